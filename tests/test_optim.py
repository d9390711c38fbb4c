"""Optimiser construction: schedules, weight-decay mask, clipping, parameter groups."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from abaw_jax import optim

PARAMS = {"features": {"0": {"conv": {"kernel": jnp.ones((3, 3, 3, 4))},
                             "bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}}},
          "tasks": {"va": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}}
GRADS = jax.tree.map(jnp.ones_like, PARAMS)


def test_schedules():
    cos = optim.schedule({"lr": 1.0, "schedule": "cosine", "warmup_steps": 10}, 110)
    assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0)
    assert float(cos(60)) == pytest.approx(0.5, abs=1e-6) and float(cos(110)) < 1e-6
    step = optim.schedule({"lr": 1.0, "schedule": "step", "decay_steps": 5, "decay": 0.1}, 20)
    assert [float(step(s)) for s in (0, 4, 5, 12)] == pytest.approx([1, 1, 0.1, 0.01])
    exp = optim.schedule({"lr": 1.0, "schedule": "exponential", "decay_steps": 1,
                          "decay": 0.9, "warmup_steps": 2}, 20)
    assert float(exp(1)) == pytest.approx(0.5) and float(exp(4)) == pytest.approx(0.81)
    with pytest.raises(KeyError, match="unknown schedule 'linear'"):
        optim.schedule({"lr": 1.0, "schedule": "linear"}, 10)


def test_weight_decay_only_on_kernels():
    tx, _ = optim.build({"name": "sgd", "lr": 1.0, "schedule": "constant", "momentum": 0.0,
                         "weight_decay": 0.5}, PARAMS, 10)
    zero = jax.tree.map(jnp.zeros_like, GRADS)
    updates, _ = tx.update(zero, tx.init(PARAMS), PARAMS)
    assert float(updates["features"]["0"]["conv"]["kernel"][0, 0, 0, 0]) == pytest.approx(-0.5)
    assert float(jnp.abs(updates["features"]["0"]["bn"]["scale"]).max()) == 0.0
    assert float(jnp.abs(updates["tasks"]["va"]["bias"]).max()) == 0.0


def test_gradient_clipping_bounds_the_update():
    tx, _ = optim.build({"name": "sgd", "lr": 1.0, "schedule": "constant", "momentum": 0.0,
                         "grad_clip": 1.0}, PARAMS, 10)
    big = jax.tree.map(lambda g: 100 * g, GRADS)
    updates, _ = tx.update(big, tx.init(PARAMS), PARAMS)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)
    assert np.isfinite(float(optax.tree.norm(updates)))


def test_groups_have_their_own_rates_and_a_later_group_waits_for_its_start():
    cfg = {"name": "sgd", "momentum": 0.0, "lr": 1.0, "schedule": "constant",
           "groups": {"tasks": {"pattern": "^tasks/", "lr": 0.5},
                      "backbone": {"pattern": "^features/", "lr": 0.1, "start_step": 2}}}
    tx, _ = optim.build(cfg, PARAMS, total_steps=10)
    state, params, moved = tx.init(PARAMS), PARAMS, []
    for _ in range(4):
        updates, state = tx.update(GRADS, state, params)
        params = optax.apply_updates(params, updates)
        moved.append({"tasks": float(-updates["tasks"]["va"]["bias"][0]),
                      "backbone": float(-updates["features"]["0"]["bn"]["bias"][0])})
    assert [m["tasks"] for m in moved] == pytest.approx([0.5] * 4)
    assert [m["backbone"] for m in moved] == pytest.approx([0, 0, 0.1, 0.1])  # stage 2 from step 2


def test_a_parameter_in_two_groups_is_an_error():
    groups = {"a": {"pattern": "^tasks/"}, "b": {"pattern": "kernel"}}
    with pytest.raises(ValueError, match="tasks/va/kernel matches the patterns of groups"):
        optim.group_labels(PARAMS, groups)


def test_a_late_group_starts_as_a_fresh_adam():
    # Adam's first step moves each parameter by lr (m_hat / sqrt(v_hat) = sign(g)); a group
    # started at step 3 must do exactly that then, not carry a step count from stage 1.
    cfg = {"name": "adam", "lr": 1.0, "schedule": "constant",
           "groups": {"late": {"pattern": "^features/", "lr": 0.1, "start_step": 3}}}
    tx, _ = optim.build(cfg, PARAMS, total_steps=10)
    state, moved = tx.init(PARAMS), []
    for _ in range(4):
        updates, state = tx.update(GRADS, state, PARAMS)
        moved.append(float(-updates["features"]["0"]["bn"]["bias"][0]))
    assert moved == pytest.approx([0, 0, 0, 0.1], rel=1e-5)
