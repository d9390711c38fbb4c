"""The trainer end to end on the tiny DDAMFN: train, evaluate, checkpoint, resume, shard."""

import json

import cv2
import jax
import numpy as np
import pytest
from flax import nnx
from helpers import load_config, parts, tiny_config

from abaw_jax import (
    checkpoint,
    config_lib,
    evaluate,
    inference,
    parallel,
    predict,
    submission,
    trainers,
)
from abaw_jax import state as state_lib
from abaw_jax.data import affwild2, augment, cache, prepare, records
from abaw_jax.trainers import loop, supervised


def test_train_checkpoint_resume_and_eval(tiny_records, tmp_path, caplog):
    workdir = tmp_path / "run"
    with caplog.at_level("INFO"):
        metrics = trainers.train_and_evaluate(tiny_config(tiny_records), workdir)
    # The console says that `loss` is weighted and its logged parts are not.
    assert "each `loss_<part>` is logged unweighted (weights other than 1: {'head': 0.1})" in (
        caplog.text)
    assert set(metrics) >= {"va/ccc_valence", "va/ccc_arousal", "va/ccc_mean", "score"}
    assert metrics["va/frames"] == len(records.RecordSource(tiny_records, "validation"))
    ckpt = checkpoint.Checkpoints(workdir / "checkpoints", read_only=True)
    assert ckpt.steps() == [2, 4] and ckpt.metrics(4)["score"] == pytest.approx(metrics["score"])
    ckpt.close()
    assert list(workdir.glob("events.out.tfevents.*"))  # TensorBoard
    # The parameter table is a file (it was 156 of the console's 233 lines for DDAMFN).
    assert "Total:" in (workdir / "parameters.txt").read_text()
    # A longer run on the same workdir resumes at step 4 and continues to 6.
    more = trainers.train_and_evaluate(tiny_config(tiny_records, total_steps=6), workdir)
    ckpt = checkpoint.Checkpoints(workdir / "checkpoints", read_only=True)
    assert 6 in ckpt.steps() and more["va/frames"] == metrics["va/frames"]
    ckpt.close()
    # --mode=eval: restores, writes metrics.json, ABAW per-video files and the VA plot.
    result = evaluate.run(tiny_config(tiny_records, total_steps=6), workdir, "latest")
    out = workdir / "eval" / "validation-step6"
    assert json.loads((out / "metrics.json").read_text())["score"] == pytest.approx(
        result["score"])
    files = sorted((out / "predictions" / "va").glob("*.txt"))
    lengths = records.read_video_frames(tiny_records, "validation")
    assert len(files) == len(lengths)
    for f in files:
        lines = f.read_text().splitlines()
        assert lines[0] == "image_location,valence,arousal"
        assert len(lines) == 1 + lengths[f.stem]  # every frame, crops or not
    assert (out / "va_over_time.png").stat().st_size > 10_000
    # Another task's config on this workdir is refused, naming both tasks.
    with pytest.raises(ValueError, match="holds a run of task 'va', this config is task 'au'"):
        evaluate.run(tiny_config(tiny_records, task="au"), workdir, "latest")
    # inference.load gives the same outputs from raw crops of any size.
    predict = inference.load(workdir, "latest")
    source = records.RecordSource(tiny_records, "validation")
    examples = [source[i] for i in (0, 5, 9)]
    faces = np.stack([cv2.resize(augment.decode(ex["image"]), (100, 100)) for ex in examples])
    got = predict(faces, embedding=True)
    assert got["va"].shape == (3, 2) and got["feature_map"].shape[:3] == (3, 7, 7)
    assert got["embedding"].shape == (3, 128)
    full = predict(np.stack([augment.resize(augment.decode(ex["image"]), 112)
                             for ex in examples]))
    for ex, va in zip(examples, full["va"], strict=True):
        line = (out / "predictions_raw/va" / f"{ex['video']}.txt").read_text().splitlines()[
            int(ex["frame"])]
        np.testing.assert_allclose([float(x) for x in line.split(",")[1:]], va, atol=2e-4)


def _steps(config, mesh, batches):
    setup = state_lib.make_setup(config, mesh)
    state = state_lib.init_state(config, setup)
    step = supervised.train_step(config, setup, state_lib.state_sharding(setup, state))
    for b in batches:
        state, _ = step(state, parallel.to_global(b, mesh))
    return jax.device_get(state.params)


def test_one_device_and_eight_devices_agree(tiny_records):
    assert jax.device_count() == 8, "conftest asks XLA for 8 CPU devices"
    # SGD: its update is linear in the gradient (Adam divides by sqrt(v) and turns the float
    # summation-order noise of near-zero gradients into full-size steps), and no head-diversity
    # loss (its 1 / MSE of nearly equal fresh heads amplifies that noise ~10x per step). Two
    # steps: the noise still grows with each (test_distributed's figures); after a third the
    # largest difference was 2.4e-5 once the initial values moved by one float32 ulp.
    config = tiny_config(tiny_records, **{"optim.name": "sgd", "optim.lr": 0.01,
                                          "optim.warmup_steps": 0, "loss.head_weight": 0.0})
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 255, (8, 112, 112, 3), dtype=np.uint8),
                "va": rng.uniform(-1, 1, (8, 2)).astype(np.float32),
                "expr": np.zeros(8, np.int32), "au": np.zeros((8, 12), np.int32),
                "va_mask": np.ones(8, bool), "expr_mask": np.zeros(8, bool),
                "au_mask": np.zeros(8, bool)} for _ in range(2)]
    one = _steps(config, parallel.make_mesh(jax.devices()[:1]), batches)
    eight = _steps(config, parallel.make_mesh(), batches)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_records, tmp_path,
                                                           monkeypatch):
    task = state_lib.tasks.get("va")
    original = task.loss

    def poisoned(out, batch, opts):
        loss, parts = original(out, batch, opts)
        return loss + jax.numpy.where(batch["index"][0] >= 0, np.nan, 0.0), parts

    workdir = tmp_path / "nan"
    trainers.train_and_evaluate(tiny_config(tiny_records, total_steps=2), workdir)
    monkeypatch.setattr(type(task), "loss", lambda self, *a: poisoned(*a))
    with pytest.raises(loop.NonFiniteLossError, match=r"loss is nan at step 4.*step 2"):
        trainers.train_and_evaluate(tiny_config(tiny_records), workdir)
    ckpt = checkpoint.Checkpoints(workdir / "checkpoints", read_only=True)
    assert ckpt.steps() == [2]
    ckpt.close()


def test_bfloat16_compute_keeps_float32_state(tiny_records):
    config = tiny_config(tiny_records, compute_dtype="bfloat16", **{"optim.warmup_steps": 0})
    rng = np.random.default_rng(1)
    batch = {"image": rng.integers(0, 255, (8, 112, 112, 3), dtype=np.uint8),
             "va": rng.uniform(-1, 1, (8, 2)).astype(np.float32), "expr": np.zeros(8, np.int32),
             "au": np.zeros((8, 12), np.int32), "va_mask": np.ones(8, bool),
             "expr_mask": np.zeros(8, bool), "au_mask": np.zeros(8, bool)}
    mesh = parallel.make_mesh()
    setup = state_lib.make_setup(config, mesh)
    state = state_lib.init_state(config, setup)
    before = jax.device_get(state.params)
    step = supervised.train_step(config, setup, state_lib.state_sharding(setup, state))
    state, stats = step(state, parallel.to_global(batch, mesh))
    assert np.isfinite(float(stats["loss"]))
    for leaf in jax.tree.leaves((state.params, state.rest)):
        assert leaf.dtype == np.float32
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(before),
                                                  jax.tree.leaves(state.params), strict=True)]
    assert max(moved) > 0


def test_balanced_loss_weights_from_the_train_split_counts(tmp_path):
    stats = {"splits": {"train": {"histogram": {
        "expr": dict(zip("ABCDEFGH", [40, 10, 10, 10, 10, 10, 5, 5], strict=True)),
        "au_positive": {f"AU{i}": 10 * (i + 1) for i in range(12)}, "au_frames": 200}}}}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    config = config_lib.experiment("mtl")
    config.loss.balance = True
    opts = supervised.loss_options(config, tmp_path)
    np.testing.assert_allclose(opts["class_weights"][:2], [100 / (8 * 40), 100 / (8 * 10)])
    np.testing.assert_allclose(opts["pos_weight"][:2], [190 / 10, 180 / 20])
    config.loss.pos_weight = [1.0] * 12  # given weights win
    assert supervised.loss_options(config, tmp_path)["pos_weight"] == [1.0] * 12


def test_predict_writes_checked_submissions_for_the_test_list(tiny_tree, tmp_path, monkeypatch):
    monkeypatch.setenv("ABAW_JAX_CACHE", str(tmp_path / "cache"))
    root, manifest = tiny_tree
    config = tiny_config(None, task="au", total_steps=2, **{"data.records": None,
                                                             "data.root": str(root)})
    workdir = tmp_path / "au"
    trainers.train_and_evaluate(config, workdir)
    out = predict.run(config, workdir)
    data = cache.records_for(config.data, "au", test=True)
    lengths = records.read_video_frames(data, "test")
    assert sorted(lengths) == sorted(manifest["test"]["au"])
    assert submission.check(out / "au", "au", lengths) == []
    for video, n in lengths.items():  # every frame of every test video, crop or not
        assert len((out / "au" / f"{video}.txt").read_text().splitlines()) == 1 + n
    # The stored post-processing (thresholds searched after smoothing) is what predict applied.
    ckpt = checkpoint.Checkpoints(workdir / "checkpoints", read_only=True)
    stored = ckpt.metrics(ckpt.resolve("best"))
    ckpt.close()
    assert len(stored["post/au/thresholds"]) == 12 and "post/au/method" in stored
    # An ensemble of the run with itself gives the same files; another task's run is refused.
    config.predict.ensemble = (str(workdir),)
    ensemble = predict.run(config, workdir)
    for f in (out / "au").glob("*.txt"):
        assert (ensemble / "au" / f.name).read_text() == f.read_text()
    other = tmp_path / "va"
    other.mkdir()
    (other / "config.json").write_text(tiny_config(None, task="va").to_json())
    config.predict.ensemble = (str(other),)
    with pytest.raises(ValueError, match="a checkpoint of task 'va', not 'au'"):
        predict.run(config, workdir)


def test_multitask_two_stage_run_reports_p_and_holds_the_backbone_in_stage_1(tiny_tree,
                                                                            tmp_path):
    root, _ = tiny_tree
    records = tmp_path / "mtl"
    prepare.prepare(affwild2.Layout.discover(root), "mtl", records, workers=1, progress=False)
    config = load_config("mtl.py")
    config.data.records = str(records)
    config.total_steps, config.batch_size, config.eval_batch_size = 2, 8, 16
    config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
    config.optim.groups.backbone.start_step = 3  # the run ends inside stage 1
    setup = state_lib.make_setup(config, parallel.make_mesh())
    before = jax.device_get(state_lib.init_state(config, setup).params)
    metrics = trainers.train_and_evaluate(config, tmp_path / "run")
    assert metrics["p_score"] == pytest.approx(
        metrics["va/ccc_mean"] + metrics["expr/f1_macro"] + metrics["au/f1_mean_at_0.5"])
    after = state_lib.restore_run(config, tmp_path / "run", 2).state.params
    before, after = nnx.to_pure_dict(before), nnx.to_pure_dict(jax.device_get(after))
    for a, b in zip(jax.tree.leaves(before["features"]), jax.tree.leaves(after["features"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)  # stage 1: the backbone is frozen
    assert not np.allclose(before["tasks"]["au"]["kernel"], after["tasks"]["au"]["kernel"])


def test_frozen_parameters_get_no_gradient_and_no_optimizer_state(tiny_records):
    # AdamW's weight decay moves every parameter it holds, gradient or not: frozen ones must
    # not be among them.
    config = tiny_config(tiny_records, **{"optim.name": "adamw", "optim.weight_decay": 0.05,
                                          "optim.freeze": ("^features/",),
                                          "optim.warmup_steps": 0})
    mesh = parallel.make_mesh(jax.devices()[:1])
    setup = state_lib.make_setup(config, mesh)
    state = state_lib.init_state(config, setup)
    before = jax.device_get(state)
    step = supervised.train_step(config, setup, state_lib.state_sharding(setup, state))
    rng = np.random.default_rng(0)
    batch = parallel.to_global({
        "image": rng.integers(0, 255, (8, 112, 112, 3), dtype=np.uint8),
        "va": rng.uniform(-1, 1, (8, 2)).astype(np.float32), "va_mask": np.ones(8, bool)}, mesh)
    for _ in range(2):
        state, _ = step(state, batch)
    trained, frozen = parts(setup, jax.device_get(state.params))
    assert set(frozen) == {"features"} and "features" not in trained
    for a, b in zip(jax.tree.leaves(parts(setup, before.params)[1]), jax.tree.leaves(frozen),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    n_trained = sum(np.size(x) for x in jax.tree.leaves(trained))
    assert sum(np.size(x) for x in jax.tree.leaves(state.opt_state)) <= 2 * n_trained + 8
    assert not np.allclose(trained["gdconv"]["conv"]["kernel"],
                           parts(setup, before.params)[0]["gdconv"]["conv"]["kernel"])
