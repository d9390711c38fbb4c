"""Audio of the raw videos: decoding (PyAV), log-mel spectrograms and per-frame windows (numpy).

A video's track is decoded once, downmixed to mono, resampled and turned into a log-mel
spectrogram (`log_mel`: librosa's `melspectrogram` with Slaney mel filters, in absolute dB) at
prepare time. Per frame, `frame_window` cuts the `window_steps` spectrogram steps centred on the
frame's timestamp, padded with `SILENCE_DB` past the track's edges; `spec_augment` masks bands and
steps of it for training. Both run per frame inside data workers: a slice and a few numpy calls.

Plain numpy, PyAV and the standard library only: no jax in data modules.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import av
import numpy as np

from abaw_jax.data.affwild2 import DataError
from abaw_jax.data.video import ffmpeg_reason
from abaw_jax.errors import ConfigError

AMIN = 1e-10  # the power floor of the dB conversion (librosa's power_to_db default)
SILENCE_DB = 10.0 * math.log10(AMIN)  # -100 dB: the floor of log_mel, and the padding value
MISSING = ("silence", "error")
# A decoded track may end a codec frame short of its header's duration (AAC: 1,024 samples, 64 ms
# at 16 kHz); a shortfall beyond this is a truncated file.
_TRUNCATION_SLACK_S = 0.1
_BLOCK_STEPS = 2048  # spectrogram steps per FFT batch: bounds the float64 frames at ~8 MB


class NoAudioError(DataError):
    """A video without an audio track (the message names the file)."""


class PastEndError(DataError):
    """A frame whose timestamp lies past the end of its video's audio (`missing="error"`)."""


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    """`data.audio.*`: the log-mel parameters, the per-frame window and its augmentation."""

    sample_rate: int = 16000
    stft_ms: float = 25.0  # STFT window (Hann)
    hop_ms: float = 10.0
    n_mels: int = 64
    n_fft: int = 512  # >= the window's samples
    fmin: float = 0.0
    fmax: float | None = None  # None: sample_rate / 2
    window_ms: float = 1000.0  # per-frame context cut around the frame's timestamp
    missing: str = "silence"  # "silence" | "error": no audio track, or a frame past the end
    freq_masks: int = 2  # SpecAugment-style augmentation (train only)
    freq_mask_bands: int = 8  # max width of each frequency mask
    time_masks: int = 2
    time_mask_steps: int = 10  # max width of each time mask, in hops

    def __post_init__(self):
        problem = _config_problem(self)
        if problem:
            raise ConfigError(f"data.audio: {problem}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> AudioConfig:
        """From `data.audio` (a dict or ConfigDict); unknown keys are a `ConfigError`."""
        cfg = dict(cfg or {})
        unknown = set(cfg) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown data.audio keys {sorted(unknown)}; known: "
                              f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**cfg)

    @property
    def win_samples(self) -> int:
        return round(self.stft_ms * self.sample_rate / 1000)

    @property
    def hop_samples(self) -> int:
        return round(self.hop_ms * self.sample_rate / 1000)

    @property
    def hop_seconds(self) -> float:
        """The true hop (`hop_samples / sample_rate`), which `hop_ms` may round to."""
        return self.hop_samples / self.sample_rate

    @property
    def max_freq(self) -> float:
        return self.sample_rate / 2 if self.fmax is None else float(self.fmax)

    @property
    def window_steps(self) -> int:
        """Steps per per-frame window: the odd count nearest to `window_ms` in hops (the larger
        on a tie: 1000 ms of 10 ms hops -> 101), so that there is a centre step."""
        return 2 * math.floor(self.window_ms / self.hop_ms / 2) + 1

    def key(self) -> dict:
        """The fields that change the stored log-mel (for cache keys); fmax resolved."""
        return {"sample_rate": self.sample_rate, "stft_ms": self.stft_ms, "hop_ms": self.hop_ms,
                "n_mels": self.n_mels, "n_fft": self.n_fft, "fmin": self.fmin,
                "fmax": self.max_freq}


def _config_problem(cfg: AudioConfig) -> str | None:
    if cfg.sample_rate <= 0 or cfg.hop_samples < 1 or cfg.win_samples < 1:
        return (f"sample_rate={cfg.sample_rate}, stft_ms={cfg.stft_ms} and hop_ms={cfg.hop_ms} "
                "must give at least one sample each")
    if cfg.n_fft < cfg.win_samples:
        return (f"n_fft={cfg.n_fft} is shorter than the {cfg.stft_ms} ms window "
                f"({cfg.win_samples} samples)")
    if not 0 <= cfg.fmin < cfg.max_freq <= cfg.sample_rate / 2:
        return (f"fmin={cfg.fmin}, fmax={cfg.fmax}: expected 0 <= fmin < fmax <= "
                f"sample_rate / 2 = {cfg.sample_rate / 2:g}")
    if cfg.n_mels < 1 or cfg.window_ms < 0:
        return f"n_mels={cfg.n_mels} and window_ms={cfg.window_ms} must be positive"
    if cfg.missing not in MISSING:
        return f"missing={cfg.missing!r}; expected one of {MISSING}"
    if min(cfg.freq_masks, cfg.freq_mask_bands, cfg.time_masks, cfg.time_mask_steps) < 0:
        return "the mask counts and widths must be >= 0"
    return None


# ----------------------------------------------------------------------------------------------
# Decoding


def decode(path: Path, sample_rate: int) -> np.ndarray:
    """The audio of a `.wav` or a video's first audio track: mono float32 at `sample_rate`.

    FFmpeg (`av.AudioResampler`) resamples; the channels are averaged here, because FFmpeg's own
    stereo-to-mono downmix weighs each channel by 1/sqrt(2) (a 0.5 tone in both channels came out
    at 0.71). Sample 0 is the time of the video's first frame: a track that starts later is
    padded with zeros at the front, one that starts earlier is cut.

    No audio track: `NoAudioError`. A file FFmpeg cannot open or decode is a `DataError` naming
    it, and so is a truncated one: a track that decodes to less than its header declares is not
    returned in part (FFmpeg stops quietly at the cut of an `.mp4` whose index is at the front;
    half of a 4 s file decoded to 1.79 s without an error), so a short track always means a
    short recording.
    """
    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise NoAudioError(f"{path}: no audio track")
            stream = container.streams.audio[0]
            start, declared = _video_start(container), _declared_seconds(stream)
            chunks, first = _decode_stream(container, stream, sample_rate)
    except av.error.FFmpegError as e:
        raise DataError(f"{path}: cannot decode the audio ({ffmpeg_reason(e)})") from e
    signal = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if declared is not None and len(signal) / sample_rate < declared - _TRUNCATION_SLACK_S:
        raise DataError(f"{path}: truncated: the audio track decodes to "
                        f"{len(signal) / sample_rate:.2f} s of the {declared:.2f} s its header "
                        "declares")
    lead = round(((first if first is not None else start) - start) * sample_rate)
    signal = np.pad(signal, (lead, 0)) if lead > 0 else signal[-lead:]
    return np.clip(signal, -1.0, 1.0).astype(np.float32, copy=False)


def _declared_seconds(stream) -> float | None:
    return float(stream.duration * stream.time_base) if stream.duration else None


def _video_start(container) -> float:
    """Seconds of the first video frame on the container's clock (0 without a video stream)."""
    if not container.streams.video:
        return 0.0
    stream = container.streams.video[0]
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def _decode_stream(container, stream, sample_rate: int) -> tuple[list[np.ndarray], float | None]:
    """Mono (channel mean) float32 chunks at `sample_rate`, and the first frame's time (s)."""
    resampler = av.AudioResampler(format="fltp", rate=sample_rate)  # layout kept: averaged below
    chunks, first = [], None
    for frame in container.decode(stream):
        if first is None and frame.time is not None:
            first = float(frame.time)
        chunks.extend(f.to_ndarray().mean(axis=0) for f in resampler.resample(frame))
    chunks.extend(f.to_ndarray().mean(axis=0) for f in resampler.resample(None))
    return chunks, first


# ----------------------------------------------------------------------------------------------
# Log-mel spectrogram


def log_mel(signal: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    """(steps, n_mels) float32 dB of a mono signal at `cfg.sample_rate`.

    As librosa's `melspectrogram(center=True, pad_mode="constant", power=2)` with a periodic Hann
    window of `stft_ms`, Slaney mel filters, then `10 * log10(max(power, 1e-10))` with no
    reference: absolute dB, comparable across videos. Step i is centred on i * hop; there are
    `1 + len(signal) // hop` steps (even n_fft).
    """
    x = np.asarray(signal, np.float64).reshape(-1)
    hop, win, n_fft = cfg.hop_samples, cfg.win_samples, cfg.n_fft
    steps = 1 + (len(x) + 2 * (n_fft // 2) - n_fft) // hop
    # Zero padding of n_fft // 2 each side centres step i's FFT frame on sample i * hop; only the
    # window's own samples are read (its zero-padded ends shift the phase, not the power).
    offset = (n_fft - win) // 2
    x = np.pad(x, (n_fft // 2 - offset, n_fft // 2))
    frames = np.lib.stride_tricks.sliding_window_view(x, win)[: (steps - 1) * hop + 1: hop]
    window = _hann(win)
    weights = _mel_filters(cfg.sample_rate, n_fft, cfg.n_mels, cfg.fmin, cfg.max_freq)
    out = np.empty((steps, cfg.n_mels), np.float32)
    for lo in range(0, steps, _BLOCK_STEPS):
        spectrum = np.fft.rfft(frames[lo: lo + _BLOCK_STEPS] * window, n=n_fft)
        power = spectrum.real ** 2 + spectrum.imag ** 2
        out[lo: lo + _BLOCK_STEPS] = 10.0 * np.log10(np.maximum(power @ weights, AMIN))
    return out


@functools.cache
def _hann(n: int) -> np.ndarray:
    """The periodic Hann window (scipy's `get_window("hann", n)`, librosa's default)."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (librosa, htk=False)."""
    f = np.asarray(f, np.float64)
    linear = f / (200.0 / 3)
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27),
                    linear)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27) * (m - 15.0)), m * 200.0 / 3)


@functools.cache
def _mel_filters(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float
                 ) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) Slaney-normalised triangular filters (librosa.filters.mel)."""
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    ramps = edges[:, None] - freqs[None, :]
    widths = np.diff(edges)
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return np.ascontiguousarray(weights.T)


# ----------------------------------------------------------------------------------------------
# Per-frame windows


def frame_time(frame: int, fps: float) -> float:
    """Seconds of a 1-based frame number (file `00001.jpg` is at 0 s)."""
    return (frame - 1) / fps


def centre_step(frame: int, fps: float, cfg: AudioConfig) -> int:
    """The spectrogram step nearest to `frame_time(frame, fps)`."""
    return math.floor(frame_time(frame, fps) / cfg.hop_seconds + 0.5)


def past_end(steps: int, frame: int, fps: float, cfg: AudioConfig) -> bool:
    """Whether a frame's centre step lies past the last of `steps` (a track shorter than the
    video, or none: steps = 0)."""
    return centre_step(frame, fps, cfg) >= steps


def frame_window(mel: np.ndarray, frame: int, fps: float, cfg: AudioConfig) -> np.ndarray:
    """(cfg.window_steps, n_mels) float32: the steps of `mel` centred on the frame's timestamp,
    `SILENCE_DB` past either edge. A frame past the end (`past_end`) with `cfg.missing="error"` is
    a `PastEndError`; with "silence" it gets what of the track its window reaches, padded.
    """
    if frame < 1:
        raise ValueError(f"frame numbers are 1-based, got {frame}")
    size, centre = cfg.window_steps, centre_step(frame, fps, cfg)
    if cfg.missing == "error" and centre >= len(mel):
        raise PastEndError(f"frame {frame} at {frame_time(frame, fps):.3f} s is past the end of "
                           f"the audio ({len(mel)} steps of {cfg.hop_seconds * 1000:g} ms)")
    lo = centre - size // 2
    if 0 <= lo and lo + size <= len(mel):
        return np.array(mel[lo: lo + size], np.float32)
    out = np.full((size, cfg.n_mels), SILENCE_DB, np.float32)
    a, b = max(lo, 0), min(lo + size, len(mel))
    if a < b:
        out[a - lo: b - lo] = mel[a:b]
    return out


def silence(cfg: AudioConfig) -> np.ndarray:
    """(cfg.window_steps, n_mels) float32 of `SILENCE_DB`: a window without sound (padding
    frames, videos without audio)."""
    return np.full((cfg.window_steps, cfg.n_mels), SILENCE_DB, np.float32)


def window_stats(window: np.ndarray) -> np.ndarray:
    """(2 * n_mels,) float32: each mel band's mean, then its standard deviation, over the steps
    of a (steps, n_mels) window in dB: the pooled log-mel statistics of a frame (the
    "audio_stats" input of the MAE fusion model when no audio feature cache is given)."""
    window = np.asarray(window, np.float32)
    return np.concatenate([window.mean(0), window.std(0)])


def spec_augment(window: np.ndarray, rng: np.random.Generator, cfg: AudioConfig) -> np.ndarray:
    """A copy of a (steps, n_mels) window with `freq_masks` bands of up to `freq_mask_bands` mel
    bins and `time_masks` runs of up to `time_mask_steps` steps set to `SILENCE_DB` (masks may
    overlap; each width is uniform in [0, max], the start uniform over where it fits)."""
    out = np.array(window, np.float32)
    steps, bands = out.shape
    # One generator call for every draw, scalar arithmetic after: 10 us per default window
    # against 16 us with two `rng.integers` calls per mask (the cut itself: ~5 us).
    draws = iter(rng.random(2 * (cfg.freq_masks + cfg.time_masks)).tolist())
    for _ in range(cfg.freq_masks):
        lo, hi = _span(next(draws), next(draws), cfg.freq_mask_bands, bands)
        out[:, lo:hi] = SILENCE_DB
    for _ in range(cfg.time_masks):
        lo, hi = _span(next(draws), next(draws), cfg.time_mask_steps, steps)
        out[lo:hi] = SILENCE_DB
    return out


def _span(u: float, v: float, widest: int, length: int) -> tuple[int, int]:
    """(start, end) of a mask from two uniform [0, 1) draws: width uniform in 0..widest (at most
    `length`), start uniform over where it fits."""
    width = int(u * (min(widest, length) + 1))
    start = int(v * (length - width + 1))
    return start, start + width
