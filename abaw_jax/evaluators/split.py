"""Predictions for every record of a split, on all processes, padded and masked so that no
frame is dropped or counted twice; frames or clips, of any named inputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from abaw_jax import parallel
from abaw_jax.data import folds, pipeline, records, schema

Predict = Callable[[Mapping[str, jax.Array]], Mapping[str, jax.Array]]


def predict_split(predict: Predict, data_dir: Path, split: records.Split, *, batch_size: int, mesh,
                  loader: pipeline.Loader, size: int = 0, features: Sequence[str] = (),
                  length: int = 0, stride: int = 1, audio=None, audio_stats: bool = False
                  ) -> dict[str, Any]:
    """{"preds": {name: (n, ...)}, "labels": {...}} in record order for all n records.

    `predict` maps a global batch of named inputs ("image" at `size`, cached "features", the
    "audio" windows of `audio` (an `AudioConfig`; pooled into "audio_stats" with
    `audio_stats`), and
    "index": the record indices, -1 for padding) to per-frame outputs. Each process reads its
    block of the split; predictions and labels are all-gathered and placed by record index.
    Frames: every index must be filled exactly once. Clips (`length` > 0, windows every
    `stride` frames): a frame's prediction is the mean over every window that holds it, and
    every frame must be in at least one.
    """
    n = len(records.read_frame_index(data_dir, split)[1])
    local_batch = parallel.check_batch_size(batch_size, mesh)
    shard = pipeline.Shard(jax.process_index(), jax.process_count())
    common = dict(batch_size=local_batch, size=size, shard=shard, loader=loader,
                  features=features, audio=audio, audio_stats=audio_stats)
    stream = (pipeline.clip_eval_dataset(data_dir, split, length=length, stride=stride, **common)
              if length else pipeline.eval_dataset(data_dir, split, **common))
    sums: dict[str, np.ndarray] = {}
    labels = {k: None for k in schema.LABEL_KEYS}
    seen = np.zeros(n, np.int32)
    try:
        for batch in stream:
            # The named inputs the pipeline loaded, and the record indices (clips: padding).
            out = parallel.to_host(predict(parallel.to_global(
                {k: v for k, v in batch.items() if k not in (*schema.LABEL_KEYS, "mask")},
                mesh)))
            # Through the same global arrays as the predictions: a TPU mesh may order a
            # process's devices non-contiguously, and rows must stay matched to their outputs.
            meta = parallel.to_host(parallel.to_global(
                {k: np.asarray(batch[k]) for k in ("index", "mask", *schema.LABEL_KEYS)}, mesh))
            rows = meta["mask"]
            if meta["index"].ndim == 2:  # clips: the frames of valid clips that have a record
                rows = rows[:, None] & (meta["index"] >= 0)
            index = meta["index"][rows]
            np.add.at(seen, index, 1)
            for k, v in out.items():
                np.add.at(sums.setdefault(k, np.zeros((n, *v.shape[rows.ndim:]), np.float64)),
                          index, v[rows])
            for k in schema.LABEL_KEYS:
                v = meta[k]
                if labels[k] is None:
                    labels[k] = np.zeros((n, *v.shape[rows.ndim:]), v.dtype)
                labels[k][index] = v[rows]
    finally:
        stream.close()
    covered = seen >= 1 if length else seen == 1
    if not np.all(covered):
        raise AssertionError(f"evaluation covered {np.sum(seen > 0)} of {n} records, "
                             f"{np.sum(seen > 1)} more than once")
    divisor = np.maximum(seen, 1)
    preds = {k: (v / divisor.reshape(-1, *[1] * (v.ndim - 1))).astype(np.float32)
             for k, v in sums.items()}
    return {"preds": preds, "labels": labels}


def predict_run(predict: Predict, setup, data_dir: Path, name: records.Split | None = None
                ) -> dict[str, Any]:
    """`predict_split` over a split of a run (`state.Setup`; the run's eval split by default:
    the config's, or its held-out fold) with the config's eval batch size and loader and the
    run's inputs."""
    config = setup.config
    return predict_split(predict, data_dir, name or folds.run_splits(config.data, data_dir)[1],
                         batch_size=config.eval_batch_size, mesh=setup.mesh,
                         loader=pipeline.Loader.from_config(config.data.loader),
                         **setup.feed.stream_options())
