"""The supervised objective: labelled heads (VA, EXPR, AU, multi-task) of any model family,
on frames or clips, from images or cached features. Each head's loss is picked by
`config.loss.<head>`; the model's own losses (its outputs' "losses") are added with
`loss.<name>_weight` from `loss.<name>_start_step`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from abaw_jax import models, parallel
from abaw_jax import state as state_lib
from abaw_jax.data import augment, folds, pipeline
from abaw_jax.errors import ConfigError
from abaw_jax.evaluators import abaw, split


def train_stream(config: ml_collections.ConfigDict, setup: state_lib.Setup, records: Path,
                 local_batch: int, shard: pipeline.Shard) -> pipeline.Stream:
    """Labelled frames, or clips (`data.clip_length`: `batch_size` counts clips), with the
    inputs the model takes: augmented images and/or cached features; of the train split, or
    with `data.folds` of the training folds."""
    if not setup.family.labels:
        raise ConfigError(f"model {config.model.name!r} trains without labels: set its own "
                          f"trainer (configs/mae/pretrain.py: trainer=mae_pretrain)")
    train_split = folds.run_splits(config.data, records)[0]
    feed = setup.feed
    common = dict(batch_size=local_batch, seed=config.seed, shard=shard,
                  augment_cfg=augment.AugmentConfig.from_config(config.augment, feed.size)
                  if feed.size else None,
                  loader=pipeline.Loader.from_config(config.data.loader), features=feed.features,
                  audio=feed.audio, audio_stats=feed.audio_stats)
    if feed.clip_length:
        return pipeline.clip_train_dataset(records, train_split,
                                           length=feed.clip_length, stride=feed.clip_stride,
                                           **common)
    return pipeline.train_dataset(records, train_split, **common)


def loss_options(config: ml_collections.ConfigDict, records: Path | None) -> dict:
    """config.loss, with balanced class / positive weights from the train split's label counts
    (the records' stats.json; with `data.folds`, the training folds' counts) when
    `loss.balance` is set and they are not given."""
    opts = config.loss.to_dict()
    if not opts.pop("balance", False) or records is None:
        return opts
    hist = folds.histogram(records, folds.run_splits(config.data, records)[0])
    if opts.get("class_weights") is None and "expr" in hist:
        counts = np.maximum(np.array(list(hist["expr"].values()), np.float64), 1)
        opts["class_weights"] = (counts.sum() / (len(counts) * counts)).tolist()
    if opts.get("pos_weight") is None and "au_positive" in hist:
        pos = np.maximum(np.array(list(hist["au_positive"].values()), np.float64), 1)
        opts["pos_weight"] = ((hist["au_frames"] - pos) / pos).tolist()
    return opts


def add_model_losses(total: jax.Array, parts: dict, model_losses: Mapping[str, jax.Array],
                     opts: Mapping[str, Any], step: jax.Array) -> jax.Array:
    """`total` plus each model loss times `<name>_weight` (default 1; 0 leaves it out) from
    step `<name>_start_step` on; each logged as `loss_<name>` (unweighted)."""
    for name, value in model_losses.items():
        weight = opts.get(f"{name}_weight", 1.0)
        if not weight:
            continue
        if f"loss_{name}" in parts:
            raise ValueError(f"the model's loss {name!r} has the name of a head's loss")
        parts[f"loss_{name}"] = value
        on = jnp.asarray(step) >= opts.get(f"{name}_start_step", 0)
        total = total + jnp.where(on, weight, 0.0) * value
    return total


def train_step(config: ml_collections.ConfigDict, setup: state_lib.Setup, sharding,
               records: Path | None = None) -> Callable:
    """The jitted, donated step: (state, global batch) -> (state, logged scalars)."""
    dtype = jnp.dtype(config.compute_dtype)
    opts = loss_options(config, records)
    setup.task.check_losses(opts)
    weights = {**(opts.get("task_weights") or {}),
               **{k.removesuffix("_weight"): v for k, v in opts.items()
                  if k.endswith("_weight") and k != "pos_weight"}}
    logging.info("logged `loss` is the weighted sum of the parts; each `loss_<part>` is logged "
                 "unweighted (weights other than 1: %s)", weights or "none")

    def step(state: state_lib.TrainState, batch: Mapping[str, jax.Array]):
        # Gradients of the trained parameters only: frozen ones get none computed.
        trained, frozen = setup.split_params(state.params)

        def loss_fn(trained, rest):
            cast = jax.tree.map(lambda p: p.astype(dtype), (trained, frozen))
            # Fresh Variables in this trace: BatchNorm updates its statistics in place, and NNX
            # refuses to mutate Variables created at the outer (jit) trace level.
            model = nnx.merge(setup.graphdef, *cast, jax.tree.map(lambda x: x, rest))
            out = model(models.prepare_inputs(setup.preprocess, batch, setup.inputs, dtype),
                        rngs=nnx.Rngs(state.step_key()))
            model_losses = out.pop("losses", {})
            out = jax.tree.map(lambda x: x.astype(jnp.float32), out)
            loss, parts = setup.task.loss(out, batch, opts)
            loss = add_model_losses(loss, parts, model_losses, opts, state.step)
            new_rest = state_lib.split(model)[1]
            new_rest = jax.tree.map(lambda new, old: new.astype(old.dtype), new_rest, rest)
            return loss, (parts, new_rest)

        (loss, (parts, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trained, state.rest)
        updates, opt_state = setup.tx.update(grads, state.opt_state, trained)
        params = nnx.merge_state(optax.apply_updates(trained, updates), frozen)
        stats = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads),
                 "learning_rate": setup.schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, rest=rest,
                             opt_state=opt_state), stats

    return jax.jit(step, donate_argnums=0,
                   in_shardings=(sharding, parallel.batch_sharding(setup.mesh)),
                   out_shardings=(sharding, parallel.replicated(setup.mesh)))


def evaluator(config: ml_collections.ConfigDict, setup: state_lib.Setup, records: Path,
              workdir: Path | None = None) -> Callable[[state_lib.TrainState], dict]:
    """state -> the task's metrics over the whole eval split, with the post-processing
    chosen on it (its figures are `--mode=eval`'s: nothing goes to `workdir` here)."""
    predict = state_lib.predict_fn(setup)
    eval_split = folds.run_splits(config.data, records)[1]

    def evaluate(state: state_lib.TrainState) -> dict:
        result = split.predict_run(state_lib.bind(predict, state), setup, records, eval_split)
        return abaw.metrics(setup.task, result, records, eval_split)

    return evaluate
