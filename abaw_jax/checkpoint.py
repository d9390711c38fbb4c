"""The one place that saves and restores: an Orbax `CheckpointManager` holding, per step, the
train state, the data stream's position and the validation metrics.

Keeps the last `keep` checkpoints plus the best one by the validation score. Saves are
asynchronous (training continues while arrays are written).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies


def _score(metrics: dict | None) -> float:
    value = (metrics or {}).get("score", float("nan"))
    return -math.inf if value is None or math.isnan(value) else float(value)


class Checkpoints:
    """Checkpoints of one run in `<workdir>/checkpoints`."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=_score, n=1, keep_checkpoints_without_metrics=False),
        ])
        # best_fn is what makes Orbax store each step's metrics next to it.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=_score, best_mode="max",
            enable_async_checkpointing=async_save,
            create=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, data: Any = None, metrics: dict | None = None) -> None:
        """Saves state (a pytree of arrays) and, when given, the data stream's position."""
        items = {"state": ocp.args.StandardSave(state)}
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data)
        # {} rather than None: a checkpoint without an evaluation ranks last for "best".
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics or {},
                          force=True)

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        scored = [(s, _score(self.manager.metrics(s))) for s in self.steps()]
        scored = [(v, s) for s, v in scored if v > -math.inf]
        return max(scored)[1] if scored else None

    def resolve(self, which: str | int) -> int:
        """'latest', 'best' (the latest when none was evaluated) or a step number -> an existing
        step (ValueError naming what exists)."""
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {self.directory}")
        if which == "latest":
            return max(steps)
        if which == "best":
            best = self.best_step()
            if best is None:
                logging.warning("no checkpoint in %s has validation metrics; using the latest",
                                self.directory)
                return max(steps)
            return best
        step = int(which)
        if step not in steps:
            raise ValueError(f"no checkpoint at step {step} in {self.directory}; have {steps}")
        return step

    def metrics(self, step: int) -> dict | None:
        return self.manager.metrics(step)

    def restore(self, step: int, abstract_state: Any, data: Any = None) -> Any:
        """Restores the state onto the shardings of `abstract_state` (any device count) and,
        when given, the data stream's position in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
