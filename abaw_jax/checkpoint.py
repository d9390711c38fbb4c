"""The one place that saves and restores: an Orbax `CheckpointManager` holding, per step, the
train state, the data stream's position, the validation metrics and their checksums.

Keeps the last `keep` checkpoints plus the best one by the validation score. Saves are
asynchronous (training continues while arrays are written). Every restore checks what it read
against the CRC32C checksums stored at the save: a mismatch is a corrupt checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import google_crc32c
import jax
import numpy as np
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


class CorruptCheckpointError(IncompatibleCheckpointError):
    """A checkpoint whose contents differ from the checksums stored when it was saved, or whose
    data-stream or metrics item cannot be read: unusable, like an incompatible one."""


def _score(metrics: dict | None) -> float:
    value = (metrics or {}).get("score", float("nan"))
    return -math.inf if value is None or math.isnan(value) else float(value)


def _checksums(state: Any, position: Any, metrics: dict) -> dict:
    """The "checksums" item of a save: CRC32C of every array of the state and of the
    data-stream and metrics items. Only process 0 writes JSON items: the others skip it."""
    if jax.process_index() > 0:
        return {}
    return {"state": _array_crcs(state), "data": _json_crc(position),
            "metrics": _json_crc(metrics)}


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


def _json_crc(value: Any) -> int | None:
    """Of a JSON item as saved (None: no item). Orbax writes `json.dumps` and reads it back
    into an equal value, so the checksum of the re-dumped value is that of the saved one."""
    return None if value is None else google_crc32c.value(json.dumps(value, sort_keys=True)
                                                          .encode())


def _array_crcs(state: Any) -> dict[str, str]:
    """'dtype:crc32c' of every array's bytes, by its path in `state`. The train state is
    replicated (`state.state_sharding`), so any process's host copy holds every value."""
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(jax.tree.map(_key_data, state)))
    return {jax.tree_util.keystr(path): _array_crc(np.ascontiguousarray(x))
            for path, x in leaves}


def _key_data(x: Any) -> Any:
    """A PRNG key array's bits (a model's dropout `Rngs` state holds keys, which have no bytes
    of their own on the host)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return x


def _array_crc(x: np.ndarray) -> str:
    return f"{x.dtype}:{google_crc32c.value(x.reshape(-1).view(np.uint8))}"


def _differing(saved: dict[str, str], restored: dict[str, str]) -> list[str]:
    """Paths of the restored arrays whose bytes differ from the saved ones, or that have no
    checksum (nothing passes unchecked). An array that Orbax cast to another dtype on restore
    cannot be compared."""
    return [p for p, crc in restored.items()
            if p not in saved or (saved[p].split(":")[0] == crc.split(":")[0]
                                  and saved[p] != crc)]


class _Manager(ocp.CheckpointManager):
    """Orbax's manager, reading an unreadable metrics item (emptied, overwritten) as missing,
    as Orbax does a deleted one, rather than failing to open the folder (it reads every step's
    metrics then): `Checkpoints` judges either against the step's checksums."""

    def metrics(self, step: int) -> Any:
        try:
            return super().metrics(step)
        except ValueError:  # json.JSONDecodeError, UnicodeDecodeError
            return None


class Checkpoints:
    """Checkpoints of one run in `<workdir>/checkpoints`.

    `read_only`: creates, saves and deletes nothing. Orbax's own read-only option would do the
    same but warns "Given directory is read only" on every open, and without saves Orbax
    writes nothing anyway.
    """

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=_score, n=1, keep_checkpoints_without_metrics=False),
        ])
        # best_fn is what makes Orbax store each step's metrics next to it.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=_score, best_mode="max",
            enable_async_checkpointing=async_save, create=not read_only)
        self.manager = _Manager(self.directory, options=options, handler_registry=_handlers())

    def save(self, step: int, state: Any, data: Any = None, metrics: dict | None = None) -> None:
        """Saves state (a pytree of arrays) and, when given, the data stream's position.

        The position is the same on every process (`pipeline.Stream`), so it is one JSON item
        (written by process 0) rather than grain's file per process: any process count can
        resume from it.

        With them go the checksums of what the step holds (`_checksums`), computed here from
        the values given, before the asynchronous write: what is on disk is checked against
        what training had, not against what was written.
        """
        if self.read_only:
            raise RuntimeError(f"{self.directory} is opened read-only")
        position = None if data is None else json.loads(data.get_state())
        metrics = metrics or {}  # {}, not None: a step without an evaluation ranks last
        items = {"state": ocp.args.PyTreeSave(state),
                 # "checksums": a step saved with them is corrupt without them.
                 "layout": ocp.args.JsonSave({"state": LAYOUT, "checksums": True}),
                 "checksums": ocp.args.JsonSave(_checksums(state, position, metrics))}
        if position is not None:
            items["data"] = ocp.args.JsonSave(position)
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step of the best validation score; CorruptCheckpointError when a step's metrics
        item is damaged (that step may have been the best)."""
        for step in self.steps():
            self._check_metrics(step, self._saved_checksums(step))
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
        its fields that are not None, matched by name, e.g. a state without its optimizer.
        CorruptCheckpointError when what it reads differs from the checksums of the save."""
        state, position = self._read(step, abstract_state, data is not None, partial)
        if data is not None:
            data.set_state(json.dumps(position).encode())
        return state

    def _read(self, step: int, abstract_state: Any, with_data: bool, partial: bool = False
              ) -> tuple[Any, Any]:
        """(state, data-stream position or None) of `step`, checked against its checksums."""
        self.check_layout(step)
        checksums = self._saved_checksums(step)
        target = abstract_state
        if partial:  # the fields to read by name (Orbax cannot trim a saved tuple to None)
            target = {f.name: getattr(abstract_state, f.name)
                      for f in dataclasses.fields(abstract_state)
                      if getattr(abstract_state, f.name) is not None}
        items = {"state": ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=partial)}
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
        except ValueError as e:
            if "DATA_LOSS" not in str(e):  # e.g. a changed model: not corruption
                raise
            # TensorStore's own CRC32C of its index (b-tree) nodes failed: say which file.
            files = re.findall(r'local file "([^"]+)"', str(e).split("[tensorstore_spec")[0])
            raise self._corrupt(step, "TensorStore cannot read it (DATA_LOSS"
                                + (f" in {files[-1]})" if files else ")")) from e
        if partial:
            state = dataclasses.replace(abstract_state, **state)
        if checksums is not None:
            differing = _differing(checksums["state"], _array_crcs(state))
            if differing:
                raise self._corrupt(step, f"{len(differing)} arrays differ from the checksums "
                                          f"of the save (first: {differing[0]})")
        self._check_metrics(step, checksums)
        return state, self._read_position(step, checksums) if with_data else None

    def _read_position(self, step: int, checksums: dict | None) -> Any:
        """The data stream's position saved at `step`."""
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(
                data=ocp.args.JsonRestore()))["data"]
        except (OSError, ValueError) as e:  # deleted, emptied, overwritten
            raise self._corrupt(step, f"its data-stream item cannot be read ({e})") from e
        if checksums is not None and _json_crc(saved) != checksums["data"]:
            raise self._corrupt(step, "its data-stream item differs from the checksum of the "
                                      "save")
        return saved

    def _check_metrics(self, step: int, checksums: dict | None) -> None:
        """CorruptCheckpointError when the metrics item of `step` is not the one saved
        (unreadable and deleted ones read as None)."""
        if checksums is not None and _json_crc(self.metrics(step)) != checksums["metrics"]:
            raise self._corrupt(step, "its metrics item is damaged or missing")

    def _saved_checksums(self, step: int) -> dict | None:
        """The checksums stored with `step`; None for a checkpoint written before them."""
        if not (self.directory / str(step) / "checksums").exists():
            if (self._layout_item(step) or {}).get("checksums"):
                raise self._corrupt(step, "its checksums item is missing")
            return None  # saved before checksums were
        try:
            return self.manager.restore(step, args=ocp.args.Composite(
                checksums=ocp.args.JsonRestore()))["checksums"]
        except (OSError, ValueError) as e:
            raise self._corrupt(step, f"its checksums item cannot be read ({e})") from e

    def _corrupt(self, step: int, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"checkpoint {self.directory / str(step)} is corrupt: {why}; restore another step "
            f"(have {self.steps()}) or move it aside")

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
        item = self._layout_item(step)
        try:
            return int(item["state"])
        except (TypeError, KeyError, ValueError):  # damaged: see the docstring
            return None

    def _layout_item(self, step: int) -> dict | None:
        """The "layout" item of `step`; None when it is missing or cannot be read."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(
                layout=ocp.args.JsonRestore()))["layout"]
        except Exception:  # noqa: BLE001 - missing or damaged: the callers judge
            return None

    def restore_latest(self, abstract_state: Any, data: Any = None) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint whose state restores, or None when there is
        none.

        A newest checkpoint that fails to restore (corrupt: its checksums differ or an item
        cannot be read; or half-written by a killed run) is moved aside to `corrupt-<step>`,
        with a warning, once an older one has restored; so is an older one whose metrics item
        is damaged (unranked, Orbax would delete it, the best maybe). When none restores (e.g.
        the model changed) the first error is raised and nothing is moved. The data stream's
        position is set after the state, and its errors (another seed or batch size) are
        raised as they are. All processes take the same decisions.
        """
        failed: list[tuple[int, Exception | None]] = []
        steps = sorted(self.steps(), reverse=True)
        if steps and all(self._layout(s) not in (LAYOUT, None) for s in steps):
            self.check_layout(steps[0])  # another version's run: nothing to fall back on
        for step in steps:
            try:
                (state, position), error = self._read(step, abstract_state, data is not None), None
            except Exception as e:  # noqa: BLE001 - judged below, against the older steps
                state, position, error = None, None, e
            if not parallel.all_processes(error is None):
                failed.append((step, error))
                continue
            failed += [(s, e) for s in steps if s < step if (e := self._metrics_error(s))]
            for bad, bad_error in failed:
                logging.warning("checkpoint step %d in %s cannot be restored (%s); moved to %s, "
                                "falling back to step %d", bad, self.directory,
                                bad_error or "failed on another process",
                                self.directory / f"corrupt-{bad}", step)
                self._set_aside(bad)
            if data is not None:
                data.set_state(json.dumps(position).encode())
            return step, state
        if failed:
            step, error = failed[0]
            raise RuntimeError(f"no checkpoint in {self.directory} restores; step {step}: "
                               f"{error or 'failed on another process'}") from error
        return None

    def _metrics_error(self, step: int) -> CorruptCheckpointError | None:
        try:
            self._check_metrics(step, self._saved_checksums(step))
        except CorruptCheckpointError as e:
            return e
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
