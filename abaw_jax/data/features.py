"""The feature cache: per-frame backbone embeddings of a split (`--mode=extract`), stored in
record order as sharded .npy files with the frames' video and frame ids and labels, so temporal
heads train from them without decoding a single image.

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

from abaw_jax.data.affwild2 import DataError

LABEL_KEYS = ("va", "expr", "au", "va_mask", "expr_mask", "au_mask")


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
             **{k: labels[k] for k in LABEL_KEYS})


def write_meta(out: str | os.PathLike, meta: Mapping[str, Any], pad: np.ndarray) -> None:
    np.save(Path(out) / "pad.npy", np.asarray(pad, np.float32))
    (Path(out) / "meta.json").write_text(json.dumps(meta, indent=1))


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
            self.labels = {k: z[k] for k in LABEL_KEYS}
        self.dim = self.shards[0].shape[1]
        self.pad = np.load(Path(directory) / "pad.npy")
        if sum(len(s) for s in self.shards) != len(self.video):
            raise DataError(f"{folder}: {sum(len(s) for s in self.shards)} embeddings for "
                            f"{len(self.video)} frames")

    def __len__(self) -> int:
        return len(self.video)

    def clip(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Embeddings and labels of record indices `rows` (-1: a padded frame)."""
        valid = rows >= 0
        emb = np.repeat(self.pad[None], len(rows), 0)
        for j in np.flatnonzero(valid):
            s, r = divmod(int(rows[j]), self.shard_rows)
            emb[j] = self.shards[s][r]
        safe = np.where(valid, rows, 0)
        out = {k: v[safe] for k, v in self.labels.items()}
        for k in ("va_mask", "expr_mask", "au_mask"):
            out[k] = out[k] & valid
        return {"features": emb, **out, "index": rows.astype(np.int32)}
