r"""Curation and indexing time and peak memory on a full-size annotation set.

  python benchmarks/curation.py [--root=DIR]

Without --root it writes an annotation-only synthetic Aff-Wild2 of real size (520 raw videos, some
split into _left/_right, ~5000 frames each: ~594 annotated videos, ~3M lines per challenge; no
images, so every frame counts as missing) and curates every task and split, printing seconds,
lines/s and the process's peak RSS. Target: under 30 s and under 1 GB on 2 cores.
"""

import resource
import tempfile
import time
from pathlib import Path

from absl import app, flags

from abaw_jax.data import affwild2, synthetic

flags.DEFINE_string("root", None, "An Aff-Wild2 tree (default: a full-size annotation-only one).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    root = Path(FLAGS.root) if FLAGS.root else None
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="bench_curation_"))
        t0 = time.perf_counter()
        synthetic.generate(root, synthetic.SyntheticSpec(
            num_videos=520, frames_per_video=5000, images=False, videos=False, audio=False))
        (root / "cropped_aligned").mkdir(exist_ok=True)
        print(f"generated annotations in {time.perf_counter() - t0:.1f} s: {root}")
    layout = affwild2.Layout.discover(root)
    index = affwild2.ImageIndex(layout.image_roots)
    total_lines, t_all = 0, time.perf_counter()
    for task in affwild2.ALL_TASKS:
        for split in affwild2.SPLITS:
            t0 = time.perf_counter()
            _, stats = affwild2.curate(layout, task, split, index=index)
            dt = time.perf_counter() - t0
            total_lines += stats["annotated"]
            print(f"curate {task:<4} {split:<10}: {stats['annotated']:>9,} lines, "
                  f"{stats['videos']:>4} videos in {dt:6.2f} s ({stats['annotated'] / dt:,.0f} "
                  "lines/s)")
    seconds = time.perf_counter() - t_all
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"curation total: {total_lines:,} lines in {seconds:.1f} s; peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    app.run(main)
