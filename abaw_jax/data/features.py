"""The feature cache: per-frame backbone embeddings of a split (`--mode=extract`), stored in
record order as sharded .npy files with the frames' video and frame ids and labels, so heads
(frame or temporal) train from them without decoding a single image. Several caches of the same
records are concatenated per frame (`data.features="a,b"`), e.g. visual and audio embeddings.

<dir>/meta.json                         dim, splits and their sizes, provenance
<dir>/pad.npy                           the embedding of the padding frame (all-zero image) that
                                        clips hold where a frame has no crop, as end to end
<dir>/<split>/embedding-00000-of-000NN.npy   (rows, dim) float32, memory-mapped when read
<dir>/<split>/frames.npz                videos, video, frame and every label / mask column
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from abaw_jax.data import schema
from abaw_jax.data.affwild2 import DataError

META_FILE = "meta.json"


def write_split(out: str | os.PathLike, split: str, embedding: np.ndarray,
                labels: Mapping[str, np.ndarray], videos: list[str], video: np.ndarray,
                frame: np.ndarray, shard_rows: int = 65_536) -> None:
    folder = Path(out) / split
    if folder.exists():  # a re-extraction: no stale shards of another shard count
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    n = len(embedding)
    count = max(1, -(-n // shard_rows))
    for s in range(count):
        np.save(folder / f"embedding-{s:05d}-of-{count:05d}.npy",
                np.asarray(embedding[s * shard_rows:(s + 1) * shard_rows], np.float32))
    np.savez(folder / "frames.npz", videos=np.asarray(videos), video=video, frame=frame,
             **{k: labels[k] for k in schema.LABEL_KEYS})


def write_meta(out: str | os.PathLike, meta: Mapping[str, Any], pad: np.ndarray) -> None:
    np.save(Path(out) / "pad.npy", np.asarray(pad, np.float32))
    (Path(out) / META_FILE).write_text(json.dumps({**meta, "dim": int(np.size(pad))},
                                                    indent=1))


def read_meta(directory: str | os.PathLike) -> dict:
    """meta.json of a feature cache: where its embeddings came from, its splits, `dim`."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise DataError(f"{directory}: not a feature cache (no meta.json); write one with "
                        "`python -m abaw_jax.main --mode=extract ...`")
    return json.loads(path.read_text())


def width(directories) -> int:
    """The width of the per-frame `features` input: the caches' dims added up."""
    return sum(int(np.load(Path(d) / "pad.npy", mmap_mode="r").size) for d in directories)


def check_matches(directory: str | os.PathLike, split: str, videos: list[str],
                  video: np.ndarray, frame: np.ndarray) -> None:
    """The cache must hold exactly these records' frames, in this order (e.g. not a cache of
    strictly filtered records used with per-task masks)."""
    with np.load(Path(directory) / split / "frames.npz") as z:
        same = (z["videos"].tolist() == list(videos) and np.array_equal(z["video"], video)
                and np.array_equal(z["frame"], frame))
    if not same:
        raise DataError(f"{directory}/{split}: the cached features are of other frames than "
                        "the records of this config; extract them again from these records")


class FeatureSource:
    """Random access to one split's cached embeddings and labels by record index."""

    def __init__(self, directory: str | os.PathLike, split: str):
        folder = Path(directory) / split
        shards = sorted(folder.glob("embedding-*-of-*.npy"))
        if shards and len(shards) != int(shards[0].stem.rsplit("-of-", 1)[1]):
            raise DataError(f"{folder}: {len(shards)} embedding shards, their names say "
                            f"{shards[0].stem.rsplit('-of-', 1)[1]}")
        if not shards or not (folder / "frames.npz").is_file():
            raise DataError(f"{folder}: no cached features of split {split!r}; write them with "
                            "`python -m abaw_jax.main --mode=extract ...`")
        self.shards = [np.load(p, mmap_mode="r") for p in shards]
        self.shard_rows = len(self.shards[0])
        with np.load(folder / "frames.npz") as z:
            self.videos = z["videos"].tolist()
            self.video, self.frame = z["video"], z["frame"]
            self.labels = {k: z[k] for k in schema.LABEL_KEYS}
        self.dim = self.shards[0].shape[1]
        self.pad = np.load(Path(directory) / "pad.npy")
        if sum(len(s) for s in self.shards) != len(self.video):
            raise DataError(f"{folder}: {sum(len(s) for s in self.shards)} embeddings for "
                            f"{len(self.video)} frames")

    def __len__(self) -> int:
        return len(self.video)

    def embeddings(self, index: int) -> np.ndarray:
        """The embedding of record `index` (-1: the padding frame's)."""
        if index < 0:
            return self.pad
        s, r = divmod(int(index), self.shard_rows)
        return np.asarray(self.shards[s][r])

    def labels_of(self, index: int) -> dict[str, np.ndarray]:
        """Labels and masks of record `index` (-1: padding, every mask False)."""
        out = {k: v[max(index, 0)] for k, v in self.labels.items()}
        if index < 0:
            out.update({k: np.False_ for k in schema.MASKS})
        return out
