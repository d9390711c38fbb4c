"""The one place that saves and restores: an Orbax `CheckpointManager` holding, per step, the
train state, the data stream's position and the validation metrics.

Keeps the last `keep` checkpoints plus the best one by the validation score. Saves are
asynchronous (training continues while arrays are written).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

from abaw_jax import parallel
from abaw_jax.errors import UserError


class NoCheckpointError(UserError, FileNotFoundError):
    """The checkpoints folder holds no checkpoint (or does not exist)."""


class IncompatibleCheckpointError(UserError, ValueError):
    """A checkpoint written by an abaw_jax whose train state has another layout."""


# The layout of the saved train state (`state.TrainState`), stored with every checkpoint as the
# "layout" item. 2: step, rng, params, rest, opt_state (of the trained parameters only).
# Checkpoints without the item were written before it (1: step, params, rest, opt_state).
LAYOUT = 2


def _score(metrics: dict | None) -> float:
    value = (metrics or {}).get("score", float("nan"))
    return -math.inf if value is None or math.isnan(value) else float(value)


def _handlers() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The state's handler: Orbax's pytree handler with replica-parallel writing off.

    Replica-parallel writing (Orbax's default off GPU) splits every replicated array into one
    slice per device, compiling a slicing function per array shape and device: for DDAMFN's
    2,126 arrays on 8 devices the first save blocked training for 14 s instead of 1 s, and later
    ones 2.0 s instead of 0.75 s (benchmarks/checkpoint.py). It pays off only for arrays far
    larger than ours; process 0 writes the replicated state.
    """
    types = ocp.type_handlers
    arrays = types.ArrayHandler(use_replica_parallel=False)
    registry = types.create_type_handler_registry(
        *[(t, types.get_type_handler(t)) for t in types.supported_types() if t is not jax.Array],
        (jax.Array, arrays))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
    handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
    handlers.add("state", ocp.args.PyTreeSave, handler)
    handlers.add("state", ocp.args.PyTreeRestore, handler)
    return handlers


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
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             handler_registry=_handlers())

    def save(self, step: int, state: Any, data: Any = None, metrics: dict | None = None) -> None:
        """Saves state (a pytree of arrays) and, when given, the data stream's position.

        The position is the same on every process (`pipeline.Stream`), so it is one JSON item
        (written by process 0) rather than grain's file per process: any process count can
        resume from it.
        """
        items = {"state": ocp.args.PyTreeSave(state),
                 "layout": ocp.args.JsonSave({"state": LAYOUT})}
        if data is not None:
            items["data"] = ocp.args.JsonSave(json.loads(data.get_state()))
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
        step (ValueError naming what exists; NoCheckpointError when there is none)."""
        steps = self.steps()
        if not steps:
            raise NoCheckpointError(f"no checkpoints in {self.directory}")
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

    def restore(self, step: int, abstract_state: Any, data: Any = None,
                partial: bool = False) -> Any:
        """Restores the state onto the shardings of `abstract_state` (any device count) and,
        when given, the data stream's position in place. `partial` (a dataclass state): only
        its fields that are not None, matched by name, e.g. a state without its optimizer."""
        self.check_layout(step)
        target = abstract_state
        if partial:  # the fields to read by name (Orbax cannot trim a saved tuple to None)
            target = {f.name: getattr(abstract_state, f.name)
                      for f in dataclasses.fields(abstract_state)
                      if getattr(abstract_state, f.name) is not None}
        items = {"state": ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=partial)}
        state = self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
        if partial:
            state = dataclasses.replace(abstract_state, **state)
        if data is not None:
            self.restore_data(step, data)
        return state

    def check_layout(self, step: int) -> None:
        """IncompatibleCheckpointError when `step` was saved with another state layout."""
        layout = self._layout(step)
        if layout not in (LAYOUT, None):
            raise IncompatibleCheckpointError(
                f"{self.directory / str(step)} holds a train state of layout {layout}, written "
                f"by another abaw_jax version; this one reads layout {LAYOUT} (a random key, "
                "the optimizer state of the trained parameters only). Train again in a new "
                "workdir, or evaluate it with abaw_jax at commit ee9d73c or earlier (layout 1)")

    def _layout(self, step: int) -> int | None:
        """The state layout of `step`: 1 without the item, None when it cannot be read (a
        damaged checkpoint, which the state's restore then judges)."""
        if not (self.directory / str(step) / "layout").exists():
            return 1
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(
                layout=ocp.args.JsonRestore()))
            return int(saved["layout"]["state"])
        except Exception:  # noqa: BLE001 - damaged: see the docstring
            return None

    def restore_data(self, step: int, data: Any) -> None:
        """Moves the data stream `data` to the position saved at `step`."""
        saved = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
        data.set_state(json.dumps(saved["data"]).encode())

    def restore_latest(self, abstract_state: Any, data: Any = None) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint whose state restores, or None when there is
        none.

        A newest checkpoint that fails to restore (corrupt, or half-written by a killed run) is
        moved aside to `corrupt-<step>`, with a warning, once an older one has restored; when
        none restores (e.g. the model changed) the first error is raised and nothing is moved.
        The data stream's position is restored after the state, and its errors (another seed or
        batch size) are raised as they are. All processes take the same decisions.
        """
        failed: list[tuple[int, Exception | None]] = []
        steps = sorted(self.steps(), reverse=True)
        if steps and all(self._layout(s) not in (LAYOUT, None) for s in steps):
            self.check_layout(steps[0])  # another version's run: nothing to fall back on
        for step in steps:
            try:
                state, error = self.restore(step, abstract_state), None
            except Exception as e:  # noqa: BLE001 - judged below, against the older steps
                state, error = None, e
            if not parallel.all_processes(error is None):
                failed.append((step, error))
                continue
            for bad, bad_error in failed:
                logging.warning("checkpoint step %d in %s cannot be restored (%s); moved to %s, "
                                "falling back to step %d", bad, self.directory,
                                bad_error or "failed on another process",
                                self.directory / f"corrupt-{bad}", step)
                self._set_aside(bad)
            if data is not None:
                self.restore_data(step, data)
            return step, state
        if failed:
            step, error = failed[0]
            raise RuntimeError(f"no checkpoint in {self.directory} restores; step {step}: "
                               f"{error or 'failed on another process'}") from error
        return None

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            target = self.directory / f"corrupt-{step}"
            if target.exists():
                shutil.rmtree(target)
            (self.directory / str(step)).rename(target)
        parallel.barrier(f"set-aside-{step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
