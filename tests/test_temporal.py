"""DDAMFN+LSTM: clips in, per-frame outputs; overlapping windows averaged back onto frames."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from abaw_jax import evaluate, extract, inference, models, parallel, train
from abaw_jax.data import pipeline, records

sys.path.insert(0, str(Path(__file__).parents[1] / "configs"))
import common  # noqa: E402


def _pixel_means(params, rest, images):
    """A stand-in model: each frame's output depends on that frame's pixels only."""
    x = images.astype(jnp.float32)
    return {"va": jnp.stack([x.mean((-3, -2, -1)), x[..., 0].mean((-2, -1))], -1) / 255}


def test_windows_average_back_onto_every_frame_exactly(tiny_records):
    mesh = parallel.make_mesh()
    step = jax.jit(_pixel_means)
    args = dict(batch_size=8, image_size=32, mesh=mesh, loader=pipeline.Loader())
    frames = evaluate.predict_split(step, None, None, tiny_records, "validation", **args)
    clips = evaluate.predict_split(step, None, None, tiny_records, "validation", **args,
                                   clip_length=8, clip_stride=3)
    # Each frame appears in 1-3 windows; averaging identical per-frame outputs must give the
    # frame's own output, at its own record index (predict_split also checks coverage).
    np.testing.assert_allclose(clips["preds"]["va"], frames["preds"]["va"], rtol=1e-6)
    for k in ("va", "va_mask"):
        np.testing.assert_array_equal(clips["labels"][k], frames["labels"][k])


def test_lstm_model_takes_frames_or_cached_embeddings():
    model = models.build("ddamfn_tiny_lstm", outputs={"au": 12}, hidden=16, layers=2,
                         bidirectional=True, rngs=nnx.Rngs(0))
    model.eval()
    clips = jax.random.normal(jax.random.key(0), (2, 3, 112, 112, 3))
    out = nnx.jit(lambda m, x: m(x))(model, clips)  # jitted: eager NNX runs op by op
    assert out["au"].shape == (2, 3, 12) and out["embedding"].shape == (2, 3, 128)
    cached = nnx.jit(lambda m, x: m(x, features=True))(model, out["embedding"])
    np.testing.assert_allclose(cached["au"], out["au"], atol=1e-6)


def _lstm_config(tiny_records, **overrides):
    c = common.temporal("va")
    c.data.records = str(tiny_records)
    c.total_steps, c.batch_size, c.eval_batch_size = 2, 8, 8
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 2
    c.model.hidden = 16
    c.update_from_flattened_dict(overrides)
    return c


def _restore(config, workdir):
    restored = train.restore_run(config, workdir, "latest")
    return restored.setup, restored.state


def test_lstm_trains_end_to_end_and_from_its_feature_cache(tiny_records, tmp_path):
    n = len(records.RecordSource(tiny_records, "validation"))
    config = _lstm_config(tiny_records)
    metrics = train.train_and_evaluate(config, tmp_path / "e2e")
    assert metrics["va/frames"] == n and np.isfinite(metrics["va/ccc_mean"])
    # --mode=extract: the run's backbone over every split, in record order.
    out = extract.run(config, tmp_path / "e2e")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"] == {"train": len(records.RecordSource(tiny_records, "train")),
                              "validation": n}
    # Same weights: the cached path gives the end-to-end outputs.
    setup, state = _restore(config, tmp_path / "e2e")
    args = dict(batch_size=8, image_size=112, mesh=setup.mesh, loader=pipeline.Loader(),
                clip_length=8, clip_stride=4)
    e2e = evaluate.predict_split(train.make_predict_step(setup), state.params, state.rest,
                                 tiny_records, "validation", **args)
    cached = evaluate.predict_split(train.make_predict_step(setup, features=True), state.params,
                                    state.rest, tiny_records, "validation", **args,
                                    features_dir=out)
    np.testing.assert_allclose(cached["preds"]["va"], e2e["preds"]["va"], atol=1e-5)
    np.testing.assert_array_equal(cached["labels"]["va_mask"], e2e["labels"]["va_mask"])
    # inference.load takes a run's frames as one clip.
    faces = np.random.default_rng(0).integers(0, 255, (5, 90, 90, 3), np.uint8)
    got = inference.load(tmp_path / "e2e", "latest")(faces, features=True)
    assert got["va"].shape == (5, 2) and got["embedding"].shape == (5, 128)
    # A head trained from the cache starts from (and keeps) the extracting backbone.
    head = _lstm_config(tiny_records, **{"data.features": str(out)})
    metrics = train.train_and_evaluate(head, tmp_path / "head")
    assert metrics["va/frames"] == n
    _, trained = _restore(head, tmp_path / "head")
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(trained.params)["backbone"]),
                    jax.tree.leaves(nnx.to_pure_dict(state.params)["backbone"]), strict=True):
        np.testing.assert_array_equal(a, b)
