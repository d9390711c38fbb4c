r"""Where the MAE fusion model's pooled log-mel statistics are computed: in the data layer (the
pipeline's "audio_stats" input, what abaw_jax does) or on the device from the "audio" windows.

  python benchmarks/fusion.py [--records=DIR] [--batch=32] [--length=100] [--batches=5]

Without --records it reads the default synthetic Aff-Wild2's EXPR records (24 videos x 300
frames, raw videos with audio; built once in the data cache, $ABAW_JAX_CACHE, with the audio side
table), and writes a 768-wide random visual feature cache of them (MAE ViT-B's width) to a
temporary folder. Prints, for batches of
`batch` clips of `length` frames (the paper's 32 x 100): the bytes of a batch's audio input and
the pipeline's frames/s in the main process with windows and with statistics, and the device
time a step spends on the audio input (host-to-device copy, and the pooling for windows).
"""

import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from abaw_jax.data import audio, cache, features, pipeline, records

flags.DEFINE_string("records", None, "A records folder with an audio table (default: synthetic).")
flags.DEFINE_integer("batch", 32, "Clips per batch.")
flags.DEFINE_integer("length", 100, "Frames per clip.")
flags.DEFINE_integer("batches", 5, "Batches timed per configuration (after 1 warm-up).")
FLAGS = flags.FLAGS
WIDTH = 768


def _records() -> Path:
    """--records, or the default synthetic Aff-Wild2's EXPR records (built once in the data
    cache, as a config without data.records or data.root gets them)."""
    return cache.records_for({"records": FLAGS.records}, "expr")


def _visual_cache(data: Path) -> Path:
    out = Path(tempfile.mkdtemp(prefix="bench_fusion_cache_"))
    index = records.read_frame_index(data, "train")
    source = records.RecordSource(data, "train")
    labels = {k: np.stack([source[i][k] for i in range(len(source))])
              for k in ("va", "expr", "au", "va_mask", "expr_mask", "au_mask")}
    rng = np.random.default_rng(0)
    features.write_split(out, "train", rng.normal(size=(len(index[1]), WIDTH)), labels, *index)
    features.write_meta(out, {"source": {}}, np.zeros(WIDTH))
    return out


def _pipeline(data: Path, cache: Path, stats: bool) -> tuple[float, int]:
    """(frames/s, bytes of a batch's audio input)."""
    stream = pipeline.clip_train_dataset(
        data, "train", length=FLAGS.length, stride=FLAGS.length // 2, batch_size=FLAGS.batch,
        seed=0, augment_cfg=None, features=(cache,), audio=audio.AudioConfig(),
        audio_stats=stats)
    batch = next(stream)
    t0 = time.perf_counter()
    for _ in range(FLAGS.batches):
        batch = next(stream)
    seconds = time.perf_counter() - t0
    stream.close()
    size = batch["audio_stats" if stats else "audio"].nbytes
    return FLAGS.batches * FLAGS.batch * FLAGS.length / seconds, size


@jax.jit
def _pool(windows: jax.Array) -> jax.Array:
    return jnp.concatenate([windows.mean(-2), windows.std(-2)], -1)


def _device_ms(host: np.ndarray, pool: bool) -> float:
    """Milliseconds per batch to put the audio input on the device (and pool windows there)."""
    def once():
        x = jax.device_put(host)
        return (_pool(x) if pool else x).block_until_ready()

    once()
    t0 = time.perf_counter()
    for _ in range(FLAGS.batches):
        once()
    return (time.perf_counter() - t0) / FLAGS.batches * 1000


def main(argv):
    del argv
    data = _records()
    cache = _visual_cache(data)
    cfg = audio.AudioConfig()
    shape = (FLAGS.batch, FLAGS.length)
    print(f"records: {data}; batches of {shape[0]} clips x {shape[1]} frames; window "
          f"{cfg.window_steps} steps x {cfg.n_mels} bands")
    for name, stats in (("windows", False), ("stats", True)):
        fps, size = _pipeline(data, cache, stats)
        print(f"fusion_audio_bytes_{name}: {size} bytes")
        print(f"fusion_pipeline_{name}: {fps:.0f} frames/s")
    rng = np.random.default_rng(0)
    windows = rng.normal(-60, 10, (*shape, cfg.window_steps, cfg.n_mels)).astype(np.float32)
    print(f"fusion_device_windows_pooled: {_device_ms(windows, True):.1f} ms")
    print(f"fusion_device_stats: {_device_ms(np.asarray(_pool(windows)), False):.1f} ms")


if __name__ == "__main__":
    app.run(main)
