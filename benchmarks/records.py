r"""Record writing throughput (curate + read JPEGs + serialise + write shards + index).

  python benchmarks/records.py [--root=DIR] [--task=va] [--format=tfrecord]

Without --root it writes a synthetic Aff-Wild2 (60 videos x 500 frames) first. Prints frames/s
with all cores and with one writer process (each writer pays TensorFlow's import, a few seconds,
once; large real runs amortise it), and the cost of the cache's content key (a stat of every
annotation file and crop, `cache.source_manifest`) per file and scaled to Aff-Wild2's 3M crops.
"""

import os
import tempfile
import time
from pathlib import Path

from absl import app, flags

from abaw_jax.data import affwild2, cache, prepare, synthetic

flags.DEFINE_string("root", None, "An Aff-Wild2 tree (default: synthetic).")
flags.DEFINE_string("task", "va", "Task to write.")
flags.DEFINE_string("format", "tfrecord", "tfrecord or array_record.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    tmp = Path(tempfile.mkdtemp(prefix="bench_records_"))
    root = Path(FLAGS.root) if FLAGS.root else tmp / "tree"
    if not FLAGS.root:
        synthetic.generate(root, synthetic.SyntheticSpec(num_videos=60, frames_per_video=500,
                                                          videos=False, audio=False))
    layout = affwild2.Layout.discover(root)
    # All cores first: its pool forks before this process imports TensorFlow (the in-process
    # writer below imports it; forking a process that holds TF's threads is unsafe).
    for workers in sorted({1, os.cpu_count() or 1}, reverse=True):
        t0 = time.perf_counter()
        stats = prepare.prepare(layout, FLAGS.task, tmp / f"w{workers}", fmt=FLAGS.format,
                                num_shards=8, workers=workers, progress=False)
        seconds = time.perf_counter() - t0
        frames = sum(s["records"] for s in stats.values())
        print(f"records {FLAGS.format} w{workers}: {frames} frames in {seconds:.1f} s = "
              f"{frames / seconds:.0f} frames/s")
    best = float("inf")
    for _ in range(3):  # best of three, page cache warm (as on every run start after the first)
        t0 = time.perf_counter()
        manifest = cache.source_manifest(layout, FLAGS.task, affwild2.SPLITS)
        best = min(best, time.perf_counter() - t0)
    files = sum(v[0] if k.endswith("/") else 1 for k, v in manifest.items())
    print(f"content key: {files} files in {best * 1000:.0f} ms = {best / files * 1e6:.2f} us/file, "
          f"~{best / files * 3e6:.0f} s for 3M crops")


if __name__ == "__main__":
    app.run(main)
