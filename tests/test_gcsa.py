"""The GCSA paper's system (models/gcsa.py, configs/gcsa/): the GCSA module's invariants, the
networks' outputs, DDAMFN's GCSA switch, the coarse-fine loss, branch outputs in the task, the
decision fusion searched on validation, and the default runs on the synthetic data."""

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from abaw_jax import (
    checkpoint,
    config_lib,
    convert,
    evaluate,
    heads,
    inference,
    losses,
    optim,
    postprocess,
    predict,
    tasks,
)
from abaw_jax.data import audio_table, cache
from abaw_jax.models import ddamfn, gcsa

EXPR = {name: i for i, name in enumerate(heads.get("expr").columns)}


def _set(variable: nnx.Variable, value: float) -> None:
    variable.set_value(jnp.full_like(variable.get_value(), value))


def test_channel_shuffle_is_a_permutation_of_the_channels():
    order = np.asarray(gcsa.channel_shuffle(jnp.arange(16), 4))
    # ShuffleNet's: channel k of group g (g * 4 + k) moves to k * 4 + g.
    assert order.tolist() == [g * 4 + k for k in range(4) for g in range(4)]
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 16))
    np.testing.assert_array_equal(gcsa.channel_shuffle(x, 4), x[..., order])
    with pytest.raises(ValueError, match="18 channels do not split into 4"):
        gcsa.channel_shuffle(jnp.zeros((1, 18)), 4)


@pytest.mark.parametrize("hw", [(1, 1), (5, 3), (8, 8)])
def test_gcsa_keeps_the_shape_and_its_attention_lies_in_0_1(hw):
    module = gcsa.GCSA(16, rngs=nnx.Rngs(0))
    x = 3 * jax.random.normal(jax.random.key(1), (4, *hw, 16))
    maps = nnx.jit(lambda m, x: (m(x), m.channel_attention(x), m.spatial_attention(x)))
    for train in (True, False):
        module.train() if train else module.eval()
        out, *attentions = maps(module, x)
        assert out.shape == x.shape
        for attention in attentions:
            assert attention.shape == x.shape
            assert float(attention.min()) > 0 and float(attention.max()) < 1


def test_gcsa_saturated_at_1_is_the_channel_shuffle_alone():
    module = gcsa.GCSA(16, rngs=nnx.Rngs(0))
    module.eval()
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 16))
    assert not np.allclose(module(x), gcsa.channel_shuffle(x, 4))  # attention at work
    # Both sigmoids' inputs pinned at 40 (sigmoid(40) is 1 in float32).
    _set(module.channel_fc2.kernel, 0.0)
    _set(module.channel_fc2.bias, 40.0)
    _set(module.spatial2.bn.scale, 0.0)
    _set(module.spatial2.bn.bias, 40.0)
    np.testing.assert_array_equal(module(x), gcsa.channel_shuffle(x, 4))


def _shapes(model, inputs, rngs=None):
    """The output shapes of a model's call, traced (nothing computed)."""
    return jax.tree.map(jnp.shape, nnx.eval_shape(lambda m, x, r: m(x, r), model, inputs,
                                                  rngs))


def test_networks_give_their_task_outputs_and_the_av_model_one_per_branch():
    rngs = nnx.Rngs(dropout=1)
    faces = jnp.zeros((3, 64, 64, 3))
    sound = jnp.full((3, 101, 64), -60.0)
    visual = gcsa.RHCNN({"expr": 8}, **gcsa.RHCNN_TINY, rngs=nnx.Rngs(0))
    assert _shapes(visual, {"image": faces}, rngs) == {"expr": (3, 8), "embedding": (3, 64)}
    assert _shapes(visual, {"features": jnp.zeros((3, 64))}, rngs)["expr"] == (3, 8)
    audio = gcsa.MCNN({"expr": 8}, **gcsa.MCNN_TINY, rngs=nnx.Rngs(0))
    assert _shapes(audio, {"audio": sound}, rngs) == {"expr": (3, 8), "embedding": (3, 48)}
    both = gcsa.AudioVisual({"expr": 8}, visual=gcsa.RHCNN_TINY, audio=gcsa.MCNN_TINY,
                            rngs=nnx.Rngs(0))
    assert _shapes(both, {"image": faces, "audio": sound}, rngs) == {
        "branches": {"visual": {"expr": (3, 8)}, "audio": {"expr": (3, 8)}}}
    # gcsa=False: the paper's "Base", without the module.
    base = gcsa.RHCNN({"expr": 8}, **{**gcsa.RHCNN_TINY, "gcsa": False}, rngs=nnx.Rngs(0))
    assert base.gcsa is None and visual.gcsa is not None


def test_ddamfn_gcsa_switch_and_converted_weights_leave_it_initialised(tmp_path):
    plain = ddamfn.ddamfn_tiny(outputs={"expr": 8}, rngs=nnx.Rngs(1))
    model = ddamfn.ddamfn_tiny(outputs={"expr": 8}, gcsa=True, rngs=nnx.Rngs(2))
    model.eval()
    out = _shapes(model, {"image": jnp.zeros((2, 112, 112, 3))})
    assert out["expr"] == (2, 8) and out["feature_map"] == (2, 7, 7, 128)
    assert "gcsa" not in nnx.to_pure_dict(nnx.state(plain))
    folder = convert.save(tmp_path / "w", nnx.to_pure_dict(nnx.state(plain)),
                          {"family": "ddamfn", "model": "ddamfn_tiny"})
    before = nnx.to_pure_dict(nnx.state(model.gcsa))
    with pytest.raises(ValueError, match="has no 'gcsa"):
        convert.load_into(model, folder)  # a plain load needs every layer
    ddamfn.load_weights(model, folder)
    loaded = nnx.to_pure_dict(nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, loaded["features"],
                 nnx.to_pure_dict(nnx.state(plain))["features"])
    jax.tree.map(np.testing.assert_array_equal, loaded["gcsa"], before)


def _batch(labels, mask=None):
    labels = jnp.asarray(labels)
    return {"expr": labels,
            "expr_mask": jnp.ones(labels.shape, bool) if mask is None else jnp.asarray(mask)}


def test_coarse_fine_is_cross_entropy_when_every_mu_is_0():
    logits = 2 * jax.random.normal(jax.random.key(3), (64, 8))
    labels = jax.random.randint(jax.random.key(4), (64,), 0, 8)
    mask = jax.random.bernoulli(jax.random.key(5), 0.8, (64,))
    weights = np.linspace(0.5, 2.0, 8)
    for cw in (None, weights):
        ce = losses.cross_entropy(logits, labels, mask, cw)
        cf = losses.coarse_fine(logits, labels, mask, [0.0] * 6, heads.EXPR_QUADRANT, cw)
        np.testing.assert_allclose(cf, ce, rtol=1e-6)
    # ... and larger with penalties: some predictions are in the wrong quadrant.
    assert losses.coarse_fine(logits, labels, mask, [1.0] * 6, heads.EXPR_QUADRANT) > \
        losses.cross_entropy(logits, labels, mask) * 1.1


def test_coarse_fine_matches_a_hand_computed_case_through_the_config():
    """Logits 0 but ln 3 on the predicted class: its probability 0.3, every other 0.1, so each
    frame's cross-entropy is ln 10 (the true class is never the predicted one)."""
    frames = [("Happiness", "Anger", True),  # quadrants 1 -> 2: mu_12 = 0.5
              ("Sadness", "Happiness", True),  # 3 -> 1: mu_13 = 1.0
              ("Neutral", "Other", True),  # both in quadrant 4: no penalty
              ("Fear", "Surprise", False)]  # masked
    logits = jnp.stack([jnp.zeros(8).at[EXPR[p]].set(math.log(3)) for _, p, _ in frames])
    batch = _batch([EXPR[t] for t, _, _ in frames], [m for _, _, m in frames])
    opts = config_lib.gcsa("visual").loss.to_dict()
    assert opts["expr"] == "coarse_fine" and list(opts["coarse_mu"][:2]) == [0.5, 1.0]
    got = losses.head_loss("expr", "coarse_fine")(logits, batch, opts)
    np.testing.assert_allclose(got, (1.5 + 2.0 + 1.0) * math.log(10) / 3, rtol=1e-6)
    # The coefficients are symmetric: the reverse confusions cost the same.
    swapped = jnp.stack([jnp.zeros(8).at[EXPR[t]].set(math.log(3)) for t, _, _ in frames])
    back = _batch([EXPR[p] for _, p, _ in frames], [m for _, _, m in frames])
    np.testing.assert_allclose(losses.head_loss("expr", "coarse_fine")(swapped, back, opts),
                               got, rtol=1e-6)


def test_coarse_fine_refuses_bad_coefficients_and_quadrants():
    logits, labels, mask = jnp.zeros((2, 8)), jnp.zeros(2, int), jnp.ones(2, bool)
    with pytest.raises(ValueError, match="6 coefficients"):
        losses.coarse_fine(logits, labels, mask, [0.5] * 5, heads.EXPR_QUADRANT)
    with pytest.raises(ValueError, match="one quadrant 0-3 per class"):
        losses.coarse_fine(logits, labels, mask, [0.5] * 6, (0, 1, 2, 3, 4, 0, 0, 0))


def test_branches_train_with_summed_losses_and_predict_their_mean():
    task = tasks.get("expr")
    audio, visual = (jax.random.normal(jax.random.key(k), (16, 8)) for k in (6, 7))
    batch = _batch(jax.random.randint(jax.random.key(8), (16,), 0, 8))
    out = {"branches": {"audio": {"expr": audio}, "visual": {"expr": visual}}}
    total, parts = task.loss(out, batch, {"expr": "ce"})
    ce = [losses.cross_entropy(x, batch["expr"], batch["expr_mask"]) for x in (audio, visual)]
    assert set(parts) == {"loss_expr.audio", "loss_expr.visual"}
    np.testing.assert_allclose(total, sum(ce), rtol=1e-6)
    preds = task.predict(out)
    np.testing.assert_allclose(preds["expr.audio"], jax.nn.softmax(audio), rtol=1e-6)
    np.testing.assert_allclose(preds["expr"], (preds["expr.audio"] + preds["expr.visual"]) / 2,
                               rtol=1e-6)
    with pytest.raises(KeyError, match="no output of \\['expr'\\]"):
        task.loss({"branches": {"audio": {}}}, batch, {"expr": "ce"})


def test_fusion_search_finds_the_planted_weights_and_is_stored_and_applied():
    """Labels planted as the argmax of (2 P_audio + 5 P_visual) / 7: only m, n = 2, 5 (ratio
    0.4, no other pair in 1..5 has it) scores F1 1; each branch alone and the other ratios
    less."""
    rng = np.random.default_rng(0)
    n = 3000
    p_audio, p_visual = (rng.dirichlet(np.ones(8) * 0.7, n) for _ in range(2))
    labels = {"expr": np.argmax(2 * p_audio + 5 * p_visual, -1),
              "expr_mask": np.ones(n, bool)}
    preds = {"expr.audio": p_audio, "expr.visual": p_visual, "expr": (p_audio + p_visual) / 2}
    video, frame = np.repeat(np.arange(3), n // 3), np.tile(np.arange(1, n // 3 + 1), 3)
    post, report = postprocess.Post.fit(("expr",), preds, labels, video, frame)
    assert post.fusion == {"expr": {"audio": 2, "visual": 5}}
    assert report["post/expr/score_raw"] == 1.0
    head = heads.get("expr")
    others = [head.selection_score(postprocess.fuse(preds, "expr", {"audio": m, "visual": v}),
                                   labels["expr"])
              for m, v in itertools.product(range(1, 6), repeat=2) if m * 5 != v * 2]
    assert max(others) < 1.0
    assert max(report["post/expr/score_audio"], report["post/expr/score_visual"]) < 0.9
    # Stored with the metrics and read back as eval, predict and inference read it.
    stored = postprocess.Post.from_metrics(report, ("expr",))
    assert stored.fusion == post.fusion
    fused = stored.fuse(preds)
    np.testing.assert_allclose(fused["expr"], (2 * p_audio + 5 * p_visual) / 7)
    applied = stored.apply(preds, video, frame)["expr"]
    assert head.selection_score(applied, labels["expr"]) == pytest.approx(
        report["post/expr/score"])
    # A model without branches has no fusion.
    plain = postprocess.Post.fit(("expr",), {"expr": p_visual}, labels, video, frame)[0]
    assert plain.fusion == {} and postprocess.Post.from_metrics({}, ("expr",)).fusion == {}


def test_the_paper_optimiser_gives_the_networks_10x_the_classifiers_rate():
    config = config_lib.gcsa("av", "real")
    assert (config.optim.name, config.optim.momentum, config.optim.lr,
            config.batch_size) == ("sgd", 0.9, 1e-4, 16)
    assert config.optim.groups.branches.lr == 1e-3
    assert config.model.visual.dropout == config.model.audio.dropout == 0.2
    model = nnx.eval_shape(lambda: gcsa.AudioVisual(
        {"expr": 8}, visual=config.model.visual, audio=config.model.audio, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    labels = jax.tree.leaves(optim.group_labels(params, config.optim.groups.to_dict()))
    paths = [p.removesuffix("/.value") for p in jax.tree.leaves(optim.param_paths(params))]
    fast = {p for p, g in zip(paths, labels, strict=True) if g == "branches"}
    slow = set(paths) - fast
    assert slow == {f"{b}/tasks/expr/{k}" for b in ("audio", "visual") for k in ("kernel", "bias")}
    assert any(p.startswith("audio/branches/") for p in fast) and \
        any(p.startswith("visual/gcsa/") for p in fast)


# ---------------------------------------------------------------------------------------------
# The default runs on the synthetic data: the configs' own commands (`python -m abaw_jax.main
# --config=configs/gcsa/...`), for 400 of their 600 steps (the suite's time), evaluated at the
# end. On one CPU device: with conftest's 8 fake devices, XLA:CPU's all-reduce of these models'
# train step sometimes waited for devices that never came (its 40 s rendezvous timeout
# aborted the process, 2 runs in 6 on the loaded 2-core machine).

STEPS = 400
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def synthetic(synthetic_cache):
    """(records, cache folder) of the default configs' synthetic data (the session's cache)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ABAW_JAX_CACHE", str(synthetic_cache))
        yield cache.records_for(config_lib.gcsa("av").data, "expr"), synthetic_cache


def _require_audio(records: Path) -> None:
    """The synthetic tree's raw videos carry sound (an expression tone): the audio runs hear it."""
    assert audio_table.read_index(records)["counts"]["ok"] > 0


def _default_run(config: str, workdir: Path, cache_dir: Path, steps: int = STEPS) -> dict:
    """`python -m abaw_jax.main --config=<config>` on one device for `steps` steps; the last
    checkpoint's validation metrics."""
    flags = [f"--config.{k}={max(steps, 1)}" for k in ("eval_every_steps",
                                                        "checkpoint_every_steps",
                                                        "log_every_steps")]
    env = {**os.environ, "ABAW_JAX_CACHE": str(cache_dir), "XLA_FLAGS": ""}
    run = subprocess.run([sys.executable, "-m", "abaw_jax.main", f"--config={config}",
                          f"--workdir={workdir}", f"--config.total_steps={steps}", *flags],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = checkpoint.Checkpoints(workdir / "checkpoints", read_only=True)
    try:
        return ckpt.metrics(ckpt.resolve("latest"))
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def visual_run(synthetic, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runs") / "visual"
    return workdir, _default_run("configs/gcsa/visual.py", workdir, synthetic[1])


@pytest.fixture(scope="module")
def audio_run(synthetic, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runs") / "audio"
    return workdir, _default_run("configs/gcsa/audio.py", workdir, synthetic[1])


def _learnt(metrics: dict) -> None:
    baseline = metrics["expr/constant_baseline"]
    assert metrics["expr/f1_macro"] > max(3 * baseline, baseline + 0.15), metrics


def test_default_visual_run_learns(visual_run):
    _learnt(visual_run[1])


def test_default_audio_run_learns(synthetic, audio_run):
    _require_audio(synthetic[0])
    _learnt(audio_run[1])


def test_default_av_run_fuses_above_each_branch_and_the_visual_only_run(synthetic, visual_run,
                                                                        tmp_path):
    """The synthetic sound is silent in pauses longer than its window: there only the face
    tells the class, elsewhere the sound tells it better (600 steps: fused 0.768, audio branch
    0.658, visual 0.524)."""
    _require_audio(synthetic[0])
    metrics = _default_run("configs/gcsa/av.py", tmp_path / "av", synthetic[1])
    fused = metrics["post/expr/score_raw"]  # at the searched weights, before smoothing
    assert set(metrics) >= {"post/expr/fusion/audio", "post/expr/fusion/visual"}
    assert fused > visual_run[1]["expr/f1_macro"] + 0.1, metrics
    assert fused > metrics["post/expr/score_visual"] + 0.1, metrics
    assert fused > metrics["post/expr/score_audio"] + 0.03, metrics
    _learnt(metrics)


def test_separate_runs_assemble_into_a_fused_workdir_for_eval_predict_and_inference(
        synthetic, visual_run, audio_run, tmp_path):
    """av.py:visual=,audio= takes each branch from its run's best checkpoint, trains nothing,
    evaluates step 0 (the fusion searched) and saves it; eval, predict and inference.load
    apply the stored weights."""
    workdir = tmp_path / "separate"
    arg = f"visual={visual_run[0]},audio={audio_run[0]}"
    metrics = _default_run(f"configs/gcsa/av.py:{arg}", workdir, synthetic[1], steps=0)
    config = config_lib.gcsa("av", arg)
    assert config.total_steps == 0 and dict(config.init_from_runs) == {
        "visual": str(visual_run[0]), "audio": str(audio_run[0])}
    # Each branch is its run's model, BatchNorm statistics included: the same scores.
    assert metrics["post/expr/score_visual"] == pytest.approx(visual_run[1]["expr/f1_macro"])
    assert metrics["post/expr/score_audio"] == pytest.approx(audio_run[1]["expr/f1_macro"])
    weights = {b: metrics[f"post/expr/fusion/{b}"] for b in ("audio", "visual")}
    assert evaluate.run(config, workdir)["post/expr/score"] == pytest.approx(
        metrics["post/expr/score"])
    out = predict.run(config, workdir)  # checks its files itself
    assert len(list((out / "expr").glob("*.txt"))) > 0
    predictor = inference.load(workdir)
    rng = np.random.default_rng(0)
    got = predictor(rng.integers(0, 256, (5, 80, 80, 3), np.uint8),
                    audio=rng.uniform(-100, 0, (5, 101, 64)).astype(np.float32))
    fused = (weights["audio"] * got["expr.audio"] + weights["visual"] * got["expr.visual"]) / \
        sum(weights.values())
    np.testing.assert_allclose(got["expr"], fused, rtol=1e-5)
