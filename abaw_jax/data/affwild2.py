"""The Aff-Wild2 layout: annotation parsing, image discovery, curation and its statistics.

Plain numpy and the standard library only: this module runs inside data-loader workers and in the
record writer, where importing jax would be wasted start-up time.

Every annotated line is accounted for: it is either curated (kept) or dropped for a named reason,
and the stats say how many of each. Malformed input raises `DataError` naming the file and line.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from abaw_jax.errors import UserError

TASKS = ("va", "expr", "au")
ALL_TASKS = (*TASKS, "mtl")
SPLITS = ("train", "validation")
CHALLENGE_DIRS = {
    "va": "VA_Estimation_Challenge",
    "expr": "EXPR_Recognition_Challenge",
    "au": "AU_Detection_Challenge",
    "mtl": "MTL_Challenge",
}
SPLIT_DIRS = {"train": "Train_Set", "validation": "Validation_Set"}
MTL_FILES = {"train": "training_set_annotations.txt",
             "validation": "validation_set_annotations.txt"}
EXPR_NAMES = ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other")
AU_NAMES = ("AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24", "AU25",
            "AU26")
HEADERS = {"va": ("valence", "arousal"), "expr": EXPR_NAMES, "au": AU_NAMES}
MTL_HEADER = ("image", "valence", "arousal", "expression", "aus")
NUM_COLUMNS = {"va": 2, "expr": 1, "au": 12}  # values per data line
# Labels dropped for something other than the documented invalid markers: a value outside the
# task's range (valence 5.0, expression 9, AU 2) or not a finite number (nan, inf).
LABEL_FAULTS = ("out_of_range", "not_finite")
DROP_REASONS = ("invalid_label", *LABEL_FAULTS, "missing_image")
MTL_DROP_REASONS = ("invalid_all", *LABEL_FAULTS, "missing_image")
STRICT_DROP_REASONS = ("invalid_any", *LABEL_FAULTS, "missing_image")
INVALID_MARKERS = {"va": -5, "expr": -1, "au": -1}  # the organisers' "no label here"
# `Annotated` labels: the smallest dtypes that hold every label and marker (AU train: 22 MB).
ANNOTATED_DTYPES = {"va": np.float32, "expr": np.int8, "au": np.int8}
_IMAGE_NAME = re.compile(r"^(\d+)\.jpg$")


class DataError(UserError, ValueError):
    """Malformed or missing input. The message names the file (and line) to look at."""


def check_video_name(name: str, where: str) -> str:
    """`name` if it is a usable video name, else a `DataError` naming `where` (file:line).

    Video names become paths (`<root>/<video>/`, `<out>/<video>.txt`) and the first field of a
    submission line, so a separator or `..` would reach outside the folder and a comma would
    break the line.
    """
    problem = ("is empty" if not name.strip() else
               "is `.` or `..`" if name in (".", "..") else
               "holds a path separator" if "/" in name or "\\" in name else
               "holds a comma (a submission line cannot)" if "," in name else
               "holds a NUL character" if "\0" in name else None)
    if problem:
        raise DataError(f"{where}: video name {name!r} {problem}")
    return name


# ----------------------------------------------------------------------------------------------
# Annotation files


def _read_lines(path: Path) -> list[str]:
    """Lines of a text file with Windows/Unix endings; trailing blank lines are dropped."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _check_header(path: Path, got: str, expected: Sequence[str]) -> None:
    names = tuple(s.strip() for s in got.split(","))
    if tuple(n.lower() for n in names) != tuple(n.lower() for n in expected):
        raise DataError(f"{path}:1: header {got!r} is not the expected {','.join(expected)!r}")


def _parse_values(path: Path, lines: Sequence[str], ncols: int, first_line: int) -> np.ndarray:
    """Parses comma-separated numbers into a (len(lines), ncols) float32 array.

    Vectorised for the common case (millions of lines); when anything is off it walks the lines
    once more only to name the first bad one.
    """
    if not lines:
        return np.zeros((0, ncols), np.float32)
    commas = np.fromiter((line.count(",") for line in lines), np.int64, len(lines))
    bad = np.flatnonzero(commas != ncols - 1)
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{path}:{i + first_line}: expected {ncols} comma-separated values, "
                        f"got {commas[i] + 1}: {lines[i]!r}")
    try:
        return np.array(",".join(lines).split(","), dtype=np.float32).reshape(-1, ncols)
    except ValueError:
        pass
    for i, line in enumerate(lines):
        for token in line.split(","):
            try:
                float(token)
            except ValueError:
                raise DataError(f"{path}:{i + first_line}: {token.strip()!r} is not a number "
                                f"in {line!r}") from None
    raise AssertionError("unreachable: the vectorised parse failed but every value parses")


def _check_integers(path: Path, values: np.ndarray, first_line: int) -> None:
    # nan and inf are not a malformed file but a label fault, counted by curation.
    finite = np.where(np.isfinite(values), values, 0)
    frac = np.flatnonzero(np.any(finite != np.round(finite), axis=-1))
    if frac.size:
        i = int(frac[0])
        raise DataError(f"{path}:{i + first_line}: expected integers, got {values[i].tolist()}")


def read_annotation(path: str | os.PathLike, task: str) -> np.ndarray:
    """Reads one per-video annotation file: row i is frame i + 1.

    Returns the values as written, float32 (n, 2) for VA, (n,) for EXPR, (n, 12) for AU: invalid
    markers, out-of-range values and nan/inf left in place (`unusable_labels` names them). EXPR and
    AU values are whole numbers (or not finite); curation stores the kept ones as int32.
    """
    path = Path(path)
    lines = _read_lines(path)
    if not lines:
        raise DataError(f"{path}: empty file, expected the header {','.join(HEADERS[task])!r}")
    _check_header(path, lines[0], HEADERS[task])
    values = _parse_values(path, lines[1:], NUM_COLUMNS[task], first_line=2)
    if task == "va":
        return values
    _check_integers(path, values, first_line=2)
    return values[:, 0] if task == "expr" else values


def valid_mask(task: str, labels: np.ndarray) -> np.ndarray:
    """Which rows carry a usable label: VA in [-1, 1] (not -5), EXPR in 0..7, AU all in {0, 1}."""
    if task == "va":
        return np.all((labels >= -1.0) & (labels <= 1.0), axis=-1)
    if task == "expr":
        return (labels >= 0) & (labels < len(EXPR_NAMES))
    if task == "au":
        return np.all((labels == 0) | (labels == 1), axis=-1)
    raise KeyError(f"unknown task {task!r}; expected one of {TASKS}")


def unusable_labels(task: str, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Why each row without a usable label has none, as disjoint row masks: `not_finite` (a nan
    or inf), `invalid_label` (the documented marker: VA -5, EXPR -1, AU -1 in any column),
    `out_of_range` (any other value outside the task's range). Rows in none are `valid_mask`."""
    rows = labels.reshape(len(labels), -1)
    not_finite = ~np.all(np.isfinite(rows), axis=-1)
    marker = ~not_finite & np.any(rows == INVALID_MARKERS[task], axis=-1)
    out_of_range = ~valid_mask(task, labels) & ~not_finite & ~marker
    return {"invalid_label": marker, "out_of_range": out_of_range, "not_finite": not_finite}


def _as_written(path: Path, labels: np.ndarray, i: int) -> str:
    """`file:line: values` of annotation row i (the header is line 1), for a warning."""
    return f"{path}:{i + 2}: {','.join(f'{v:g}' for v in np.ravel(labels[i]))}"


@dataclasses.dataclass(frozen=True)
class MTLAnnotations:
    """The s-Aff-Wild2 multi-task file: one row per listed image."""

    videos: list[str]
    frames: np.ndarray  # int32 (n,)
    va: np.ndarray  # float32 (n, 2), values as written (see `read_annotation`)
    expr: np.ndarray  # float32 (n,)
    au: np.ndarray  # float32 (n, 12)


def read_mtl_annotation(path: str | os.PathLike) -> MTLAnnotations:
    """Reads `image,valence,arousal,expression,aus` lines (`video/NNNNN.jpg,v,a,e,au1..au12`)."""
    path = Path(path)
    lines = _read_lines(path)
    if not lines:
        raise DataError(f"{path}: empty file, expected the header {','.join(MTL_HEADER)!r}")
    _check_header(path, lines[0], MTL_HEADER)
    images, rest = [], []
    for i, line in enumerate(lines[1:], start=2):
        image, sep, values = line.partition(",")
        if not sep:
            raise DataError(f"{path}:{i}: expected `video/NNNNN.jpg,values...`, got {line!r}")
        images.append(image.strip())
        rest.append(values)
    values = _parse_values(path, rest, 15, first_line=2)
    _check_integers(path, values[:, 2:], first_line=2)
    videos, frames = [], np.zeros(len(images), np.int32)
    for i, image in enumerate(images):
        video, frame = _split_image_path(path, i + 2, image)
        videos.append(video)
        frames[i] = frame
    return MTLAnnotations(videos, frames, values[:, :2], values[:, 2], values[:, 3:])


def _split_image_path(path: Path, line: int, image: str) -> tuple[str, int]:
    video, _, name = image.replace("\\", "/").rpartition("/")
    match = _IMAGE_NAME.match(name)
    if not video or not match:
        raise DataError(f"{path}:{line}: {image!r} is not `video/NNNNN.jpg`")
    return check_video_name(video, f"{path}:{line}"), int(match.group(1))


def read_test_list(path: str | os.PathLike, images: bool = False) -> list[str]:
    """A test-set release: one video name (or, with `images`, for MTL, one `video/NNNNN.jpg`)
    per line; a bad name (`check_video_name`) is a `DataError` naming the list's line."""
    path = Path(path)
    lines = [(i, line.strip().rstrip(",")) for i, line in enumerate(_read_lines(path), start=1)]
    if lines and lines[0][1].lower() in ("video", "videos", "image", "image_location", "name"):
        lines = lines[1:]  # some releases carry a header
    lines = [(i, n) for i, n in lines if n]
    if not lines:
        raise DataError(f"{path}: the test list names no video")
    for i, name in lines:
        if images:
            _split_image_path(path, i, name)
        else:
            check_video_name(name, f"{path}:{i}")
    return [n for _, n in lines]


# ----------------------------------------------------------------------------------------------
# Where things are


@dataclasses.dataclass(frozen=True)
class Layout:
    """Paths of one Aff-Wild2 copy: the annotation folder, one or more image roots, and the
    folders of the raw videos (and `.wav`s) with `video_info.csv` when there are any."""

    annotations: Path
    image_roots: tuple[Path, ...]
    root: Path | None = None
    video_roots: tuple[Path, ...] = ()
    video_info: Path | None = None

    @classmethod
    def discover(cls, root: str | os.PathLike, annotations: str | os.PathLike | None = None,
                 image_roots: Iterable[str | os.PathLike] | None = None,
                 video_roots: Iterable[str | os.PathLike] | None = None) -> Layout:
        """Finds the annotation folder, the `cropped_aligned*` image roots, the raw video
        folders (`video*`, `raw_video*`) and `video_info.csv` under `root`."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: Aff-Wild2 root is not a directory")
        ann = Path(annotations) if annotations else _find_annotations(root)
        if image_roots:
            roots = tuple(Path(r) for r in image_roots)
        else:
            roots = tuple(sorted((p for p in root.iterdir()
                                  if p.is_dir() and p.name.startswith("cropped_aligned")),
                                 key=lambda p: (p.name != "cropped_aligned", p.name)))
        if not roots:
            raise DataError(f"{root}: no image root; expected a `cropped_aligned/` folder "
                            "(or pass image_roots)")
        for r in roots:
            if not r.is_dir():
                raise DataError(f"{r}: image root is not a directory")
        if video_roots is not None:
            videos = tuple(Path(r) for r in video_roots)
            for r in videos:
                if not r.is_dir():
                    raise DataError(f"{r}: video root is not a directory")
        else:
            videos = tuple(sorted(p for p in root.iterdir() if p.is_dir()
                                  and p.name.lower().startswith(("video", "raw_video"))))
        info = root / VIDEO_INFO_FILE
        return cls(ann, roots, root, videos, info if info.is_file() else None)

    def task_dir(self, task: str, split: str) -> Path:
        path = self.annotations / CHALLENGE_DIRS[task]
        return path / MTL_FILES[split] if task == "mtl" else path / SPLIT_DIRS[split]

    def test_list(self, task: str) -> Path:
        """The organisers' test-set list for a challenge, searched next to the annotations."""
        pattern = f"{CHALLENGE_DIRS[task]}*test*.txt"
        for folder in _candidate_dirs(self.root or self.annotations.parent, self.annotations):
            hits = sorted(folder.glob(pattern))
            if hits:
                return hits[0]
        raise DataError(f"no test list `{pattern}` under {self.root or self.annotations.parent}")


VIDEO_INFO_FILE = "video_info.csv"


def _candidate_dirs(root: Path, annotations: Path) -> list[Path]:
    dirs = [root, annotations, annotations / "test_lists"]
    dirs += [p for p in sorted(root.iterdir())
             if p.is_dir() and not p.name.startswith("cropped_aligned")]
    return [d for d in dirs if d.is_dir()]


def _find_annotations(root: Path) -> Path:
    names = set(CHALLENGE_DIRS.values())
    for candidate in (root, root / "annotations", *sorted(p for p in root.iterdir() if p.is_dir())):
        if candidate.is_dir() and any((candidate / n).is_dir() for n in names):
            return candidate
    raise DataError(f"{root}: no annotation folder; expected one of {sorted(names)} in it, in "
                    "`annotations/`, or in another direct sub-folder (or pass annotations=)")


class ImageIndex:
    """Which crops exist, per video, over several image roots (the first root wins a tie)."""

    def __init__(self, roots: Sequence[Path]):
        self.roots = tuple(roots)
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def frames(self, video: str) -> tuple[np.ndarray, np.ndarray]:
        """Sorted frame numbers with a crop, and the index of the root holding each."""
        if video not in self._cache:
            found: dict[int, int] = {}
            for r, root in reversed(list(enumerate(self.roots))):
                for name in _listdir(root / video):
                    match = _IMAGE_NAME.match(name)
                    if match:
                        found[int(match.group(1))] = r
            frames = np.array(sorted(found), np.int32)
            self._cache[video] = (frames, np.array([found[f] for f in frames], np.int8))
        return self._cache[video]

    def lookup(self, video: str, frames: np.ndarray) -> np.ndarray:
        """Root index per requested frame, -1 where no crop exists."""
        have, roots = self.frames(video)
        pos = np.clip(np.searchsorted(have, frames), 0, max(len(have) - 1, 0))
        hit = (have[pos] == frames) if len(have) else np.zeros(len(frames), bool)
        return np.where(hit, roots[pos] if len(have) else -1, -1).astype(np.int8)


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


# ----------------------------------------------------------------------------------------------
# Curation


@dataclasses.dataclass(frozen=True)
class Annotated:
    """The labels of EVERY annotation line of a labelled split, frames without a crop and invalid
    labels included: what the organisers score a submission against. Lines are grouped by video:
    video i holds rows `offsets[i]:offsets[i + 1]`."""

    videos: list[str]
    offsets: np.ndarray  # int64 (len(videos) + 1,)
    frame: np.ndarray  # int32 (n,), 1-based frame of each line
    labels: dict[str, np.ndarray]  # task -> (n, ...) in ANNOTATED_DTYPES: `kept_labels`
    masks: dict[str, np.ndarray]  # task -> bool (n,): `valid_mask`

    @classmethod
    def build(cls, videos: list[str], video: np.ndarray, frame: np.ndarray,
              labels: dict[str, np.ndarray]) -> Annotated:
        """From lines in any order (`video` indexes `videos`; labels as written, nan
        included), ordered by (video, frame)."""
        order = np.lexsort((frame, video))
        counts = np.bincount(video, minlength=len(videos))
        masks = {t: valid_mask(t, v)[order] for t, v in labels.items()}
        return cls(list(videos), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   np.asarray(frame, np.int32)[order],
                   {t: kept_labels(t, v[order], masks[t]) for t, v in labels.items()}, masks)

    def rows(self, i: int) -> slice:
        """The lines of video i."""
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))


def kept_labels(task: str, labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Labels as `Annotated` keeps them: the label where valid, the task's invalid marker
    elsewhere (nan, out of range), in `ANNOTATED_DTYPES`."""
    valid = valid.reshape(-1, *[1] * (labels.ndim - 1))
    return np.where(valid, labels, INVALID_MARKERS[task]).astype(ANNOTATED_DTYPES[task])


@dataclasses.dataclass
class FrameTable:
    """Curated frames as numpy columns; every task's labels with a validity mask per task."""

    videos: list[str]  # names; `video` holds indices into it
    image_roots: tuple[str, ...]
    video: np.ndarray  # int32 (n,)
    frame: np.ndarray  # int32 (n,), 1-based
    root: np.ndarray  # int8 (n,), index into image_roots; -1 for frames without a crop (test fill)
    va: np.ndarray  # float32 (n, 2)
    expr: np.ndarray  # int32 (n,)
    au: np.ndarray  # int32 (n, 12)
    va_mask: np.ndarray  # bool (n,)
    expr_mask: np.ndarray
    au_mask: np.ndarray
    video_frames: np.ndarray  # int32 (len(videos),): frames of each video (annotation lines, or
    #                           the last listed / cropped frame where there is no annotation file)
    annotated: Annotated | None = None  # every annotation line (labelled splits only)

    def __len__(self) -> int:
        return len(self.frame)

    def take(self, rows: np.ndarray) -> FrameTable:
        """The given rows (per-frame columns sliced; video names and lengths kept; `annotated`
        left out, so that a shard's job pickles only its rows)."""
        per_frame = ("video", "frame", "root", "va", "expr", "au", "va_mask", "expr_mask",
                     "au_mask")
        return dataclasses.replace(self, annotated=None,
                                   **{k: getattr(self, k)[rows] for k in per_frame})

    def image_path(self, i: int) -> str:
        video = self.videos[self.video[i]]
        return os.path.join(self.image_roots[self.root[i]], video, f"{self.frame[i]:05d}.jpg")

    @classmethod
    def build(cls, videos: list[str], roots: Sequence[Path], columns: dict[str, list[np.ndarray]],
              video_frames: Sequence[int], annotated: Annotated | None = None) -> FrameTable:
        n = sum(len(c) for c in columns["frame"])
        cat = {k: np.concatenate(v) if v else None for k, v in columns.items()}
        defaults = {"va": np.zeros((n, 2), np.float32), "expr": np.zeros(n, np.int32),
                    "au": np.zeros((n, 12), np.int32), "va_mask": np.zeros(n, bool),
                    "expr_mask": np.zeros(n, bool), "au_mask": np.zeros(n, bool),
                    "video": np.zeros(n, np.int32), "frame": np.zeros(n, np.int32),
                    "root": np.zeros(n, np.int8)}
        fields = {k: (cat[k] if cat.get(k) is not None else d).astype(d.dtype, copy=False)
                  for k, d in defaults.items()}
        return cls(videos=videos, image_roots=tuple(str(r) for r in roots),
                   video_frames=np.asarray(video_frames, np.int32).reshape(-1),
                   annotated=annotated, **fields)


def _empty_stats(task: str, strict: bool = False) -> dict:
    reasons = STRICT_DROP_REASONS if strict else MTL_DROP_REASONS if task == "mtl" else DROP_REASONS
    return {"videos": 0, "annotated": 0, "curated": 0, "dropped": dict.fromkeys(reasons, 0),
            "missing_images": 0, "first": {}}


def _note_first(stats: dict, reason: str, where: str) -> None:
    """Keeps where a fault was first seen (`stats["first"]`, warned by prepare)."""
    stats["first"].setdefault(reason, where)


def curate(layout: Layout, task: str, split: str, strict: bool = False,
           index: ImageIndex | None = None) -> tuple[FrameTable, dict]:
    """Pairs annotation lines with crops and filters them; returns the frames and their stats.

    `task` is va/expr/au (per-challenge folders) or mtl (the s-Aff-Wild2 file). For mtl a frame
    stays for every task it is labelled for (per-task masks); `strict` drops it when any task is
    invalid, as the 7th ABAW paper did. `split="test"` lists every crop of the test videos.
    """
    if task not in ALL_TASKS:
        raise DataError(f"unknown task {task!r}; expected one of {ALL_TASKS}")
    index = index or ImageIndex(layout.image_roots)
    if split == "test":
        table, stats = _curate_test(layout, task, index)
        stats["source"] = str(layout.test_list(task))
        return table, stats
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {(*SPLITS, 'test')}")
    if task == "mtl":
        table, stats = _curate_mtl(layout, split, strict, index)
    else:
        table, stats = _curate_task(layout, task, split, index)
    stats["source"] = str(layout.task_dir(task, split))
    return table, stats


def _curate_task(layout: Layout, task: str, split: str, index: ImageIndex
                 ) -> tuple[FrameTable, dict]:
    folder = layout.task_dir(task, split)
    if not folder.is_dir():
        raise DataError(f"{folder}: annotation folder is missing")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".txt")
    if not files:
        raise DataError(f"{folder}: no <video>.txt annotation files")
    stats = _empty_stats(task)
    stats["no_annotation"] = 0
    videos, lengths, kept, masks = [], [], [], []
    cols = {k: [] for k in ("video", "frame", "root", task, f"{task}_mask")}
    for path in files:
        check_video_name(path.stem, str(path))
        labels = read_annotation(path, task)
        frames = np.arange(1, len(labels) + 1, dtype=np.int32)
        roots = index.lookup(path.stem, frames)
        valid, present = valid_mask(task, labels), roots >= 0
        keep = valid & present
        stats["videos"] += 1
        stats["annotated"] += len(labels)
        _count_unusable_labels(stats, path, labels, unusable_labels(task, labels))
        stats["dropped"]["missing_image"] += int(np.sum(valid & ~present))
        stats["missing_images"] += int(np.sum(~present))
        _count_unannotated(stats, path, index, len(labels))
        cols["video"].append(np.full(int(keep.sum()), len(videos), np.int32))
        videos.append(path.stem)
        lengths.append(len(labels))
        cols["frame"].append(frames[keep])
        cols["root"].append(roots[keep])
        cols[task].append(labels[keep])
        cols[f"{task}_mask"].append(np.ones(int(keep.sum()), bool))
        kept.append(kept_labels(task, labels, valid))
        masks.append(valid)
    annotated = Annotated(videos, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                          line_frames(lengths), {task: np.concatenate(kept)},
                          {task: np.concatenate(masks)})
    table = FrameTable.build(videos, layout.image_roots, cols, lengths, annotated)
    stats["curated"] = len(table)
    stats["histogram"] = histograms(table)
    return table, stats


def line_frames(lengths: Sequence[int]) -> np.ndarray:
    """1..n for each video of n annotation lines, concatenated: the frames of a challenge's
    annotation lines."""
    return np.concatenate([np.arange(1, n + 1, dtype=np.int32) for n in lengths])


def _count_unusable_labels(stats: dict, path: Path, labels: np.ndarray,
                        faults: dict[str, np.ndarray]) -> None:
    for reason, rows in faults.items():
        stats["dropped"][reason] += int(rows.sum())
        if reason in LABEL_FAULTS and rows.any():
            _note_first(stats, reason, _as_written(path, labels, int(np.argmax(rows))))


def _count_unannotated(stats: dict, path: Path, index: ImageIndex, lines: int) -> None:
    """Crops past the last annotation line: no label says what they show (counted, not kept)."""
    have, _ = index.frames(path.stem)
    extra = int(np.sum(have > lines))
    stats["no_annotation"] += extra
    if extra:
        _note_first(stats, "no_annotation", f"{path}: {lines:,} frame lines, but {extra:,} crops "
                                            f"of {path.stem!r} past them (up to frame {have[-1]})")


def _curate_mtl(layout: Layout, split: str, strict: bool, index: ImageIndex
                ) -> tuple[FrameTable, dict]:
    path = layout.task_dir("mtl", split)
    if not path.is_file():
        raise DataError(f"{path}: multi-task annotation file is missing")
    ann = read_mtl_annotation(path)
    masks = {t: valid_mask(t, getattr(ann, t)) for t in TASKS}
    names, video = np.unique(np.asarray(ann.videos), return_inverse=True)
    videos, video = names.tolist(), video.astype(np.int32)
    roots = np.full(len(video), -1, np.int8)
    order = np.argsort(video, kind="stable")
    for rows in np.split(order, np.flatnonzero(np.diff(video[order])) + 1):
        if len(rows):
            roots[rows] = index.lookup(videos[video[rows[0]]], ann.frames[rows])
    any_valid = masks["va"] | masks["expr"] | masks["au"]
    all_valid = masks["va"] & masks["expr"] & masks["au"]
    labelled = all_valid if strict else any_valid
    present = roots >= 0
    keep = labelled & present
    stats = _empty_stats("mtl", strict)
    stats["videos"] = len(videos)
    stats["annotated"] = len(video)
    faults = _mtl_faults(stats, path, ann)
    dirt = faults["not_finite"] | faults["out_of_range"]  # a dropped row with dirt counts as dirt
    stats["dropped"]["invalid_any" if strict else "invalid_all"] = int(np.sum(~labelled & ~dirt))
    stats["dropped"]["not_finite"] = int(np.sum(~labelled & faults["not_finite"]))
    stats["dropped"]["out_of_range"] = int(np.sum(~labelled & faults["out_of_range"]
                                                  & ~faults["not_finite"]))
    stats["dropped"]["missing_image"] = int(np.sum(labelled & ~present))
    stats["missing_images"] = int(np.sum(~present))
    # A kept frame may hold a nan in a task it is masked out of: store that task's marker.
    labels = {t: np.where(np.isfinite(getattr(ann, t)), getattr(ann, t), INVALID_MARKERS[t])
              for t in TASKS}
    cols = {"video": [video[keep]], "frame": [ann.frames[keep]], "root": [roots[keep]],
            **{t: [labels[t][keep]] for t in TASKS},
            **{f"{t}_mask": [masks[t][keep]] for t in TASKS}}
    last = np.zeros(len(videos), np.int32)
    np.maximum.at(last, video, ann.frames)
    annotated = Annotated.build(videos, video, ann.frames, {t: getattr(ann, t) for t in TASKS})
    table = FrameTable.build(videos, layout.image_roots, cols, last, annotated)
    stats["curated"] = len(table)
    stats["valid"] = {t: int(getattr(table, f"{t}_mask").sum()) for t in TASKS}
    stats["histogram"] = histograms(table)
    return table, stats


def _mtl_faults(stats: dict, path: Path, ann: MTLAnnotations) -> dict[str, np.ndarray]:
    """Rows with a label fault in any task, per fault; notes the first line of each."""
    rows = np.concatenate([ann.va, ann.expr[:, None], ann.au], axis=1)
    out = {}
    for reason in LABEL_FAULTS:
        out[reason] = np.any([unusable_labels(t, getattr(ann, t))[reason] for t in TASKS], axis=0)
        if out[reason].any():
            _note_first(stats, reason, _as_written(path, rows, int(np.argmax(out[reason]))))
    return out


def _curate_test(layout: Layout, task: str, index: ImageIndex) -> tuple[FrameTable, dict]:
    """Every crop of every listed test video (no labels); frames to predict."""
    path = layout.test_list(task)
    names = read_test_list(path, images=task == "mtl")
    if task == "mtl":
        pairs = [_split_image_path(path, 0, n) for n in names]  # checked with their lines
        videos = sorted({v for v, _ in pairs})
        wanted = {v: np.array(sorted(f for vv, f in pairs if vv == v), np.int32) for v in videos}
    else:
        videos = names
        wanted = {v: index.frames(v)[0] for v in videos}
    stats = _empty_stats(task)
    stats["dropped"] = {"missing_image": 0}
    cols = {k: [] for k in ("video", "frame", "root")}
    for i, v in enumerate(videos):
        roots = index.lookup(v, wanted[v])
        if task != "mtl" and not len(roots):
            raise DataError(f"{path}: test video {v!r} has no crops in any image root "
                            f"{[str(r) for r in layout.image_roots]}")
        present = roots >= 0
        stats["annotated"] += len(roots)
        stats["dropped"]["missing_image"] += int(np.sum(~present))
        stats["missing_images"] += int(np.sum(~present))
        cols["video"].append(np.full(int(present.sum()), i, np.int32))
        cols["frame"].append(wanted[v][present])
        cols["root"].append(roots[present])
    stats["videos"] = len(videos)
    last = [int(wanted[v].max(initial=0)) for v in videos]
    table = FrameTable.build(list(videos), layout.image_roots, cols, last)
    stats["curated"] = len(table)
    return table, stats


def histograms(table: FrameTable) -> dict:
    """Label histograms over the curated frames valid for each task."""
    out = {}
    if table.va_mask.any():
        va = table.va[table.va_mask]
        edges = np.linspace(-1, 1, 11)
        out["va"] = {"valence": np.histogram(va[:, 0], edges)[0].tolist(),
                     "arousal": np.histogram(va[:, 1], edges)[0].tolist(),
                     "edges": edges.round(2).tolist()}
    if table.expr_mask.any():
        counts = np.bincount(table.expr[table.expr_mask], minlength=len(EXPR_NAMES))
        out["expr"] = dict(zip(EXPR_NAMES, counts.tolist(), strict=True))
    if table.au_mask.any():
        out["au_positive"] = dict(zip(AU_NAMES, table.au[table.au_mask].sum(0).tolist(),
                                      strict=True))
        out["au_frames"] = int(table.au_mask.sum())
    return out


def check_accounting(stats: dict) -> None:
    """Every annotated line must be curated or dropped for a reason; raises if not."""
    total = stats["curated"] + sum(stats["dropped"].values())
    if total != stats["annotated"]:
        raise AssertionError(f"accounting error: {stats['annotated']} annotated lines but "
                             f"{stats['curated']} curated + {stats['dropped']} dropped")


def check_not_empty(split: str, stats: dict, image_roots: Sequence[str | os.PathLike]) -> None:
    """A split with no frame left is a `DataError` saying why: training or evaluating on it
    would only give a nan score."""
    if stats["curated"]:
        return
    why = ", ".join(f"{k}: {v:,}" for k, v in stats["dropped"].items() if v) or "no line"
    raise DataError(f"{split}: 0 of {stats['annotated']:,} annotated frames of {stats['videos']:,} "
                    f"videos in {stats['source']} are usable ({why}); crops are looked up under "
                    f"{', '.join(str(r) for r in image_roots)}")


def format_stats(stats: dict[str, dict[str, dict]]) -> str:
    """A fixed-width table of {task: {split: stats}} for the console."""
    head = (f"{'task':<5} {'split':<10} {'videos':>7} {'annotated':>10} {'curated':>10} "
            f"{'no crop':>8}  dropped (reason: n)")
    rows = [head, "-" * len(head)]
    for task, splits in stats.items():
        for split, s in splits.items():
            dropped = ", ".join(f"{k}: {v:,}" for k, v in s["dropped"].items())
            if s.get("no_annotation"):
                dropped += f"; crops past the annotations (not kept): {s['no_annotation']:,}"
            rows.append(f"{task:<5} {split:<10} {s['videos']:>7,} {s['annotated']:>10,} "
                        f"{s['curated']:>10,} {s['missing_images']:>8,}  {dropped}")
    return "\n".join(rows)
