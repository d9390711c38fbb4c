"""ABAW evaluation of a split's predictions: the task's metrics with the post-processing chosen
on them (smoothing per head, AU thresholds after it), and the `--mode=eval` outputs:
metrics.json, per-video prediction files in the ABAW format, and plots."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from abaw_jax import heads as heads_lib
from abaw_jax import metrics as metrics_lib
from abaw_jax import plots, postprocess, submission, tasks
from abaw_jax.data import records


def metrics(task: tasks.Task, result: dict, data_dir: Path, split: str) -> dict[str, Any]:
    """Task metrics of `result` (`split.predict_split`) and the post-processing report
    (`post/...`: the smoothing chosen per head, AU thresholds after it, scores before/after)."""
    out = task.metrics(result["preds"], result["labels"])
    _, video, frame = records.read_frame_index(data_dir, split)
    _, report = postprocess.Post.fit(task.heads, result["preds"], result["labels"], video, frame)
    return {**out, **report}


def write_outputs(out: Path, data_dir: Path, split: str, result: dict, metrics: dict,
                  heads: tuple[str, ...]) -> None:
    """metrics.json, per-video ABAW prediction files per head, and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    videos, video, frame = records.read_frame_index(data_dir, split)
    lengths = records.read_video_frames(data_dir, split)
    # predictions/: with the post-processing chosen on this split (smoothing, then the AU
    # thresholds searched after it), as a submission would be; predictions_raw/: the model's
    # outputs (AU thresholds searched on them). The over-time plot shows both, the others the
    # raw outputs.
    post = postprocess.Post.from_metrics(metrics, heads)
    smoothed = post.apply(result["preds"], video, frame)
    preds, labels = result["preds"], result["labels"]
    for h in heads:
        thresholds = post.thresholds if h == "au" else 0.5
        submission.write_videos(out / "predictions" / h, h, videos, video, frame, smoothed[h],
                                lengths, thresholds)
        raw_thresholds = metrics_lib.au_values(metrics["au/thresholds"]) if h == "au" else 0.5
        submission.write_videos(out / "predictions_raw" / h, h, videos, video, frame, preds[h],
                                lengths, raw_thresholds)
        valid = labels[f"{h}_mask"].astype(bool)
        _FIGURES[heads_lib.get(h).kind](out, h, preds[h], smoothed[h], labels, valid, metrics,
                                        (videos, video, frame))


def _confusion(out, h, pred, smoothed, labels, valid, metrics, index) -> None:
    plots.confusion_matrix(pred[valid], labels[h][valid], out / f"{h}_confusion.png")


def _au_bars(out, h, pred, smoothed, labels, valid, metrics, index) -> None:
    plots.au_f1_bars(metrics_lib.au_values(metrics[f"{h}/f1_per_au_at_0.5"]),
                     metrics_lib.au_values(metrics[f"{h}/f1_per_au_thresholded"]),
                     metrics_lib.au_values(metrics[f"{h}/thresholds"]), out / f"{h}_f1.png")


def _over_time(out, h, pred, smoothed, labels, valid, metrics, index) -> None:
    method, width = metrics.get(f"post/{h}/method", "none"), metrics.get(f"post/{h}/width", 0)
    smoothing = {"none": None, "gaussian": f"Gaussian, sigma {width:g}",
                 "mean": f"moving mean of {width:g} frames"}[method]
    plots.va_over_time(_series(*index, pred, smoothed, labels[h], valid),
                       out / f"{h}_over_time.png", smoothing)


# One figure per head, by the kind of its labels (heads.Head.kind).
_FIGURES: dict[str, Callable[..., None]] = {
    "regression": _over_time, "classes": _confusion, "binary": _au_bars}


def _series(videos, video, frame, pred, smoothed, target, valid) -> dict:
    """Every video's valid frames in frame order: {video: (frames, raw, smoothed, true)}."""
    series = {}
    for i, name in enumerate(videos):
        rows = np.flatnonzero((video == i) & valid)
        if len(rows):
            rows = rows[np.argsort(frame[rows])]
            series[name] = (frame[rows], pred[rows], smoothed[rows], target[rows])
    return series
