"""Raw video in, per-frame affect out.

    python -m abaw_jax.video --model=<workdir or converted folder> --input=<video | folder of
        videos | folder of frames | folder of frame folders> --out=<dir>
        [--detector=haar|yunet:<onnx>|none] [--batch=0] [--every=N] [--max_gap=15]
        [--min_hits=2] [--devices=0] [--annotate]

For each input video: frames decoded in order by PyAV on a background thread; faces found and
tracked (`faces.Tracker`: stable ids; a new track written once found in `min_hits` frames, its
first frames then too); each face cropped with a margin and run through the model as
`inference.load` gives it (its own preprocessing), crops of many frames batched together,
`--batch` on each local device (`Predictor.sharded`), a temporal model over each track's crops
in order (windows of the run's clip length and stride, windows of any tracks batched, each
frame's outputs the mean over its windows, as evaluation does), a model that takes audio with
the video's own windows (its run's `data.audio`); then the post-processing stored with the
checkpoint (smoothing along each track, AU thresholds). A face's outputs are the model's on
its crop alone, whatever else shared its model call (`inference.Predictor`).

Outputs per input, in --out: `<name>.csv`, one row per frame and face (a frame without a face:
one row with empty values), `<name>.png` (per track: valence and arousal over time, the
expression timeline, an AU heatmap) and with --annotate `<name>_annotated.mp4` (boxes and
labels drawn). `analyse(path, model)` gives the same table as numpy columns.

A video that cannot be read, or stops early (a cut file), is an error naming it; the rows of the
frames read before are written. A folder: every input is tried, the failures listed at the end
(exit status 1).
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import fractions
import math
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from abaw_jax import console, errors, faces, heads, inference, plots, postprocess
from abaw_jax.data import audio, audio_table, augment
from abaw_jax.data import video as video_lib
from abaw_jax.data.affwild2 import DataError, check_video_name
from abaw_jax.errors import ConfigError, NotFoundError

# What FFmpeg commonly holds; a folder's other files are not inputs.
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
_MODEL_INPUTS = ("image", "audio", "audio_stats", "frame_mask")  # what a video gives a model
_IN_FLIGHT = 2  # model calls queued ahead of the one running: bounds the crops held
Model = inference.Predictor | inference.Stacked


@dataclasses.dataclass(frozen=True)
class Options:
    """How faces are found and batched (the command's flags)."""

    detector: str = "haar"  # haar | yunet:<onnx> | none
    batch: int = 0  # faces (a temporal model's clips) per device and model call; 0: the model's own
    every: int = 1  # analyse frames 1, 1 + every, ...
    margin: float = 0.2  # crop: the box's side grows by this much on each side
    min_face: float = 0  # smallest face searched for, pixels (0: an eighth of the shorter side)
    full_every: int = 10  # whole-frame searches every this many analysed frames
    max_gap: int = 15  # analysed frames a track may go unseen and keep its id
    fps: float = 30.0  # of a folder of frames (videos say their own)
    min_hits: int = 2  # frames a new track must be found in before it is written
    devices: int = 0  # local devices the model's batches are split over (0: all)

    def __post_init__(self):
        if min(self.every, self.min_hits) < 1 or min(self.margin, self.max_gap, self.devices,
                                                       self.batch) < 0 or self.fps <= 0:
            raise ConfigError(f"every={self.every} and min_hits={self.min_hits} must be >= 1, "
                              f"batch={self.batch}, margin={self.margin}, max_gap="
                              f"{self.max_gap} and devices={self.devices} >= 0, fps={self.fps} "
                              "> 0")


@dataclasses.dataclass(frozen=True)
class Source:
    """One input: a video file, or a folder of frame images (`files`)."""

    name: str  # of its outputs (`check_video_name` before use)
    path: Path
    files: tuple[tuple[int, Path], ...] | None = None

    def info(self, options: Options) -> tuple[float, int]:
        """(fps, frames to analyse)."""
        if self.files is not None:
            return options.fps, math.ceil(len(self.files) / options.every)
        info = video_lib.probe(self.path)
        return info.fps, math.ceil(info.num_frames / options.every)

    def frames(self, every: int) -> Iterator[tuple[int, np.ndarray]]:
        if self.files is not None:
            return video_lib.read_frame_files(self.files, every)
        return video_lib.read_frames(self.path, every)


def find_inputs(path: str | Path) -> list[Source]:
    """The inputs of --input: a video file; a folder's videos; a folder of frame images (one
    input, named after the folder); or a folder of such folders (`cropped_aligned`: one input
    per sub-folder that holds frame images, named after it)."""
    path = Path(path)
    if path.is_file():
        return [Source(path.stem, path)]
    if not path.is_dir():
        raise NotFoundError(f"{path}: no such video or folder")
    videos = sorted(p for p in path.iterdir()
                    if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if videos:
        stems = collections.Counter(p.stem for p in videos)
        # a.mp4 and a.avi both: outputs named after the whole file name
        return [Source(p.stem if stems[p.stem] == 1 else p.name, p) for p in videos]
    files = video_lib.frame_files(path)
    if files:
        return [Source(path.resolve().name, path, tuple(files))]
    folders = [Source(d.name, d, tuple(files)) for d in sorted(path.iterdir())
               if d.is_dir() and (files := video_lib.frame_files(d))]
    if not folders:
        raise DataError(f"{path}: no videos ({', '.join(VIDEO_SUFFIXES)}), no frame images "
                        f"({', '.join(video_lib.IMAGE_SUFFIXES)}) and no folders of them")
    return folders


# ----------------------------------------------------------------------------------------------
# Running the model over the faces


class _Model:
    """Model calls on a worker thread, in order, at most `_IN_FLIGHT` waiting: the host finds
    and crops the next faces meanwhile. `collect` hands back what finished."""

    def __init__(self, predictor: Model):
        self.predictor = predictor
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self.pending: collections.deque = collections.deque()
        self.done: list[tuple[np.ndarray, dict]] = []
        self.busy = 0.0  # seconds in model calls
        self.waited = 0.0  # seconds the host waited for a free place in the queue

    def submit(self, rows: np.ndarray, images: np.ndarray | None, named: dict,
               valid: np.ndarray | None = None) -> None:
        """Faces (rows (N,), images (N, H, W, 3)), or a clip model's clips (rows, images,
        named inputs and `valid` with (C, T) in front)."""
        start = time.perf_counter()
        while len(self.pending) > _IN_FLIGHT:
            self._wait_oldest()
        self.waited += time.perf_counter() - start
        self.pending.append((rows.reshape(-1),
                             self.pool.submit(self._call, images, named, valid)))

    def _call(self, images, named, valid):
        start = time.perf_counter()
        predict = self.predictor.clip_batch if self.predictor.clips else self.predictor
        out = predict(images, valid=valid, **named)
        self.busy += time.perf_counter() - start
        return {k: v.reshape(-1, *v.shape[2 if self.predictor.clips else 1:])
                for k, v in out.items() if k in heads.HEADS}

    def _wait_oldest(self) -> None:
        rows, future = self.pending.popleft()
        self.done.append((rows, future.result()))

    def collect(self, wait: bool = False) -> list[tuple[np.ndarray, dict]]:
        while self.pending and (wait or self.pending[0][1].done()):
            self._wait_oldest()
        out, self.done = self.done, []
        return out


class _Outputs:
    """Per-row sums of the model's head outputs and how many calls gave each row (clips
    overlap: a frame's outputs are the mean of its windows)."""

    def __init__(self):
        self.sums: dict[str, dict[int, np.ndarray]] = collections.defaultdict(dict)
        self.counts: collections.Counter = collections.Counter()

    def add(self, results: Iterable[tuple[np.ndarray, dict]]) -> None:
        for rows, out in results:
            if not out:
                raise ConfigError("the model gives none of the task heads "
                                  f"{list(heads.HEADS)}: nothing to write per frame")
            for i, row in enumerate(rows):
                if row < 0:
                    continue
                self.counts[row] += 1
                for k, v in out.items():
                    sums = self.sums[k]
                    sums[row] = sums[row] + v[i] if row in sums else np.array(v[i], np.float64)

    def arrays(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """{head: (len(rows), size)} means of these rows, nan for rows -1 (no face)."""
        out = {}
        for k, sums in self.sums.items():
            size = len(next(iter(sums.values())))
            values = np.full((len(rows), size), np.nan)
            for i, row in enumerate(rows):
                if row in sums:
                    values[i] = sums[row] / self.counts[row]
            out[k] = values
        return out


class _FrameBatches:
    """A frame model: faces of any frames and tracks, `batch` per call (the predictor pads the
    last to its one compiled shape)."""

    def __init__(self, model: _Model, batch: int):
        self.model, self.batch = model, batch
        self.rows: list[int] = []
        self.images: list[np.ndarray] = []
        self.named: dict[str, list] = collections.defaultdict(list)

    def add(self, row: int, track: int, image: np.ndarray | None, named: dict) -> None:
        self.rows.append(row)
        if image is not None:
            self.images.append(image)
        for k, v in named.items():
            self.named[k].append(v)
        if len(self.rows) == self.batch:
            self._flush()

    def end_track(self, track: int) -> None:
        pass

    def finish(self) -> None:
        if self.rows:
            self._flush()

    def _flush(self) -> None:
        images = np.stack(self.images) if self.images else None
        self.model.submit(np.array(self.rows), images,
                          {k: np.stack(v) for k, v in self.named.items()})
        self.rows, self.images, self.named = [], [], collections.defaultdict(list)


def _stack(items: list[np.ndarray], pad: int) -> np.ndarray:
    out = np.stack(items)
    return np.concatenate([out, np.zeros((pad, *out.shape[1:]), out.dtype)]) if pad else out


@dataclasses.dataclass
class _Clip:
    """A track's faces still needed by a window: `items` are its faces `first`, first + 1, ...
    of `n` so far; the next window starts at face `next`, the last ran from `last_run`."""

    items: collections.deque = dataclasses.field(default_factory=collections.deque)
    first: int = 0
    n: int = 0
    next: int = 0
    last_run: int | None = None


class _TrackClips:
    """A temporal model: each track's faces in order, windows of `length` starting every
    `stride` faces and a last one ending at the track's end (`pipeline.clip_index`'s windows
    over the track's faces); a track shorter than `length` is one window padded at its end.
    `length` 0: each track is one clip. Only the faces a window still needs are kept. Windows
    of any tracks go `batch` per call (clips of one length)."""

    def __init__(self, model: _Model, length: int, stride: int, batch: int):
        self.model, self.length, self.stride, self.batch = model, length, stride, batch
        self.tracks: dict[int, _Clip] = {}
        self.windows: list[tuple[np.ndarray, np.ndarray | None, dict]] = []

    def add(self, row: int, track: int, image: np.ndarray | None, named: dict) -> None:
        t = self.tracks.setdefault(track, _Clip())
        t.items.append((row, image, named))
        t.n += 1
        while self.length and t.next + self.length <= t.n:
            self._run(t, t.next, self.length)
            t.next += self.stride
            # later windows start at `next` or later; the last may end at the track's end
            while t.first < min(t.next, t.n - self.length):
                t.items.popleft()
                t.first += 1

    def end_track(self, track: int) -> None:
        t = self.tracks.pop(track, None)
        if t is None:
            return
        if not self.length or t.last_run is None:  # one clip; or one window, padded
            self._run(t, 0, t.n)
        elif t.last_run + self.length < t.n:
            self._run(t, t.n - self.length, self.length)

    def finish(self) -> None:
        for track in list(self.tracks):
            self.end_track(track)
        self._flush()

    def _run(self, t: _Clip, start: int, count: int) -> None:
        items = list(t.items)[start - t.first: start - t.first + count]
        pad = max(0, self.length - len(items))
        rows = np.array([r for r, _, _ in items] + [-1] * pad)
        if self.windows and len(self.windows[0][0]) != len(rows):  # whole tracks: one length
            self._flush()
        images = None if items[0][1] is None else _stack([im for _, im, _ in items], pad)
        named = {k: _stack([n[k] for _, _, n in items], pad) for k in items[0][2]}
        self.windows.append((rows, images, named))
        t.last_run = start
        if len(self.windows) == self.batch:
            self._flush()

    def _flush(self) -> None:
        if not self.windows:
            return
        rows = np.stack([r for r, _, _ in self.windows])
        images = None if self.windows[0][1] is None else np.stack([i for _, i, _ in
                                                                   self.windows])
        named = {k: np.stack([n[k] for _, _, n in self.windows]) for k in self.windows[0][2]}
        self.model.submit(rows, images, named, rows >= 0)
        self.windows = []


class _AudioWindows:
    """The audio windows of a source's frames, as its run cut them in training
    (`audio_table.spectrogram`, `audio.frame_window`)."""

    def __init__(self, source: Source, cfg: audio.AudioConfig, fps: float):
        self.cfg, self.fps = cfg, fps
        is_video = source.files is None
        wav = video_lib.wav_beside(source.path)
        entry, mel = audio_table.spectrogram(audio_table.Source(
            video=str(source.path) if is_video else None, wav=str(wav) if wav else None,
            fps=fps), cfg)
        if mel is None:
            why = audio_table.explain(entry)
            if cfg.missing == "error":
                raise DataError(f"{source.path}: {why} (the model's data.audio.missing=error)")
            logging.warning("%s: %s: the model hears silence", source.path, why)
            mel = np.zeros((0, cfg.n_mels), np.float16)
        self.mel = mel

    def __call__(self, frame: int) -> np.ndarray:
        return audio.frame_window(self.mel, frame, self.fps, self.cfg)


# ----------------------------------------------------------------------------------------------
# One input


@dataclasses.dataclass
class Result:
    """One input's table, the error that stopped it early (its table: the frames before), and
    the seconds each stage took on its own thread."""

    table: dict[str, np.ndarray]
    fps: float
    error: DataError | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)


class _Prefetch:
    """Runs an iterator on a background thread, `depth` items ahead; its exception is raised
    where the item it failed at would have come. `busy`: seconds spent producing."""

    _END = object()

    def __init__(self, items: Iterator, depth: int = 8):
        self.queue: queue.Queue = queue.Queue(depth)
        self.stop = threading.Event()
        self.busy = 0.0
        self.thread = threading.Thread(target=self._fill, args=(items,), daemon=True)
        self.thread.start()

    def _fill(self, items: Iterator) -> None:
        try:
            while True:
                start = time.perf_counter()
                item = next(items, self._END)
                self.busy += time.perf_counter() - start
                if item is self._END or self.stop.is_set():
                    break
                self.queue.put(item)
        except Exception as e:  # handed to the consumer
            self.queue.put(e)
        self.queue.put(self._END)

    def __iter__(self):
        while (item := self.queue.get()) is not self._END:
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self) -> None:
        self.stop.set()
        while self.thread.is_alive():  # unblock a full queue
            try:
                self.queue.get(timeout=0.1)
            except queue.Empty:
                pass


class _Rows:
    """The table's rows as faces are found. A face of a tentative track (`faces.Tracker`'s
    `min_hits`) is held with its model inputs until the track is confirmed (then fed to the
    model under its id, before the face that confirmed it) or dropped (then its row goes)."""

    def __init__(self, feeder: _FrameBatches | _TrackClips):
        self.feeder = feeder
        self.columns: dict[str, list] = {"frame": [], "track": [], "box": [], "score": []}
        self.frames: list[int] = []  # analysed
        self.pending: dict[int, list] = collections.defaultdict(list)
        self.dropped: set[int] = set()

    def add(self, number: int, found: list[tuple[faces.Face, np.ndarray | None, dict]],
            tracker: faces.Tracker) -> None:
        self.frames.append(number)
        now = []
        for face, image, named in found:
            row = len(self.columns["frame"])
            for k, v in zip(self.columns, (number, face.track, face.box, face.score),
                            strict=True):
                self.columns[k].append(v)
            if face.confirmed:
                now.append((row, face.track, image, named))
            else:
                self.pending[face.track].append((row, image, named))
        self.settle(tracker)
        for item in now:
            self.feeder.add(*item)
        for track in tracker.ended:
            self.feeder.end_track(track)

    def settle(self, tracker: faces.Tracker) -> None:
        """The held faces of the tracks `tracker` confirmed or dropped at its last call."""
        for provisional, track in tracker.confirmed.items():
            for row, image, named in self.pending.pop(provisional, ()):
                self.columns["track"][row] = track
                self.feeder.add(row, track, image, named)
        for provisional in tracker.dropped:
            self.dropped.update(row for row, _, _ in self.pending.pop(provisional, ()))

    def ordered(self) -> tuple[dict[str, list], np.ndarray]:
        """(columns, row each came from: -1 for a frame without a face), by frame then track:
        the kept faces and one empty row per analysed frame without any."""
        keep = [i for i in range(len(self.columns["frame"])) if i not in self.dropped]
        faced = {self.columns["frame"][i] for i in keep}
        empty = [f for f in self.frames if f not in faced]
        rows = np.array(keep + [-1] * len(empty), np.int64)
        frame = np.array([self.columns["frame"][i] for i in keep] + empty, np.int64)
        track = np.array([self.columns["track"][i] for i in keep] + [-1] * len(empty))
        order = np.lexsort((track, frame))
        nothing = {"box": np.full(4, np.nan), "score": math.nan}
        columns = {k: [v[r] if r >= 0 else nothing.get(k, -1) for r in rows[order]]
                   for k, v in self.columns.items()}
        columns["frame"] = frame[order].tolist()
        return columns, rows[order]


def _check_inputs(predictor: Model) -> None:
    other = [k for k in predictor.inputs if k not in _MODEL_INPUTS]
    if other:
        raise ConfigError(
            f"the model takes {other}, which the video path cannot give (it gives "
            f"{list(_MODEL_INPUTS)}): a head trained on cached features (`--mode=extract`'s "
            "embeddings, e.g. the MAE fusion's temporal heads) needs the frame model that "
            "cached them: --backbone=<its workdir or converted folder>")


def analyse_input(source: Source, predictor: Model, options: Options,
                  progress: bool = False) -> Result:
    """Analyses one input (`find_inputs`); an error of its frames ends it early with the rows
    so far (`Result.error`)."""
    check_video_name(source.name, str(source.path))  # it names the output files
    _check_inputs(predictor)
    fps, expected = source.info(options)
    predictor = predictor.sharded(options.devices, options.batch)
    tracker = faces.Tracker(faces.detector(options.detector), min_face=options.min_face,
                            full_every=options.full_every, max_gap=options.max_gap,
                            min_hits=options.min_hits)
    hears = _AudioWindows(source, predictor.feed.audio, fps) \
        if {"audio", "audio_stats"} & set(predictor.inputs) else None
    model = _Model(predictor)
    rows = _Rows(_TrackClips(model, predictor.feed.clip_length, predictor.feed.clip_stride,
                             predictor.per_call) if predictor.clips
                 else _FrameBatches(model, predictor.per_call))
    size = predictor.preprocess.size if "image" in predictor.inputs else 0
    outputs, error, host = _Outputs(), None, 0.0
    frames = _Prefetch(source.frames(options.every))
    bar = tqdm(total=expected, desc=source.name, unit="frame", disable=not progress,
               mininterval=1.0, dynamic_ncols=True)
    try:
        for number, rgb in frames:
            start = time.perf_counter()
            found = [(face, _model_image(rgb, face, size, options),
                      _sound(hears, number, predictor.inputs)) for face in tracker(rgb)]
            rows.add(number, found, tracker)
            host += time.perf_counter() - start
            outputs.add(model.collect())
            bar.update()
    except DataError as e:
        error = e
    finally:
        frames.close()
        bar.close()
    tracker.finish()
    rows.settle(tracker)
    rows.feeder.finish()
    outputs.add(model.collect(wait=True))
    model.pool.shutdown()
    columns, index = rows.ordered()
    table = _table(columns, outputs.arrays(index), predictor, fps)
    # The host's time less its waits for the model; max: equal floats may subtract to -0.0.
    detect_crop = max(0.0, host - model.waited)
    return Result(table, fps, error, {"decode": frames.busy, "detect_crop": detect_crop,
                                      "model": model.busy})


def _sound(hears: _AudioWindows | None, number: int, inputs: tuple[str, ...]) -> dict:
    """The frame's audio inputs: its log-mel window and/or the window's per-band mean and std
    (`audio_stats`, as the pipeline pools them)."""
    if hears is None:
        return {}
    window = hears(number)
    return {**({"audio": window} if "audio" in inputs else {}),
            **({"audio_stats": audio.window_stats(window)} if "audio_stats" in inputs else {})}


def _model_image(rgb: np.ndarray, face: faces.Face, size: int, options: Options
                 ) -> np.ndarray | None:
    """The face's crop at the model's size (None: the model takes no image)."""
    if not size:
        return None
    image = rgb if options.detector == "none" else faces.crop(rgb, face.box, options.margin)
    return augment.resize(image, size)


def analyse(path: str | Path, model: str | Path | Model,
            backbone: str | Path | Model | None = None, **options: Any
            ) -> dict[str, np.ndarray]:
    """The per-frame table of one video (or folder of frames) as numpy columns: `frame` (from
    1), `timestamp` (s), `track` (-1: no face in that frame; its other values are nan, "" or
    -1), the box `x`, `y`, `w`, `h` and detector `score`, and per head of the model `valence`,
    `arousal`; `p_<class>` and `expression`; `p_<AU>` and the 0/1 `<AU>` decisions.

    `model`: a workdir or converted folder (`inference.load`) or a loaded predictor;
    `backbone`: for a head over cached features, the frame model whose embeddings it read
    (`inference.Stacked`); `options`: the fields of `Options`. A video that cannot be read to
    its end is a `DataError` (the command line writes the rows before it).
    """
    predictor = _predictor(model, backbone)
    sources = find_inputs(path)
    if len(sources) != 1:
        raise ConfigError(f"{path}: a folder of {len(sources)} videos; analyse takes one video "
                          "or folder of frames (`run` takes a folder of videos)")
    result = analyse_input(sources[0], predictor, Options(**options))
    if result.error:
        raise result.error
    return result.table


# ----------------------------------------------------------------------------------------------
# The table and its files


def _table(rows: Mapping[str, list], outputs: Mapping[str, np.ndarray],
           predictor: Model, fps: float) -> dict[str, np.ndarray]:
    """The rows' columns, the heads' outputs smoothed along each track (columns for every head
    the predictor names, even when no face was found)."""
    frame = np.asarray(rows["frame"], np.int64)
    track = np.asarray(rows["track"], np.int64)
    box = np.asarray(rows["box"], np.float64).reshape(-1, 4)
    table = {"frame": frame, "timestamp": (frame - 1) / fps, "track": track,
             **{k: box[:, i] for i, k in enumerate("xywh")},
             "score": np.asarray(rows["score"], np.float64)}
    face, post = track >= 0, predictor.post
    named = set(outputs) | set(predictor.heads or ())
    for name in (h for h in heads.HEADS if h in named):
        values = outputs.get(name, np.full((len(frame), heads.get(name).size), np.nan))
        smoothing = post.smoothing.get(name, postprocess.Smoothing())
        if face.any():
            values[face] = postprocess.smooth_rows(values[face], track[face], frame[face],
                                                   smoothing)
        table.update(_head_columns(name, values, face, post.thresholds))
    return table


def _head_columns(name: str, values: np.ndarray, face: np.ndarray,
                  thresholds: np.ndarray | None) -> dict[str, np.ndarray]:
    head = heads.get(name)
    if head.kind == "regression":
        return {c: values[:, i] for i, c in enumerate(head.columns)}
    out = {f"p_{c}": values[:, i] for i, c in enumerate(head.columns)}
    if head.kind == "classes":
        best = np.argmax(np.nan_to_num(values, nan=-1.0), -1)
        out["expression"] = np.where(face, np.asarray(head.columns)[best], "")
    else:
        decided = head.submitted(np.nan_to_num(values), 0.5 if thresholds is None
                                 else thresholds)
        out.update({c: np.where(face, decided[:, i], -1).astype(np.int8)
                    for i, c in enumerate(head.columns)})
    return out


# Digits written per column kind; nan, and any value but the frame's in a row without a face,
# are written empty.
_FORMATS = {"timestamp": "{:.3f}", "x": "{:.1f}", "y": "{:.1f}", "w": "{:.1f}", "h": "{:.1f}",
            "score": "{:.4g}"}
_ALWAYS = ("frame", "timestamp")


def write_csv(table: Mapping[str, np.ndarray], path: Path) -> Path:
    """The table as CSV: a header line and a line per row."""
    face = table["track"] >= 0
    columns = [_cells(name, values, face) for name, values in table.items()]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(table))
        writer.writerows(zip(*columns, strict=True))
    return path


def _cells(name: str, values: np.ndarray, face: np.ndarray) -> list[str]:
    if values.dtype.kind in "US":
        return values.tolist()
    fmt = _FORMATS.get(name, "{:d}" if values.dtype.kind in "iu" else "{:.4f}")
    written = face | (name in _ALWAYS)
    return [fmt.format(v) if w and v == v else "" for v, w in zip(values.tolist(), written,
                                                                    strict=True)]


def _labels(table: Mapping[str, np.ndarray], i: int) -> str:
    parts = [f"#{table['track'][i]}"]
    if "expression" in table:
        parts.append(str(table["expression"][i]))
    if "valence" in table:
        parts.append(f"V{table['valence'][i]:+.2f} A{table['arousal'][i]:+.2f}")
    return " ".join(parts)


def write_annotated(source: Source, table: Mapping[str, np.ndarray], path: Path,
                    fps: float, every: int) -> Path:
    """The analysed frames with each face's box and its labels (track, expression, valence and
    arousal), H.264 where PyAV has it (else MPEG-4), at fps / every."""
    by_frame: dict[int, list[int]] = collections.defaultdict(list)
    for i in np.flatnonzero(table["track"] >= 0):
        by_frame[int(table["frame"][i])].append(int(i))
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    rate = fractions.Fraction(fps / every).limit_denominator(1001)
    size = None
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.pix_fmt = "yuv420p"
        for number, rgb in _until_error(source.frames(every)):
            if size is None:  # yuv420p: even sides
                size = (rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2)
                stream.width, stream.height = size
            image = np.ascontiguousarray(cv2.resize(rgb, size) if rgb.shape[1::-1] != size
                                         else rgb)
            _draw(image, table, by_frame.get(number, []))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def _until_error(frames: Iterator[tuple[int, np.ndarray]]) -> Iterator[tuple[int, np.ndarray]]:
    """The frames up to a cut or broken part (the analysis already reported it)."""
    try:
        yield from frames
    except DataError:
        return


def _draw(image: np.ndarray, table: Mapping[str, np.ndarray], rows: list[int]) -> None:
    thick = max(1, round(min(image.shape[:2]) / 300))
    for i in rows:
        x, y, w, h = (round(table[k][i]) for k in "xywh")
        cv2.rectangle(image, (x, y), (x + w, y + h), (0, 255, 0), thick)
        cv2.putText(image, _labels(table, i), (x, max(12, y - 4)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4 * thick, (0, 255, 0), thick, cv2.LINE_AA)


# ----------------------------------------------------------------------------------------------
# The command


def _predictor(model: str | Path | Model, backbone: str | Path | Model | None) -> Model:
    predictor = inference.load(model) if isinstance(model, str | Path) else model
    if backbone is None:
        return predictor
    frames = inference.load(backbone) if isinstance(backbone, str | Path) else backbone
    return inference.Stacked(frames, predictor)


def run(model: str | Path | Model, input_path: str | Path, out: str | Path,
        options: Options = Options(), annotate: bool = False, progress: bool = True,
        backbone: str | Path | Model | None = None) -> list[str]:
    """Analyses every input of `input_path` into `out`; returns the failures, one line each
    (their rows before the failure are written). `backbone`: as `analyse`'s."""
    out = Path(out)
    predictor = _predictor(model, backbone).sharded(options.devices, options.batch)
    sources = find_inputs(input_path)
    out.mkdir(parents=True, exist_ok=True)
    failures = []
    for source in sources:
        try:
            result = analyse_input(source, predictor, options, progress)
        except errors.UserError as e:  # nothing read
            failures.append(str(e))
            logging.error("%s", e)
            continue
        _write(source, result, out, options, annotate)
        if result.error:
            failures.append(str(result.error))
            logging.error("%s (its %d rows before are written)", result.error,
                          len(result.table["frame"]))
    return failures


def _write(source: Source, result: Result, out: Path, options: Options, annotate: bool
           ) -> None:
    table = result.table
    face = table["track"] >= 0
    write_csv(table, out / f"{source.name}.csv")
    plots.video_tracks(table, out / f"{source.name}.png", source.name)
    if annotate and face.any():
        write_annotated(source, table, out / f"{source.name}_annotated.mp4", result.fps,
                        options.every)
    frames = len(np.unique(table["frame"]))
    if not face.any():
        logging.warning("%s: no face found in its %d frames: %s holds empty rows", source.path,
                        frames, out / f"{source.name}.csv")
        return
    logging.info("%s: %d frames, a face in %d, tracks: %d -> %s (%s)", source.name, frames,
                 len(np.unique(table["frame"][face])), len(np.unique(table["track"][face])),
                 out / f"{source.name}.csv", ", ".join(
                     f"{k} {v:.1f} s" for k, v in result.seconds.items()))


def _define_flags() -> None:
    flags.DEFINE_string("model", None, "Training workdir or converted folder "
                        "(python -m abaw_jax.convert).")
    flags.DEFINE_string("checkpoint", "best", "Of a workdir: 'best', 'latest' or a step.")
    flags.DEFINE_string("backbone", None, "For a head over cached features (CLIP+LSTM, the MAE "
                        "fusion): the frame model whose embeddings it was trained on (workdir "
                        "or converted folder; its best checkpoint).")
    flags.DEFINE_string("input", None, "A video file, a folder of videos, a folder of frame "
                        "images or a folder of such folders.")
    flags.DEFINE_string("out", None, "Output folder: <name>.csv, <name>.png per input.")
    flags.DEFINE_string("detector", "haar", "haar (OpenCV's bundled cascade), "
                        "yunet:<path of its .onnx> or none (the frames are faces).")
    flags.DEFINE_integer("batch", Options.batch, "Faces (clips of a temporal model) per "
                         "device and model call (0: the model's own, 32 faces or 1 clip).")
    flags.DEFINE_integer("every", Options.every, "Analyse every N-th frame.")
    flags.DEFINE_float("margin", Options.margin, "Crop margin, a fraction of the face box.")
    flags.DEFINE_float("min_face", Options.min_face, "Smallest face searched for, pixels "
                       "(0: an eighth of the frame's shorter side).")
    flags.DEFINE_integer("full_every", Options.full_every, "Search the whole frame every N "
                         "analysed frames (in between, near each face only).")
    flags.DEFINE_integer("max_gap", Options.max_gap, "Analysed frames a face may be missed in "
                         "and keep its track id.")
    flags.DEFINE_integer("min_hits", Options.min_hits, "Frames a new face must be found in "
                         "before its track is written (its earlier frames then too).")
    flags.DEFINE_integer("devices", Options.devices, "Local devices the model's batches are "
                         "split over (0: all).")
    flags.DEFINE_float("fps", Options.fps, "Frame rate of a folder of frames.")
    flags.DEFINE_bool("annotate", False, "Also write <name>_annotated.mp4 with boxes and labels.")
    flags.DEFINE_bool("traceback", False, "Show the traceback of user errors.")
    flags.mark_flags_as_required(["model", "input", "out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    console.quiet_libraries()
    try:
        options = Options(f.detector, f.batch, f.every, f.margin, f.min_face, f.full_every,
                          f.max_gap, f.fps, f.min_hits, f.devices)
        faces.detector(options.detector)  # a bad detector before the model loads
        failures = run(inference.load(f.model, f.checkpoint), f.input, f.out, options,
                       f.annotate, backbone=f.backbone)
    except Exception as e:
        if f.traceback or not errors.is_user_error(e):
            raise
        console.exit_with(f"error: {e}")
    if failures:
        console.exit_with(f"error: {len(failures)} input(s) failed: " + "; ".join(failures))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
