"""Evaluation: predictions for every record of a split (all processes, padded and masked so no
frame is dropped or counted twice), metrics, and `--mode=eval` outputs: metrics.json, per-video
prediction files in the ABAW format, and plots."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from abaw_jax import parallel, plots, postprocess, submission
from abaw_jax.data import cache, features, pipeline, records

LABELS = ("va", "expr", "au", "va_mask", "expr_mask", "au_mask")


def predict_split(predict_step: Callable, params, rest, data_dir: Path, split: str, *,
                  batch_size: int, image_size: int, mesh, loader: pipeline.Loader,
                  clip_length: int = 0, clip_stride: int = 1,
                  features_dir: str | Path | None = None) -> dict[str, Any]:
    """{"preds": {head: (n, ...)}, "labels": {...}} in record order for all n records.

    Each process reads its block of the split; predictions and labels are all-gathered and
    placed by record index. Frames: every index must be filled exactly once. Clips
    (`clip_length` > 0, windows every `clip_stride` frames): a frame's prediction is the mean
    over every window that holds it, and every frame must be in at least one. With
    `features_dir` the clips are of cached embeddings (`predict_step` takes them) instead of
    images.
    """
    n = len(records.RecordSource(data_dir, split))
    local_batch = parallel.check_batch_size(batch_size, mesh)
    shard = pipeline.Shard(jax.process_index(), jax.process_count())
    inputs = "image"
    if features_dir:
        inputs = "features"
        features.check_matches(features_dir, split, *records.read_frame_index(data_dir, split))
        stream = pipeline.feature_clip_eval_dataset(features_dir, split, length=clip_length,
                                                    stride=clip_stride, batch_size=local_batch,
                                                    shard=shard, loader=loader)
    elif clip_length:
        stream = pipeline.clip_eval_dataset(data_dir, split, length=clip_length,
                                            stride=clip_stride, batch_size=local_batch,
                                            size=image_size, shard=shard, loader=loader)
    else:
        stream = pipeline.eval_dataset(data_dir, split, batch_size=local_batch, size=image_size,
                                       shard=shard, loader=loader)
    sums: dict[str, np.ndarray] = {}
    labels = {k: None for k in LABELS}
    seen = np.zeros(n, np.int32)
    try:
        for batch in stream:
            x = parallel.to_global({inputs: batch[inputs]}, mesh)[inputs]
            out = parallel.to_host(predict_step(params, rest, x))
            # Through the same global arrays as the predictions: a TPU mesh may order a
            # process's devices non-contiguously, and rows must stay matched to their outputs.
            meta = parallel.to_host(parallel.to_global(
                {k: np.asarray(batch[k]) for k in ("index", "mask", *LABELS)}, mesh))
            rows = meta["mask"]
            if meta["index"].ndim == 2:  # clips: the frames of valid clips that have a record
                rows = rows[:, None] & (meta["index"] >= 0)
            index = meta["index"][rows]
            np.add.at(seen, index, 1)
            for k, v in out.items():
                np.add.at(sums.setdefault(k, np.zeros((n, *v.shape[rows.ndim:]), np.float64)),
                          index, v[rows])
            for k in LABELS:
                v = meta[k]
                if labels[k] is None:
                    labels[k] = np.zeros((n, *v.shape[rows.ndim:]), v.dtype)
                labels[k][index] = v[rows]
    finally:
        stream.close()
    covered = seen >= 1 if clip_length else seen == 1
    if not np.all(covered):
        raise AssertionError(f"evaluation covered {np.sum(seen > 0)} of {n} records, "
                             f"{np.sum(seen > 1)} more than once")
    divisor = np.maximum(seen, 1)
    preds = {k: (v / divisor.reshape(-1, *[1] * (v.ndim - 1))).astype(np.float32)
             for k, v in sums.items()}
    return {"preds": preds, "labels": labels}


def predict_config_split(params, rest, predict_step: Callable, setup, records: Path,
                         config: ml_collections.ConfigDict, split: str | None = None
                         ) -> dict[str, Any]:
    """`predict_split` of a split (the config's eval split by default) with the config's eval
    batch size, loader and clip options."""
    return predict_split(predict_step, params, rest, records, split or config.data.eval_split,
                         batch_size=config.eval_batch_size, image_size=setup.image_size,
                         mesh=setup.mesh, loader=pipeline.Loader.from_config(config.data.loader),
                         **clip_options(config))


def clip_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The clip length and stride of a temporal model's config (none for a frame model), and
    the feature cache it trains from (`data.features`), if any."""
    length = int(config.data.get("clip_length", 0) or 0)
    if not length:
        return {}
    out = {"clip_length": length, "clip_stride": int(config.data.get("clip_stride", 1) or 1)}
    if config.data.get("features"):
        out["features_dir"] = config.data.features
    return out


def evaluate_split(params, rest, *, predict_step: Callable, setup, records: Path,
                   config: ml_collections.ConfigDict) -> dict:
    """Task metrics over the config's whole eval split, with the post-processing chosen on it
    (`post/...`: smoothing per head, AU thresholds after smoothing, scores before and after)."""
    result = predict_config_split(params, rest, predict_step, setup, records, config)
    return _metrics(setup.task, result, records, config.data.eval_split)


def _metrics(task, result: dict, data_dir: Path, split: str) -> dict:
    out = task.metrics(result["preds"], result["labels"])
    _, video, frame = records.read_frame_index(data_dir, split)
    _, report = postprocess.Post.fit(task.heads, result["preds"], result["labels"], video, frame)
    return {**out, **report}


def run(config: ml_collections.ConfigDict, workdir: str | Path, which: str = "best") -> dict:
    """Restores a checkpoint ('best', 'latest' or a step) of `workdir`, evaluates the eval split
    and writes `eval/<split>-step<N>/` (metrics.json, predictions/, plots)."""
    from abaw_jax import train  # train imports this module

    workdir = Path(workdir)
    train.check_workdir(config, workdir)
    restored = train.restore_run(config, workdir, which)
    setup, state, step = restored.setup, restored.state, restored.step
    data_dir = cache.records_for(config.data, config.task)
    split = config.data.eval_split
    predict_step = train.make_predict_step(setup, features=bool(config.data.get("features")))
    result = predict_config_split(state.params, state.rest, predict_step, setup, data_dir,
                                  config)
    metrics = _metrics(setup.task, result, data_dir, split)
    metrics["step"] = step
    out = workdir / "eval" / f"{split}-step{step}"
    if jax.process_index() == 0:
        write_outputs(out, data_dir, split, result, metrics, setup.task.heads)
        logging.info("eval outputs in %s", out)
    return metrics


def write_outputs(out: Path, data_dir: Path, split: str, result: dict, metrics: dict,
                  heads: tuple[str, ...]) -> None:
    """metrics.json, per-video ABAW prediction files per head, and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    videos, video, frame = records.read_frame_index(data_dir, split)
    lengths = records.read_video_frames(data_dir, split)
    # predictions/: with the post-processing chosen on this split (smoothing, then the AU
    # thresholds searched after it), as a submission would be; predictions_raw/: the model's
    # outputs (AU thresholds searched on them); the plots show the raw outputs.
    post = postprocess.Post.from_metrics(metrics, heads)
    smoothed = post.apply(result["preds"], video, frame)
    preds, labels = result["preds"], result["labels"]
    for h in heads:
        thresholds = post.thresholds if h == "au" else 0.5
        submission.write_videos(out / "predictions" / h, h, videos, video, frame, smoothed[h],
                                lengths, thresholds)
        raw_thresholds = np.asarray(metrics["au/thresholds"]) if h == "au" else 0.5
        submission.write_videos(out / "predictions_raw" / h, h, videos, video, frame, preds[h],
                                lengths, raw_thresholds)
        valid = labels[f"{h}_mask"].astype(bool)
        if h == "expr":
            plots.confusion_matrix(preds[h][valid], labels[h][valid], out / "expr_confusion.png")
        elif h == "au":
            plots.au_f1_bars(np.asarray(metrics["au/f1_per_au"]),
                             np.asarray(metrics["au/f1_per_au_thresholded"]), raw_thresholds,
                             out / "au_f1.png")
        else:
            plots.va_over_time(_va_series(videos, video, frame, preds[h], labels, valid),
                               out / "va_over_time.png")


def _va_series(videos, video, frame, pred, labels, valid, count: int = 3) -> dict:
    """The `count` longest videos' valid frames, in frame order, for the VA plot."""
    lengths = np.bincount(video[valid], minlength=len(videos))
    series = {}
    for i in np.argsort(-lengths, kind="stable")[:count]:
        rows = np.flatnonzero((video == i) & valid)
        rows = rows[np.argsort(frame[rows])]
        series[videos[i]] = (frame[rows], pred[rows], labels["va"][rows])
    return series
