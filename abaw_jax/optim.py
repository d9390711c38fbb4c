"""The one place that builds optimisers: optax optimiser, schedule, weight-decay mask, clipping,
parameter groups and layer-wise learning-rate decay, all from the `config.optim` block. Frozen
parameters (`optim.freeze`) never reach it: the run state keeps them apart (state.py), without
gradients or optimizer state."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from abaw_jax.errors import ConfigError, UnknownNameError


def schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """cfg.schedule: cosine (to end_lr, default 0, at total_steps), step, exponential or
    constant, each after a linear warm-up of warmup_steps from 0."""
    lr, warmup = cfg["lr"], int(cfg.get("warmup_steps", 0))
    name = cfg.get("schedule", "cosine")
    if name == "cosine":  # to end_lr at total_steps
        main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1),
                                           alpha=cfg.get("end_lr", 0.0) / lr)
    elif name == "step":  # multiply by `decay` every `decay_steps` (PyTorch StepLR)
        main = optax.exponential_decay(lr, cfg["decay_steps"], cfg.get("decay", 0.1),
                                       staircase=True)
    elif name == "exponential":  # multiply by `decay` every `decay_steps`, smoothly
        main = optax.exponential_decay(lr, cfg.get("decay_steps", 1), cfg.get("decay", 0.9))
    elif name == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise UnknownNameError(f"unknown schedule {name!r}; expected cosine, step, exponential, "
                               "constant")
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def param_paths(params) -> Any:
    """A tree like `params` whose leaves are their '/'-joined paths (for patterns and masks)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _path(p), params)


def decay_mask(params, exclude: Sequence[str] = ()) -> Any:
    """Weight decay on kernels only: not on biases, norm scales or PReLU slopes (ndim <= 1), nor
    on the parameters whose path a regex of `exclude` matches (`optim.no_decay`: MAE's class and
    mask tokens and position embeddings, which are 3-D)."""
    compiled = [re.compile(p) for p in exclude]
    return jax.tree.map(lambda x, path: x.ndim > 1 and not any(c.search(path) for c in compiled),
                        params, param_paths(params))


def layer_scales(params, rate: float, embed: str, block: str) -> Any:
    """Layer-wise learning-rate decay (BEiT; MAE's `lr_decay.param_groups_lrd`): a tree like
    `params` of each parameter's learning-rate factor rate ** (L + 1 - layer), where the layer
    is 0 for a path matching the regex `embed` (patch and position embeddings, class token),
    i + 1 for one matching `block` (its group 1 is the block index i), and L + 1 for every other
    parameter (final norm, task layers), L being the number of blocks (highest index + 1)."""
    embed_re, block_re = re.compile(embed), re.compile(block)
    paths = param_paths(params)
    blocks = [int(m.group(1)) for p in jax.tree.leaves(paths) if (m := block_re.search(p))]
    if not blocks:
        raise ConfigError(f"optim.layer_decay: no parameter path matches the block pattern "
                          f"{block!r}")
    top = max(blocks) + 2  # the layer of everything after the last block

    def scale(path: str) -> float:
        if embed_re.search(path):
            return rate ** top
        m = block_re.search(path)
        return rate ** (top - int(m.group(1)) - 1) if m else 1.0

    return jax.tree.map(scale, paths)


def _scaled(scales) -> optax.GradientTransformation:
    """Multiplies each update by its factor: AdamW's update, weight decay included, is
    proportional to the learning rate, so this is a per-parameter learning rate."""
    return optax.stateless(lambda updates, params=None: jax.tree.map(
        lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales))


def _base(cfg: Mapping[str, Any], lr: optax.Schedule, params) -> optax.GradientTransformation:
    name, wd = cfg.get("name", "adam"), cfg.get("weight_decay", 0.0)
    mask = decay_mask(params, tuple(cfg.get("no_decay") or ()))
    if name == "adamw":
        return optax.adamw(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), weight_decay=wd,
                           mask=mask)
    # Adam and SGD take PyTorch's L2 form of weight decay: added to the gradient.
    l2 = [optax.add_decayed_weights(wd, mask)] if wd else []
    if name == "adam":
        return optax.chain(*l2, optax.adam(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999)))
    if name == "sgd":
        return optax.chain(*l2, optax.sgd(lr, momentum=cfg.get("momentum", 0.9),
                                          nesterov=cfg.get("nesterov", False)))
    raise UnknownNameError(f"unknown optimizer {name!r}; expected adam, adamw, sgd")


def group_labels(params, groups: Mapping[str, Mapping[str, Any]]) -> Any:
    """Each parameter's group: the group whose `pattern` regex matches its path (searched), else
    "default". A path matched by two groups is an error (config dicts have no order to break
    the tie)."""
    compiled = [(name, re.compile(g["pattern"])) for name, g in groups.items()]

    def label(path: str) -> str:
        hits = [n for n, c in compiled if c.search(path)]
        if len(hits) > 1:
            raise ConfigError(f"parameter {path} matches the patterns of groups {hits}")
        return hits[0] if hits else "default"

    return jax.tree.map(label, param_paths(params))


_SCHEDULE_KEYS = ("lr", "schedule", "warmup_steps", "end_lr", "decay", "decay_steps")


def _group(cfg: Mapping[str, Any], group: Mapping[str, Any], params, total_steps: int
           ) -> optax.GradientTransformation:
    """A group's optimizer: the main settings with the group's schedule keys; with
    `start_step`, frozen before it and started there as a fresh optimizer (its schedule,
    warm-up included, and Adam's step count begin at the start)."""
    gcfg = {**cfg, **{k: v for k, v in group.items() if k in _SCHEDULE_KEYS}}
    start = int(group.get("start_step", 0))
    tx = _base(gcfg, schedule(gcfg, max(total_steps - start, 1)), params)
    return _from_step(tx, start) if start else tx


def _from_step(tx: optax.GradientTransformation, start: int) -> optax.GradientTransformation:
    """`tx` held back until `start` steps have passed: zero updates, and its state (moments,
    step count) left untouched, so it starts exactly as a fresh optimizer would."""

    def init(params):
        return jnp.zeros([], jnp.int32), tx.init(params)

    def update(updates, state, params=None):
        count, inner = state
        new_updates, new_inner = tx.update(updates, inner, params)
        on = count >= start
        new_updates = jax.tree.map(lambda u: jnp.where(on, u, jnp.zeros_like(u)), new_updates)
        inner = jax.tree.map(lambda new, old: jnp.where(on, new, old), new_inner, inner)
        return new_updates, (count + 1, inner)

    return optax.GradientTransformation(init, update)


def build(cfg: Mapping[str, Any], params, total_steps: int
          ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, learning-rate schedule of the default group) for `params` from the config's
    optim block. `groups` ({name: {pattern, lr, start_step, ...}}) give parameter groups their
    own learning rates and start steps (two-stage fine-tuning); `layer_decay` ({rate, embed,
    block}, rate 0: off) scales each parameter's rate by its depth (`layer_scales`)."""
    lr = schedule(cfg, total_steps)
    groups = {k: dict(v) for k, v in (cfg.get("groups") or {}).items()}
    if groups:
        labels = group_labels(params, groups)
        txs = {name: _group(cfg, g, params, total_steps) for name, g in groups.items()}
        txs["default"] = _base(cfg, lr, params)
        tx = optax.multi_transform(txs, labels)
    else:
        tx = _base(cfg, lr, params)
    decay = dict(cfg.get("layer_decay") or {})
    if decay.get("rate"):
        tx = optax.chain(tx, _scaled(layer_scales(params, decay["rate"], decay["embed"],
                                                  decay["block"])))
    if cfg.get("grad_clip"):
        tx = optax.chain(optax.clip_by_global_norm(cfg["grad_clip"]), tx)
    return tx, lr
