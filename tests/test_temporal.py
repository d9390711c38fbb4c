"""Temporal heads (LSTM, transformer) over clips and the feature cache: clips in, per-frame
outputs; overlapping windows averaged back onto frames; heads trained from cached embeddings
of one or several caches; short videos padded."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from helpers import fake_feature_cache, optimizer_values, parts, tiny_config

from abaw_jax import extract, inference, models, parallel, trainers
from abaw_jax import state as state_lib
from abaw_jax.data import pipeline, records
from abaw_jax.evaluators import split


def _pixel_means(batch):
    """A stand-in model: each frame's output depends on that frame's pixels only."""
    x = batch["image"].astype(jnp.float32)
    return {"va": jnp.stack([x.mean((-3, -2, -1)), x[..., 0].mean((-2, -1))], -1) / 255}


def test_windows_average_back_onto_every_frame_exactly(tiny_records):
    mesh = parallel.make_mesh()
    step = jax.jit(_pixel_means)
    args = dict(batch_size=8, size=32, mesh=mesh, loader=pipeline.Loader())
    frames = split.predict_split(step, tiny_records, "validation", **args)
    clips = split.predict_split(step, tiny_records, "validation", **args, length=8, stride=3)
    # Each frame appears in 1-3 windows; averaging identical per-frame outputs must give the
    # frame's own output, at its own record index (predict_split also checks coverage).
    np.testing.assert_allclose(clips["preds"]["va"], frames["preds"]["va"], rtol=1e-6)
    for k in ("va", "va_mask"):
        np.testing.assert_array_equal(clips["labels"][k], frames["labels"][k])
    # Clips longer than every video: one padded clip per video, every frame still covered.
    longest = max(np.bincount(records.read_frame_index(tiny_records, "validation")[1]))
    long = split.predict_split(step, tiny_records, "validation", **args, length=longest + 50,
                               stride=4)
    np.testing.assert_allclose(long["preds"]["va"], frames["preds"]["va"], rtol=1e-6)


def test_short_videos_are_one_padded_clip():
    video, frame = np.array([0, 0, 0, 1, 1]), np.array([1, 2, 4, 1, 2])
    clips = pipeline.clip_index(video, frame, length=6, stride=2)
    np.testing.assert_array_equal(clips, [[0, 1, -1, 2, -1, -1], [3, 4, -1, -1, -1, -1]])


def test_temporal_heads_take_frames_or_cached_embeddings():
    clips = jax.random.normal(jax.random.key(0), (2, 3, 112, 112, 3))
    for name, kwargs in (("lstm", dict(hidden=16, layers=2, bidirectional=True)),
                         ("transformer", dict(proj=(32, 16), layers=1, heads=2))):
        model = models.build(name, backbone="ddamfn_tiny", outputs={"au": 12},
                             rngs=nnx.Rngs(0), **kwargs)
        model.eval()
        inputs = {"image": clips, "frame_mask": jnp.ones((2, 3), bool)}
        out = nnx.jit(lambda m, x: m(x))(model, inputs)  # jitted: eager NNX runs op by op
        assert out["au"].shape == (2, 3, 12) and out["embedding"].shape == (2, 3, 128)
        assert set(out["losses"]) == {"head"}  # the backbone's own loss comes through
        cached = nnx.jit(lambda m, x: m(x))(model, {**inputs, "features": out["embedding"]})
        np.testing.assert_allclose(cached["au"], out["au"], atol=1e-5)


def test_transformer_ignores_padded_frames():
    model = models.build("transformer", outputs={"va": 2}, feature_dim=8, proj=(16,), layers=2,
                         heads=2, rngs=nnx.Rngs(0))
    model.eval()
    x = jax.random.normal(jax.random.key(1), (1, 5, 8))
    mask = jnp.array([[True, True, True, False, False]])
    noisy = x.at[:, 3:].set(100.0)
    a = model({"features": x, "frame_mask": mask})["va"]
    b = model({"features": noisy, "frame_mask": mask})["va"]
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-5)
    assert not np.allclose(model({"features": noisy})["va"][:, :3], a[:, :3], atol=1e-3)


def test_lstm_trains_end_to_end_and_from_its_feature_cache(tiny_records, tmp_path, one_device):
    n = len(records.RecordSource(tiny_records, "validation"))
    overrides = {"total_steps": 2, "eval_batch_size": 8, "eval_every_steps": 2,
                 "model.hidden": 16}
    config = tiny_config(tiny_records, temporal=True, **overrides)
    metrics = trainers.train_and_evaluate(config, tmp_path / "e2e")
    assert metrics["va/frames"] == n and np.isfinite(metrics["va/ccc_mean"])
    # --mode=extract: the run's backbone over every split, in record order.
    out = extract.run(config, tmp_path / "e2e")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"] == {"train": len(records.RecordSource(tiny_records, "train")),
                              "validation": n}
    assert meta["dim"] == 128
    # Same weights: the cached path gives the end-to-end outputs.
    run = state_lib.restore_run(config, tmp_path / "e2e", "latest")
    cached_config = tiny_config(tiny_records, temporal=True, **overrides,
                                **{"data.features": str(out)})
    cached_setup = state_lib.make_setup(cached_config, run.setup.mesh)
    assert cached_setup.inputs == ("features",) and cached_setup.frozen == ("^backbone/",)
    e2e = split.predict_run(state_lib.bind(state_lib.predict_fn(run.setup), run.state),
                            run.setup, tiny_records)
    cached = split.predict_run(state_lib.bind(state_lib.predict_fn(cached_setup), run.state),
                               cached_setup, tiny_records)
    np.testing.assert_allclose(cached["preds"]["va"], e2e["preds"]["va"], atol=1e-5)
    np.testing.assert_array_equal(cached["labels"]["va_mask"], e2e["labels"]["va_mask"])
    # inference.load takes a run's frames as one clip.
    faces = np.random.default_rng(0).integers(0, 255, (5, 90, 90, 3), np.uint8)
    got = inference.load(tmp_path / "e2e", "latest")(faces, embedding=True)
    assert got["va"].shape == (5, 2) and got["embedding"].shape == (5, 128)
    # A head trained from the cache (AdamW with weight decay) starts from, and keeps bit for
    # bit, the extracting backbone, which gets no optimizer state.
    cached_config.optim.name, cached_config.optim.weight_decay = "adamw", 0.05
    metrics = trainers.train_and_evaluate(cached_config, tmp_path / "head")
    assert metrics["va/frames"] == n
    head = state_lib.restore_run(cached_config, tmp_path / "head", "latest")
    trained, frozen = parts(head.setup, head.state.params)
    assert "backbone" not in trained and set(frozen) == {"backbone"}
    for a, b in zip(jax.tree.leaves(frozen["backbone"]),
                    jax.tree.leaves(nnx.to_pure_dict(run.state.params)["backbone"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    n_trained = sum(np.size(x) for x in jax.tree.leaves(trained))
    # Adam's two moments (and a count) of the trained layers only.
    assert optimizer_values(cached_config, tmp_path / "head", head.setup) <= 2 * n_trained + 8
    # Its checkpoint also works end to end: the config without the cache restores it, and
    # predicts from images what it predicts from the cache.
    e2e_head = state_lib.restore_run(config, tmp_path / "head", "latest")
    via_images, via_cache = (
        split.predict_run(state_lib.bind(state_lib.predict_fn(r.setup), r.state), r.setup,
                          tiny_records)["preds"]["va"] for r in (e2e_head, head))
    np.testing.assert_allclose(via_images, via_cache, atol=1e-5)
    backbone = nnx.to_pure_dict(run.state.params)["backbone"]
    # A frame model trains from the same cache: its task layer on the embeddings, its own
    # backbone (features, heads, GDConv) taken from the LSTM run that extracted them, frozen.
    frame = tiny_config(tiny_records, **{"total_steps": 2, "data.features": str(out)})
    assert trainers.train_and_evaluate(frame, tmp_path / "frame")["va/frames"] == n
    restored = state_lib.restore_run(frame, tmp_path / "frame", "latest")
    trained, frozen = parts(restored.setup, restored.state.params)
    assert set(trained) == {"tasks"}
    for a, b in zip(jax.tree.leaves(frozen),
                    jax.tree.leaves({k: backbone[k] for k in ("features", "gdconv", "heads")}),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    # A transformer head without a backbone over two caches joined per frame (e.g. visual and
    # audio embeddings).
    other = fake_feature_cache(tmp_path / "other", {"train": tiny_records,
                                                    "validation": tiny_records}, 6, 0)
    fusion = tiny_config(tiny_records, temporal=True, **{
        "total_steps": 2, "eval_batch_size": 8, "data.features": f"{out},{other}"})
    fusion.model = {"name": "transformer", "proj": (32, 16), "layers": 1, "heads": 2}
    setup = state_lib.make_setup(fusion, run.setup.mesh)
    assert setup.inputs == ("features", "frame_mask") and setup.frozen == ()
    assert nnx.to_pure_dict(state_lib.abstract_state(fusion, setup).params)["proj"][0][
        "kernel"].shape == (1, 134, 32)
    metrics = trainers.train_and_evaluate(fusion, tmp_path / "fusion")
    assert metrics["va/frames"] == n and np.isfinite(metrics["va/ccc_mean"])

