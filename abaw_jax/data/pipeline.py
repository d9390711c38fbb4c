"""grain pipelines over the records: training frames, evaluation frames, and clips of frames.

Every pipeline is a `grain.MapDataset` of record indices batched to the per-process batch, so
shuffling, per-process sharding and resuming are index arithmetic, independent of the number of
worker processes that decode and augment (`Loader.num_workers`). Each returns a `Stream`: an
iterator whose checkpoint state is the number of the next batch. Close streams (`close()`) when
done, or the workers and their shared memory outlive them.

Batches are dicts of numpy arrays, named as the models' inputs: `image` uint8 (B, S, S, 3) (clips:
(B, T, S, S, 3)) and/or `features` (B, D) float32 from feature caches, `audio` (B, W, M) float32
log-mel windows around each frame's timestamp (data/audio_table.py) or, with `audio_stats`,
those windows pooled to `audio_stats` (B, 2M) (each band's mean and std), labels and masks of
every task, `index` (the record index within the split, -1 for padding) and, for eval
and clip batches, `mask` (False on padding). Map an `index` back to (video, frame) with
`records.read_frame_index`. A split may be a `records.Subset` (cross-validation folds,
data/folds.py): some videos of several splits, read as one (`SubsetReader`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from abaw_jax.data import audio as audio_lib
from abaw_jax.data import audio_table, augment, records, schema
from abaw_jax.data import features as features_lib
from abaw_jax.data.affwild2 import AU_NAMES, DataError


@dataclasses.dataclass(frozen=True)
class Shard:
    """Which part of the data this process reads: (jax.process_index(), jax.process_count())."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} not in [0, {self.count})")


@dataclasses.dataclass(frozen=True)
class Loader:
    """How batches are produced: worker processes, reader threads and buffers."""

    num_workers: int = 0  # 0: decode in the calling process
    read_threads: int = 1  # per process: one overlaps batching; more contend for the GIL
    worker_buffer: int = 2  # batches each worker keeps ready

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> Loader:
        return cls(**dict(cfg or {}))


class FrameReader:
    """One split's frames by record index, as the named inputs a model takes, with labels.

    `size` > 0: the decoded (and for training augmented) "image" at that size. `features`:
    feature caches of these records (data/features.py), concatenated per frame into "features";
    without images the labels come from the first cache and no record is read. `audio`: the
    log-mel window of each frame as "audio" (masked at random when training), or with
    `audio_stats` its per-band mean and std as "audio_stats" (`audio.window_stats`). Index -1
    is a padding frame: a zero image, the caches' padding embedding, silence, every mask False.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, *, size: int = 0,
                 features: Sequence[str | os.PathLike] = (),
                 audio: audio_lib.AudioConfig | None = None, audio_stats: bool = False):
        if not size and not features and not audio:
            raise ValueError("a frame reader needs an image size, feature caches or audio")
        if audio_stats and not audio:
            raise ValueError("audio_stats pools the audio windows: give the audio config")
        self.audio = audio_table.AudioTable(data_dir, audio) if audio else None
        self.audio_stats = audio_stats
        self.size = size
        # The records give the image and, unless a feature cache does, the labels.
        self.records = records.RecordSource(data_dir, split) if size or not features else None
        self.caches = [features_lib.FeatureSource(d, split) for d in features]
        index = records.read_frame_index(data_dir, split)
        for d in features:  # the caches must hold these records' frames, in this order
            features_lib.check_matches(d, split, *index)
        self.videos, self.video, self.frame = index
        self.split = split

    def __len__(self) -> int:
        return len(self.video)

    def __call__(self, index: int, cfg: augment.AugmentConfig | None = None,
                 rng: np.random.Generator | None = None) -> dict:
        out = self._record(index, cfg, rng) if self.records else self.caches[0].labels_of(index)
        if self.caches:
            out["features"] = np.concatenate([c.embeddings(index) for c in self.caches])
        if self.audio_stats:  # pooled here: 1/50 of the window's bytes (benchmarks/fusion.py)
            out["audio_stats"] = audio_lib.window_stats(self._audio(index, rng))
        elif self.audio:
            out["audio"] = self._audio(index, rng)
        return {**out, "index": np.int32(index)}

    def _audio(self, index: int, rng) -> np.ndarray:
        """The frame's window; masked at random when training (an rng: training streams only),
        after the image so that its augmentation draws the same numbers with or without audio."""
        if index < 0:
            return self.audio.silence
        window = self.audio.window(self.videos[self.video[index]], int(self.frame[index]))
        return window if rng is None else audio_lib.spec_augment(window, rng, self.audio.cfg)

    def _record(self, index: int, cfg, rng) -> dict:
        """The labels and, with a size, the (augmented) image of a record."""
        if index < 0:
            pad = {"va": np.zeros(2, np.float32), "expr": np.int32(0),
                   "au": np.zeros(len(AU_NAMES), np.int32), "va_mask": np.False_,
                   "expr_mask": np.False_, "au_mask": np.False_}
            return {"image": np.zeros((self.size, self.size, 3), np.uint8), **pad} \
                if self.size else pad
        ex = self.records[int(index)]
        out = {}
        if self.size:
            name = f"{self.split} record {index} ({ex['video']}/{int(ex['frame']):05d}.jpg)"
            image = augment.decode(ex["image"], name)
            out["image"] = augment.augment(image, cfg, rng) if cfg else \
                augment.resize(image, self.size)
        return {**out, **{k: ex[k] for k in schema.LABEL_KEYS}}


class SubsetReader:
    """A `records.Subset` read as one split: each part's split by a `FrameReader` (images,
    caches and audio as it reads them), subset record j mapped to its part's record
    (`records.subset_rows`); the output's "index" is j. No record is written for a subset."""

    def __init__(self, data_dir: str | os.PathLike, subset: records.Subset, **kwargs):
        self.parts = [(FrameReader(data_dir, split, **kwargs), rows)
                      for split, rows in records.subset_rows(data_dir, subset)]
        self._starts = np.cumsum([0] + [len(rows) for _, rows in self.parts])
        self.videos, self.video, self.frame = records.read_frame_index(data_dir, subset)
        self.split = subset.name

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __call__(self, index: int, cfg: augment.AugmentConfig | None = None,
                 rng: np.random.Generator | None = None) -> dict:
        if index < 0:
            return self.parts[0][0](-1, cfg, rng)
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        reader, rows = self.parts[part]
        out = reader(int(rows[index - self._starts[part]]), cfg, rng)
        return {**out, "index": np.int32(index)}


def frame_reader(data_dir: str | os.PathLike, split: records.Split, **kwargs
                 ) -> FrameReader | SubsetReader:
    """The reader of a split or of a subset of splits (FrameReader's keyword arguments)."""
    if isinstance(split, records.Subset):
        return SubsetReader(data_dir, split, **kwargs)
    return FrameReader(data_dir, split, **kwargs)


class Stream:
    """An iterator of batches whose checkpoint state is the number of the next batch.

    The batches are elements of a `grain.MapDataset`, so resuming is `dataset[k:]`: exact for any
    number of worker processes, with nothing of the workers in the state. Implements what
    `grain.checkpoint.CheckpointSave` / `CheckpointRestore` need (`get_state` / `set_state` as
    bytes, `start_prefetch`). `describe` goes into the state and must match on restore.
    """

    def __init__(self, batches: grain.MapDataset, loader: Loader, describe: dict):
        self._batches, self._loader, self._describe = batches, loader, describe
        self._next = 0
        self._it = None

    def __iter__(self) -> Stream:
        return self

    def __len__(self) -> int:
        """Batches left (huge for the endless training streams)."""
        return len(self._batches) - self._next

    def __next__(self) -> dict:
        self.start_prefetch()
        batch = next(self._it)
        self._next += 1
        return batch

    def start_prefetch(self) -> None:
        if self._it is None:
            buffer = max(self._loader.read_threads, self._loader.worker_buffer)
            it = self._batches[self._next:].to_iter_dataset(grain.ReadOptions(
                num_threads=self._loader.read_threads, prefetch_buffer_size=buffer))
            if self._loader.num_workers > 0:
                # grain's workers read absl flags; outside `app.run` (notebooks, tests) nothing
                # parsed them, so take the defaults rather than fail.
                if not flags.FLAGS.is_parsed():
                    flags.FLAGS.mark_as_parsed()
                it = it.mp_prefetch(grain.MultiprocessingOptions(
                    num_workers=self._loader.num_workers,
                    per_worker_buffer_size=self._loader.worker_buffer),
                    worker_init_fn=_ignore_sigterm)
            self._it = iter(it)

    def get_state(self) -> bytes:
        return json.dumps({"next_batch": self._next, **self._describe}).encode()

    def set_state(self, state: bytes) -> None:
        state = json.loads(state)
        saved = {k: v for k, v in state.items() if k != "next_batch"}
        if saved != self._describe:
            diff = {k: (saved.get(k), v) for k, v in self._describe.items() if saved.get(k) != v}
            raise DataError(f"the checkpointed data stream differs from this one (saved, now): "
                            f"{diff}")
        self.close()
        self._next = int(state["next_batch"])

    def close(self) -> None:
        """Stops the worker processes and frees their shared memory."""
        if self._it is not None:
            self._it.close()
            self._it = None


def _ignore_sigterm(worker_index: int, worker_count: int) -> None:
    """In data workers: a scheduler's SIGTERM reaches the whole process group, but the trainer
    still needs batches until its preemption checkpoint; it stops the workers itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _LoadBatch:
    """Batch b -> dict of stacked arrays, built in one call.

    One grain element per batch rather than per frame: grain's per-element machinery (index
    slicing, per-element RNG, batching) cost about as much as decoding and augmenting a frame.
    `order.locate(b, j)` gives the j-th element of batch b and its position in the global stream;
    the random generator of an element is seeded by (seed, position), so an element is augmented
    the same way on any worker and on any process count.
    """

    def __init__(self, order, batch_size: int, element, seed: int | None = None):
        self.order, self.batch_size, self.element, self.seed = order, batch_size, element, seed

    def __call__(self, b: int) -> dict:
        items = []
        for j in range(self.batch_size):
            index, position = self.order.locate(int(b), j)
            rng = None if self.seed is None else np.random.default_rng([self.seed, position])
            items.append(self.element(index, rng))
        return {k: np.stack([it[k] for it in items]) for k in items[0]}


def _finish(order, batch_size: int, loader: Loader, element, rng_seed: int | None = None,
            **describe) -> Stream:
    # A batch is the unit of work: workers take whole batches round robin, so the stream (and a
    # checkpointed position in it) is the same for any worker count.
    ds = grain.MapDataset.range(len(order) // batch_size)
    ds = ds.map(_LoadBatch(order, batch_size, element, rng_seed))
    return Stream(ds, loader, describe)


class _GlobalOrder:
    """The endless shuffled stream, cut into global batches that the processes share.

    Position g of the global stream is record perm_e[g % n] with e = g // n, a new permutation
    of the n records every epoch (from seed and epoch). Global batch b is positions
    [b * G, (b + 1) * G) with G = batch_size * count; process p loads its `batch_size` block of
    it, so the processes' batches, concatenated in process order (`parallel.to_global`), are
    exactly the single-process global batch: data order and augmentation do not depend on the
    number of processes, and a stream position resumes onto any process count.
    One numpy permutation per epoch costs far less than grain's per-element index shuffle.
    """

    def __init__(self, n: int, seed: int, batch_size: int, shard: Shard):
        if n < 1:
            raise DataError("the split has no records")
        self.n, self.seed, self.batch_size, self.shard = n, seed, batch_size, shard
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return sys.maxsize

    def locate(self, b: int, j: int) -> tuple[int, int]:
        position = (b * self.shard.count + self.shard.index) * self.batch_size + j
        epoch, k = divmod(position, self.n)
        cache = self._cache
        if cache is None or cache[0] != epoch:
            cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
            self._cache = cache
        return int(cache[1][k]), position


class _Indices:
    """A fixed list of elements (-1: padding), read in order."""

    def __init__(self, indices: np.ndarray, batch_size: int):
        self.indices, self.batch_size = indices, batch_size

    def __len__(self) -> int:
        return len(self.indices)

    def locate(self, b: int, j: int) -> tuple[int, int]:
        position = b * self.batch_size + j
        return int(self.indices[position]), position


def train_dataset(data_dir: str | os.PathLike, split: records.Split, *,
                  batch_size: int, seed: int,
                  augment_cfg: augment.AugmentConfig | None, shard: Shard = Shard(),
                  loader: Loader = Loader(), features: Sequence[str | os.PathLike] = (),
                  audio: audio_lib.AudioConfig | None = None, audio_stats: bool = False
                  ) -> Stream:
    """Endless augmented frames, shuffled per epoch from `seed`: this process's `batch_size`
    block of every global batch (see `_GlobalOrder`). `augment_cfg` None: no image (cached
    `features` only). Several splits are one `records.Subset` (`records.whole_splits`).

    The state keeps the seed, global batch size and record count, and refuses to resume a
    different stream; the augmentation, worker count and process count may change between runs.
    """
    reader = frame_reader(data_dir, split, size=augment_cfg.size if augment_cfg else 0,
                          features=features, audio=audio, audio_stats=audio_stats)
    element = functools.partial(_train_frame, reader, augment_cfg)
    return _finish(_GlobalOrder(len(reader), seed, batch_size, shard), batch_size, loader,
                   element, seed + 1, split=str(split), seed=seed, records=len(reader),
                   global_batch=batch_size * shard.count, **_describe(features))


def _describe(features) -> dict:
    return {"features": len(features)} if features else {}


def _train_frame(reader, cfg, index, rng):
    return reader(index, cfg, rng)


def eval_steps(n: int, batch_size: int, shard_count: int) -> int:
    """Batches each process runs so that n elements are covered once by all processes."""
    return max(1, math.ceil(math.ceil(n / shard_count) / batch_size))


def _host_indices(n: int, batch_size: int, shard: Shard) -> np.ndarray:
    """This process's contiguous block of 0..n-1, padded with -1 to the common batch count."""
    per_host = math.ceil(n / shard.count)
    start, stop = min(n, shard.index * per_host), min(n, (shard.index + 1) * per_host)
    out = np.full(eval_steps(n, batch_size, shard.count) * batch_size, -1, np.int64)
    out[: stop - start] = np.arange(start, stop)
    return out


def eval_dataset(data_dir: str | os.PathLike, split: records.Split, *,
                 batch_size: int, size: int,
                 shard: Shard = Shard(), loader: Loader = Loader(),
                 features: Sequence[str | os.PathLike] = (),
                 audio: audio_lib.AudioConfig | None = None, audio_stats: bool = False
                 ) -> Stream:
    """Every record exactly once over all processes, in order, padded (mask False) so that
    every process runs `eval_steps` batches. `size` 0: no image (cached `features` only)."""
    reader = frame_reader(data_dir, split, size=size, features=features, audio=audio,
                          audio_stats=audio_stats)
    return _finish(_Indices(_host_indices(len(reader), batch_size, shard), batch_size),
                   batch_size, loader, functools.partial(_eval_frame, reader))


def _eval_frame(reader, index, rng=None):
    return {**reader(index), "mask": np.bool_(index >= 0)}


# ----------------------------------------------------------------------------------------------
# Clips: T consecutive frame numbers of one video


def clip_index(video: np.ndarray, frame: np.ndarray, length: int, stride: int) -> np.ndarray:
    """(num_clips, length) record indices (-1 where that frame has no record).

    Windows start every `stride` frames of each video and never cross a video; a last window
    ending at the video's last frame is added so that every record is in at least one clip. A
    video shorter than `length` frames is one clip, padded at its end.
    """
    if length < 1 or stride < 1:
        raise ValueError(f"clip length {length} and stride {stride} must be positive")
    clips = []
    order = np.lexsort((frame, video))
    bounds = np.flatnonzero(np.diff(video[order])) + 1
    for rows in np.split(order, bounds):
        if not len(rows):
            continue
        first, last = int(frame[rows[0]]), int(frame[rows[-1]])
        span = last - first + 1
        lookup = np.full(max(span, length), -1, np.int64)
        lookup[frame[rows] - first] = rows
        starts = list(range(0, max(span - length, 0) + 1, stride))
        if starts[-1] + length < span:
            starts.append(span - length)
        clips += [lookup[s : s + length] for s in starts]
    return np.stack(clips) if clips else np.zeros((0, length), np.int64)


def _clips(data_dir, split: records.Split, length: int, stride: int, size: int, features, audio,
           audio_stats: bool) -> tuple[FrameReader | SubsetReader, np.ndarray]:
    reader = frame_reader(data_dir, split, size=size, features=features, audio=audio,
                          audio_stats=audio_stats)
    return reader, clip_index(reader.video, reader.frame, length, stride)


def _clip(reader, clips, cfg, clip, rng=None):
    """One clip: the same augmentation for every frame (one seed), missing frames padded."""
    seed = None if rng is None else rng.integers(2**63)
    frames = [reader(int(i), cfg, None if seed is None else np.random.default_rng(seed))
              for i in clips[clip]]
    return {k: np.stack([f[k] for f in frames]) for k in frames[0]} | {"mask": np.bool_(True)}


def clip_train_dataset(data_dir: str | os.PathLike, split: records.Split, *,
                       length: int, stride: int,
                       batch_size: int, seed: int, augment_cfg: augment.AugmentConfig | None,
                       shard: Shard = Shard(), loader: Loader = Loader(),
                       features: Sequence[str | os.PathLike] = (),
                       audio: audio_lib.AudioConfig | None = None, audio_stats: bool = False
                       ) -> Stream:
    """Endless shuffled clips of `length` consecutive frames for temporal models (of cached
    `features` only when `augment_cfg` is None)."""
    reader, clips = _clips(data_dir, split, length, stride,
                           augment_cfg.size if augment_cfg else 0, features, audio, audio_stats)
    element = functools.partial(_clip, reader, clips, augment_cfg)
    return _finish(_GlobalOrder(len(clips), seed, batch_size, shard), batch_size, loader,
                   element, seed + 1, split=str(split), seed=seed, clips=len(clips), length=length,
                   stride=stride, global_batch=batch_size * shard.count, **_describe(features))


def clip_eval_dataset(data_dir: str | os.PathLike, split: records.Split, *,
                      length: int, stride: int,
                      batch_size: int, size: int, shard: Shard = Shard(),
                      loader: Loader = Loader(), features: Sequence[str | os.PathLike] = (),
                      audio: audio_lib.AudioConfig | None = None, audio_stats: bool = False
                      ) -> Stream:
    """Every clip once over all processes, in order, padded like `eval_dataset`."""
    reader, clips = _clips(data_dir, split, length, stride, size, features, audio, audio_stats)
    return _finish(_Indices(_host_indices(len(clips), batch_size, shard), batch_size),
                   batch_size, loader, functools.partial(_eval_clip, reader, clips, length))


def _eval_clip(reader, clips, length, c, rng=None):
    if c < 0:
        pad = reader(-1)
        return {k: np.stack([v] * length) for k, v in pad.items()} | {"mask": np.False_}
    return _clip(reader, clips, None, int(c))
