"""The ABAW-8 CLIP systems: the `clip` family (frozen pretrained tower, prompt head, contrastive
loss) trained end to end and from its feature cache, CLIP+LSTM, and inference from a converted
folder; the default random-tower run learns the synthetic expressions."""

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import load_config, parts

from abaw_jax import extract, inference, trainers
from abaw_jax import state as state_lib
from abaw_jax.convert import clip as conv
from abaw_jax.data import affwild2, prepare, records
from abaw_jax.models import clip


@pytest.fixture(scope="module")
def expr_records(tiny_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("records") / "expr"
    prepare.prepare(affwild2.Layout.discover(tiny_tree[0]), "expr", out, num_shards=2,
                    workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted tiny random CLIP (as `python -m abaw_jax.convert clip` writes one)."""
    return conv.build_random(tmp_path_factory.mktemp("clip") / "tiny", "tiny", seed=3)


def _config(path, records_dir, **overrides):
    config = load_config(path)
    config.data.records = records_dir and str(records_dir)
    config.update_from_flattened_dict({"eval_every_steps": 1000, "log_every_steps": 50,
                                       "checkpoint_every_steps": 1000, **overrides})
    return config


def test_default_runs_learn_the_synthetic_expressions(tmp_path, monkeypatch, one_device):
    """CLIP+FC's default run, then CLIP+LSTM over that tower frozen: its embeddings extracted
    (`--mode=extract`) as the paper's LSTM reads a pretrained tower's."""
    # A random tower, trained with the head (frozen, its features carry nothing: F1 ~0.1). The
    # tiny tree's train and validation share one class only: a small synthetic set instead.
    monkeypatch.setenv("ABAW_JAX_CACHE", str(tmp_path / "cache"))
    synthetic = {"data.records": None,
                 "data.synthetic": {"num_videos": 16, "frames_per_video": 150, "seed": 0}}
    config = _config("clip/expr.py", None, total_steps=600, **synthetic)
    assert config.model.clip is None and config.loss.expr == "contrastive"
    metrics = trainers.train_and_evaluate(config, tmp_path / "fc")
    baseline = metrics["expr/constant_baseline"]
    assert metrics["expr/f1_macro"] > max(2.5 * baseline, baseline + 0.1), metrics
    cached = extract.run(config, tmp_path / "fc")
    # End to end, the random tower learns slowly through the LSTM (F1 0.097 against 0.052 after
    # 1,000 steps, 100 s); over the trained tower's embeddings 300 steps take 16 s.
    lstm = _config("clip/expr_lstm.py", None, total_steps=300, **synthetic,
                   **{"data.features": str(cached)})
    metrics = trainers.train_and_evaluate(lstm, tmp_path / "lstm")
    assert metrics["expr/f1_macro"] > max(2.5 * baseline, baseline + 0.1), metrics


def test_pretrained_tower_and_prompts_load_stay_frozen_and_extract(expr_records, converted,
                                                                    tmp_path):
    config = load_config("clip/expr.py", f"weights={converted}")
    assert config.init_from == str(converted) and config.model.clip.projection_dim == 16
    config = _config("clip/expr.py", expr_records, total_steps=3, batch_size=8,
                     eval_batch_size=16, **{"model.clip": config.model.clip.to_dict(),
                                            "init_from": str(converted)})
    trainers.train_and_evaluate(config, tmp_path / "run")
    run = state_lib.restore_run(config, tmp_path / "run", "latest")
    trained, frozen = parts(run.setup, run.state.params)
    assert set(frozen) == {"clip"} and "clip" not in trained  # no gradient, no optimizer state
    model = run.setup.model(run.state)
    _, embeds = clip.load_prompts(converted)
    np.testing.assert_array_equal(np.asarray(model.prompts[...]), embeds)
    fresh = clip.CLIPExpr(outputs={"expr": 8}, rngs=nnx.Rngs(0), **clip.model_kwargs(converted))
    clip.load_weights(fresh, converted)
    for a, b in zip(jax.tree.leaves(nnx.state(model.clip)), jax.tree.leaves(nnx.state(fresh.clip)),
                    strict=True):
        np.testing.assert_array_equal(a, b)  # the tower is the converted one, untouched

    # --mode=extract from the converted weights, then the head trains on the cache.
    out = extract.run(config, tmp_path / "frames")
    cached = _config("clip/expr.py", expr_records, total_steps=3, batch_size=8,
                     eval_batch_size=16, **{"model.clip": config.model.clip.to_dict(),
                                            "init_from": str(converted),
                                            "data.features": str(out)})
    metrics = trainers.train_and_evaluate(cached, tmp_path / "cached")
    assert metrics["expr/frames"] == len(records.RecordSource(expr_records, "validation"))

    # inference from the converted folder: EXPR probabilities from the prompt similarities and
    # the projected image embedding; from the workdir the same tower gives the same embedding.
    faces = np.random.default_rng(0).integers(0, 255, (4, 70, 70, 3), np.uint8)
    got = inference.load(converted)(faces)
    assert sorted(got) == ["expr", "image_embeds"]
    assert got["expr"].shape == (4, 8) and np.allclose(got["expr"].sum(1), 1, atol=1e-5)
    assert got["image_embeds"].shape == (4, 16)
    run_out = inference.load(tmp_path / "run", "latest")(faces)
    np.testing.assert_allclose(run_out["image_embeds"], got["image_embeds"], atol=1e-5)


def test_clip_lstm_trains_on_clips(expr_records, tmp_path):
    config = _config("clip/expr_lstm.py", expr_records, total_steps=2, **{"model.hidden": 16})
    assert config.model.backbone == "clip" and config.data.clip_length == 16
    metrics = trainers.train_and_evaluate(config, tmp_path / "run")
    assert metrics["expr/frames"] == len(records.RecordSource(expr_records, "validation"))


@pytest.mark.parametrize("learn", [False, True])
def test_similarities_over_the_temperature_which_trains_only_when_asked(learn):
    model = clip.CLIPExpr(outputs={"expr": 8}, rngs=nnx.Rngs(0), temperature=0.07,
                          learn_temperature=learn)
    features = jax.random.normal(jax.random.key(1), (3, model.embed_dim))
    out = model({"features": features})
    z = model.fc2(jax.nn.relu(model.fc1(features)))
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    prompts = model.prompts[...] / np.linalg.norm(model.prompts[...], axis=-1, keepdims=True)
    np.testing.assert_allclose(out["expr"], z @ prompts.T / 0.07, rtol=1e-5, atol=1e-5)
    assert isinstance(model.log_scale, nnx.Param) == learn  # else a constant, not trained
    assert not isinstance(model.prompts, nnx.Param)  # the prompts are never trained


def test_with_weights_the_head_trains_on_embeddings_extracted_once(expr_records, converted,
                                                                   tmp_path, monkeypatch,
                                                                   caplog):
    monkeypatch.setenv("ABAW_JAX_CACHE", str(tmp_path / "cache"))
    config = load_config("clip/expr.py", f"weights={converted}")
    assert config.data.features == "auto"
    config.data.records = str(expr_records)
    config.update_from_flattened_dict({"total_steps": 2, "batch_size": 8, "eval_batch_size": 16})
    with caplog.at_level("INFO"):
        trainers.train_and_evaluate(config, tmp_path / "first")
    assert caplog.text.count("extracting the frame embeddings") == 1
    (found,) = (tmp_path / "cache").glob("features-*/features")
    saved = state_lib.read_config(tmp_path / "first")
    assert saved.data.features == str(found)  # the workdir names the folder it trained on
    stamp = (found / "meta.json").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO"):  # another run of the same weights and data reuses it
        metrics = trainers.train_and_evaluate(config, tmp_path / "second")
    assert "extracting the frame embeddings" not in caplog.text
    assert (found / "meta.json").stat().st_mtime_ns == stamp
    assert metrics["expr/frames"] == len(records.RecordSource(expr_records, "validation"))
