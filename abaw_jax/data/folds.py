"""K-fold cross-validation over a run's train and eval splits together (`data.folds` folds,
this run's `data.fold`, `data.fold_seed`; `data.folds=0`: off, the splits as they are).

Folds are made by raw video: `x_left` and `x_right` (two people of one raw video) always share
a fold, and no video is in two. They are balanced by the number of records (frames with a
crop), greedily: raw videos from the largest, in blocks of `folds` whose order the seed
shuffles, each to the fold with the fewest records so far; no fold then has more records than
another plus the largest raw video (0.13 % of a fold's records apart at the AU challenge's
size, `benchmarks/folds.py`). A fold run trains on the other folds and evaluates on its
fold: two `records.Subset`s of the prepared records, read through a filter over the records'
video index (`records.subset_rows`), so nothing is prepared again. Training writes the fold
lists to `<workdir>/folds.json` (`write`); the fold ensemble (abaw_jax/ensemble.py) reads them.

Plain numpy: no jax in data modules.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from abaw_jax.data import records
from abaw_jax.data.affwild2 import AU_NAMES, EXPR_NAMES, DataError
from abaw_jax.data.video import raw_name
from abaw_jax.errors import NotFoundError

FOLDS_FILE = "folds.json"


def make_folds(frames: Mapping[str, int], folds: int, seed: int) -> list[list[str]]:
    """Video name -> records, into `folds` sorted lists of names: by raw video, balanced by
    records (see the module's docstring), the same for the same inputs and seed."""
    groups: dict[str, list[str]] = {}
    for name in frames:
        groups.setdefault(raw_name(name), []).append(name)
    if len(groups) < folds:
        raise DataError(f"{len(groups)} raw videos cannot make {folds} folds")
    weight = {raw: sum(frames[v] for v in names) for raw, names in groups.items()}
    order = sorted(groups, key=lambda raw: (-weight[raw], raw))
    rng = np.random.default_rng(seed)
    load = np.zeros(folds, np.int64)
    out: list[list[str]] = [[] for _ in range(folds)]
    for start in range(0, len(order), folds):
        block = order[start:start + folds]
        for i in rng.permutation(len(block)):
            fold = int(np.argmin(load))  # ties: the first (a block starts on the empty folds)
            out[fold] += groups[block[i]]
            load[fold] += weight[block[i]]
    return [sorted(names) for names in out]


@dataclasses.dataclass(frozen=True)
class Folds:
    """The folds of a records folder's two splits."""

    splits: tuple[str, str]  # (train, eval) split names, in the subsets' part order
    videos: list[list[str]]  # per fold, sorted
    split_of: dict[str, str]  # video -> the split that holds it
    records: dict[str, int]  # video -> its records

    def subset(self, name: str, folds: Iterable[int]) -> records.Subset:
        """The records of these folds' videos as one split."""
        names = sorted(v for f in folds for v in self.videos[f])
        return records.Subset(name, tuple(
            (s, tuple(v for v in names if self.split_of[v] == s)) for s in self.splits))


def read(data: Mapping[str, Any], data_dir: str | os.PathLike) -> Folds:
    """The `data.folds` folds of the records of `data.train_split` and `data.eval_split`."""
    splits = (data["train_split"], data["eval_split"])
    split_of, counts = {}, {}
    for split in splits:
        videos, video, _ = records.read_frame_index(data_dir, split)
        for name, n in zip(videos, np.bincount(video, minlength=len(videos)), strict=True):
            if name in split_of:
                raise DataError(f"{data_dir}: video {name!r} is in both {splits[0]} and "
                                f"{splits[1]}: folds need each video in one split")
            split_of[name], counts[name] = split, int(n)
    return Folds(splits, make_folds(counts, data["folds"], data["fold_seed"]), split_of, counts)


def run_splits(data: Mapping[str, Any], data_dir: str | os.PathLike
               ) -> tuple[records.Split, records.Split]:
    """(train, eval) of a run: `data.train_split` and `data.eval_split`, or with `data.folds`
    the other folds and fold `data.fold` of the two together."""
    if not data.get("folds"):
        return data["train_split"], data["eval_split"]
    folds = read(data, data_dir)
    return train_subset(data, folds), eval_subset(data, folds)


def eval_subset(data: Mapping[str, Any], folds: Folds) -> records.Subset:
    return folds.subset(f"fold{data['fold']}-of-{data['folds']}", [data["fold"]])


def train_subset(data: Mapping[str, Any], folds: Folds) -> records.Subset:
    others = [f for f in range(data["folds"]) if f != data["fold"]]
    return folds.subset(f"folds-but-{data['fold']}-of-{data['folds']}", others)


def write(workdir: str | os.PathLike, data: Mapping[str, Any], data_dir: str | os.PathLike
          ) -> Path:
    """`<workdir>/folds.json`: every fold's videos, records and raw videos, which fold this
    run holds out, and the splits and records folder they were made from."""
    folds = read(data, data_dir)
    info = {"folds": data["folds"], "fold": data["fold"], "seed": data["fold_seed"],
            "splits": list(folds.splits), "records": str(data_dir),
            "train": train_subset(data, folds).name, "eval": eval_subset(data, folds).name,
            "records_per_fold": [sum(folds.records[v] for v in f) for f in folds.videos],
            "raw_videos_per_fold": [len({raw_name(v) for v in f}) for f in folds.videos],
            "videos": folds.videos}
    path = Path(workdir) / FOLDS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, path)
    return path


def read_file(workdir: str | os.PathLike) -> dict[str, Any]:
    """A fold run's `folds.json`."""
    path = Path(workdir) / FOLDS_FILE
    if not path.is_file():
        raise NotFoundError(f"{workdir}: no {FOLDS_FILE} (not a fold run, or not trained yet)")
    return json.loads(path.read_text())


def histogram(data_dir: str | os.PathLike, split: records.Split) -> dict[str, Any]:
    """The label counts loss balancing reads (`expr` per class, `au_positive` per AU,
    `au_frames`) over a split's records: stats.json's; for a subset, counted from the labels
    file at its records' frames (no record is read: 1.2 s for the 1.4M records of 4 of 5 folds
    of the AU challenge's size on the 2-core machine, loaded; `benchmarks/folds.py`)."""
    if not isinstance(split, records.Subset):
        stats = json.loads((Path(data_dir) / "stats.json").read_text())
        return stats["splits"][split]["histogram"]
    annotated = records.read_labels(data_dir, split)
    lines = _record_lines(annotated, *records.read_frame_index(data_dir, split))
    out: dict[str, Any] = {}
    if "expr" in annotated.labels:
        valid = annotated.masks["expr"][lines]
        counts = np.bincount(annotated.labels["expr"][lines][valid], minlength=len(EXPR_NAMES))
        out["expr"] = dict(zip(EXPR_NAMES, counts.tolist(), strict=True))
    if "au" in annotated.labels:
        valid = annotated.masks["au"][lines]
        positive = annotated.labels["au"][lines][valid].sum(0)
        out["au_positive"] = dict(zip(AU_NAMES, positive.tolist(), strict=True))
        out["au_frames"] = int(valid.sum())
    return out


def _record_lines(annotated, videos: list[str], video: np.ndarray, frame: np.ndarray
                  ) -> np.ndarray:
    """The annotation line of each record (lines are in frame order within a video)."""
    where = {name: i for i, name in enumerate(annotated.videos)}
    order = np.argsort(video, kind="stable")
    bounds = np.searchsorted(video[order], np.arange(len(videos) + 1))
    lines = np.zeros(len(frame), np.int64)
    for i, name in enumerate(videos):
        rows = order[bounds[i]:bounds[i + 1]]
        if not len(rows):
            continue
        span = annotated.rows(where[name]) if name in where else slice(0, 0)
        found = span.start + np.searchsorted(annotated.frame[span], frame[rows])
        ok = found < span.stop
        if not ok.all() or np.any(annotated.frame[found] != frame[rows]):
            raise DataError(f"{name}: records without an annotation line in the labels file; "
                            "write the records again with prepare")
        lines[rows] = found
    return lines
