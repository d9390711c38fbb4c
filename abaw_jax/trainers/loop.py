"""The training loop of every objective: stream -> jitted step -> logs, evaluation,
checkpoints (train state and data stream together), automatic resume and preemption.

The trainer (a module of `abaw_jax.trainers`) supplies `train_stream(config, setup, records,
local_batch, shard)`, `train_step(config, setup, sharding, records)` and
`evaluator(config, setup, records, workdir)` (state -> metrics with a "score"; figures it
draws go to the workdir).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview
from flax import nnx

from abaw_jax import checkpoint, config_lib, parallel
from abaw_jax import preemption as preemption_lib
from abaw_jax import state as state_lib
from abaw_jax.data import cache, folds, pipeline
from abaw_jax.errors import UserError

PREEMPTED = "PREEMPTED"  # in the workdir while a run stopped by SIGTERM has steps left


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or Inf; nothing after the last good checkpoint was saved."""


def _write_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """config.json, replaced atomically: the other processes may be reading the previous one
    (`state.check_workdir` on a resumed run)."""
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = workdir / "config.json.tmp"
        tmp.write_text(config.to_json_best_effort(indent=2))
        os.replace(tmp, workdir / "config.json")


def _jsonable(metrics: Mapping[str, Any]) -> dict:
    """Metrics as stored next to a checkpoint (AU thresholds included)."""
    return json.loads(json.dumps(metrics, default=float))


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if np.ndim(v) == 0 and isinstance(v, numbers.Number | np.ndarray | jax.Array)}


def run(config: ml_collections.ConfigDict, workdir: str | Path, trainer: ModuleType) -> dict:
    """Trains `config` with `trainer` in `workdir` (resuming from its latest checkpoint) and
    returns the final validation metrics ({} when SIGTERM stopped it before its first step)."""
    workdir = Path(workdir)
    mesh = parallel.make_mesh()
    config_lib.check(config, mesh.size)
    state_lib.check_workdir(config, workdir)
    preemption = preemption_lib.Preemption()  # from here on SIGTERM stops the run cleanly
    try:
        return _run(config, workdir, trainer, mesh, preemption)
    except (preemption_lib.Preempted, cache.Terminated) as e:  # the latter: while preparing
        _mark_preempted(workdir, None)
        logging.warning("SIGTERM during start-up (%s): stopped before the first step (run the "
                        "same command to resume)",
                        e if isinstance(e, preemption_lib.Preempted) else "the data preparation")
        return {}
    finally:
        preemption.close()


def _mark_preempted(workdir: Path, step: int | None) -> None:
    """PREEMPTED (the step saved, or "start-up"): launch/slurm.sbatch requeues the job on it."""
    if jax.process_index() == 0:
        (workdir / PREEMPTED).write_text(f"{'start-up' if step is None else step}\n")


def _run(config: ml_collections.ConfigDict, workdir: Path, trainer: ModuleType, mesh,
         preemption: preemption_lib.Preemption) -> dict:
    _write_config(config, workdir)
    if jax.process_index() == 0:
        (workdir / PREEMPTED).unlink(missing_ok=True)
    local_batch = parallel.check_batch_size(config.batch_size, mesh)
    setup = state_lib.make_setup(config, mesh)
    records = cache.records_for(config.data, config.task)
    preemption.check("the data preparation")
    if config.data.get("folds") and jax.process_index() == 0:
        logging.info("cross-validation: fold lists in %s", folds.write(workdir, config.data,
                                                                        records))
    writer = metric_writers.create_default_writer(workdir,
                                                  just_logging=jax.process_index() > 0)
    ckpt = checkpoint.Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
    shard = pipeline.Shard(jax.process_index(), jax.process_count())
    stream = trainer.train_stream(config, setup, records, local_batch, shard)
    try:
        state, start = _restore_or_init(config, setup, ckpt, stream, workdir)
        preemption.check("start-up")
        train_step = trainer.train_step(config, setup, state_lib.state_sharding(setup, state),
                                        records)
        evaluate = trainer.evaluator(config, setup, records, workdir)
        return _loop(config, workdir, setup, state, start, stream, train_step, evaluate,
                     writer, ckpt, preemption)
    finally:
        ckpt.wait()
        ckpt.close()
        stream.close()
        writer.flush()


def _restore_or_init(config: ml_collections.ConfigDict, setup: state_lib.Setup,
                     ckpt: checkpoint.Checkpoints, stream, workdir: Path
                     ) -> tuple[state_lib.TrainState, int]:
    state = state_lib.init_state(config, setup)
    restored = ckpt.restore_latest(state_lib.abstract_state(config, setup), data=stream)
    if restored is not None:
        start, state = restored
        logging.warning("resumed from %s step %d", ckpt.directory, start)
        return state, start
    state = state_lib.init_weights(state, setup)
    _write_parameters(state, workdir)
    return state, 0


def _write_parameters(state: state_lib.TrainState, workdir: Path) -> None:
    """One summary line on the console; the table (156 lines for DDAMFN) in the workdir."""
    params = nnx.to_pure_dict(state.params)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    if jax.process_index() == 0:
        path = workdir / "parameters.txt"
        path.write_text(parameter_overview.get_parameter_overview(params, include_stats=False)
                        + "\n")
        logging.info("%s parameters in %d arrays (table: %s)", f"{count:,}",
                     len(jax.tree.leaves(params)), path)


def _loop(config, workdir, setup, state, start, stream, train_step, evaluate, writer, ckpt,
          preemption) -> dict:
    if config.total_steps == 0 and ckpt.latest_step() is None:
        # Nothing to train (a model assembled from other runs, configs/gcsa/av.py): its start
        # is evaluated and saved, so eval, predict and inference find a checkpoint.
        metrics = evaluate(state)
        ckpt.save(0, state, stream, metrics=_jsonable(metrics))
        return metrics
    progress = Progress(start, config.total_steps, config.eval_every_steps)
    metrics: dict = {}
    for step in range(start + 1, config.total_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            batch = parallel.to_global(next(stream), setup.mesh)
            state, stats = train_step(state, batch)
        is_last = step == config.total_steps
        log = step % config.log_every_steps == 0 or is_last
        evaluate_now = step % config.eval_every_steps == 0 or is_last
        preempted = preemption.reached(step)
        save = evaluate_now or step % config.checkpoint_every_steps == 0 or preempted
        if log or save:  # reading the loss syncs with the device: only when it is needed
            _check_finite(stats, step, ckpt)
        if log:
            writer.write_scalars(step, _scalars(jax.device_get(stats)))
            progress.log(step)
        if evaluate_now:
            with progress.timed_eval():
                metrics = evaluate(state)
            writer.write_scalars(step, {f"val/{k}": v for k, v in _scalars(metrics).items()})
            logging.info("step %d: %s", step, describe_score(metrics, config.data))
        if save:  # an evaluated checkpoint carries its metrics (for "best")
            ckpt.save(step, state, stream, metrics=_jsonable(metrics) if evaluate_now else None)
        if preempted:
            ckpt.wait()
            _mark_preempted(workdir, step)
            logging.warning("preempted: saved step %d in %s; stopping (run the same command "
                            "to resume)", step, ckpt.directory)
            break
    if not metrics and start >= config.total_steps:
        logging.warning("%s already trained to step %d", workdir, start)
    return metrics


def describe_score(metrics: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> str:
    """Which figure ranks the checkpoints (`score_metric`), on which split, for the console."""
    name = metrics.get("score_metric", "score")
    what = " (every annotated frame, as submitted)" if name == "challenge_score" else ""
    split = (f"held-out fold {data['fold']} of {data['folds']}" if data and data.get("folds")
             else "validation")
    return f"{split} {name} {metrics['score']:.4f}{what} ranks the checkpoints"


def _check_finite(stats: Mapping[str, jax.Array], step: int, ckpt: checkpoint.Checkpoints
                  ) -> None:
    loss = float(stats["loss"])
    if not math.isfinite(loss):
        ckpt.wait()
        raise NonFiniteLossError(
            f"loss is {loss} at step {step}: stopping; the last good checkpoint is step "
            f"{ckpt.latest_step()} in {ckpt.directory} (lower optim.lr or set optim.grad_clip)")


class Progress:
    """Progress lines with a rate and an ETA measured over train steps only: the first step
    (which compiles) and evaluations are timed apart, so neither skews the other. (clu's
    ReportProgress timed the compile-heavy first interval as if it were steps and said
    `8.2 steps/s ... ETA: 0m` at step 25 of 300 after ~52 s.)"""

    def __init__(self, start: int, total: int, eval_every: int):
        self.start, self.total, self.eval_every = start, total, eval_every
        self.began = time.monotonic()
        self.first: tuple[int, float, float] | None = None  # step, time, eval time at start
        self.eval_s: list[float] = []
        self._in_eval = 0.0

    @contextlib.contextmanager
    def timed_eval(self) -> Iterator[None]:
        t = time.monotonic()
        yield
        spent = time.monotonic() - t
        self.eval_s.append(spent)
        self._in_eval += spent

    def log(self, step: int) -> None:
        now = time.monotonic()
        if self.first is None:  # the step that compiled: time from here on
            self.first = (step, now, self._in_eval)
            logging.info("step %d/%d: first steps took %s (compiling)", step, self.total,
                         _duration(now - self.began))
            return
        step0, t0, eval0 = self.first
        per_step = (now - t0 - (self._in_eval - eval0)) / max(step - step0, 1)
        left = self.total - step
        evals_left = self.total // self.eval_every - step // self.eval_every
        if self.total % self.eval_every:
            evals_left += 1  # the last step evaluates too
        eval_each = float(np.mean(self.eval_s)) if self.eval_s else 0.0
        eta = left * per_step + evals_left * eval_each
        evals = (f", {evals_left} evaluations of ~{_duration(eval_each)} each"
                 if self.eval_s and evals_left else "")
        logging.info("step %d/%d (%.0f%%): %.2f s/step; about %s left%s", step, self.total,
                     100 * step / max(self.total, 1), per_step, _duration(eta), evals)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
