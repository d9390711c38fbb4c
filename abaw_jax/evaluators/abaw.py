"""ABAW evaluation of a split's predictions: the task's metrics with the post-processing chosen
on them (smoothing per head, AU thresholds after it), the challenge's figures (the submitted
values over every annotated frame), and the `--mode=eval` outputs: metrics.json, per-video
prediction files in the ABAW format, and plots."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from abaw_jax import heads as heads_lib
from abaw_jax import metrics as metrics_lib
from abaw_jax import plots, postprocess, submission, tasks
from abaw_jax.data import affwild2, records

Index = tuple[list[str], np.ndarray, np.ndarray]  # `records.read_frame_index`


def metrics(task: tasks.Task, result: dict, data_dir: Path, split: records.Split
            ) -> dict[str, Any]:
    """Task metrics of `result` (`split.predict_split`) over the frames with a crop, the
    post-processing report (`post/...`: the smoothing chosen per head, AU thresholds after it,
    scores before/after) and the challenge's figures (`challenge`). `score` is
    `challenge_score` when the records keep every annotation line's labels, else the task's
    crop-only score; `score_metric` says which."""
    out = task.metrics(result["preds"], result["labels"])
    index = records.read_frame_index(data_dir, split)
    post, report = postprocess.Post.fit(task.heads, result["preds"], result["labels"], *index[1:])
    out.update(report)
    out.update(challenge(task, post.apply(result["preds"], *index[1:]), post.thresholds,
                         data_dir, split))
    if "challenge_score" in out:
        out["score_metric"] = "challenge_score"
        out["score"] = out["challenge_score"]
    return out


def challenge(task: tasks.Task, smoothed: dict[str, np.ndarray], thresholds: np.ndarray | None,
              data_dir: Path, split: records.Split) -> dict[str, Any]:
    """The challenge's figures, as the organisers compute them from a submission: the values of
    the submission files (`smoothed` outputs filled per video over its frame count by
    `submission.filled_videos`, AU at `thresholds`) over every annotation line of the split with
    a valid label (`records.read_labels`), crop or not: `<head>/challenge_<metric>`,
    `<head>/challenge_frames` (lines scored) and `<head>/challenge_frames_missing` (valid lines
    the files have no line for: a video without any prediction, a line past the video's frame
    count; 0 on data as prepared), and
    `challenge_score`. Multi-task (s-Aff-Wild2): the listed images only, as `write_mtl` submits
    them (an image without a crop takes its video's nearest prediction, interpolated for VA);
    `challenge_score` is P. {} when the records predate the labels file (with a warning)."""
    if not records.has_labels(data_dir, split):
        logging.warning("%s: no labels file of %s (records prepared before it was kept), so "
                        "no challenge figures: the best checkpoint is picked by %s over the "
                        "frames with a crop. Prepare the records again to get them (a data cache "
                        "folder: delete it, and the next run prepares it again)",
                        data_dir, split, task.score)
        return {}
    annotated = records.read_labels(data_dir, split)
    index = records.read_frame_index(data_dir, split)
    lengths = records.read_video_frames(data_dir, split)
    out: dict[str, Any] = {}
    for h in task.heads:
        head = heads_lib.get(h)
        at = _thresholds(thresholds, h)
        lines, values = (_at_listed_images(h, annotated, index, smoothed[h], at)
                         if task.name == "mtl" else
                         _at_annotated_frames(h, annotated, index, smoothed[h], lengths, at))
        valid = annotated.masks[h][lines]
        figures = head.challenge(values[valid], annotated.labels[h][lines][valid])
        out.update({f"{h}/challenge_{k}": v for k, v in figures.items()})
        out[f"{h}/challenge_frames"] = int(valid.sum())
        out[f"{h}/challenge_frames_missing"] = int(annotated.masks[h].sum() - valid.sum())
    out["challenge_score"] = float(sum(out[f"{h}/challenge_{heads_lib.get(h).challenge_score}"]
                                       for h in task.heads))
    return out


def _thresholds(thresholds: np.ndarray | None, head: str) -> np.ndarray | float:
    """The decision thresholds a head's submission applies (AU: those searched on validation)."""
    return thresholds if head == "au" and thresholds is not None else 0.5


def _at_annotated_frames(head: str, annotated: affwild2.Annotated, index: Index,
                         values: np.ndarray, lengths: dict[str, int], thresholds
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(annotation lines, their submitted values) of every line a per-video file holds."""
    where = {name: i for i, name in enumerate(annotated.videos)}
    lines = [np.zeros(0, np.int64)]
    got = [heads_lib.get(head).submitted(np.zeros((0, *values.shape[1:])), thresholds)]
    for _, name, per_frame in submission.filled_videos(head, *index, values, lengths):
        if name in where:
            rows = np.arange(annotated.offsets[where[name]], annotated.offsets[where[name] + 1])
            rows = rows[annotated.frame[rows] <= len(per_frame)]  # past the file: not scored
            lines.append(rows)
            got.append(heads_lib.get(head).submitted(per_frame[annotated.frame[rows] - 1],
                                                     thresholds))
    return np.concatenate(lines), np.concatenate(got)


def _at_listed_images(head: str, annotated: affwild2.Annotated, index: Index,
                      values: np.ndarray, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """(lines, their submitted values) of the listed images of the videos with predictions, as
    the multi-task file holds them."""
    videos, video, _ = index
    names = np.repeat(np.asarray(annotated.videos, dtype=str), np.diff(annotated.offsets))
    lines = np.flatnonzero(np.isin(names, [videos[i] for i in np.unique(video)]))
    pairs = [(str(names[r]), int(annotated.frame[r])) for r in lines]
    return lines, heads_lib.get(head).submitted(
        submission.at_images(pairs, *index, values, head), thresholds)


def write_outputs(out: Path, data_dir: Path, split: records.Split, result: dict, metrics: dict,
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
        submission.write_videos(out / "predictions" / h, h, videos, video, frame, smoothed[h],
                                lengths, _thresholds(post.thresholds, h))
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
