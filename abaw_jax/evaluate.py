"""`--mode=eval`: restores a checkpoint of a workdir, predicts every frame of the eval split and
writes `eval/<split>-step<N>/` (metrics.json, predictions/, plots; evaluators/abaw.py)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import logging

from abaw_jax import state as state_lib
from abaw_jax.data import cache, folds
from abaw_jax.evaluators import abaw, split


def run(config: ml_collections.ConfigDict, workdir: str | Path, which: str = "best") -> dict:
    """Restores a checkpoint ('best', 'latest' or a step) of `workdir`, evaluates the eval split
    and writes `eval/<split>-step<N>/`; returns the metrics (with "step")."""
    workdir = Path(workdir)
    state_lib.check_workdir(config, workdir)
    restored = state_lib.restore_run(config, workdir, which)
    setup, step = restored.setup, restored.step
    logging.info("evaluating %s", describe_checkpoint(which, step, restored.metrics,
                                                      setup.task.score))
    data_dir = cache.records_for(config.data, config.task)
    name = folds.run_splits(config.data, data_dir)[1]  # a fold run's: its held-out fold
    predict = state_lib.bind(state_lib.predict_fn(setup), restored.state)
    result = split.predict_run(predict, setup, data_dir, name)
    metrics = abaw.metrics(setup.task, result, data_dir, name)
    metrics["step"] = step
    out = workdir / "eval" / f"{name}-step{step}"
    if jax.process_index() == 0:
        abaw.write_outputs(out, data_dir, name, result, metrics, setup.task.heads)
        logging.info("eval outputs in %s", out)
    return metrics


def describe_checkpoint(which: str | int, step: int, stored: Mapping[str, Any], score: str
                        ) -> str:
    """Which checkpoint a mode restored and why, for the console: the figures of a run's last
    evaluation are those of its last step, `--mode=eval` and predict use the best one. `score`:
    the task's, for checkpoints whose metrics do not name theirs (`score_metric`)."""
    if which != "best":
        return f"checkpoint step {step} (--checkpoint={which})"
    score = stored.get("score_metric", score)  # challenge_score where the records allow it
    if score not in stored:
        return f"checkpoint step {step} (the latest: no checkpoint has validation metrics)"
    return f"checkpoint step {step} (best by {score}: {stored[score]:.4f} at training time)"
