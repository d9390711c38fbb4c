"""The training loop of every objective: stream -> jitted step -> logs, evaluation,
checkpoints (train state and data stream together), automatic resume and preemption.

The trainer (a module of `abaw_jax.trainers`) supplies `train_stream(config, setup, records,
local_batch, shard)`, `train_step(config, setup, sharding, records)` and
`evaluator(config, setup, records)` (state -> metrics with a "score").
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from flax import nnx

from abaw_jax import checkpoint, parallel
from abaw_jax import preemption as preemption_lib
from abaw_jax import state as state_lib
from abaw_jax.data import cache, pipeline

PREEMPTED = "PREEMPTED"  # in the workdir while a run stopped by SIGTERM has steps left


class NonFiniteLossError(FloatingPointError):
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
    returns the final validation metrics."""
    workdir = Path(workdir)
    state_lib.check_workdir(config, workdir)
    _write_config(config, workdir)
    if jax.process_index() == 0:
        (workdir / PREEMPTED).unlink(missing_ok=True)
    mesh = parallel.make_mesh()
    local_batch = parallel.check_batch_size(config.batch_size, mesh)
    setup = state_lib.make_setup(config, mesh)
    records = cache.records_for(config.data, config.task)
    writer = metric_writers.create_default_writer(workdir,
                                                  just_logging=jax.process_index() > 0)
    ckpt = checkpoint.Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
    shard = pipeline.Shard(jax.process_index(), jax.process_count())
    stream = trainer.train_stream(config, setup, records, local_batch, shard)
    state = state_lib.init_state(config, setup)
    restored = ckpt.restore_latest(state_lib.abstract_state(config, setup), data=stream)
    if restored is not None:
        start, state = restored
        logging.warning("resumed from %s step %d", ckpt.directory, start)
    else:
        start = 0
        state = state_lib.init_weights(state, setup)
    if start == 0:
        logging.info("parameters (trained):\n%s", parameter_overview.get_parameter_overview(
            nnx.to_pure_dict(state.params), include_stats=False))
    train_step = trainer.train_step(config, setup, state_lib.state_sharding(setup, state),
                                    records)
    evaluate = trainer.evaluator(config, setup, records)
    report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                             every_steps=config.log_every_steps)
    metrics: dict = {}
    preemption = preemption_lib.Preemption()
    try:
        for step in range(start + 1, config.total_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = parallel.to_global(next(stream), mesh)
                state, stats = train_step(state, batch)
            report(step)
            is_last = step == config.total_steps
            log = step % config.log_every_steps == 0 or is_last
            evaluate_now = step % config.eval_every_steps == 0 or is_last
            preempted = preemption.reached(step)
            save = evaluate_now or step % config.checkpoint_every_steps == 0 or preempted
            if log or save:  # reading the loss syncs with the device: only when it is needed
                _check_finite(stats, step, ckpt)
            if log:
                writer.write_scalars(step, _scalars(jax.device_get(stats)))
            if evaluate_now:
                with report.timed("eval"):
                    metrics = evaluate(state)
                writer.write_scalars(step, {f"val/{k}": v for k, v in _scalars(metrics).items()})
            if save:  # an evaluated checkpoint carries its metrics (for "best")
                ckpt.save(step, state, stream, metrics=_jsonable(metrics) if evaluate_now else None)
            if preempted:
                ckpt.wait()
                if jax.process_index() == 0:  # launch/slurm.sbatch requeues the job on it
                    (workdir / PREEMPTED).write_text(f"{step}\n")
                logging.warning("preempted: saved step %d in %s; stopping (run the same command "
                                "to resume)", step, ckpt.directory)
                break
    finally:
        preemption.close()
        ckpt.wait()
        ckpt.close()
        stream.close()
        writer.flush()
    if not metrics and start >= config.total_steps:
        logging.warning("%s already trained to step %d", workdir, start)
    return metrics


def _check_finite(stats: Mapping[str, jax.Array], step: int, ckpt: checkpoint.Checkpoints
                  ) -> None:
    loss = float(stats["loss"])
    if not math.isfinite(loss):
        ckpt.wait()
        raise NonFiniteLossError(
            f"loss is {loss} at step {step}: stopping; the last good checkpoint is step "
            f"{ckpt.latest_step()} in {ckpt.directory} (lower optim.lr or set optim.grad_clip)")
