"""`--mode=predict`: ABAW submission files for the challenge's test list, from one workdir or
an ensemble of workdirs.

Each member restores its checkpoint ('best' by default), predicts every test frame with a crop
(all processes, like evaluation), and applies the post-processing stored with that checkpoint
(smoothing per head chosen on validation, then AU thresholds searched on validation after
smoothing). Members are averaged (probabilities, VA values) or, for EXPR with
`predict.combine="vote"`, vote (`heads.Classes.combine`: ties to the highest mean
probability); AU thresholds are the members' mean (fold models: abaw_jax/ensemble.py).
Every frame of every test video gets a line (frames without a crop filled from their
neighbours), and the files are checked by `submission.check` before the run ends. The
multi-task task writes one file instead, `mtl/predictions.txt` in the layout of the
s-Aff-Wild2 annotation file, one line per image of the test list in its order (checked by
`submission.check_mtl`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging

from abaw_jax import evaluate, heads, parallel, postprocess, submission, tasks
from abaw_jax import state as state_lib
from abaw_jax.data import affwild2, cache, records
from abaw_jax.errors import ConfigError
from abaw_jax.evaluators import abaw, split


@dataclasses.dataclass(frozen=True)
class Member:
    """A run's checkpoint restored for prediction (here and by the fold ensemble)."""

    predict: Callable  # global batch of named inputs -> per-frame outputs
    setup: state_lib.Setup
    post: postprocess.Post  # stored with the checkpoint (chosen on its validation split)
    step: int


def restore(workdir: Path, config: ml_collections.ConfigDict, which: str) -> Member:
    """The checkpoint `which` of a run, ready to predict any split (`split.predict_run`)."""
    restored = state_lib.restore_run(config, workdir, which)
    setup, step = restored.setup, restored.step
    post = postprocess.Post.from_metrics(restored.metrics, setup.task.heads)
    logging.info("%s: %s; smoothing %s, AU thresholds %s", workdir,
                 evaluate.describe_checkpoint(which, step, restored.metrics, setup.task.score),
                 dict(post.smoothing), post.thresholds)
    return Member(state_lib.bind(state_lib.predict_fn(setup), restored.state), setup, post,
                  step)


def _combine(members: list[dict[str, np.ndarray]], head: str, how: str) -> np.ndarray:
    if head == "expr" and how == "vote":
        return heads.get(head).combine(np.stack(members))
    return np.mean(members, 0)


def read_test(data_dir: Path) -> tuple[abaw.Index, dict[str, int]]:
    """The test split's frame index and video lengths; a test video without a frame to
    predict is a `DataError`."""
    index = records.read_frame_index(data_dir, "test")
    _warn_last_crop_counts(data_dir)
    empty = [v for i, v in enumerate(index[0]) if not np.any(index[1] == i)]
    if empty:
        raise affwild2.DataError(f"{data_dir}: test videos with no frame to predict: {empty}")
    return index, records.read_video_frames(data_dir, "test")


def run(config: ml_collections.ConfigDict, workdir: str | Path, which: str = "best") -> Path:
    """Writes `<workdir>/predict/test-<step or ensemble>/<head>/<video>.txt` and returns the
    folder. Members: `workdir` and the workdirs in `config.predict.ensemble`."""
    workdir = Path(workdir)
    task = tasks.get(config.task)
    data_dir = cache.records_for(config.data, config.task, test=True)
    index, lengths = read_test(data_dir)
    extra = [Path(p) for p in config.get("predict", {}).get("ensemble", [])]
    members, posts, steps = [], [], []
    for i, member in enumerate([workdir, *extra]):
        member_config = config if i == 0 else state_lib.read_config(member)
        if i == 0:
            state_lib.check_workdir(config, member)
        if member_config.task != config.task:
            raise ConfigError(f"{member}: a checkpoint of task {member_config.task!r}, not "
                             f"{config.task!r}")
        restored = restore(member, member_config, which)
        result = split.predict_run(restored.predict, restored.setup, data_dir, "test")
        members.append(restored.post.apply(result["preds"], *index[1:]))
        posts.append(restored.post)
        steps.append(restored.step)
    how = config.get("predict", {}).get("combine", "mean")
    out = workdir / "predict" / (f"test-step{steps[0]}" if not extra else "test-ensemble")
    def write():
        values = {h: _combine([m[h] for m in members], h, how) for h in task.heads}
        thresholds = (np.mean([p.thresholds for p in posts], 0)
                      if all(p.thresholds is not None for p in posts) else 0.5)
        write_submission(out, task, data_dir, values, thresholds, index, lengths)
        (out / "members.json").write_text(json.dumps(
            {"members": [str(m) for m in [workdir, *extra]], "steps": steps, "combine": how,
             "data": str(data_dir)}, indent=1))

    parallel.on_process_0(write, "writing the submission")
    return out


def write_submission(out: Path, task: tasks.Task, data_dir: Path, values: dict[str, np.ndarray],
                     thresholds: np.ndarray | float, index: abaw.Index,
                     lengths: dict[str, int]) -> None:
    """The submission files of per-frame `values` of the test split (`read_test`), checked:
    `<out>/<head>/<video>.txt`, or for the multi-task task `<out>/mtl/predictions.txt`."""
    if task.name == "mtl":
        _write_mtl(out / "mtl", data_dir, values, thresholds, *index)
    else:
        _write(out, values, thresholds, *index, lengths)
    logging.info("submission files in %s (checked: %d videos); to check again: %s", out,
                 len(index[0]), "; ".join(
                     f"python -m abaw_jax.submission --dir={out / h} --head={h} "
                     f"--records={data_dir}" for h in (["mtl"] if task.name == "mtl"
                                                        else task.heads)))


def _warn_last_crop_counts(data_dir: Path) -> None:
    """Test videos whose frame count (their submission's lines) is the last crop's: no raw
    video or video_info.csv line said how long they are (prepare's stats.json)."""
    counts = json.loads((data_dir / "stats.json").read_text())["splits"]["test"].get(
        "frame_counts", {})
    if counts.get("without_video"):
        logging.warning("%d test videos without a raw video: their submission files end at the "
                        "last crop, which may miss trailing frames: %s", counts["without_video"],
                        ", ".join(counts["videos_without_video"][:5]))


def _write(out: Path, values: dict[str, np.ndarray], thresholds, videos, video, frame,
           lengths) -> None:
    for h, v in values.items():
        submission.write_videos(out / h, h, videos, video, frame, v, lengths,
                                thresholds if h == "au" else 0.5)
        _raise_if_invalid(out / h, submission.check(out / h, h, lengths))


def _write_mtl(out: Path, data_dir: Path, values: dict[str, np.ndarray], thresholds, videos,
               video, frame) -> None:
    images, source = submission.mtl_test_images(data_dir)
    logging.info("multi-task submission: the %d images of %s", len(images), source)
    submission.write_mtl(out / submission.MTL_FILE, images, videos, video, frame, values,
                         thresholds)
    _raise_if_invalid(out, submission.check_mtl(out, images))


def _raise_if_invalid(out: Path, errors: list[str]) -> None:
    if errors:
        raise AssertionError(f"{out}: the written submission is invalid:\n"
                             + "\n".join(errors[:20]))
