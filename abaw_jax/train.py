"""Training: `train_and_evaluate(config, workdir)` builds the state on the mesh, runs the jitted
train step over the data stream, evaluates, checkpoints and resumes by itself.

The model is a Flax NNX module; under `jax.jit` it lives as (graphdef, params, rest) with the
functional split/merge core, so the train state is a plain pytree that Orbax saves and restores.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from flax import nnx, struct

from abaw_jax import checkpoint, evaluate, extract, models, optim, parallel, tasks
from abaw_jax import preemption as preemption_lib
from abaw_jax.data import augment, cache, pipeline

# numpy, not jnp: a jax array at import time would start the backend before
# jax.distributed.initialize (main calls it first).
IMAGENET_MEAN = np.asarray(augment.IMAGENET_MEAN, np.float32) * 255
IMAGENET_STD = np.asarray(augment.IMAGENET_STD, np.float32) * 255


PREEMPTED = "PREEMPTED"  # in the workdir while a run stopped by SIGTERM has steps left


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; nothing after the last good checkpoint was saved."""


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    rest: nnx.State  # BatchNorm statistics and any other non-trainable state
    opt_state: optax.OptState


def normalize(images: jax.Array, dtype=jnp.float32) -> jax.Array:
    """uint8 RGB -> ImageNet-normalised floats, on the device inside the jitted step."""
    return ((images.astype(jnp.float32) - IMAGENET_MEAN) / IMAGENET_STD).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything derived from the config that the steps close over."""

    task: tasks.Task
    graphdef: nnx.GraphDef  # train mode
    eval_graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    image_size: int


def build_model(config: ml_collections.ConfigDict, task: tasks.Task, seed: int) -> nnx.Module:
    kwargs = dict(config.model)
    name = kwargs.pop("name")
    return models.build(name, outputs=task.outputs, rngs=nnx.Rngs(seed), **kwargs)


def make_setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
    task = tasks.get(config.task)
    model = nnx.eval_shape(lambda: build_model(config, task, config.seed))
    model.train()
    graphdef, abstract_params, _ = nnx.split(model, nnx.Param, ...)
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    tx, schedule = optim.build(config.optim, abstract_params, config.total_steps)
    return Setup(task, graphdef, eval_graphdef, tx, schedule, mesh, config.image_size)


def init_state(config: ml_collections.ConfigDict, setup: Setup) -> TrainState:
    """A fresh state built directly with replicated shardings (jit out_shardings)."""

    def init():
        model = build_model(config, setup.task, config.seed)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return TrainState(jnp.asarray(0, jnp.int32), params, rest, setup.tx.init(params))

    return jax.jit(init, out_shardings=state_sharding(setup, jax.eval_shape(init)))()


def state_sharding(setup: Setup, abstract_state) -> Any:
    return jax.tree.map(lambda _: parallel.replicated(setup.mesh), abstract_state)


def abstract_state(config: ml_collections.ConfigDict, setup: Setup) -> Any:
    """Shapes, dtypes and shardings of the state: the restore target on this mesh."""
    shapes = jax.eval_shape(lambda: init_state(config, setup))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, state_sharding(setup, shapes))


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint of a run restored for evaluation, prediction, extraction or inference."""

    setup: Setup
    state: TrainState
    step: int
    metrics: dict  # stored beside the checkpoint at its evaluation ({} when none)


def restore_run(config: ml_collections.ConfigDict, workdir: str | Path, which: str | int,
                mesh: jax.sharding.Mesh | None = None) -> Restored:
    """The checkpoint `which` ('best', 'latest' or a step) of `workdir`, restored onto `mesh`
    (default: every device), read-only. checkpoint.NoCheckpointError when there is none."""
    setup = make_setup(config, mesh or parallel.make_mesh())
    ckpt = checkpoint.Checkpoints(Path(workdir) / "checkpoints", read_only=True)
    try:
        step = ckpt.resolve(which)
        state = ckpt.restore(step, abstract_state(config, setup))
        return Restored(setup, state, step, ckpt.metrics(step) or {})
    finally:
        ckpt.close()


def load_pretrained(state: TrainState, setup: Setup, path: str) -> TrainState:
    """Replaces the backbone (and any matching layers) with converted weights from `path`; new
    task layers keep their initialisation, the optimiser state is rebuilt."""
    from abaw_jax.convert import ddamfn as convert_ddamfn

    model = nnx.merge(setup.graphdef, jax.device_get(state.params), jax.device_get(state.rest))
    convert_ddamfn.load_into(getattr(model, "backbone", model), path)  # temporal: its backbone
    _, params, rest = nnx.split(model, nnx.Param, ...)
    sharding = parallel.replicated(setup.mesh)
    params, rest = jax.device_put((params, rest), sharding)
    opt_state = jax.jit(setup.tx.init, out_shardings=sharding)(params)
    return state.replace(params=params, rest=rest, opt_state=opt_state)


def loss_options(config: ml_collections.ConfigDict, records: Path | None) -> dict:
    """config.loss, with balanced class / positive weights from the train split's label counts
    (the records' stats.json) when `loss.balance` is set and they are not given."""
    opts = config.loss.to_dict()
    if not opts.pop("balance", False) or records is None:
        return opts
    stats = json.loads((Path(records) / "stats.json").read_text())["splits"]
    hist = stats[config.data.train_split]["histogram"]
    if opts.get("class_weights") is None and "expr" in hist:
        counts = np.maximum(np.array(list(hist["expr"].values()), np.float64), 1)
        opts["class_weights"] = (counts.sum() / (len(counts) * counts)).tolist()
    if opts.get("pos_weight") is None and "au_positive" in hist:
        pos = np.maximum(np.array(list(hist["au_positive"].values()), np.float64), 1)
        opts["pos_weight"] = ((hist["au_frames"] - pos) / pos).tolist()
    return opts


def make_train_step(config: ml_collections.ConfigDict, setup: Setup, sharding,
                    records: Path | None = None) -> Callable:
    dtype = jnp.dtype(config.compute_dtype)
    loss_opts = loss_options(config, records)

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        def loss_fn(params, rest):
            cast = jax.tree.map(lambda p: p.astype(dtype), params)
            # Fresh Variables in this trace: BatchNorm updates its statistics in place, and NNX
            # refuses to mutate Variables created at the outer (jit) trace level.
            model = nnx.merge(setup.graphdef, cast, jax.tree.map(lambda x: x, rest))
            if "features" in batch:  # clips of cached embeddings: the temporal head only
                out = model(batch["features"].astype(dtype), features=True)
            else:
                out = model(normalize(batch["image"], dtype))
            out = jax.tree.map(lambda x: x.astype(jnp.float32), out)
            loss, parts = setup.task.loss(out, batch, loss_opts, state.step)
            _, _, new_rest = nnx.split(model, nnx.Param, ...)
            new_rest = jax.tree.map(lambda new, old: new.astype(old.dtype), new_rest, rest)
            return loss, (parts, new_rest)

        (loss, (parts, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.rest)
        updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        stats = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads),
                 "learning_rate": setup.schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, rest=rest,
                             opt_state=opt_state), stats

    return jax.jit(train_step, donate_argnums=0,
                   in_shardings=(sharding, parallel.batch_sharding(setup.mesh)),
                   out_shardings=(sharding, parallel.replicated(setup.mesh)))


def make_predict_step(setup: Setup, features: bool = False) -> Callable:
    """Eval-mode forward -> the task's per-frame predictions; of uint8 images, or with
    `features` of cached embeddings (a temporal model's head only)."""

    def predict_step(params, rest, x):
        model = nnx.merge(setup.eval_graphdef, params, rest)
        out = model(x, features=True) if features else model(normalize(x))
        return setup.task.predict(out)

    return jax.jit(predict_step)


def check_workdir(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
    """A workdir holds one task's run: refuse to resume, evaluate or predict another task's
    checkpoints with this config (Orbax would fail later on mismatched arrays)."""
    saved = Path(workdir) / "config.json"
    if saved.is_file():
        task = json.loads(saved.read_text()).get("task")
        if task != config.task:
            raise ValueError(f"{workdir} holds a run of task {task!r}, this config is task "
                             f"{config.task!r}: use another --workdir")


def _write_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


def _jsonable(metrics: Mapping[str, Any]) -> dict:
    """Metrics as stored next to a checkpoint (AU thresholds included)."""
    return json.loads(json.dumps(metrics, default=float))


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if np.ndim(v) == 0 and isinstance(v, numbers.Number | np.ndarray | jax.Array)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns the final
    validation metrics."""
    workdir = Path(workdir)
    check_workdir(config, workdir)
    _write_config(config, workdir)
    if jax.process_index() == 0:
        (workdir / PREEMPTED).unlink(missing_ok=True)
    mesh = parallel.make_mesh()
    local_batch = parallel.check_batch_size(config.batch_size, mesh)
    setup = make_setup(config, mesh)
    records = cache.records_for(config.data, config.task)
    writer = metric_writers.create_default_writer(workdir,
                                                  just_logging=jax.process_index() > 0)
    ckpt = checkpoint.Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
    shard = pipeline.Shard(jax.process_index(), jax.process_count())
    stream = _train_stream(config, records, local_batch, shard)
    state = init_state(config, setup)
    restored = ckpt.restore_latest(abstract_state(config, setup), data=stream)
    if restored is not None:
        start, state = restored
        logging.warning("resumed from %s step %d", ckpt.directory, start)
    else:
        start = 0
        if config.data.get("features"):  # the backbone that extracted the cached embeddings
            state = extract.load_backbone(state, setup, config.data.features)
        elif config.init_from:
            state = load_pretrained(state, setup, config.init_from)
    if start == 0:
        logging.info("parameters:\n%s", parameter_overview.get_parameter_overview(
            nnx.to_pure_dict(state.params), include_stats=False))
    train_step = make_train_step(config, setup, state_sharding(setup, state), records)
    predict_step = make_predict_step(setup, features=bool(config.data.get("features")))
    report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                             every_steps=config.log_every_steps)
    evaluator = functools.partial(evaluate.evaluate_split, predict_step=predict_step,
                                  setup=setup, records=records, config=config)
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
                    metrics = evaluator(state.params, state.rest)
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


def _train_stream(config: ml_collections.ConfigDict, records: Path, local_batch: int,
                  shard: pipeline.Shard) -> pipeline.Stream:
    """Frames, or for a temporal model (`data.clip_length`) clips of consecutive frames;
    `batch_size` counts clips then."""
    common = dict(batch_size=local_batch, seed=config.seed, shard=shard,
                  augment_cfg=augment.AugmentConfig.from_config(config.augment,
                                                                config.image_size),
                  loader=pipeline.Loader.from_config(config.data.loader))
    clips = evaluate.clip_options(config)
    if "features_dir" in clips:
        del common["augment_cfg"]  # embeddings of the un-augmented frames
        return pipeline.feature_clip_train_dataset(
            clips["features_dir"], config.data.train_split, length=clips["clip_length"],
            stride=clips["clip_stride"], **common)
    if clips:
        return pipeline.clip_train_dataset(records, config.data.train_split,
                                           length=clips["clip_length"],
                                           stride=clips["clip_stride"], **common)
    return pipeline.train_dataset(records, config.data.train_split, **common)


def _check_finite(stats: Mapping[str, jax.Array], step: int, ckpt: checkpoint.Checkpoints
                  ) -> None:
    loss = float(stats["loss"])
    if not math.isfinite(loss):
        ckpt.wait()
        raise NonFiniteLossError(
            f"loss is {loss} at step {step}: stopping; the last good checkpoint is step "
            f"{ckpt.latest_step()} in {ckpt.directory} (lower optim.lr or set optim.grad_clip)")

