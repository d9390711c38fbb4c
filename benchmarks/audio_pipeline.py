r"""What the `audio` input costs the training pipeline: frames/s of the same records with and
without it, in the main process (no workers, so the figures are one core's).

  python benchmarks/audio_pipeline.py [--records=DIR] [--batch=64] [--batches=40]

Without --records it reads the default synthetic Aff-Wild2's EXPR records (24 videos x 300
frames, raw videos with audio; built once in the data cache, $ABAW_JAX_CACHE, with the audio side
table).
Prints frames/s of images only, images + audio (the window cut from the memory-mapped table and
masked), audio only, and the cost of the audio as a share of the images-only time (goal: < 20 %).
"""

import time
from pathlib import Path

from absl import app, flags

from abaw_jax.data import audio, augment, cache, pipeline

flags.DEFINE_string("records", None, "A records folder with an audio table (default: synthetic).")
flags.DEFINE_integer("batch", 64, "Batch size.")
flags.DEFINE_integer("batches", 40, "Batches timed per configuration (after 3 warm-up).")
FLAGS = flags.FLAGS


def _records() -> Path:
    """--records, or the default synthetic Aff-Wild2's EXPR records (built once in the data
    cache, as a config without data.records or data.root gets them)."""
    return cache.records_for({"records": FLAGS.records}, "expr")


def frames_per_second(data: Path, size: int, cfg: audio.AudioConfig | None) -> float:
    stream = pipeline.train_dataset(
        data, "train", batch_size=FLAGS.batch, seed=0,
        augment_cfg=augment.AugmentConfig(size=size) if size else None, audio=cfg)
    for _ in range(3):
        next(stream)
    t0 = time.perf_counter()
    for _ in range(FLAGS.batches):
        next(stream)
    seconds = time.perf_counter() - t0
    stream.close()
    return FLAGS.batches * FLAGS.batch / seconds


def main(argv):
    del argv
    data = _records()
    cfg = audio.AudioConfig()
    print(f"records: {data}; window {cfg.window_steps} steps x {cfg.n_mels} bands")
    images = frames_per_second(data, 112, None)
    both = frames_per_second(data, 112, cfg)
    alone = frames_per_second(data, 0, cfg)
    print(f"images: {images:.0f} frames/s")
    print(f"images_and_audio: {both:.0f} frames/s")
    print(f"audio_only: {alone:.0f} frames/s")
    print(f"audio_cost: {100 * (images / both - 1):.1f} % of the images-only time")


if __name__ == "__main__":
    app.run(main)
