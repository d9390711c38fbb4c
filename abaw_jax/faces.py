"""Faces in video frames: detectors, crops with a margin, and tracks with stable ids.

Detectors (`--detector` of `python -m abaw_jax.video`): "haar", OpenCV's bundled frontal-face
Haar cascade (no download); "yunet:<onnx file>", OpenCV's YuNet CNN (`cv2.FaceDetectorYN`) from
the user's copy of its ONNX file; "none": every frame is one face (already-cropped faces).
`DETECTORS` maps the names to factories (a test may register its own).

`Tracker` finds the faces of consecutive frames. It searches the whole frame every `full_every`
frames; in between it looks for each track only near its last box and at sizes near its own,
which costs a fraction of a full search (a new face waits for the next full search). Frames
are searched at a reduced scale, such that the smallest face wanted (`min_face` pixels) is the
detector's smallest. Detections are matched to tracks by IoU (greedily, the best overlap
first); a track not found for more than `max_gap` frames ends, and a face found after that
starts a new track id. With `min_hits` > 1 a new track is tentative (a provisional negative id)
until it has been found in `min_hits` frames; then it gets its id (`confirmed` says which
provisional id became which), and a tentative track that ends before that is `dropped`: a
detector's one-frame false positive never becomes a track, and the caller, which kept the
tentative faces, writes them under the confirmed id (no frame of a true face is lost).

numpy and OpenCV only (no jax).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from abaw_jax.errors import ConfigError, NotFoundError, UnknownNameError


class Detector(Protocol):
    """Finds faces in an RGB image: (n, 4) boxes x, y, w, h in its pixels, and (n,) scores."""

    smallest: int  # the smallest face (pixels) it finds

    def __call__(self, rgb: np.ndarray, min_size: int, max_size: int
                 ) -> tuple[np.ndarray, np.ndarray]: ...


class Haar:
    """OpenCV's frontal-face Haar cascade (or the cascade file `arg`). Score: the number of
    overlapping detections merged into the box (OpenCV's neighbours; not a probability)."""

    def __init__(self, arg: str = ""):
        path = arg or cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
        if not Path(path).is_file():
            raise NotFoundError(f"{path}: no such Haar cascade file")
        try:  # OpenCV's parse errors come through its bindings as SystemError
            self.cascade = cv2.CascadeClassifier(path)
        except (cv2.error, SystemError) as e:
            raise NotFoundError(f"{path}: not a Haar cascade OpenCV can read") from e
        if self.cascade.empty():
            raise NotFoundError(f"{path}: not a Haar cascade OpenCV can read")
        self.smallest = int(max(self.cascade.getOriginalWindowSize()))

    def __call__(self, rgb: np.ndarray, min_size: int, max_size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        boxes, neighbours = self.cascade.detectMultiScale2(
            gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_size, min_size),
            maxSize=(max_size, max_size))
        return (np.asarray(boxes, np.float64).reshape(-1, 4),
                np.asarray(neighbours, np.float64).reshape(-1))


class YuNet:
    """OpenCV's YuNet face detector from its ONNX file (`yunet:<path>`, e.g.
    face_detection_yunet_2023mar.onnx of the OpenCV model zoo). Score: its confidence, 0-1."""

    smallest = 16  # its smallest anchors are 16 pixels
    threshold = 0.6

    def __init__(self, arg: str = ""):
        if not arg:
            raise ConfigError("--detector=yunet:<path of the YuNet .onnx file>")
        if not Path(arg).is_file():
            raise NotFoundError(f"{arg}: no such YuNet ONNX file")
        try:
            self.net = cv2.FaceDetectorYN.create(arg, "", (320, 320), self.threshold)
        except cv2.error as e:
            raise NotFoundError(f"{arg}: not a YuNet model OpenCV can load ({e.err})") from e

    def __call__(self, rgb: np.ndarray, min_size: int, max_size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
        self.net.setInputSize((rgb.shape[1], rgb.shape[0]))
        _, found = self.net.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        found = np.zeros((0, 15)) if found is None else np.asarray(found, np.float64)
        side = found[:, 2:4].max(1)
        keep = (side >= min_size) & (side <= max_size)
        return found[keep, :4], found[keep, 14]


DETECTORS: dict[str, Callable[[str], Detector]] = {"haar": Haar, "yunet": YuNet}


def detector(spec: str) -> Detector | None:
    """`name[:argument]` -> a detector of `DETECTORS`; "none" -> None (whole frames)."""
    name, _, arg = spec.partition(":")
    if name == "none":
        return None
    if name not in DETECTORS:
        raise UnknownNameError(f"unknown face detector {name!r}; known: "
                               f"{sorted(DETECTORS) + ['none']}")
    return DETECTORS[name](arg)


@dataclasses.dataclass(frozen=True)
class Face:
    track: int  # stable id from 0, in order of confirmation (then left to right); < -1: tentative
    box: np.ndarray  # (4,) x, y, w, h in whole pixels of the frame
    score: float  # the detector's (nan without one)

    @property
    def confirmed(self) -> bool:
        return self.track >= 0


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes (..., 4) x, y, w, h, broadcast."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    w = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    h = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    return inter / np.maximum(union, 1e-9)


def crop(frame: np.ndarray, box: np.ndarray, margin: float) -> np.ndarray:
    """The square around a box's centre, of side max(w, h) * (1 + 2 * margin), black where it
    leaves the frame."""
    x, y, w, h = (float(v) for v in box)
    side = max(1, round(max(w, h) * (1 + 2 * margin)))
    x0, y0 = round(x + w / 2 - side / 2), round(y + h / 2 - side / 2)
    out = np.zeros((side, side, frame.shape[2]), frame.dtype)
    fx0, fy0 = max(x0, 0), max(y0, 0)
    fx1, fy1 = min(x0 + side, frame.shape[1]), min(y0 + side, frame.shape[0])
    if fx0 < fx1 and fy0 < fy1:
        out[fy0 - y0: fy1 - y0, fx0 - x0: fx1 - x0] = frame[fy0:fy1, fx0:fx1]
    return out


@dataclasses.dataclass
class _Track:
    id: int  # < -1 while tentative
    box: np.ndarray
    seen: int  # the frame count when last found
    hits: int = 1  # frames found in


class Tracker:
    """The faces of consecutive frames (`__call__` once per frame, in order) with track ids.

    `detector` None: every frame is one face, track 0, its box the whole frame. `min_face`:
    the smallest face searched for, in frame pixels (0: an eighth of the frame's shorter side).
    After a call: `ended`, the ids of the tracks that ended at it (not found for `max_gap`
    frames); `confirmed`, {provisional id: id} of the tracks confirmed at it (this frame's faces
    already carry the id; with `min_hits` 1 every new track at once); `dropped`, the provisional
    ids of tentative tracks that ended unconfirmed. `finish()` drops the tentative tracks left at
    the end (their ids in `dropped`).
    """

    # Between full searches a track is looked for in a square of this many times its size
    # around its last box, at sizes within these factors of its last size.
    ROI = 2.0
    SIZES = (0.7, 1.45)

    def __init__(self, detector: Detector | None, *, min_face: float = 0, full_every: int = 10,
                 max_gap: int = 15, min_hits: int = 1, min_iou: float = 0.3):
        if full_every < 1 or max_gap < 0 or min_hits < 1:
            raise ConfigError(f"full_every={full_every} and min_hits={min_hits} must be >= 1, "
                              f"max_gap={max_gap} >= 0")
        self.detector, self.min_face = detector, min_face
        self.full_every, self.max_gap, self.min_iou = full_every, max_gap, min_iou
        self.min_hits = min_hits
        self.tracks: list[_Track] = []
        self.count, self.next_id, self.next_tentative = 0, 0, -2
        self.ended: list[int] = []
        self.dropped: list[int] = []
        self.confirmed: dict[int, int] = {}

    def __call__(self, rgb: np.ndarray) -> list[Face]:
        h, w = rgb.shape[:2]
        self.count += 1
        if self.detector is None:
            return [Face(0, np.array([0.0, 0.0, w, h]), math.nan)]
        # An eighth rather than a tenth: the benchmark's 720p face took 5.9 instead of 8.5 ms a
        # frame to find (searched at 0.27 rather than 0.33 of the size; busy machine).
        min_face = self.min_face or min(h, w) / 8
        scale = min(1.0, self.detector.smallest / min_face)
        full = (self.count - 1) % self.full_every == 0
        if full:
            boxes, scores = self._search(rgb, (0, 0, w, h), scale, min_face, max(h, w))
        else:
            boxes, scores = self._near_tracks(rgb, scale, min_face)
        return self._match(*_suppress(boxes, scores), new_tracks=full)

    def _search(self, rgb: np.ndarray, region: tuple[int, int, int, int], scale: float,
                smallest: float, largest: float) -> tuple[np.ndarray, np.ndarray]:
        """Detections in `region` (x0, y0, x1, y1) of the frame, searched at `scale`, in frame
        pixels."""
        x0, y0, x1, y1 = region
        part = rgb[y0:y1, x0:x1]
        if scale < 1:
            size = (max(1, round(part.shape[1] * scale)), max(1, round(part.shape[0] * scale)))
            part = cv2.resize(part, size, interpolation=cv2.INTER_AREA)
        lo = max(self.detector.smallest, math.floor(smallest * scale))
        hi = math.ceil(largest * scale)
        if hi < lo or min(part.shape[:2]) < lo:
            return np.zeros((0, 4)), np.zeros(0)
        boxes, scores = self.detector(part, lo, hi)
        # whole pixels of the frame: a box's finer places mean nothing at 10 % size steps, and
        # the written box then gives back the very crop
        return np.round(boxes / scale) + np.array([x0, y0, 0, 0]), scores

    def _near_tracks(self, rgb: np.ndarray, scale: float, min_face: float
                     ) -> tuple[np.ndarray, np.ndarray]:
        h, w = rgb.shape[:2]
        found = [(np.zeros((0, 4)), np.zeros(0))]
        for t in self.tracks:
            size = max(t.box[2:])
            cx, cy = t.box[:2] + t.box[2:] / 2
            half = self.ROI * size / 2
            region = (max(0, math.floor(cx - half)), max(0, math.floor(cy - half)),
                      min(w, math.ceil(cx + half)), min(h, math.ceil(cy + half)))
            if region[2] > region[0] and region[3] > region[1]:
                found.append(self._search(rgb, region, scale,
                                          max(min_face, self.SIZES[0] * size),
                                          self.SIZES[1] * size))
        return np.concatenate([b for b, _ in found]), np.concatenate([s for _, s in found])

    def _match(self, boxes: np.ndarray, scores: np.ndarray, new_tracks: bool) -> list[Face]:
        """Detections -> the tracks they overlap most; the others start tracks in a full
        search (near a track, they are parts or neighbours of it cut by the search region)."""
        taken_tracks, taken_boxes, found = set(), set(), []
        if self.tracks and len(boxes):
            overlap = iou(np.stack([t.box for t in self.tracks])[:, None], boxes[None])
            for flat in np.argsort(-overlap, axis=None):
                ti, bi = np.unravel_index(flat, overlap.shape)
                if overlap[ti, bi] < self.min_iou:
                    break
                if ti in taken_tracks or bi in taken_boxes:
                    continue
                taken_tracks.add(ti)
                taken_boxes.add(bi)
                track = self.tracks[ti]
                track.box, track.seen, track.hits = boxes[bi], self.count, track.hits + 1
                found.append((track, bi))
        for bi in np.lexsort((boxes[:, 1], boxes[:, 0])) if new_tracks else ():
            if bi not in taken_boxes:  # new tracks from left to right
                self.tracks.append(_Track(self.next_tentative, boxes[bi], self.count))
                self.next_tentative -= 1
                found.append((self.tracks[-1], bi))
        self._confirm()
        gone = [t for t in self.tracks if self.count - t.seen > self.max_gap]
        self.ended = [t.id for t in gone if t.id >= 0]
        self.dropped = [t.id for t in gone if t.id < 0]
        self.tracks = [t for t in self.tracks if self.count - t.seen <= self.max_gap]
        faces = [Face(t.id, boxes[bi], float(scores[bi])) for t, bi in found]
        return sorted(faces, key=lambda f: (not f.confirmed, abs(f.track)))

    def _confirm(self) -> None:
        """Ids for the tentative tracks found in `min_hits` frames, in order of creation."""
        self.confirmed = {}
        for t in self.tracks:
            if t.id < 0 and t.hits >= self.min_hits:
                self.confirmed[t.id] = self.next_id
                t.id = self.next_id
                self.next_id += 1

    def finish(self) -> None:
        """The end of the frames: tentative tracks left are dropped, the others end."""
        self.dropped = [t.id for t in self.tracks if t.id < 0]
        self.ended = [t.id for t in self.tracks if t.id >= 0]
        self.tracks, self.confirmed = [], {}


def _suppress(boxes: np.ndarray, scores: np.ndarray, overlap: float = 0.5
              ) -> tuple[np.ndarray, np.ndarray]:
    """Non-maximum suppression: of boxes overlapping by more than `overlap` IoU, the best
    scored (two tracks' searches may find the same face)."""
    keep: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if all(iou(boxes[i], boxes[k]) <= overlap for k in keep):
            keep.append(int(i))
    keep.sort()
    return boxes[keep], scores[keep]
