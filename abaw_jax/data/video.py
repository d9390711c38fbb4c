"""Aff-Wild2's raw videos: finding them, their fps and frame counts (PyAV or `video_info.csv`),
and their frames (decoded in order, or read from a folder of frame images).

The raw videos (`.mp4`/`.avi`, named like the annotations without `_left`/`_right`) give the true
frame count of each video (a submission has a line for every frame) and the audio track. Reading
their headers with PyAV takes milliseconds; a `video_info.csv` (`video,fps,num_frames[,width,
height]`, as the synthetic tree writes it) stands in where the videos are not at hand.

Plain numpy, PyAV and the standard library only: no jax in data modules.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import av
import cv2
import numpy as np
from absl import logging

from abaw_jax.data.affwild2 import VIDEO_INFO_FILE as INFO_FILE
from abaw_jax.data.affwild2 import DataError, _read_lines, check_video_name

VIDEO_SUFFIXES = (".mp4", ".avi")  # in order of preference when both hold the same name
INFO_HEADER = ("video", "fps", "num_frames")
INFO_SIZE = ("width", "height")  # optional trailing columns
PERSON_SUFFIXES = ("_left", "_right")  # videos with two people: one annotation per person
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")  # frames in a folder
# A container's frame count may exceed what decodes by a frame or two (edit lists, a last
# frame the encoder dropped); fewer frames than this below it is a cut file.
_FRAME_SLACK = 2


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the pipeline needs of a raw video."""

    fps: float
    num_frames: int
    duration: float  # seconds: num_frames / fps, the span the frames cover
    width: int = 0  # 0: unknown
    height: int = 0
    sample_rate: int | None = None  # of the audio track; None: no audio track (or unknown: csv)
    source: str = ""  # "video" (probed) or "video_info.csv"


def raw_name(video: str) -> str:
    """The raw video an annotation's video belongs to: `x_left` and `x_right` -> `x`."""
    for suffix in PERSON_SUFFIXES:
        if video.endswith(suffix) and len(video) > len(suffix):
            return video[: -len(suffix)]
    return video


def index_videos(roots: Sequence[Path]) -> dict[str, Path]:
    """Raw video name -> its `.mp4`/`.avi` file, found directly in `roots`.

    The first root wins when several hold a name (and `.mp4` wins over `.avi` in one root); the
    duplicates are named in one warning. A file name that could not be a video name
    (`affwild2.check_video_name`: a backslash, a comma) is a `DataError` naming the file.
    """
    found: dict[str, Path] = {}
    shadowed: list[str] = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise DataError(f"{root}: video folder is not a directory")
        names = sorted(os.listdir(root), key=_suffix_rank)
        for name in names:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in VIDEO_SUFFIXES or not (root / name).is_file():
                continue
            check_video_name(stem, str(root / name))
            if stem in found:
                shadowed.append(f"{root / name} (using {found[stem]})")
            else:
                found[stem] = root / name
    if shadowed:
        logging.warning("%d videos found more than once, the first kept: %s%s", len(shadowed),
                        "; ".join(shadowed[:5]), " ..." if len(shadowed) > 5 else "")
    return found


def _suffix_rank(name: str) -> tuple[str, int]:
    stem, suffix = os.path.splitext(name)
    suffix = suffix.lower()
    return stem, VIDEO_SUFFIXES.index(suffix) if suffix in VIDEO_SUFFIXES else len(VIDEO_SUFFIXES)


def find_video(index: Mapping[str, Path], video: str) -> Path | None:
    """The raw video file of an annotation's video (its own name first, then `raw_name`)."""
    return index.get(video) or index.get(raw_name(video))


def wav_beside(video_path: Path) -> Path | None:
    """`<same stem>.wav` in the video's folder, if there is one."""
    path = Path(video_path).with_suffix(".wav")
    return path if path.is_file() else None


def find_wav(raw: str, video_path: Path | None, roots: Sequence[Path]) -> Path | None:
    """The `.wav` of raw video `raw`: beside its file, else `<raw>.wav` in the first video
    folder holding one (sound extracted without keeping the video; `raw` is a checked name)."""
    if video_path is not None and (path := wav_beside(video_path)):
        return path
    return next((p for root in roots if (p := Path(root) / f"{raw}.wav").is_file()), None)


# ----------------------------------------------------------------------------------------------
# Reading


def probe(path: Path) -> VideoInfo:
    """fps, frame count, size and the audio track's sample rate of a video file, from its headers.

    The frame count is the container's (`stream.frames`) or, where it does not say (Matroska,
    some AVIs), the number of video packets demuxed (no decoding). A file FFmpeg cannot open or
    demux is a `DataError` naming it. The headers are trusted: a file cut after its index is not
    found out here (decoding its audio is, `audio.decode`).
    """
    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate or rate <= 0:
                raise DataError(f"{path}: the video stream has no frame rate")
            frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
            audio = container.streams.audio
            sample_rate = audio[0].sample_rate if audio else None
            width, height = stream.codec_context.width, stream.codec_context.height
    except av.error.FFmpegError as e:
        raise DataError(f"{path}: cannot read the video ({ffmpeg_reason(e)})") from e
    fps = float(rate)
    return VideoInfo(fps=fps, num_frames=int(frames), duration=frames / fps, width=int(width),
                     height=int(height), sample_rate=sample_rate, source="video")


def ffmpeg_reason(error: Exception) -> str:
    """FFmpeg's message of a PyAV error without the file name PyAV appends (the caller's
    `DataError` names the file)."""
    return getattr(error, "strerror", None) or str(error)


def read_info_csv(path: Path) -> dict[str, VideoInfo]:
    """`video,fps,num_frames[,width,height]` lines -> {video: VideoInfo}.

    Windows line endings, spaces after commas and trailing blank lines are accepted; a line with
    the wrong number of values, a bad number, a bad or repeated video name is a `DataError`
    naming the file and line.
    """
    path = Path(path)
    lines = _read_lines(path)
    if not lines:
        raise DataError(f"{path}: empty file, expected the header {','.join(INFO_HEADER)!r}")
    header = tuple(s.strip().lower() for s in lines[0].split(","))
    if header not in (INFO_HEADER, INFO_HEADER + INFO_SIZE):
        raise DataError(f"{path}:1: header {lines[0]!r} is not {','.join(INFO_HEADER)!r} "
                        f"(optionally followed by ,{','.join(INFO_SIZE)})")
    out: dict[str, VideoInfo] = {}
    for i, line in enumerate(lines[1:], start=2):
        name, info = _info_line(f"{path}:{i}", header, line)
        if name in out:
            raise DataError(f"{path}:{i}: video {name!r} listed twice")
        out[name] = info
    return out


def _info_line(where: str, header: tuple[str, ...], line: str) -> tuple[str, VideoInfo]:
    values = [s.strip() for s in line.split(",")]
    if len(values) != len(header):
        raise DataError(f"{where}: expected {len(header)} comma-separated values, got "
                        f"{len(values)}: {line!r}")
    name = check_video_name(values[0], where)
    fps = _number(where, "fps", values[1], float)
    if not (math.isfinite(fps) and fps > 0):
        raise DataError(f"{where}: fps {values[1]!r} must be a positive number")
    frames, *size = (_number(where, h, v, int)
                     for h, v in zip(header[2:], values[2:], strict=True))
    if frames < 0 or any(s < 0 for s in size):
        raise DataError(f"{where}: a negative count in {line!r}")
    width, height = size or (0, 0)
    return name, VideoInfo(fps=fps, num_frames=frames, duration=frames / fps, width=width,
                           height=height, source=INFO_FILE)


def _number(where: str, column: str, text: str, kind: type) -> float | int:
    try:
        return kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise DataError(f"{where}: {column} {text!r} is not {noun}") from None


def read_frames(path: Path, every: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """(frame number from 1, RGB uint8 (H, W, 3)) of frames 1, 1 + every, ... of a video's first
    video stream, in order (FFmpeg decodes on its own threads).

    A file FFmpeg cannot open is a `DataError` naming it before any frame; one that fails later,
    or decodes to fewer frames than its header declares (a cut file: FFmpeg stops quietly where
    the data ends), is a `DataError` naming it after the frames that decoded.
    """
    path = Path(path)
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise DataError(f"{path}: cannot read the video ({ffmpeg_reason(e)})") from e
    with container:
        if not container.streams.video:
            raise DataError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        declared, n = stream.frames, 0
        try:
            for frame in container.decode(stream):
                n += 1
                if (n - 1) % every == 0:
                    yield n, frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as e:
            raise DataError(f"{path}: cannot decode past frame {n} ({ffmpeg_reason(e)})") from e
    if declared and n < declared - _FRAME_SLACK:
        raise DataError(f"{path}: truncated: {n} of the {declared} frames its header declares "
                        "decode")


def frame_files(folder: Path) -> list[tuple[int, Path]]:
    """(frame number, file) of the frame images of a folder, in order: numbered by their names
    when every name is a number (Aff-Wild2's `00001.jpg` is frame 1; gaps stay gaps), else 1, 2,
    ... in name order."""
    files = [p for p in Path(folder).iterdir()
             if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if files and all(p.stem.isdigit() for p in files):
        return sorted((int(p.stem), p) for p in files)
    return list(enumerate(sorted(files), start=1))


def read_frame_files(files: Sequence[tuple[int, Path]], every: int = 1
                     ) -> Iterator[tuple[int, np.ndarray]]:
    """(frame number, RGB uint8) of every `every`-th of `frame_files`; an image that does not
    decode is a `DataError` naming it, after the frames before it."""
    for number, path in files[::every]:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise DataError(f"{path}: cannot read the image")
        yield number, cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# ----------------------------------------------------------------------------------------------
# Writing (tests, benchmarks and the synthetic tree)


def write_video(path: Path, fps: float | fractions.Fraction, num_frames: int, *,
                size: tuple[int, int] = (64, 48), audio: np.ndarray | None = None,
                sample_rate: int = 16000, audio_delay: float = 0.0,
                faststart: bool = False, draw: Callable[[int], np.ndarray] | None = None,
                quality: int | None = None) -> None:
    """A small video: MPEG-4 frames of a grey level that changes per frame (or `draw(i)`'s RGB
    image of `size` for frame i from 0; `quality`: MPEG-4's qscale, 2 near-lossless), and with
    `audio` ((samples,) or (channels, samples) float in [-1, 1]; 1 or 2 channels) an audio track
    starting `audio_delay` seconds after the first frame: AAC in `.mp4`, 16-bit PCM in `.avi`
    (the AVI muxer turns an AAC encoder's start delay into empty video frames: 75 written frames
    read back as 77 at 25 fps). Packets are interleaved by time; `faststart` puts an `.mp4`'s
    index before its data, as files made for streaming have it.
    """
    path = Path(path)
    rate = fractions.Fraction(fps).limit_denominator(1001)
    signal = None if audio is None else np.atleast_2d(np.asarray(audio, np.float32))
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        if quality is not None:
            stream.options = {"qscale": str(quality)}
        track = None if signal is None else _AudioTrack(container, path.suffix.lower(), signal,
                                                         sample_rate, audio_delay)
        for i in range(num_frames):
            image = draw(i) if draw else np.full((size[1], size[0], 3), (i * 37) % 256, np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, 1 / rate
            container.mux(stream.encode(frame))
            if track:
                track.write_until((i + 1) / rate)
        container.mux(stream.encode(None))
        if track:
            track.write_until(math.inf)
            container.mux(track.stream.encode(None))


class _AudioTrack:
    """Feeds one signal to an audio encoder in codec-sized frames, up to a given time."""

    def __init__(self, container, suffix: str, signal: np.ndarray, sample_rate: int,
                 delay: float):
        if len(signal) not in (1, 2):
            raise ValueError(f"audio of {len(signal)} channels; expected 1 or 2")
        self.layout = ("mono", "stereo")[len(signal) - 1]
        self.stream = container.add_stream("pcm_s16le" if suffix == ".avi" else "aac",
                                           rate=sample_rate, layout=self.layout)
        self.container, self.signal, self.sample_rate = container, signal, sample_rate
        self.delay = round(delay * sample_rate)
        self.format = self.stream.codec_context.format.name
        self.frame_size = self.stream.codec_context.frame_size or 1024
        self.written = 0

    def write_until(self, seconds: float) -> None:
        end = self.signal.shape[1]
        if math.isfinite(seconds):
            end = min(end, math.ceil(seconds * self.sample_rate) - self.delay)
        while self.written < end:
            chunk = self.signal[:, self.written:self.written + self.frame_size]
            if self.format.startswith("s16"):  # packed 16-bit: (1, samples * channels)
                chunk = np.round(np.clip(chunk, -1, 1) * 32767).astype(np.int16).T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format=self.format,
                                               layout=self.layout)
            frame.sample_rate, frame.pts = self.sample_rate, self.written + self.delay
            frame.time_base = fractions.Fraction(1, self.sample_rate)
            self.container.mux(self.stream.encode(frame))
            self.written += frame.samples
