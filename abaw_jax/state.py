"""Run state: what a config builds on a mesh (`Setup`), the train state (`TrainState`), restoring
a workdir's checkpoint, and starting from converted weights (`init_from`) or from the backbone
that extracted a feature cache (`data.features`).

The model is a Flax NNX module; under `jax.jit` it lives as (graphdef, params, rest) with the
functional split/merge core, so the train state is a plain pytree that Orbax saves and restores.
`params` holds every parameter and `rest` the BatchNorm statistics and any other non-parameter
variable, whatever the run trains, so a checkpoint restores under any choice of frozen
parameters (a head trained on cached features evaluates end to end). Frozen parameters
(`Setup.frozen`) get no gradient and no optimizer state: `opt_state` covers the trained ones.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct

from abaw_jax import checkpoint, convert, models, optim, parallel, tasks
from abaw_jax.data import audio as audio_lib
from abaw_jax.data import features as features_lib
from abaw_jax.errors import ConfigError, NotFoundError


@struct.dataclass
class TrainState:
    step: jax.Array
    rng: jax.Array  # raw key data; step k draws from fold_in(rng, k) (dropout, masking)
    params: nnx.State  # every parameter, trained or frozen
    rest: nnx.State  # BatchNorm statistics and any other non-parameter variable
    opt_state: optax.OptState | None  # of the trained parameters; None in a read-only restore

    def step_key(self) -> jax.Array:
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


@dataclasses.dataclass(frozen=True)
class Feed:
    """What the pipelines load for a run: images at `size` (0: none), the feature caches
    concatenated into "features", the "audio" windows (None: none) or with `audio_stats` their
    pooled statistics ("audio_stats"), and clips (`clip_length` 0: frames)."""

    size: int
    features: tuple[str, ...]
    clip_length: int
    clip_stride: int
    audio: audio_lib.AudioConfig | None = None
    audio_stats: bool = False

    def stream_options(self) -> dict[str, Any]:
        """The pipelines' keyword arguments for it (eval and clip datasets)."""
        clips = {"length": self.clip_length, "stride": self.clip_stride} if self.clip_length \
            else {}
        return {"size": self.size, "features": self.features, "audio": self.audio,
                "audio_stats": self.audio_stats, **clips}


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything derived from the config that the steps close over."""

    config: ml_collections.ConfigDict
    task: tasks.Task
    family: models.Family
    inputs: tuple[str, ...]  # the named inputs this run feeds the model
    preprocess: models.Preprocess | None  # of the "image" input
    frozen: tuple[str, ...]  # regexes over parameter paths: never trained in this run
    backbone_cached: bool  # cached features stand in for the (frozen) backbone's images
    graphdef: nnx.GraphDef  # train mode
    eval_graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh

    @property
    def feed(self) -> Feed:
        """What the pipelines load for this run."""
        c = self.config
        stats = "audio_stats" in self.inputs
        return Feed(self.preprocess.size if "image" in self.inputs else 0,
                    feature_dirs(c) if "features" in self.inputs else (),
                    int(c.data.get("clip_length") or 0), int(c.data.get("clip_stride") or 1),
                    audio_lib.AudioConfig.from_config(c.data.get("audio"))
                    if "audio" in self.inputs or stats else None, stats)

    def model(self, state: TrainState, train: bool = False) -> nnx.Module:
        graphdef = self.graphdef if train else self.eval_graphdef
        return nnx.merge(graphdef, state.params, state.rest)

    def split_params(self, params: nnx.State) -> tuple[nnx.State, nnx.State]:
        """(trained, frozen) parts of the parameters."""
        trained, frozen = nnx.split_state(params, _trainable(self.frozen), ...)
        return trained, frozen


def feature_dirs(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The feature caches of `data.features` (comma-separated folders), in order."""
    return tuple(p for p in (config.data.get("features") or "").split(",") if p)


def _frozen_filter(patterns: Sequence[str]) -> Callable[[tuple, Any], bool]:
    compiled = [re.compile(p) for p in patterns]

    def frozen(path: tuple, value: Any) -> bool:
        return isinstance(value, nnx.Param) and any(c.search(_name(path)) for c in compiled)

    return frozen


def build_model(config: ml_collections.ConfigDict, task: tasks.Task, seed: int) -> nnx.Module:
    kwargs = dict(config.model)
    family = models.get(kwargs.pop("name"))
    dirs = feature_dirs(config)
    dim = features_lib.width(dirs) if dirs else 0
    return family.build(outputs=task.outputs if family.labels else {}, rngs=nnx.Rngs(seed),
                        feature_dim=dim, **kwargs)


def _inputs_and_frozen(config: ml_collections.ConfigDict, family: models.Family,
                       model: nnx.Module) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """The inputs the run feeds: the model's own, with cached features in place of images when
    `data.features` is set and the model does not take features itself; then its backbone is
    frozen by construction (it is not even run)."""
    name, inputs = config.model.name, tuple(model.inputs)
    frozen = (*(config.optim.get("freeze") or ()), *family.frozen_patterns(model))
    cached = bool(feature_dirs(config))
    replaced = cached and "features" not in inputs
    if replaced:
        if not family.embeds or "image" not in inputs or not family.backbone:
            raise ConfigError(f"model {name!r} cannot train on cached features (data.features)")
        inputs = tuple("features" if i == "image" else i for i in inputs)
        frozen = (*frozen, *family.backbone)
    if "features" in inputs and not cached:
        raise ConfigError(f"model {name!r} takes cached per-frame features: set data.features "
                          "to --mode=extract output folders")
    clips = bool(config.data.get("clip_length"))
    if family.clips != clips:
        raise ConfigError(f"model {name!r} takes {'clips' if family.clips else 'frames'}: "
                          f"{'set' if family.clips else 'unset'} data.clip_length")
    return inputs, frozen, replaced


def make_setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
    task = tasks.get(config.task)
    family = models.get(config.model.name)
    model = nnx.eval_shape(lambda: build_model(config, task, config.seed))
    inputs, frozen, replaced = _inputs_and_frozen(config, family, model)
    preprocess = family.image_preprocess(model)
    if preprocess is None and "image" in model.inputs:
        raise ConfigError(f"model family {family.name!r} takes images but has no preprocessing")
    model.train()
    graphdef, trained, _ = nnx.split(model, _trainable(frozen), ...)
    if not jax.tree.leaves(trained):
        raise ConfigError(f"every parameter of {config.model.name!r} is frozen ({frozen})")
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    tx, schedule = optim.build(config.optim, trained, config.total_steps)
    return Setup(config, task, family, inputs, preprocess, frozen,
                 replaced, graphdef, eval_graphdef, tx, schedule, mesh)


def _trainable(frozen: Sequence[str]):
    is_frozen = _frozen_filter(frozen)
    return lambda path, value: isinstance(value, nnx.Param) and not is_frozen(path, value)


def split(model: nnx.Module) -> tuple[nnx.State, nnx.State]:
    """(params, rest) of a model."""
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return params, rest


# Step keys come from fold_in(key(seed), _RNG_STREAM) folded with the step: apart from the
# initialisers' keys (nnx.Rngs(seed) draws fold_in(key(seed), 0, 1, ...)).
_RNG_STREAM = 2**31 - 1


def _init_fn(config: ml_collections.ConfigDict, setup: Setup) -> Callable[[], TrainState]:
    def init():
        params, rest = split(build_model(config, setup.task, config.seed))
        rng = jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed),
                                                     _RNG_STREAM))
        return TrainState(jnp.asarray(0, jnp.int32), rng, params, rest,
                          setup.tx.init(setup.split_params(params)[0]))

    return init


def init_state(config: ml_collections.ConfigDict, setup: Setup) -> TrainState:
    """A fresh state built directly with replicated shardings (jit out_shardings)."""
    init = _init_fn(config, setup)
    lowered = jax.jit(init, out_shardings=state_sharding(setup, jax.eval_shape(init))).lower()
    return lowered.compile(compiler_options=_RUN_ONCE_OPTIONS.get(jax.default_backend()))()


# The initialiser runs once: on CPU, LLVM's optimisations only lengthen its compile (DDAMFN tiny:
# 8.1 s at the default level, 3.5 s at 0, then it runs in 30 ms; benchmarks/init_compile.py).
# Accelerator compiles keep their defaults.
_RUN_ONCE_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


def state_sharding(setup: Setup, abstract_state) -> Any:
    return jax.tree.map(lambda _: parallel.replicated(setup.mesh), abstract_state)


def abstract_state(config: ml_collections.ConfigDict, setup: Setup) -> Any:
    """Shapes, dtypes and shardings of the state: the restore target on this mesh."""
    shapes = jax.eval_shape(_init_fn(config, setup))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, state_sharding(setup, shapes))


def with_model(state: TrainState, setup: Setup, model: nnx.Module) -> TrainState:
    """`state` with the variables of `model` (replicated) and a fresh optimizer state."""
    sharding = parallel.replicated(setup.mesh)
    params, rest = jax.device_put(split(model), sharding)
    opt_state = jax.jit(lambda p: setup.tx.init(setup.split_params(p)[0]),
                        out_shardings=sharding)(params)
    return state.replace(params=params, rest=rest, opt_state=opt_state)


def is_workdir(path: str | Path) -> bool:
    """Whether `path` is a training workdir (config.json and checkpoints/)."""
    return (Path(path) / "config.json").is_file() and (Path(path) / "checkpoints").is_dir()


def load_pretrained(state: TrainState, setup: Setup, path: str | Path) -> TrainState:
    """`init_from`: converted weights from the folder `path` loaded by the family (the backbone
    and any matching layers), or, when `path` is a training workdir, the variables of its
    latest checkpoint's model that the family takes from such a run (`Family.load_run`: MAE
    fine-tuning from a pretraining run; pretraining's reference fine-tunes its last weights).
    New task layers keep their initialisation, the optimizer state is rebuilt."""
    model = setup.model(jax.device_get(state), train=True)
    if is_workdir(path):
        src = restore_run(read_config(path), path, "latest", setup.mesh)
        variables = convert.flatten(nnx.to_pure_dict(nnx.state(
            src.setup.model(jax.device_get(src.state)))))
        setup.family.load_run_into(model, src.setup.config.model.name, variables,
                                   f"{path} (step {src.step})")
    else:
        setup.family.load_into(model, path)
    return with_model(state, setup, model)


def check_workdir(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
    """A workdir holds one task's run: refuse to resume, evaluate or predict another task's
    checkpoints with this config (Orbax would fail later on mismatched arrays)."""
    saved = Path(workdir) / "config.json"
    if saved.is_file():
        task = json.loads(saved.read_text()).get("task")
        if task != config.task:
            raise ConfigError(f"{workdir} holds a run of task {task!r}, this config is task "
                              f"{config.task!r}: use another --workdir")


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a training workdir was run with."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise NotFoundError(f"{workdir}: not a training workdir (no config.json)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


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
    (default: every device), read-only: the model's variables without the optimizer state, so
    a config that trains other parameters (e.g. without `data.features`) restores it too.
    checkpoint.NoCheckpointError when there is none."""
    setup = make_setup(config, mesh or parallel.make_mesh())
    ckpt = checkpoint.Checkpoints(Path(workdir) / "checkpoints", read_only=True)
    try:
        step = ckpt.resolve(which)
        target = abstract_state(config, setup).replace(opt_state=None)
        state = ckpt.restore(step, target, partial=True)
        return Restored(setup, state, step, ckpt.metrics(step) or {})
    finally:
        ckpt.close()


def load_backbone(state: TrainState, setup: Setup, features_dir: str | Path) -> TrainState:
    """`state` with the backbone of the frame model that extracted `features_dir` (its
    family's `backbone` variables, BatchNorm statistics included); the other layers keep their
    initialisation."""
    source = features_lib.read_meta(features_dir)["source"]
    if "init_from" in source:
        return load_pretrained(state, setup, source["init_from"])
    workdir = Path(source["workdir"])
    src = restore_run(read_config(workdir), workdir, source["step"])
    src_frame = src.setup.family.frame_model(src.setup.model(jax.device_get(src.state)))
    model = setup.model(jax.device_get(state), train=True)
    family, frame = setup.family.frame_model(model)
    patterns = [re.compile(p) for p in family.backbone]
    have = {_name(p): v for p, v in nnx.to_flat_state(nnx.state(src_frame[1]))}
    target = nnx.state(frame)
    for path, var in nnx.to_flat_state(target):
        name = _name(path)
        if any(p.search(name) for p in patterns):
            value, shape = have.get(name), np.shape(var.get_value())
            if value is None or np.shape(value.get_value()) != shape:
                raise ConfigError(f"{features_dir}: the extracting model ({workdir}) has no "
                                  f"{name} of shape {shape}")
            var.set_value(value.get_value())
    nnx.update(frame, target)
    return with_model(state, setup, model)


def _name(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def load_runs(state: TrainState, setup: Setup, runs: Mapping[str, str]) -> TrainState:
    """`state` with each sub-module named in `runs` (an attribute of the model) set to the
    model of a training run ({attribute: workdir}, its best checkpoint): every variable,
    BatchNorm statistics included; the other layers keep theirs."""
    model = setup.model(jax.device_get(state), train=True)
    for attr, workdir in runs.items():
        where = f"init_from_runs.{attr}={workdir}"
        target = getattr(model, attr, None)
        if not isinstance(target, nnx.Module):
            raise ConfigError(f"{where}: model {setup.config.model.name!r} has no sub-module "
                              f"{attr!r}")
        src = restore_run(read_config(workdir), workdir, "best")
        if src.setup.task.name != setup.task.name:
            raise ConfigError(f"{where}: a run of task {src.setup.task.name!r}, not "
                              f"{setup.task.name!r}")
        source = nnx.state(src.setup.model(jax.device_get(src.state)))
        _check_same_variables(source, nnx.state(target), where)
        nnx.update(target, source)
    return with_model(state, setup, model)


def _check_same_variables(source: nnx.State, target: nnx.State, where: str) -> None:
    shapes = [{_name(p): np.shape(v.get_value()) for p, v in nnx.to_flat_state(s)}
              for s in (source, target)]
    differ = sorted(k for k in shapes[0].keys() | shapes[1].keys()
                    if shapes[0].get(k) != shapes[1].get(k))
    if differ:
        raise ConfigError(f"{where}: the run's model and this sub-module differ in "
                          f"{len(differ)} variables, e.g. " + ", ".join(
                              f"{k} {shapes[0].get(k)} there, {shapes[1].get(k)} here"
                              for k in differ[:3]))


def init_weights(state: TrainState, setup: Setup) -> TrainState:
    """A fresh run's start: the backbone that extracted the feature cache when cached features
    stand in for its images, else the converted weights of `init_from`, then the sub-modules
    of `init_from_runs` from their runs, else `state`."""
    if setup.backbone_cached:
        return load_backbone(state, setup, feature_dirs(setup.config)[0])
    if setup.config.init_from:
        state = load_pretrained(state, setup, setup.config.init_from)
    runs = {k: v for k, v in (setup.config.get("init_from_runs") or {}).items() if v}
    return load_runs(state, setup, runs) if runs else state


def predict_fn(setup: Setup) -> Callable:
    """Jitted eval-mode forward -> the task's per-frame predictions, of a batch's named inputs
    (`params, rest, batch`)."""

    def predict(params, rest, batch: Mapping[str, jax.Array]) -> dict:
        model = nnx.merge(setup.eval_graphdef, params, rest)
        return setup.task.predict(model(models.prepare_inputs(setup.preprocess, batch,
                                                              setup.inputs)))

    return jax.jit(predict)


def embed_inputs(setup: Setup) -> tuple[str, ...]:
    """What the frame model's embedding (`--mode=extract`) reads: the images of a model with
    an image preprocessing, else the sound windows of an audio network (GCSA's MCNN)."""
    if setup.preprocess is not None:
        return ("image",)
    return ("audio",) if "audio" in setup.inputs else ()


def embed_fn(setup: Setup) -> Callable:
    """Jitted eval-mode per-frame embedding of images or sound windows (`embed_inputs`;
    `params, rest, batch`): what `--mode=extract` stores."""
    names = embed_inputs(setup)

    def embed(params, rest, batch: Mapping[str, jax.Array]) -> dict:
        model = nnx.merge(setup.eval_graphdef, params, rest)
        inputs = models.prepare_inputs(setup.preprocess, batch, names)
        return {"embedding": setup.family.embed_frames(model, inputs)}

    return jax.jit(embed)


def bind(fn: Callable, state: TrainState) -> Callable[[Mapping[str, jax.Array]], dict]:
    """A predict or embed function of this state's variables: batch -> outputs."""
    return functools.partial(fn, state.params, state.rest)
