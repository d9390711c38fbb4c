"""The family seam: a toy family defined here (two named inputs, image and a per-frame vector;
its own extra loss; a frozen sub-module; a registry entry; a config) goes through every public
entry point, train -> eval -> predict -> extract -> inference.load, with no change to the
trainer, evaluation, prediction, extraction or inference code."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import fake_feature_cache, optimizer_values, parts, tiny_config

from abaw_jax import (
    evaluate,
    extract,
    inference,
    models,
    parallel,
    predict,
    submission,
    trainers,
)
from abaw_jax import state as state_lib
from abaw_jax.data import augment, cache, features, records
from abaw_jax.trainers import supervised


class Toy(nnx.Module):
    """A strided conv over the image (frozen by its family), a projection of the per-frame
    vector, task layers on both; its own loss: the embedding's mean square."""

    inputs = ("image", "features")

    def __init__(self, outputs, *, feature_dim: int, width: int = 8, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, width, (4, 4), strides=(4, 4), rngs=rngs)
        self.proj = nnx.Linear(feature_dim, width, rngs=rngs)
        self.outputs = dict(outputs)
        self.tasks = nnx.Dict({k: nnx.Linear(2 * width, n, rngs=rngs)
                               for k, n in outputs.items()})

    def __call__(self, inputs, rngs=None):
        embedding = jnp.concatenate([toy_embed(self, inputs), self.proj(inputs["features"])], -1)
        return {"embedding": embedding, "losses": {"toy": jnp.mean(embedding ** 2)},
                **{k: self.tasks[k](embedding) for k in self.outputs}}


def toy_embed(model, inputs):
    return model.stem(inputs["image"]).mean((1, 2))


TOY = models.Family("toy", Toy, preprocess=models.Preprocess(32, (0.5,) * 3, (0.5,) * 3),
                    embed=toy_embed, frozen=("^stem/",))


@pytest.fixture
def toy_run(tiny_tree, tmp_path, monkeypatch):
    """(config, workdir) of a toy run on the tiny tree, its vectors from a feature cache."""
    monkeypatch.setenv("ABAW_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.FAMILIES, "toy", TOY)  # registered for this test only
    config = tiny_config(None, **{"data.root": str(tiny_tree[0]), "loss.toy_weight": 0.5})
    config.model = {"name": "toy", "width": 8}
    data = cache.records_for(config.data, "va")
    splits = {"train": data, "validation": data,
              "test": cache.records_for(config.data, "va", test=True)}
    config.data.features = str(fake_feature_cache(tmp_path / "vectors", splits, 5, 0))
    return config, tmp_path / "toy"


def test_a_family_defined_in_a_test_runs_every_entry_point(toy_run):
    config, workdir = toy_run
    setup = state_lib.make_setup(config, parallel.make_mesh())
    assert setup.inputs == ("image", "features") and setup.frozen == ("^stem/",)
    before = state_lib.init_state(config, setup)
    metrics = trainers.train_and_evaluate(config, workdir)
    assert np.isfinite(metrics["va/ccc_mean"]) and metrics["va/frames"] > 0
    trained, frozen = parts(setup, state_lib.restore_run(config, workdir, "latest").state.params)
    # The frozen sub-module: no gradient, no optimizer state, bit-identical.
    assert "stem" not in trained and set(frozen) == {"stem"}
    for a, b in zip(jax.tree.leaves(parts(setup, before.params)[1]), jax.tree.leaves(frozen),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(parts(setup, before.params)[0]["proj"]["kernel"],
                           trained["proj"]["kernel"])
    n_trained = sum(np.size(x) for x in jax.tree.leaves(trained))
    assert optimizer_values(config, workdir, setup) <= 2 * n_trained + 8
    # --mode=eval, --mode=predict (checked submission files), --mode=extract.
    result = evaluate.run(config, workdir, "latest")
    out = workdir / "eval" / "validation-step4"
    assert json.loads((out / "metrics.json").read_text())["score"] == result["score"]
    sub = predict.run(config, workdir, "latest")
    test_records = cache.records_for(config.data, "va", test=True)
    lengths = records.read_video_frames(test_records, "test")
    assert submission.check(sub / "va", "va", lengths) == []
    cached = extract.run(config, workdir)
    assert json.loads((cached / "meta.json").read_text())["dim"] == 8
    # inference.load: images and vectors by name, the run's own preprocessing; the same
    # outputs as the evaluation's raw prediction files.
    predictor = inference.load(workdir, "latest")
    data = cache.records_for(config.data, "va")
    source = records.RecordSource(data, "validation")
    vectors = features.FeatureSource(config.data.features, "validation")
    rows = (0, 5, 9)
    faces = np.stack([augment.decode(source[i]["image"]) for i in rows])
    got = predictor(faces, features=np.stack([vectors.embeddings(i) for i in rows]))
    for i, va in zip(rows, got["va"], strict=True):
        ex = source[i]
        line = (out / "predictions_raw/va" / f"{ex['video']}.txt").read_text().splitlines()[
            int(ex["frame"])]
        np.testing.assert_allclose([float(x) for x in line.split(",")[1:]], va, atol=2e-4)
    with pytest.raises(ValueError, match=r"also takes \['features'\]"):
        predictor(faces)


def test_a_model_loss_is_added_with_its_weight_from_its_start_step(toy_run):
    config, _ = toy_run
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    batch = parallel.to_global({
        "image": rng.integers(0, 255, (8, 32, 32, 3), np.uint8),
        "features": rng.normal(size=(8, 5)).astype(np.float32),
        "va": rng.uniform(-1, 1, (8, 2)).astype(np.float32), "va_mask": np.ones(8, bool),
        "index": np.arange(8, dtype=np.int32)}, mesh)
    losses = {}
    for weight, start in ((0.5, 0), (0.5, 1), (0.0, 0)):
        config.loss.toy_weight, config.loss.toy_start_step = weight, start
        setup = state_lib.make_setup(config, mesh)
        state = state_lib.init_state(config, setup)
        step = supervised.train_step(config, setup, state_lib.state_sharding(setup, state))
        _, stats = step(state, batch)
        losses[weight, start] = {k: float(v) for k, v in stats.items()}
    on, later, off = losses[0.5, 0], losses[0.5, 1], losses[0.0, 0]
    assert on["loss"] == pytest.approx(on["loss_va"] + 0.5 * on["loss_toy"], rel=1e-6)
    assert later["loss"] == pytest.approx(later["loss_va"], rel=1e-6)  # from step 1 on
    assert "loss_toy" not in off and off["loss"] == pytest.approx(off["loss_va"], rel=1e-6)


def test_wrong_inputs_for_a_family_are_named(toy_run):
    config, _ = toy_run
    config.data.features = None
    config.model = {"name": "transformer", "layers": 1}
    config.data.clip_length = 4
    with pytest.raises(ValueError, match="without a backbone trains on cached features"):
        state_lib.make_setup(config, parallel.make_mesh())
    config.model = {"name": "ddamfn_tiny", "num_head": 2}
    config.data.clip_length = 4
    with pytest.raises(ValueError, match="'ddamfn_tiny' takes frames: unset data.clip_length"):
        state_lib.make_setup(config, parallel.make_mesh())
    config.optim.freeze = (".",)
    config.data.clip_length = 0
    with pytest.raises(ValueError, match="every parameter of 'ddamfn_tiny' is frozen"):
        state_lib.make_setup(config, parallel.make_mesh())
