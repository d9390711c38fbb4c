"""Synthetic Aff-Wild2: the real on-disk layout, a learnable planted signal and real-file dirt.

The tree stands in for the licensed dataset in the default training run, the tests and the
benchmarks (layout: ../shared/specs/affwild2_format.md). Every frame has latent valence/arousal,
expression and AU labels, and its face crop is rendered from all of them, so any task can be learnt
from any video. Each challenge's annotation file writes its task's labels with invalid markers
planted at known rates; the exact planted counts go to manifest.json so tests can check a reader's
curation against them.

Raw videos: videos/<raw>.mp4 (H.264 + AAC; one raw video .avi: MPEG-4 + PCM), the face crops of
each frame pasted into a plain frame, at a reduced size (video_info.csv and the manifest give the
size written). Their sound carries arousal (pitch and loudness of a voice-like tone) and the
expression class (a tone of the class's own frequency while its segment lasts), silent in pauses
(two fifths of the time, in runs longer than the audio input's window); a two-person video's
sound follows its _left person. Most videos also have videos/<raw>.wav; some have audio only as
the track, some none at all, one another sample rate (manifest.json: "raw_videos").

Determinism: each raw video draws from its own SeedSequence([seed, 1, index, track, purpose]) and
the global choices from SeedSequence([seed, 0]) (pairs, splits, challenge membership, file dirt)
and SeedSequence([seed, 2]) (containers and audio: a separate stream, so adding them changed no
annotation), so a spec writes byte-identical files whatever the number of workers or the order of
work (the encoders run single-threaded for that).

No jax here: data modules run inside data-loader worker processes.

CLI: python -m abaw_jax.data.synthetic --out=DIR [--videos=24] [--frames=300] [--size=112]
     [--seed=0] [--noimages] [--novideos] [--noaudio] [--workers=N]
"""

import copy
import dataclasses
import functools
import itertools
import json
import math
import multiprocessing
import os
import shutil
import time
import wave
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
from absl import app, flags
from tqdm import tqdm

from abaw_jax.data.affwild2 import (
    CHALLENGE_DIRS,
    EXPR_NAMES,
    MTL_FILES,
    SPLIT_DIRS,
    SPLITS,
    TASKS,
)
from abaw_jax.data.affwild2 import HEADERS as _HEADERS
from abaw_jax.data.affwild2 import MTL_HEADER as _MTL_HEADER

MTL_DIR = CHALLENGE_DIRS["mtl"]
EXPRESSIONS = EXPR_NAMES
HEADERS = {task: ",".join(names) for task, names in _HEADERS.items()}
MTL_HEADER = ",".join(_MTL_HEADER)
IMAGE_ROOTS = ("cropped_aligned", "cropped_aligned_new")
INVALID_VA = -5.0
INVALID_CLASS = -1

# Rates of the dirt that the spec does not expose (shares of annotation files).
_SPACES_FRACTION = 0.15
_NO_FINAL_NEWLINE_FRACTION = 0.1
_TRAILING_BLANK_FRACTION = 0.05
_ALT_SIZE_FRACTION = 0.1  # videos whose crops have another size, so readers must resize
_PARTIAL_FRACTION = 0.25  # annotated videos in only one or two challenges
# Invalid labels come in runs (min, max frames), as in the real files: EXPR has long unlabelled
# stretches, VA/AU shorter ones. Missing crops are face-detector gaps of 1-10 frames.
_INVALID_RUNS = {"va": (1, 25), "expr": (5, 60), "au": (1, 25)}
_MISSING_RUN = (1, 10)
# Class prior of the expression segments: all 8 present, moderately imbalanced like Aff-Wild2.
_EXPR_PRIOR = (0.22, 0.07, 0.05, 0.06, 0.2, 0.14, 0.1, 0.16)
_AU_BASE_RATES = (0.15, 0.1, 0.2, 0.3, 0.4, 0.35, 0.38, 0.08, 0.06, 0.05, 0.5, 0.2)
_RESOLUTIONS = ((640, 360), (854, 480), (1280, 720), (1920, 1080), (480, 360))
# Below this many frames to render, starting worker processes costs more than it saves.
_MIN_POOL_FRAMES = 3000
_ANNOTATION_ONLY_COST = 1 / 40  # cost of an annotation-only frame relative to a rendered one

# Purposes of the per-video random streams: each has its own, so that e.g. images=False does not
# change the annotations.
_META, _LABELS, _DIRT, _MTL_DIRT, _RENDER, _AUDIO, _VIDEO = range(7)

# --- Raw videos and their sound.
_NO_AUDIO_FRACTION = 0.1  # raw videos without any audio (at least one from 4 videos)
_TRACK_ONLY_FRACTION = 0.2  # of those with audio: the track only, no .wav beside the video
_ODD_SAMPLE_RATE = 22050  # exactly one video with audio has this rate, in its track and wav
# Rates AAC takes, high enough for the cue tones below (the odd rate is not the spec's).
SAMPLE_RATES = (8000, 11025, 12000, 16000, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
# Containers: extension -> (video codec, its options, audio codec, its options). The encoders run
# single-threaded: their output then depends on nothing but the input (x264's frame threads
# change the bytes). x264 ultrafast with B-frames (so readers meet reordered timestamps): 0.15 ms
# a 298x168 frame against 0.36 for veryfast; AAC's fast coder halves its cost. PCM in the AVI:
# MP3 there starts 1105 samples late (no edit list to say so) and shifted the video by a frame.
_CONTAINERS = {
    "mp4": (
        "libx264",
        {"preset": "ultrafast", "crf": "30", "x264-params": "bframes=2"},
        "aac",
        {"aac_coder": "fast"},
    ),
    "avi": ("mpeg4", {"qmax": "4"}, "pcm_s16le", {}),
}
# Expression cue: class k sounds a tone at _EXPR_TONES[k] Hz (detuned per video by up to
# _TONE_DETUNE) while its segment lasts, above the arousal voice (fundamental 90-210 Hz, one
# harmonic) and below 4 kHz (the Nyquist frequency of 8 kHz). Neighbours are 4 bands apart on a
# 64-band mel scale to 8 kHz, and still 2.6 when detuned towards each other.
_EXPR_TONES = (500, 700, 950, 1250, 1600, 2000, 2500, 3100)
_TONE_DETUNE = 0.04
# Speech in runs of 1.5-4 s on average, pauses of 1-2.7 s: longer than the 1-s window the audio
# input reads, so a pause leaves frames whose window is silent and only the face tells their
# expression (with 2-10-frame pauses the sound gave 92 % of the frames' class: a fused
# audio-visual model could not beat its audio branch).
_SPEAKING_SHARE = 0.6
_SPEAKING_RUNS = (45, 120)  # frames: the range of mean speech-run lengths (a video draws one)

# --- Face drawing, in units of the face scale u (fractions of the crop size) around its centre.
_SKIN_TONES = ((150, 180, 225), (120, 160, 210), (95, 130, 185), (70, 100, 150), (50, 75, 115))
# Eyebrow offsets (left inner, left outer, right inner, right outer); positive = lower.
_BROWS = (
    (0.0, 0.0, 0.0, 0.0),  # Neutral
    (0.035, -0.02, 0.035, -0.02),  # Anger: V shape
    (0.025, 0.025, 0.025, 0.025),  # Disgust: lowered
    (-0.035, 0.0, -0.035, 0.0),  # Fear: inner raised
    (-0.01, -0.01, -0.01, -0.01),  # Happiness: slightly raised
    (-0.03, 0.03, -0.03, 0.03),  # Sadness: inner up, outer down
    (-0.04, -0.04, -0.04, -0.04),  # Surprise: high
    (-0.03, -0.03, 0.025, 0.025),  # Other: asymmetric
)
_CLASS_COLOURS = (
    (150, 150, 150),
    (40, 40, 220),
    (40, 160, 40),
    (160, 40, 140),
    (40, 220, 230),
    (200, 90, 30),
    (30, 140, 250),
    (210, 200, 40),
)
# Centre(s) of each AU's mark, near the anatomical location and clear of the other features.
AU_MARKS = (
    ((0.0, -0.175),),  # AU1 inner brow raiser
    ((-0.22, -0.225), (0.22, -0.225)),  # AU2 outer brow raiser
    ((0.0, -0.095),),  # AU4 brow lowerer
    ((-0.24, 0.06), (0.24, 0.06)),  # AU6 cheek raiser
    ((-0.13, 0.045), (0.13, 0.045)),  # AU7 lid tightener
    ((0.0, 0.105),),  # AU10 upper lip raiser
    ((-0.185, 0.16), (0.185, 0.16)),  # AU12 lip corner puller
    ((-0.15, 0.29), (0.15, 0.29)),  # AU15 lip corner depressor
    ((-0.075, 0.29), (0.075, 0.29)),  # AU23 lip tightener
    ((0.0, 0.29),),  # AU24 lip pressor
    ((-0.06, 0.355),),  # AU25 lips part
    ((0.06, 0.355),),  # AU26 jaw drop
)
_AU_COLOUR = (110, 30, 30)
_AU_RADIUS = 0.025
_FACE_AXES = (0.34, 0.42)
_FOREHEAD = (0.0, -0.29)


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    num_videos: int = 24  # raw videos; some become _left/_right pairs (two annotated "videos")
    frames_per_video: int = 300  # mean; each video's length is drawn in [0.5, 1.5] x this
    image_size: int = 112  # crop size; about 10 % of the videos use 8/7 of it (128 for 112)
    seed: int = 0
    val_fraction: float = 0.25  # share of annotated raw videos in Validation_Set
    test_fraction: float = 0.1  # share of raw videos that are test videos (crops, no labels)
    invalid_va_rate: float = 0.02  # share of VA lines written with -5
    invalid_expr_rate: float = 0.10  # share of EXPR lines written as -1
    invalid_au_rate: float = 0.03  # share of AU lines with -1 in at least one column
    missing_crop_rate: float = 0.03  # share of frames without a jpg, in runs of 1-10 frames
    pair_fraction: float = 0.15  # share of raw videos with two people -> _left, _right
    second_root_fraction: float = 0.2  # share of videos whose crops go to cropped_aligned_new/
    crlf_fraction: float = 0.3  # share of annotation files with Windows line endings
    mtl_stride: int = 5  # s-Aff-Wild2 takes every k-th frame of the MTL videos
    images: bool = True  # False: no jpg crops (annotations only, with videos=audio=False)
    videos: bool = True  # raw videos (False: no video files; the .wavs then cover every voice)
    audio: bool = True  # False: no audio at all (no tracks, no .wavs)
    sample_rate: int = 44100  # of every voiced video but one (_ODD_SAMPLE_RATE); in SAMPLE_RATES

    def invalid_rates(self) -> dict[str, float]:
        return {
            "va": self.invalid_va_rate,
            "expr": self.invalid_expr_rate,
            "au": self.invalid_au_rate,
        }


@dataclasses.dataclass(frozen=True)
class _FileStyle:
    newline: str = "\n"
    sep: str = ","
    tail: str = "\n"  # after the last line: "" (no final newline), newline, or a blank line


@dataclasses.dataclass(frozen=True)
class _Track:
    """One annotated "video": a raw video, or one person of a two-person raw video."""

    name: str
    index: int  # 0: the only (or left) person, 1: the right person
    num_frames: int
    size: int
    image_root: str
    challenges: dict[str, str]  # "va"/"expr"/"au"/"mtl" -> "train" | "validation" | "test"
    styles: dict[str, _FileStyle]  # per annotated challenge


@dataclasses.dataclass(frozen=True)
class _Media:
    """What a raw video is written as: its file, frame size and audio (as the spec allows)."""

    file: str | None  # "videos/<raw>.mp4" or ".avi", relative to the root; None: no video
    width: int  # frame size written (video_info.csv's): the name's, scaled (_frame_size)
    height: int
    sample_rate: int | None  # None: no audio at all
    track: bool  # an audio stream in the video file
    wav: str | None  # "videos/<raw>.wav"


@dataclasses.dataclass(frozen=True)
class _RawVideo:
    index: int
    name: str
    fps: int
    width: int  # the resolution of the name
    height: int
    tracks: tuple[_Track, ...]
    media: _Media


@dataclasses.dataclass(frozen=True)
class _Labels:
    va: np.ndarray  # (n, 2) float valence, arousal in [-1, 1]
    expr: np.ndarray  # (n,) int 0..7
    au: np.ndarray  # (n, 12) int8 0/1

    def rows(self, index: np.ndarray) -> "_Labels":
        return _Labels(self.va[index], self.expr[index], self.au[index])


@dataclasses.dataclass(frozen=True)
class _Identity:
    skin: tuple[float, float, float]
    background: tuple[float, float, float]  # per-channel tint of the arousal-driven background
    x: float  # face centre, fraction of the crop size
    y: float
    scale: float


# --------------------------------------------------------------------------------------------
# Random helpers


def _stream(seed: int, raw: int, track: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, 1, raw, track, purpose]))


def _count(n: int, rate: float, at_least_one: bool = False) -> int:
    count = int(n * rate + 0.5)
    if at_least_one and rate > 0:
        count = max(count, 1)
    return min(count, n)


def _exact(rng: np.random.Generator, n: int, rate: float, at_least_one: bool = False) -> np.ndarray:
    """Boolean mask with exactly _count(n, rate) True, at random places."""
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[: _count(n, rate, at_least_one)]] = True
    return mask


def _runs_mask(
    rng: np.random.Generator,
    n: int,
    rate: float,
    run: tuple[int, int],
    base: np.ndarray | None = None,
) -> np.ndarray:
    """Mask with exactly round(rate * n) True (at least those of base), placed as runs."""
    mask = np.zeros(n, bool) if base is None else base.copy()
    target = max(_count(n, rate), int(mask.sum()))
    covered = int(mask.sum())
    while covered < target:
        start = int(rng.integers(0, n))
        span = np.arange(start, min(n, start + int(rng.integers(run[0], run[1] + 1))))
        free = span[~mask[span]][: target - covered]
        mask[free] = True
        covered += free.size
    return mask


# --------------------------------------------------------------------------------------------
# Planning: every choice that spans videos, made once in the main process


def _raw_meta(spec: SyntheticSpec, index: int) -> tuple[str, int, int, int, tuple[int, int]]:
    """Name, fps, resolution and the frame counts of both possible people of a raw video."""
    rng = _stream(spec.seed, index, 0, _META)
    fps = int(rng.choice((25, 30)))
    width, height = _RESOLUTIONS[int(rng.integers(len(_RESOLUTIONS)))]
    low = max(1, math.ceil(0.5 * spec.frames_per_video))
    num_frames = int(rng.integers(low, max(low, int(1.5 * spec.frames_per_video)) + 1))
    # The second person usually leaves the shot a little before the end.
    second = num_frames - int(rng.integers(0, num_frames // 20 + 1))
    pattern = int(rng.choice(3, p=(0.6, 0.25, 0.15)))
    number = index + 1
    name = (f"{number}-{fps}-{width}x{height}", f"video{number}", f"video{number}_1")[pattern]
    return name, fps, width, height, (num_frames, second)


def _raw_splits(rng: np.random.Generator, spec: SyntheticSpec) -> list[str]:
    n = spec.num_videos
    n_test = min(_count(n, spec.test_fraction, at_least_one=n >= 3), n - 1)
    n_annotated = n - n_test
    n_val = min(
        _count(n_annotated, spec.val_fraction, at_least_one=n_annotated >= 2), n_annotated - 1
    )
    splits = ["train"] * n
    order = rng.permutation(n)
    for i in order[:n_test]:
        splits[i] = "test"
    for i in order[n_test : n_test + n_val]:
        splits[i] = "validation"
    return splits


_PARTIAL_SUBSETS = [c for k in (1, 2) for c in itertools.combinations(TASKS, k)]


def _memberships(rng: np.random.Generator, splits: list[str]) -> list[dict[str, str]]:
    """Challenges (and MTL) of each track; the first train and validation track are in all."""
    annotated = [k for k, split in enumerate(splits) if split != "test"]
    anchors = {next((k for k in annotated if splits[k] == s), None) for s in SPLITS}
    candidates = np.array([k for k in annotated if k not in anchors], int)
    partial = set(candidates[_exact(rng, candidates.size, _PARTIAL_FRACTION)].tolist())
    memberships = []
    for k, split in enumerate(splits):
        if k in partial:
            subset = _PARTIAL_SUBSETS[int(rng.integers(len(_PARTIAL_SUBSETS)))]
            memberships.append({task: split for task in subset})
        else:  # in every challenge, hence in s-Aff-Wild2 too (test videos in every test list)
            memberships.append({task: split for task in (*TASKS, "mtl")})
    return memberships


def _file_styles(rng: np.random.Generator, n: int, crlf_fraction: float) -> list[_FileStyle]:
    crlf = _exact(rng, n, crlf_fraction, at_least_one=True)
    spaces = _exact(rng, n, _SPACES_FRACTION, at_least_one=True)
    order = rng.permutation(n)
    no_final = set(order[: _count(n, _NO_FINAL_NEWLINE_FRACTION, True)].tolist())
    blank = set(order[len(no_final) :][: _count(n, _TRAILING_BLANK_FRACTION, True)].tolist())
    styles = []
    for k in range(n):
        newline = "\r\n" if crlf[k] else "\n"
        tail = "" if k in no_final else newline * 2 if k in blank else newline
        styles.append(_FileStyle(newline, ", " if spaces[k] else ",", tail))
    return styles


def _plan(spec: SyntheticSpec) -> tuple[list[_RawVideo], dict[str, _FileStyle]]:
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 0]))
    metas = [_raw_meta(spec, i) for i in range(spec.num_videos)]
    raw_splits = _raw_splits(rng, spec)
    pairs = _exact(rng, spec.num_videos, spec.pair_fraction)
    keys = [(i, t) for i in range(spec.num_videos) for t in range(2 if pairs[i] else 1)]
    memberships = _memberships(rng, [raw_splits[i] for i, _ in keys])
    alt_size = _exact(rng, len(keys), _ALT_SIZE_FRACTION, at_least_one=len(keys) >= 5)
    second_root = _exact(rng, len(keys), spec.second_root_fraction, at_least_one=True)
    files = [
        (k, task) for k, m in enumerate(memberships) for task in TASKS if m.get(task) in SPLITS
    ]
    styles: list[dict[str, _FileStyle]] = [{} for _ in keys]
    file_styles = _file_styles(rng, len(files), spec.crlf_fraction)
    for (k, task), style in zip(files, file_styles, strict=True):
        styles[k][task] = style
    mtl_styles = {
        s: _FileStyle(newline="\r\n" if rng.random() < spec.crlf_fraction else "\n") for s in SPLITS
    }

    tracks: list[list[_Track]] = [[] for _ in metas]
    for k, (i, t) in enumerate(keys):
        name = metas[i][0] + (("_left", "_right")[t] if pairs[i] else "")
        size = round(spec.image_size * 8 / 7) if alt_size[k] else spec.image_size
        root = IMAGE_ROOTS[int(second_root[k])]
        tracks[i].append(_Track(name, t, metas[i][4][t], size, root, memberships[k], styles[k]))
    media = _media_plan(spec, metas)
    raws = [
        _RawVideo(i, m[0], m[1], m[2], m[3], tuple(tracks[i]), media[i])
        for i, m in enumerate(metas)
    ]
    return raws, mtl_styles


def _frame_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """The named resolution scaled to 1.5 crops high, even (for 4:2:0 chroma).

    The picture is only pasted crops: full HD would cost 40x the pixels of 298x168, and 2 crops
    high (398x224) cost 1.25x the CPU of this size (whole generation, videos only).
    """
    scale = 1.5 * image_size / height
    return 2 * round(width * scale / 2), 2 * round(height * scale / 2)


def _media_plan(spec: SyntheticSpec, metas: list[tuple]) -> list[_Media]:
    """Container, frame size and audio of each raw video; the choices ignore spec.videos/audio."""
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 2]))
    n = spec.num_videos
    voiced = np.flatnonzero(~_exact(rng, n, _NO_AUDIO_FRACTION, at_least_one=n >= 4))
    order = rng.permutation(voiced).tolist()  # the odd rate first, then the track-only ones
    odd = set(order[:1]) if len(order) >= 2 else set()
    rest = order[len(odd) :]
    track_only = set(rest[: _count(len(rest), _TRACK_ONLY_FRACTION, len(rest) >= 2)])
    # The .avi has audio when any video has: its decoder path is then exercised too.
    avi = int(rng.choice(voiced if voiced.size else n)) if n >= 2 else -1
    media = []
    for i, (name, _, width, height, _) in enumerate(metas):
        voice = spec.audio and i in voiced
        track = voice and spec.videos
        wav = voice and not (track and i in track_only)
        rate = (_ODD_SAMPLE_RATE if i in odd else spec.sample_rate) if voice else None
        file = f"videos/{name}.{'avi' if i == avi else 'mp4'}" if spec.videos else None
        size = _frame_size(width, height, spec.image_size)
        media.append(_Media(file, *size, rate, track, f"videos/{name}.wav" if wav else None))
    return media


# --------------------------------------------------------------------------------------------
# Latent labels and planted dirt


def _smooth_trajectory(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n)
    periods = rng.uniform(40, 600, 3)
    amplitudes = rng.uniform(0.15, 0.45, 3)
    phases = rng.uniform(0, 2 * np.pi, 3)
    waves = amplitudes[:, None] * np.sin(2 * np.pi * t / periods[:, None] + phases[:, None])
    return np.clip(rng.uniform(-0.3, 0.3) + waves.sum(0), -1, 1)


def _expr_segments(rng: np.random.Generator, n: int) -> np.ndarray:
    lengths = rng.integers(20, 81, n // 20 + 1)
    classes = rng.choice(len(EXPRESSIONS), lengths.size, p=_EXPR_PRIOR)
    return np.repeat(classes, lengths)[:n]


def _binary_chain(rng: np.random.Generator, n: int, rate: float,
                  on_means: tuple[float, float] = (8, 40)) -> np.ndarray:
    """Two-state Markov chain with stationary share `rate` of ones, built from geometric runs
    whose mean length of ones is drawn in `on_means` (frames)."""
    on_mean = rng.uniform(*on_means)
    off_mean = on_mean * (1 - rate) / rate
    pairs = int(n / (on_mean + off_mean)) + 4
    while True:
        on = rng.geometric(1 / on_mean, pairs)
        off = rng.geometric(min(1.0, 1 / off_mean), pairs)
        if on.sum() + off.sum() >= n:
            break
        pairs *= 2
    first = int(rng.random() < rate)
    runs = np.stack([on, off] if first else [off, on], 1).ravel()
    states = np.tile(np.array([first, 1 - first], np.int8), pairs)
    return np.repeat(states, runs)[:n]


def _latent_labels(rng: np.random.Generator, n: int) -> _Labels:
    va = np.stack([_smooth_trajectory(rng, n), _smooth_trajectory(rng, n)], 1)
    expr = _expr_segments(rng, n)
    rates = np.clip(np.array(_AU_BASE_RATES) * rng.uniform(0.7, 1.3, 12), 0.05, 0.5)
    au = np.stack([_binary_chain(rng, n, r) for r in rates], 1)
    return _Labels(va, expr, au)


def _invalid_masks(
    rng: np.random.Generator, n: int, spec: SyntheticSpec, base: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    rates = spec.invalid_rates()
    return {task: _runs_mask(rng, n, rates[task], _INVALID_RUNS[task], base) for task in TASKS}


def _plant(rng: np.random.Generator, labels: _Labels, invalid: dict[str, np.ndarray]) -> _Labels:
    """The labels as written: invalid markers where the masks say."""
    va = labels.va.copy()
    rows = np.flatnonzero(invalid["va"])
    mode = rng.choice(3, rows.size, p=(0.6, 0.2, 0.2))  # both, valence only, arousal only
    va[rows[mode != 2], 0] = INVALID_VA
    va[rows[mode != 1], 1] = INVALID_VA
    expr = np.where(invalid["expr"], INVALID_CLASS, labels.expr)
    au = labels.au.copy()
    rows = np.flatnonzero(invalid["au"])
    # Real files mark all twelve columns; a few lines with only some is dirt a reader must catch.
    columns = rng.random((rows.size, 12)) < 0.3
    columns[rng.random(rows.size) < 0.8] = True
    columns[np.arange(rows.size), rng.integers(0, 12, rows.size)] = True
    au[rows] = np.where(columns, INVALID_CLASS, au[rows])
    return _Labels(va, expr, au)


def _task_counts(invalid: np.ndarray, missing: np.ndarray) -> dict[str, int]:
    n_invalid = int(invalid.sum())
    n_missing = int((missing & ~invalid).sum())
    return {
        "annotated": int(invalid.size),
        "invalid": n_invalid,
        "missing_image": n_missing,
        "curated": int(invalid.size) - n_invalid - n_missing,
    }


def _mtl_counts(invalid: dict[str, np.ndarray], missing: np.ndarray) -> dict[str, Any]:
    invalid_all = invalid["va"] & invalid["expr"] & invalid["au"]
    curated = ~invalid_all & ~missing
    any_invalid = invalid["va"] | invalid["expr"] | invalid["au"]
    return {
        "annotated": int(missing.size),
        "missing_image": int((missing & ~invalid_all).sum()),
        "invalid_all": int(invalid_all.sum()),
        "curated": int(curated.sum()),
        "strict_curated": int((curated & ~any_invalid).sum()),
        "valid": {task: int((curated & ~invalid[task]).sum()) for task in TASKS},
    }


# --------------------------------------------------------------------------------------------
# Text formatting: table look-ups instead of per-value formatting, for the 3M-line benchmarks


@functools.cache
def _va_table() -> np.ndarray:
    values = [f"{k / 1000:.3f}" for k in range(-1000, 1001)]
    return np.array([*values, "-5"], dtype=object)  # index 2001: the invalid marker


@functools.cache
def _au_table(sep: str) -> np.ndarray:
    bits = (np.arange(4096)[:, None] >> np.arange(12)) & 1
    return np.array([sep.join(map(str, row)) for row in bits.tolist()], dtype=object)


_EXPR_TABLE = np.array([*map(str, range(len(EXPRESSIONS))), "-1"], dtype=object)


def _va_strings(va: np.ndarray, sep: str) -> np.ndarray:
    index = np.rint(np.clip(va, -1, 1) * 1000).astype(np.int64) + 1000
    index[va == INVALID_VA] = 2001
    table = _va_table()
    return table[index[:, 0]] + sep + table[index[:, 1]]


def _expr_strings(expr: np.ndarray) -> np.ndarray:
    return _EXPR_TABLE[np.where(expr < 0, len(EXPRESSIONS), expr)]


def _au_strings(au: np.ndarray, sep: str) -> np.ndarray:
    valid = (au >= 0).all(1)
    codes = (np.where(valid[:, None], au, 0).astype(np.int64) << np.arange(12)).sum(1)
    strings = _au_table(sep)[codes]
    for row in np.flatnonzero(~valid):  # rare: about invalid_au_rate of the lines
        strings[row] = sep.join(map(str, au[row].tolist()))
    return strings


def _task_strings(task: str, written: _Labels, sep: str) -> np.ndarray:
    if task == "va":
        return _va_strings(written.va, sep)
    if task == "expr":
        return _expr_strings(written.expr)
    return _au_strings(written.au, sep)


def _write_text(path: Path, header: str, lines: np.ndarray | list[str], style: _FileStyle) -> None:
    body = style.newline.join(lines)
    path.write_bytes(f"{header}{style.newline}{body}{style.tail}".encode("ascii"))


def _image_names(name: str, frames: np.ndarray) -> list[str]:
    return [f"{name}/{f:05d}.jpg" for f in frames.tolist()]


# --------------------------------------------------------------------------------------------
# Rendering


def _identity(rng: np.random.Generator) -> _Identity:
    skin = np.array(_SKIN_TONES[int(rng.integers(len(_SKIN_TONES)))]) + rng.uniform(-12, 12, 3)
    tint = rng.uniform(0.75, 1.25, 3)
    x, y = 0.5 + rng.uniform(-0.04, 0.04), 0.52 + rng.uniform(-0.04, 0.04)
    return _Identity(tuple(skin.tolist()), tuple(tint.tolist()), x, y, rng.uniform(0.85, 1.05))


def _draw_class_shape(img: np.ndarray, centre: tuple[int, int], r: int, cls: int) -> None:
    """A large, class-specific coloured shape on the forehead."""
    x, y = centre
    colour = _CLASS_COLOURS[cls]
    polygons = {
        1: [(x - r, y - r), (x + r, y - r), (x, y + r)],  # Anger: triangle down
        2: [(x, y - r), (x + r, y), (x, y + r), (x - r, y)],  # Disgust: diamond
        5: [(x - r, y + r), (x + r, y + r), (x, y - r)],  # Sadness: triangle up
    }
    if cls in polygons:
        cv2.fillPoly(img, [np.array(polygons[cls], np.int32)], colour)
    elif cls == 0:  # Neutral: horizontal bar
        cv2.rectangle(img, (x - r, y - r // 3), (x + r, y + r // 3), colour, -1)
    elif cls == 3:  # Fear: ring
        cv2.circle(img, centre, r, colour, max(2, r // 3))
    elif cls == 4:  # Happiness: disc
        cv2.circle(img, centre, r, colour, -1)
    elif cls == 6:  # Surprise: square
        cv2.rectangle(img, (x - r, y - r), (x + r, y + r), colour, -1)
    else:  # Other: cross
        width = max(2, r // 2)
        cv2.line(img, (x - r, y - r), (x + r, y + r), colour, width)
        cv2.line(img, (x - r, y + r), (x + r, y - r), colour, width)


def _render(
    size: int,
    ident: _Identity,
    va: np.ndarray,
    expr: int,
    au: np.ndarray,
    jitter: np.ndarray,
) -> np.ndarray:
    """BGR face: arousal, valence, expression and every active AU each drive their own feature."""
    valence, arousal = float(va[0]), float(va[1])
    # Arousal: background brightness and eye openness.
    img = np.empty((size, size, 3), np.uint8)
    img[:] = np.clip((128 + 85 * arousal) * np.array(ident.background), 0, 255).astype(np.uint8)
    u = size * ident.scale
    cx, cy = size * ident.x + jitter[0], size * ident.y + jitter[1]

    def at(dx: float, dy: float) -> tuple[int, int]:
        return round(cx + dx * u), round(cy + dy * u)

    # Valence: skin tint (red when positive, blue when negative) and mouth curvature.
    skin = np.clip(np.array(ident.skin) + valence * np.array((-25.0, 0.0, 25.0)), 0, 255)
    axes = (round(_FACE_AXES[0] * u), round(_FACE_AXES[1] * u))
    cv2.ellipse(img, at(0, 0), axes, 0, 0, 360, skin.tolist(), -1, cv2.LINE_AA)
    line = max(1, round(0.03 * u))
    openness = 0.012 + 0.033 * (arousal + 1) / 2
    for side in (-1, 1):
        eye = at(side * 0.13, -0.04)
        cv2.ellipse(
            img, eye, (round(0.06 * u), max(1, round(openness * u))), 0, 0, 360, (235, 235, 235), -1
        )
        cv2.circle(img, eye, max(1, round(min(openness, 0.025) * u)), (30, 25, 20), -1)
    # Expression: eyebrow configuration and a coloured forehead shape.
    brows = _BROWS[expr]
    brow_colour = (skin * 0.35).tolist()
    for side, inner, outer in ((-1, brows[0], brows[1]), (1, brows[2], brows[3])):
        start, end = at(side * 0.06, -0.13 + inner), at(side * 0.21, -0.13 + outer)
        cv2.line(img, start, end, brow_colour, line)
    _draw_class_shape(img, at(*_FOREHEAD), round(0.06 * u), expr)
    xs = np.linspace(-0.12, 0.12, 9)
    ys = 0.2 - 0.05 * valence * ((xs / 0.12) ** 2 - 0.5)  # smile: corners above the centre
    mouth = np.array([at(x, y) for x, y in zip(xs, ys, strict=True)], np.int32)
    cv2.polylines(img, [mouth], False, (60, 50, 170), line)
    # AUs: a dark dot (or pair of dots) at each active AU's place.
    radius = max(2, round(_AU_RADIUS * u))
    for k in np.flatnonzero(au):
        for dx, dy in AU_MARKS[k]:
            cv2.circle(img, at(dx, dy), radius, _AU_COLOUR, -1)
    return img


def _crops(
    size: int, labels: _Labels, ident: _Identity, rng: np.random.Generator, wanted: np.ndarray
) -> Iterator[np.ndarray | None]:
    """The noisy face crop of each frame in order (None where not wanted)."""
    n = wanted.size
    reach = max(1, round(2 * size / 112))
    jitter = rng.integers(-reach, reach + 1, (n, 2))
    # A small bank of Gaussian noise tiles, cropped at random offsets: per-frame noise for the
    # price of a few draws (fresh sigma-5 noise per frame costs more than drawing the face).
    margin = 16
    bank = np.rint(rng.normal(0, 5, (4, size + margin, size + margin, 3))).astype(np.int16)
    tiles = rng.integers(0, bank.shape[0], n)
    offsets = rng.integers(0, margin + 1, (n, 2))
    for i in range(n):
        if not wanted[i]:
            yield None
            continue
        img = _render(size, ident, labels.va[i], int(labels.expr[i]), labels.au[i], jitter[i])
        oy, ox = offsets[i]
        noise = bank[tiles[i], oy : oy + size, ox : ox + size]
        yield np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


# Where OpenCV's frontal-face Haar cascade boxes `draw_face`'s drawing (its square of side d at
# x0, y0): at (x0 - 0.0675 d, y0 - 0.086 d), of side 1.141 d. Measured over 300 random sizes
# (50-200 pixels), places, tones and grey backgrounds, all found: mean errors below 0.3 % of the
# side, spread (1 sd) 2.3 % (x), 2.8 % (y), 4.7 % (side), 4.8 pixels the mean largest error.
_HAAR_BOX = (-0.0675, -0.086, 1.141)


def draw_face(img: np.ndarray, box: tuple[float, float, float],
              tone: tuple[int, int, int] = (150, 170, 200)) -> None:
    """Draws a frontal face that a face detector finds (in place, on an RGB or BGR image):
    hair, skin, brows, eye sockets, eyes, a bright nose bridge, nostrils and a mouth; `box`
    (x, y, side) is where OpenCV's Haar cascade puts its box, within a few pixels (the video
    tests and benchmarks)."""
    x, y, side = box
    d = side / _HAAR_BOX[2]
    x0, y0 = x - _HAAR_BOX[0] * d, y - _HAAR_BOX[1] * d

    def at(fx: float, fy: float) -> tuple[int, int]:
        return round(x0 + fx * d), round(y0 + fy * d)

    def n(f: float) -> int:
        return max(1, round(f * d))

    def shade(k: float) -> list[float]:
        return np.minimum(np.array(tone, np.float64) * k, 255).tolist()

    dark = (30, 30, 40)
    cv2.ellipse(img, at(0.5, 0.5), (n(0.46), n(0.6)), 0, 0, 360, shade(0.25), -1, cv2.LINE_AA)
    cv2.ellipse(img, at(0.5, 0.56), (n(0.42), n(0.54)), 0, 0, 360, shade(1), -1, cv2.LINE_AA)
    for side_x in (0.3, 0.7):
        cv2.ellipse(img, at(side_x, 0.37), (n(0.15), n(0.09)), 0, 0, 360, shade(0.6), -1,
                    cv2.LINE_AA)
        cv2.ellipse(img, at(side_x, 0.27), (n(0.14), n(0.04)), 0, 180, 360, dark, n(0.045),
                    cv2.LINE_AA)
        cv2.ellipse(img, at(side_x, 0.38), (n(0.09), n(0.04)), 0, 0, 360, (220, 220, 220), -1,
                    cv2.LINE_AA)
        cv2.circle(img, at(side_x, 0.38), n(0.04), dark, -1, cv2.LINE_AA)
    cv2.ellipse(img, at(0.5, 0.45), (n(0.05), n(0.15)), 0, 0, 360, shade(1.2), -1, cv2.LINE_AA)
    cv2.ellipse(img, at(0.5, 0.62), (n(0.1), n(0.035)), 0, 0, 360, shade(0.55), -1, cv2.LINE_AA)
    cv2.ellipse(img, at(0.5, 0.78), (n(0.16), n(0.045)), 0, 0, 360, shade(0.4), -1, cv2.LINE_AA)


def _write_jpg(path: Path, img: np.ndarray) -> None:
    ok, jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    jpeg.tofile(path)


# --------------------------------------------------------------------------------------------
# Sound and video files


def _oscillator(frequency: np.ndarray, rate: int) -> np.ndarray:
    """The phase (in [0, 2 pi), float32) of a tone whose frequency in Hz changes per sample."""
    phase = np.cumsum(frequency * (2 * np.pi / rate))  # float64: it grows to 1e5 rad
    return np.remainder(phase, 2 * np.pi).astype(np.float32)  # float32 sin costs a fifth


def _audio_pcm(labels: _Labels, fps: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """16-bit mono: while the person speaks, a voice-like tone whose pitch and loudness follow
    arousal and a steady tone at the expression class's frequency; a little noise throughout.
    Frame k (1-based) sounds from (k - 1.5) / fps to (k - 0.5) / fps: centred on its
    timestamp (k - 1) / fps, that of the video's k-th frame."""
    n = labels.expr.size
    samples = round(n * rate / fps)
    frame_pos = np.arange(samples) * (fps / rate)
    # Pauses (two fifths of the time, in runs): the sound alone does not give every frame's labels.
    speaking = _binary_chain(rng, n, _SPEAKING_SHARE, _SPEAKING_RUNS).astype(np.float32)
    gate = np.interp(frame_pos, np.arange(n), speaking).astype(np.float32)
    a = np.interp(frame_pos, np.arange(n), labels.va[:, 1]).astype(np.float32)
    voice = _oscillator(150 + 60 * a, rate)
    signal = (0.08 + 0.06 * (a + 1)) * (np.sin(voice) + 0.4 * np.sin(2 * voice))
    tones = np.array(_EXPR_TONES) * rng.uniform(1 - _TONE_DETUNE, 1 + _TONE_DETUNE, 8)
    frame = np.minimum(np.rint(frame_pos).astype(np.int64), n - 1)
    # One continuous-phase tone that changes frequency with the class: no click at a change.
    signal += rng.uniform(0.04, 0.07) * np.sin(_oscillator(tones[labels.expr[frame]], rate))
    signal = gate * signal + 0.01 * rng.standard_normal(samples, dtype=np.float32)
    return np.clip(np.rint(signal * 32767), -32768, 32767).astype(np.int16)


def _write_wav(path: Path, pcm: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.astype("<i2").tobytes())


class _VideoWriter:
    """One raw video file: the frames given in order, the audio (if any) interleaved with them."""

    def __init__(self, path: Path, raw: _RawVideo, pcm: np.ndarray | None) -> None:
        video_codec, video_options, audio_codec, audio_options = _CONTAINERS[path.suffix[1:]]
        self.container = av.open(str(path), "w")
        self.video = self.container.add_stream(video_codec, rate=raw.fps, options=video_options)
        self.video.width, self.video.height = raw.media.width, raw.media.height
        self.video.pix_fmt = "yuv420p"
        self.video.codec_context.thread_count = 1
        self.frames, self.pcm, self.sent = 0, pcm, 0
        if pcm is not None:
            rate = raw.media.sample_rate
            self.audio = self.container.add_stream(
                audio_codec, rate=rate, layout="mono", options=audio_options
            )
            self.audio.codec_context.thread_count = 1
            self.samples_per_frame = Fraction(rate, raw.fps)

    def write(self, bgr: np.ndarray) -> None:
        # OpenCV's BT.601 limited-range conversion (swscale's) costs a third of swscale's, and
        # wrapping its array a twentieth of copying it (libavcodec copies what it keeps).
        yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420)
        frame = av.VideoFrame.from_numpy_buffer(yuv, format="yuv420p")
        frame.pts = self.frames
        self.container.mux(self.video.encode(frame))
        self.frames += 1
        if self.pcm is not None:
            self._send_audio(round(self.frames * self.samples_per_frame))

    def _send_audio(self, until: int) -> None:
        chunk = self.pcm[self.sent : until]
        if chunk.size:
            frame = av.AudioFrame.from_ndarray(chunk[None], format="s16", layout="mono")
            frame.sample_rate = self.audio.rate
            frame.pts, frame.time_base = self.sent, Fraction(1, self.audio.rate)
            self.container.mux(self.audio.encode(frame))
            self.sent += chunk.size

    def close(self) -> None:
        self.container.mux(self.video.encode())
        if self.pcm is not None:
            self._send_audio(self.pcm.size)
            self.container.mux(self.audio.encode())
        self.container.close()


def _crop_places(raw: _RawVideo) -> list[tuple[int, int]]:
    """Top-left corner of each person's crop: centred, or around 1/4 and 3/4 of the width, inside
    the frame (two people in a 4:3 frame overlap; the right one is in front)."""
    k, width, height = len(raw.tracks), raw.media.width, raw.media.height
    places = []
    for t in raw.tracks:
        x = (2 * t.index + 1) * width // (2 * k) - t.size // 2
        places.append((min(max(x, 0), width - t.size), max(height // 2 - t.size // 2, 0)))
    return places


# --------------------------------------------------------------------------------------------
# Per-video work (runs in pool workers: top-level, picklable arguments)


def _mtl_part(
    spec: SyntheticSpec, raw: _RawVideo, track: _Track, labels: _Labels, missing: np.ndarray
) -> dict[str, Any]:
    rows = np.arange(0, track.num_frames, spec.mtl_stride)
    names = _image_names(track.name, rows + 1)
    if track.challenges["mtl"] == "test":  # the organisers list the test images that exist
        return {
            "lines": [name for name, gone in zip(names, missing[rows], strict=True) if not gone]
        }
    rng = _stream(spec.seed, raw.index, track.index, _MTL_DIRT)
    # Some frames are unlabelled for every task; per-task rates are still the spec's.
    rate_all = min(spec.invalid_rates().values()) / 2
    invalid_all = _runs_mask(rng, rows.size, rate_all, (1, 3))
    invalid = _invalid_masks(rng, rows.size, spec, base=invalid_all)
    written = _plant(rng, labels.rows(rows), invalid)
    lines = np.array(names, dtype=object)
    for task in TASKS:
        lines = lines + "," + _task_strings(task, written, ",")
    return {"lines": lines.tolist(), "counts": _mtl_counts(invalid, missing[rows])}


@dataclasses.dataclass(frozen=True)
class _Made:
    """A track whose annotations are written: its manifest part, and what its crops come from."""

    result: dict[str, Any]
    labels: _Labels
    missing: np.ndarray
    ident: _Identity
    render: np.random.Generator


def _make_track(spec: SyntheticSpec, out: Path, raw: _RawVideo, track: _Track) -> _Made:
    n = track.num_frames
    labels = _latent_labels(_stream(spec.seed, raw.index, track.index, _LABELS), n)
    dirt = _stream(spec.seed, raw.index, track.index, _DIRT)
    missing = _runs_mask(dirt, n, spec.missing_crop_rate, _MISSING_RUN)
    invalid = _invalid_masks(dirt, n, spec)
    written = _plant(dirt, labels, invalid)
    for task, style in track.styles.items():
        split_dir = out / "annotations" / CHALLENGE_DIRS[task] / SPLIT_DIRS[track.challenges[task]]
        lines = _task_strings(task, written, style.sep)
        _write_text(split_dir / f"{track.name}.txt", HEADERS[task], lines, style)
    render = _stream(spec.seed, raw.index, track.index, _RENDER)
    ident = _identity(render)
    result = {
        "missing": (np.flatnonzero(missing) + 1).tolist(),
        "counts": {task: _task_counts(invalid[task], missing) for task in TASKS},
        "face": {"x": ident.x, "y": ident.y, "scale": ident.scale},
    }
    if "mtl" in track.challenges:
        result["mtl"] = _mtl_part(spec, raw, track, labels, missing)
    return _Made(result, labels, missing, ident, render)


def _write_frames(
    spec: SyntheticSpec, out: Path, raw: _RawVideo, made: list[_Made], pcm: np.ndarray | None
) -> None:
    """The jpg crops (where the detector found the face) and the raw video (every frame's face
    pasted into a plain frame), in one pass over the frames."""
    writer = _VideoWriter(out / raw.media.file, raw, pcm) if raw.media.file else None
    crops = []
    for track, part in zip(raw.tracks, made, strict=True):
        wanted = np.ones_like(part.missing) if writer else ~part.missing
        crops.append(_crops(track.size, part.labels, part.ident, part.render, wanted))
        if spec.images:
            (out / track.image_root / track.name).mkdir(parents=True, exist_ok=True)
    colour = _stream(spec.seed, raw.index, 0, _VIDEO).integers(30, 226, 3)
    background = np.empty((raw.media.height, raw.media.width, 3), np.uint8)
    background[:] = colour
    places = _crop_places(raw)
    for i in range(max(track.num_frames for track in raw.tracks)):
        frame = background.copy()
        for track, part, stream, (x, y) in zip(raw.tracks, made, crops, places, strict=True):
            crop = next(stream) if i < track.num_frames else None
            if spec.images and crop is not None and not part.missing[i]:
                _write_jpg(out / track.image_root / track.name / f"{i + 1:05d}.jpg", crop)
            if crop is not None:
                frame[y : y + track.size, x : x + track.size] = crop
        if writer:
            writer.write(frame)
    if writer:
        writer.close()


def _make_raw(job: tuple[SyntheticSpec, str, _RawVideo]) -> list[dict[str, Any]]:
    spec, out_dir, raw = job
    out = Path(out_dir)
    made = [_make_track(spec, out, raw, track) for track in raw.tracks]
    media, pcm = raw.media, None
    if media.sample_rate:  # the first track is the longest: it spans the raw video
        rng = _stream(spec.seed, raw.index, 0, _AUDIO)
        pcm = _audio_pcm(made[0].labels, raw.fps, media.sample_rate, rng)
    if media.wav:
        _write_wav(out / media.wav, pcm, media.sample_rate)
    if spec.images or media.file:
        _write_frames(spec, out, raw, made, pcm if media.track else None)
    return [part.result for part in made]


def _run_jobs(
    spec: SyntheticSpec, out: Path, raws: list[_RawVideo], progress: bool, workers: int | None
) -> list[list[dict[str, Any]]]:
    jobs = [(spec, str(out), raw) for raw in raws]
    frames = sum(t.num_frames for raw in raws for t in raw.tracks)
    work = frames if spec.images or spec.videos else frames * _ANNOTATION_ONLY_COST
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    with tqdm(total=len(jobs), unit="video", disable=not progress) as bar:
        if workers < 2 or work < _MIN_POOL_FRAMES:
            return [_tick(bar, _make_raw(job)) for job in jobs]
        # spawn: callers may hold threads (jax, grain) that make fork unsafe.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            return [_tick(bar, result) for result in pool.imap(_make_raw, jobs)]


def _tick(bar: tqdm, result: Any) -> Any:
    bar.update()
    return result


# --------------------------------------------------------------------------------------------
# Tree, manifest, entry points


_OWNED = (
    *IMAGE_ROOTS,
    "annotations",
    "test_lists",
    "videos",
    "audio",  # the .wavs of earlier versions: a rerun over such a tree clears it
    "video_info.csv",
    "manifest.json",
    "manifest.json.tmp",
)


def _prepare_out_dir(out: Path, spec: SyntheticSpec) -> None:
    """Creates out, or clears a previous synthetic tree; refuses a directory with other files."""
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _OWNED)
        if foreign:
            raise FileExistsError(f"{out} holds files the generator did not write: {foreign[:5]}")
        for name in _OWNED:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    for task, split in itertools.product(TASKS, SPLIT_DIRS.values()):
        (out / "annotations" / CHALLENGE_DIRS[task] / split).mkdir(parents=True)
    (out / "annotations" / MTL_DIR).mkdir()
    (out / "test_lists").mkdir()
    if spec.videos or spec.audio:
        (out / "videos").mkdir()


def _empty_counts() -> dict[str, Any]:
    task = {"videos": 0, "annotated": 0, "invalid": 0, "missing_image": 0, "curated": 0}
    mtl = {
        "annotated": 0,
        "missing_image": 0,
        "invalid_all": 0,
        "curated": 0,
        "strict_curated": 0,
        "valid": dict.fromkeys(TASKS, 0),
    }
    counts = {t: {s: dict(task) for s in SPLITS} for t in TASKS}
    counts["mtl"] = {s: copy.deepcopy(mtl) for s in SPLITS}
    return counts


def _add_counts(total: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        if isinstance(value, dict):
            _add_counts(total[key], value)
        else:
            total[key] += value


def _assemble(
    spec: SyntheticSpec, raws: list[_RawVideo], results: list[list[dict[str, Any]]]
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The manifest, and the MTL lines per split (train, validation, test) in plan order."""
    videos, counts = {}, _empty_counts()
    tests: dict[str, list[str]] = {task: [] for task in TASKS}
    mtl_lines: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for raw, raw_results in zip(raws, results, strict=True):
        for track, result in zip(raw.tracks, raw_results, strict=True):
            videos[track.name] = {
                "raw": raw.name,
                "num_frames": track.num_frames,
                "fps": raw.fps,
                "image_root": track.image_root,
                "size": track.size,
                "missing": result["missing"],
                "challenges": track.challenges,
                "face": result["face"],
            }
            for task in TASKS:
                split = track.challenges.get(task)
                if split == "test":
                    tests[task].append(track.name)
                elif split is not None:
                    counts[task][split]["videos"] += 1
                    _add_counts(counts[task][split], result["counts"][task])
            if "mtl" in result:
                mtl_split = track.challenges["mtl"]
                mtl_lines[mtl_split] += result["mtl"]["lines"]
                if mtl_split != "test":
                    _add_counts(counts["mtl"][mtl_split], result["mtl"]["counts"])
    manifest = {
        "spec": dataclasses.asdict(spec),
        "images": spec.images,
        "videos": videos,
        "raw_videos": {raw.name: _raw_entry(raw) for raw in raws},
        "counts": counts,
        "test": {**tests, "mtl": len(mtl_lines["test"])},
    }
    return manifest, mtl_lines


def _raw_entry(raw: _RawVideo) -> dict[str, Any]:
    """What is written for a raw video: the truth a reader's fps, counts and audio must match."""
    media = raw.media
    voiced = media.sample_rate is not None
    return {
        "file": media.file,
        "fps": raw.fps,
        "num_frames": max(t.num_frames for t in raw.tracks),
        "width": media.width,
        "height": media.height,
        "tracks": [t.name for t in raw.tracks],
        "crop_places": [list(xy) for xy in _crop_places(raw)] if media.file else None,
        "has_audio": voiced,
        "sample_rate": media.sample_rate,
        "audio_track": media.track,
        "wav": media.wav,
        "audio_follows": raw.tracks[0].name if voiced else None,
    }


def _write_lists(
    out: Path,
    raws: list[_RawVideo],
    manifest: dict[str, Any],
    mtl_lines: dict[str, list[str]],
    mtl_styles: dict[str, _FileStyle],
) -> None:
    for split in SPLITS:
        path = out / "annotations" / MTL_DIR / MTL_FILES[split]
        _write_text(path, MTL_HEADER, mtl_lines[split], mtl_styles[split])
    for task in TASKS:
        names = manifest["test"][task]
        path = out / "test_lists" / f"{CHALLENGE_DIRS[task]}_test_set_release.txt"
        path.write_text("".join(f"{name}\n" for name in names))
    test_images = "".join(f"{name}\n" for name in mtl_lines["test"])
    (out / "test_lists" / "MTL_Challenge_test_set_release.txt").write_text(test_images)
    info = ["video,fps,num_frames,width,height"]
    for raw in raws:
        frames = max(t.num_frames for t in raw.tracks)
        info.append(f"{raw.name},{raw.fps},{frames},{raw.media.width},{raw.media.height}")
    (out / "video_info.csv").write_text("\n".join(info) + "\n")


_SHARE_FIELDS = {
    f.name for f in dataclasses.fields(SyntheticSpec) if f.name.endswith(("_fraction", "_rate"))
} - {"sample_rate"}


def _validate(spec: SyntheticSpec) -> None:
    if spec.num_videos < 1 or spec.frames_per_video < 2 or spec.mtl_stride < 1:
        raise ValueError(f"need num_videos >= 1, frames_per_video >= 2, mtl_stride >= 1: {spec}")
    if spec.image_size < 32:
        raise ValueError(f"need image_size >= 32: {spec}")
    if spec.sample_rate not in SAMPLE_RATES:
        raise ValueError(f"sample_rate must be one of {SAMPLE_RATES}, got {spec.sample_rate}")
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        if field.name in _SHARE_FIELDS and not 0 <= value <= 1:
            raise ValueError(f"{field.name} must be in [0, 1], got {value}")


def generate(
    out_dir: str | os.PathLike,
    spec: SyntheticSpec = SyntheticSpec(),
    progress: bool = False,
    *,
    workers: int | None = None,
) -> dict:
    """Writes the tree and returns the manifest (also written as <out_dir>/manifest.json).

    out_dir must be absent, empty, or a previous synthetic tree (which is replaced). workers:
    processes for the per-video work (default os.cpu_count()); small runs stay in-process.
    """
    _validate(spec)
    out = Path(out_dir)
    _prepare_out_dir(out, spec)
    raws, mtl_styles = _plan(spec)
    results = _run_jobs(spec, out, raws, progress, workers)
    manifest, mtl_lines = _assemble(spec, raws, results)
    _write_lists(out, raws, manifest, mtl_lines, mtl_styles)
    # Written last, through a rename: its presence means the tree is complete.
    partial = out / "manifest.json.tmp"
    partial.write_text(json.dumps(manifest, separators=(",", ":")))
    partial.replace(out / "manifest.json")
    return manifest


def _define_flags() -> None:
    # Defined only when run as a script: importers (main.py ...) may have flags of these names.
    flags.DEFINE_string("out", None, "Output directory.", required=True)
    flags.DEFINE_integer("videos", SyntheticSpec.num_videos, "Raw videos.")
    flags.DEFINE_integer("frames", SyntheticSpec.frames_per_video, "Mean frames per video.")
    flags.DEFINE_integer("size", SyntheticSpec.image_size, "Crop size in pixels.")
    flags.DEFINE_integer("seed", SyntheticSpec.seed, "Random seed.")
    flags.DEFINE_bool("images", True, "Write the jpg crops.")
    # --videos counts raw videos, so the switch is a flag of its own.
    flags.DEFINE_bool("novideos", False, "Write no raw videos (the .wavs then cover every voice).")
    flags.DEFINE_bool("audio", True, "Write audio (tracks in the videos, .wavs beside them).")
    flags.DEFINE_integer("workers", None, "Worker processes (default: all cores).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    spec = SyntheticSpec(
        num_videos=f.videos,
        frames_per_video=f.frames,
        image_size=f.size,
        seed=f.seed,
        images=f.images,
        videos=not f.novideos,
        audio=f.audio,
    )
    start = time.perf_counter()
    manifest = generate(f.out, spec, progress=True, workers=f.workers)
    seconds = time.perf_counter() - start
    videos = manifest["videos"].values()
    frames = sum(v["num_frames"] for v in videos)
    jpgs = frames - sum(len(v["missing"]) for v in videos) if spec.images else 0
    curated = ", ".join(
        f"{task} {sum(c['curated'] for c in manifest['counts'][task].values())}"
        for task in (*TASKS, "mtl")
    )
    print(
        f"{spec.num_videos} raw videos, {len(videos)} videos, {frames} frames, {jpgs} jpgs; "
        f"curated frames: {curated}; {seconds:.1f} s -> {f.out}"
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
