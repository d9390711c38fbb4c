r"""Audio preparation throughput on one core: decoding, log-mel, per-frame windows.

  python benchmarks/audio_prep.py [--seconds=60] [--repeats=3]

Writes a `--seconds` long track as a 16 kHz and a 44.1 kHz `.wav` and as 48 kHz stereo AAC in an
`.mp4` (YouTube's usual track), then prints, best of `--repeats`, seconds of audio processed per
second on one core (BLAS held to one thread) for `decode` of each, `log_mel`, and the
whole per-video step (decode the mp4 + log_mel); then `frame_window` (and with `spec_augment`)
calls per second, and the per-video step scaled to Aff-Wild2 (~3M frames at 30 fps, ~28 h).
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # per core: before numpy loads its BLAS

import tempfile  # noqa: E402
import time  # noqa: E402
import wave  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from abaw_jax.data import audio, video  # noqa: E402

flags.DEFINE_integer("seconds", 60, "Length of the test track.")
flags.DEFINE_integer("repeats", 3, "Best of this many timings.")
FLAGS = flags.FLAGS

AFFWILD2_HOURS = 3e6 / 30 / 3600  # ~3M annotated frames (VA) at ~30 fps


def _speech_like(seconds: float, rate: int) -> np.ndarray:
    """A pitch-varying tone with harmonics in noise: a stand-in for a voice track."""
    t = np.arange(round(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(150 + 60 * np.sin(2 * np.pi * 0.3 * t)) / rate
    x = 0.2 * (np.sin(phase) + 0.4 * np.sin(2 * phase) + 0.2 * np.sin(3 * phase))
    return x + 0.02 * np.random.default_rng(0).standard_normal(len(t))


def _write_wav(path: Path, signal: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.round(np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes())


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv):
    del argv
    seconds, repeats = FLAGS.seconds, FLAGS.repeats
    cfg = audio.AudioConfig()
    tmp = Path(tempfile.mkdtemp(prefix="bench_audio_"))
    files = {"decode_wav_16k": tmp / "a16.wav", "decode_wav_44k": tmp / "a44.wav",
             "decode_mp4_aac_48k_stereo": tmp / "v.mp4"}
    _write_wav(files["decode_wav_16k"], _speech_like(seconds, 16000), 16000)
    _write_wav(files["decode_wav_44k"], _speech_like(seconds, 44100), 44100)
    track = _speech_like(seconds, 48000)
    video.write_video(files["decode_mp4_aac_48k_stereo"], 30, seconds * 30,
                      audio=np.stack([track, 0.5 * track]), sample_rate=48000)
    for name, path in files.items():
        took = _best(lambda p=path: audio.decode(p, cfg.sample_rate), repeats)
        print(f"{name}: {seconds / took:.0f} audio-s/s")
    signal = audio.decode(files["decode_mp4_aac_48k_stereo"], cfg.sample_rate)
    took = _best(lambda: audio.log_mel(signal, cfg), repeats)
    print(f"log_mel: {seconds / took:.0f} audio-s/s")
    mp4 = files["decode_mp4_aac_48k_stereo"]
    took = _best(lambda: audio.log_mel(audio.decode(mp4, cfg.sample_rate), cfg), repeats)
    print(f"per_video: {seconds / took:.0f} audio-s/s")
    print(f"per_video_affwild2: {AFFWILD2_HOURS * 3600 * took / seconds / 60:.1f} core-minutes")
    _windows(audio.log_mel(signal, cfg), seconds, cfg, repeats)


def _windows(mel: np.ndarray, seconds: int, cfg: audio.AudioConfig, repeats: int) -> None:
    frames = np.random.default_rng(0).integers(1, seconds * 30 + 1, 20000).tolist()
    took = _best(lambda: [audio.frame_window(mel, k, 30, cfg) for k in frames], repeats)
    print(f"frame_window: {len(frames) / took:.0f} calls/s")
    rng = np.random.default_rng(0)
    took = _best(lambda: [audio.spec_augment(audio.frame_window(mel, k, 30, cfg), rng, cfg)
                          for k in frames], repeats)
    print(f"frame_window_spec_augment: {len(frames) / took:.0f} calls/s")


if __name__ == "__main__":
    app.run(main)
