"""The feature cache: per-frame embeddings of a split (`--mode=extract` of a frame model: a
face's or, for an audio network, the frame's sound window), stored in record order as sharded
.npy files with the frames' video and frame ids and labels, so heads (frame or temporal) train
from them without decoding a single image. Several caches of the same records are concatenated
per frame (`data.features="a,b"`), e.g. MAE's visual and the GCSA audio branch's embeddings:
each is keyed by the records' frame index (videos, video, frame) and must hold exactly the
frames of the records it is read with, in their order (`check_matches`, which names the first
frame where they part), and each shard is checked against its CRC the first time a process
reads it.

<dir>/meta.json                         dim, splits and their sizes, provenance
<dir>/pad.npy                           the embedding of the padding frame (all-zero image or
                                        silence) that clips hold where a frame has no record
<dir>/<split>/embedding-00000-of-000NN.npy   (rows, dim) float32, memory-mapped when read
<dir>/<split>/frames.npz                videos, video, frame, every label / mask column and
                                        `shard_crc`: each embedding shard's CRC32C
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from abaw_jax.data import records, schema
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
    crcs = []
    for s in range(count):
        shard = np.asarray(embedding[s * shard_rows:(s + 1) * shard_rows], np.float32)
        np.save(folder / f"embedding-{s:05d}-of-{count:05d}.npy", shard)
        crcs.append(records.array_crc(shard))
    np.savez(folder / "frames.npz", videos=np.asarray(videos), video=video, frame=frame,
             shard_crc=np.asarray(crcs), **{k: labels[k] for k in schema.LABEL_KEYS})


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
    strictly filtered records used with per-task masks, nor of another task's or data's
    records); DataError names the first frame where they part."""
    with np.load(Path(directory) / split / "frames.npz") as z:
        cached = (z["videos"].tolist(), z["video"], z["frame"])
    where = first_difference(cached, (list(videos), video, frame))
    if where:
        raise DataError(f"{directory}/{split}: the cached features are of other frames than "
                        f"the records of this config ({where}); extract them again from these "
                        "records")


def first_difference(a: tuple[list[str], np.ndarray, np.ndarray],
                     b: tuple[list[str], np.ndarray, np.ndarray]) -> str | None:
    """Where two frame indexes (videos, per record its video index and frame) part, in words
    (None: the same frames in the same order)."""
    if len(a[1]) != len(b[1]):
        return f"{len(a[1])} frames there, {len(b[1])} here"
    names = [np.asarray(videos, dtype=object)[np.asarray(video, np.int64)]
             for videos, video, _ in (a, b)]
    differ = np.flatnonzero((names[0] != names[1]) | (np.asarray(a[2]) != np.asarray(b[2])))
    if not len(differ):
        return None
    i = int(differ[0])
    return (f"record {i} is {names[0][i]}/{int(a[2][i]):05d} there, "
            f"{names[1][i]}/{int(b[2][i]):05d} here")


class FeatureSource:
    """Random access to one split's cached embeddings and labels by record index. Each shard is
    memory-mapped and checked against its CRC when this process first reads from it (a few
    tenths of a second for a full 65,536 x 768 shard), and sent to grain's workers without
    its maps (they map it again), not copied into their pickles."""

    def __init__(self, directory: str | os.PathLike, split: str):
        folder = Path(directory) / split
        shards = sorted(folder.glob("embedding-*-of-*.npy"))
        if shards and len(shards) != int(shards[0].stem.rsplit("-of-", 1)[1]):
            raise DataError(f"{folder}: {len(shards)} embedding shards, their names say "
                            f"{shards[0].stem.rsplit('-of-', 1)[1]}")
        if not shards or not (folder / "frames.npz").is_file():
            raise DataError(f"{folder}: no cached features of split {split!r}; write them with "
                            "`python -m abaw_jax.main --mode=extract ...`")
        with np.load(folder / "frames.npz") as z:
            self.videos = z["videos"].tolist()
            self.video, self.frame = z["video"], z["frame"]
            self.labels = {k: z[k] for k in schema.LABEL_KEYS}
            crcs = z["shard_crc"].tolist() if "shard_crc" in z else None
        if crcs is None or len(crcs) != len(shards):
            raise DataError(f"{folder}: no CRC for each embedding shard (a cache written before "
                            "they were stored); extract it again with --mode=extract")
        self.paths, self.crcs = shards, crcs
        self._maps: dict[int, np.ndarray] = {}
        self._checked: set[int] = set()
        rows = [len(self._map(s)) for s in range(len(shards))]
        self.shard_rows, self.dim = rows[0], self._map(0).shape[1]
        self.pad = np.load(Path(directory) / "pad.npy")
        if sum(rows) != len(self.video):
            raise DataError(f"{folder}: {sum(rows)} embeddings for {len(self.video)} frames")

    def __getstate__(self) -> dict:  # to grain's workers: no memory maps
        return {**self.__dict__, "_maps": {}, "_checked": set()}

    def __len__(self) -> int:
        return len(self.video)

    def _map(self, s: int) -> np.ndarray:
        if s not in self._maps:
            try:
                self._maps[s] = np.load(self.paths[s], mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise DataError(f"{self.paths[s]}: unreadable embedding shard ({err})") from None
        return self._maps[s]

    def _shard(self, s: int) -> np.ndarray:
        """Shard `s`, CRC-checked on this process's first read."""
        shard = self._map(s)
        if s not in self._checked:
            if records.array_crc(shard) != self.crcs[s]:
                raise DataError(f"{self.paths[s]}: fails its CRC check (a corrupt or rewritten "
                                "shard); extract the features again")
            self._checked.add(s)
        return shard

    def embeddings(self, index: int) -> np.ndarray:
        """The embedding of record `index` (-1: the padding frame's)."""
        if index < 0:
            return self.pad
        s, r = divmod(int(index), self.shard_rows)
        return np.asarray(self._shard(s)[r])

    def labels_of(self, index: int) -> dict[str, np.ndarray]:
        """Labels and masks of record `index` (-1: padding, every mask False)."""
        out = {k: v[max(index, 0)] for k, v in self.labels.items()}
        if index < 0:
            out.update({k: np.False_ for k in schema.MASKS})
        return out
