"""DDAMFN: parity with an independent PyTorch reference through the converter, converter errors,
depthwise conv implementations, and a jitted train step of the tiny variant.

NNX models are built abstractly (nnx.eval_shape) and filled from a conversion or with random
numbers: concrete initialisation costs one XLA compile per parameter shape (~20 s on 2 cores).
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import random_model
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from reference import ddamfn as ref_ddamfn

from abaw_jax import config_lib, convert, extract, models, parallel
from abaw_jax.convert import ddamfn as conv
from abaw_jax.data import records
from abaw_jax.models import ddamfn, layers

# The official checkpoint's state_dict keys and shapes.
KEYS_FILE = Path(__file__).parent / "reference/ddamfn_state_dict_keys.txt"
TOL = 1e-4  # max abs error relative to the reference's max abs value

# --- Fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official_keys():
    rows = [line.split("\t") for line in KEYS_FILE.read_text().splitlines()
            if line and not line.startswith("#")]
    return {k: tuple(int(d) for d in shape.strip("()").split(",") if d) for k, shape in rows}


@pytest.fixture(scope="module")
def ref_full():
    return ref_ddamfn.reference(ref_ddamfn.OFFICIAL_TABLE, seed=0)


@pytest.fixture(scope="module")
def ref_tiny():
    return ref_ddamfn.reference(ref_ddamfn.table(ddamfn.TINY_TRUNK), seed=1)


@pytest.fixture(scope="module")
def full_state_dict(ref_full):
    return {k: v.numpy() for k, v in ref_full.state_dict().items()}


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(2, 112, 112, 3)).astype(np.float32)


def _checkpoint(path, ref, wrap=True, prefix=""):
    sd = {prefix + k: v for k, v in ref.state_dict().items()}
    torch.save({"iter": 0, "model_state_dict": sd, "optimizer_state_dict": {}} if wrap else sd,
               path)
    return path


def _cli_convert(tmp_path_factory, ref, *flags):
    tmp = tmp_path_factory.mktemp("ddamfn")
    ckpt = _checkpoint(tmp / "ref.pth", ref)
    assert convert.main(["ddamfn", f"--checkpoint={ckpt}", f"--out={tmp / 'out'}", *flags]) == 0
    return tmp / "out"


@pytest.fixture(scope="module")
def converted_full(tmp_path_factory, ref_full):
    return _cli_convert(tmp_path_factory, ref_full, "--keep_fc")


@pytest.fixture(scope="module")
def converted_tiny(tmp_path_factory, ref_tiny):
    return _cli_convert(tmp_path_factory, ref_tiny, "--keep_fc", "--model=ddamfn_tiny")


def _abstract(name, **kwargs):
    return nnx.eval_shape(lambda: models.build(name, **kwargs))


def _loaded(name, directory, **kwargs):
    model = _abstract(name, **kwargs)
    convert.load_into(model, directory)
    return model


def _torch_outputs(ref, images):
    with torch.no_grad():
        logits, feats, heads, emb = ref(torch.from_numpy(images).permute(0, 3, 1, 2))
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    return {"logits": logits.numpy(), "feature_map": nhwc(feats), "embedding": emb.numpy(),
            "heads": [nhwc(h) for h in heads]}


def _assert_close(ours, ref, name):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, name
    err = np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err < TOL, f"{name}: relative max error {err:.2e}"


def _compare(model, ref, images):
    model.eval()
    out = nnx.jit(lambda m, x: m({"image": x}))(model, jnp.asarray(images))
    expected = _torch_outputs(ref, images)
    for name in ("logits", "feature_map", "embedding"):
        _assert_close(out[name], expected[name], name)
    assert len(out["heads"]) == len(expected["heads"])
    for i, (ours, theirs) in enumerate(zip(out["heads"], expected["heads"], strict=True)):
        _assert_close(ours, theirs, f"head {i}")


# --- Reference and parity ------------------------------------------------------------------------

def test_reference_matches_official_state_dict(official_keys, full_state_dict):
    assert {k: v.shape for k, v in full_state_dict.items()} == official_keys


@pytest.fixture(scope="module")
def full_model(converted_full):
    return _loaded("ddamfn", converted_full)


def test_full_model_matches_reference(full_model, ref_full, images):
    _compare(full_model, ref_full, images)


def test_tiny_model_matches_reference(converted_tiny, ref_tiny, images):
    _compare(_loaded("ddamfn_tiny", converted_tiny), ref_tiny, images)


def test_used_parameter_count(full_model):
    params = nnx.state(full_model, nnx.Param)
    assert 4.0e6 < sum(p.size for p in jax.tree.leaves(params)) < 4.2e6  # spec: about 4.1M


# --- Converter -----------------------------------------------------------------------------------

def test_cli_writes_state_and_meta(converted_full, capsys, tmp_path, ref_full):
    meta = json.loads((converted_full / "meta.json").read_text())
    assert meta["family"] == "ddamfn" and meta["model"] == "ddamfn"
    assert meta["model_kwargs"] == {"num_head": 2}
    assert meta["outputs"] == {"logits": 8} and meta["source"].endswith("ref.pth")
    assert "fc.weight" not in meta["unused_keys"]
    ckpt = _checkpoint(tmp_path / "ref.pth", ref_full)
    assert convert.main(["ddamfn", f"--checkpoint={ckpt}", f"--out={tmp_path / 'o'}"]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((tmp_path / "o/meta.json").read_text())
    assert meta["outputs"] == {} and "fc.weight" in meta["unused_keys"]
    # One line: the count, grouped by first name (it was a line per key, 335 for DDAMFN).
    unused_line = next(ln for ln in printed.splitlines() if ln.startswith("unused keys"))
    assert unused_line.startswith(f"unused keys: {len(meta['unused_keys'])}: ")
    assert "fc (" in unused_line and len(printed.splitlines()) == 2
    assert convert.main(["ddamfn", f"--checkpoint={ckpt}", f"--out={tmp_path / 'o'}"]) == 1


def test_unused_keys_are_the_never_applied_parts(full_state_dict):
    state, unused = conv.convert_state_dict(full_state_dict)
    assert len(jax.tree.leaves(state)) + len(unused) == len(full_state_dict)
    for key in ("fc.weight", "fc.bias", "bn.running_var", "features.2.conv_dw.bn.weight",
                "features.7.model.5.conv_dw.prelu.weight", "cat_head1.CoordAtt.Linear.conv.weight",
                "features.0.bn.num_batches_tracked"):
        assert key in unused
    assert all(k.startswith(("fc.", "bn.")) or ".conv_dw.bn." in k or ".conv_dw.prelu." in k
               or ".CoordAtt.Linear." in k or k.endswith("num_batches_tracked") for k in unused)


def test_missing_key_is_named(full_state_dict):
    sd = dict(full_state_dict)
    del sd["features.5.model.3.CA.conv2.bias"]
    with pytest.raises(KeyError, match=r"features\.5\.model\.3\.CA\.conv2\.bias"):
        conv.convert_state_dict(sd)


def test_misshaped_key_is_named(full_state_dict):
    sd = dict(full_state_dict, **{"cat_head1.CoordAtt.conv1.weight": np.zeros((8, 512, 1, 1))})
    with pytest.raises(ValueError, match=r"cat_head1\.CoordAtt\.conv1\.weight.*\(8, 512, 1, 1\)"
                                         r".*\(16, 512, 1, 1\)"):
        conv.convert_state_dict(sd)


def test_keys_of_another_architecture_are_an_error(full_state_dict):
    sd = dict(full_state_dict, **{"cat_head2.CoordAtt.conv1.bias": np.zeros(16)})
    with pytest.raises(ValueError, match=r"cat_head2\.CoordAtt\.conv1\.bias"):
        conv.convert_state_dict(sd, num_head=2)


@pytest.mark.parametrize("wrap,prefix", [(False, ""), (True, "module."), (False, "module.")])
def test_bare_and_dataparallel_checkpoints(tmp_path, ref_full, full_state_dict, wrap, prefix):
    sd = conv.read_checkpoint(_checkpoint(tmp_path / "x.pth", ref_full, wrap, prefix))
    state, unused = conv.convert_state_dict(sd, keep_fc=True)
    expected, _ = conv.convert_state_dict(full_state_dict, keep_fc=True)
    jax.tree.map(np.testing.assert_array_equal, state, expected)
    assert "bn.weight" in unused  # reported without the prefix


def test_load_into_keeps_new_task_layers(converted_tiny, ref_tiny):
    model = random_model("ddamfn_tiny", outputs={"va": 2, "expr": 8})
    va_before = np.asarray(model.tasks["va"].kernel[...])
    assert convert.load_into(model, converted_tiny) == []
    np.testing.assert_array_equal(model.tasks["va"].kernel[...], va_before)
    sd = ref_tiny.state_dict()
    np.testing.assert_array_equal(model.features[7].model[0].CA.conv1.bias[...],
                                  sd["features.7.model.0.CA.conv1.bias"].numpy())
    np.testing.assert_array_equal(model.heads[1].bn1.var[...],
                                  sd["cat_head1.CoordAtt.bn1.running_var"].numpy())


def test_extract_without_checkpoints_uses_init_from(converted_tiny, tiny_records, tmp_path):
    """--mode=extract on a workdir without checkpoints embeds with the converted weights of
    init_from, and says so; with neither it is an error naming the workdir."""
    config = config_lib.experiment("va")
    config.model.name, config.data.records = "ddamfn_tiny", str(tiny_records)
    config.eval_batch_size = 8
    with pytest.raises(FileNotFoundError, match="no checkpoint to extract"):
        extract.run(config, tmp_path / "none")
    config.init_from = str(converted_tiny)
    meta = json.loads((extract.run(config, tmp_path / "wd") / "meta.json").read_text())
    assert meta["source"] == {"init_from": str(converted_tiny.absolute())}
    assert meta["splits"] == {split: len(records.RecordSource(tiny_records, split))
                              for split in ("train", "validation")}


def test_load_into_mismatches_name_the_path(converted_tiny):
    narrow = dataclasses.replace(ddamfn.TINY_TRUNK, stem=8)
    with pytest.raises(ValueError, match=r"features\.0\.bn\.bias.*\(16,\).*\(8,\)"):
        convert.load_into(nnx.eval_shape(lambda: ddamfn.DDAMFN(trunk=narrow)), converted_tiny)
    with pytest.raises(ValueError, match=r"tasks\.logits\.(kernel|bias)"):
        convert.load_into(_abstract("ddamfn_tiny", outputs={"logits": 7}), converted_tiny)
    with pytest.raises(KeyError, match=r"heads\.1\."):
        convert.load_into(_abstract("ddamfn_tiny", num_head=1), converted_tiny)


def test_registry():
    assert {"ddamfn", "ddamfn_tiny", "lstm", "transformer"} <= set(models.FAMILIES)
    with pytest.raises(KeyError, match="ddamfn_tiny"):
        models.build("ddamfn_huge")
    with pytest.raises(ValueError, match="reserved"):
        _abstract("ddamfn_tiny", outputs={"embedding": 3})


# --- Depthwise conv ------------------------------------------------------------------------------

# (input shape, kernel (kh, kw), padding (ph, pw)): MixConv-style k // 2 padding, non-square
# kernels, and the heads' / GDConv's valid convs over a whole 7x7 map.
CASES = [((2, 13, 11, 5), (3, 3), (1, 1)), ((2, 12, 12, 4), (5, 5), (2, 2)),
         ((1, 14, 9, 3), (7, 7), (3, 3)), ((2, 9, 10, 3), (3, 5), (1, 2)),
         ((2, 7, 7, 6), (1, 7), (0, 0)), ((2, 7, 7, 6), (7, 7), (0, 0))]


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_shift_matches_xla(stride):
    rng = np.random.default_rng(stride)
    arrays = [(jnp.asarray(rng.normal(size=shape), jnp.float32),
               jnp.asarray(rng.normal(size=(*k, 1, shape[-1])), jnp.float32))
              for shape, k, _ in CASES]

    def run(impl):
        def loss(x, w, padding):
            y = layers.depthwise_conv(x, w, stride, padding, impl=impl)
            return jnp.sum(jnp.sin(y)), y

        return jax.jit(lambda arrays: [
            jax.value_and_grad(loss, (0, 1), has_aux=True)(x, w, padding)
            for (x, w), (_, _, padding) in zip(arrays, CASES, strict=True)])(arrays)

    for ((_, y_s), g_s), ((_, y_x), g_x) in zip(run("shift"), run("xla"), strict=True):
        np.testing.assert_allclose(y_s, y_x, atol=1e-5, rtol=1e-5)
        for a, b in zip(g_s, g_x, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_depthwise_kernel_grad_by_image_groups(monkeypatch):
    """The kernel gradient summed per group of images, then over the groups (as a large batch
    is on CPU), equals XLA's: the stride-1 (shifted gradient) and strided (input window)
    forms, and more taps than one reduction takes."""
    monkeypatch.setattr(layers, "_GROUP_BYTES", 6000)  # 2 images of the 3x3 case's operands
    assert layers._group_size(16, (9 * 7 + 11 * 9) * 4 * 4) == 2
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 8, 7, 4)), jnp.float32)
    for kernel, stride, padding in (((3, 3), 1, (1, 1)), ((7, 7), 1, (3, 3)),
                                    ((5, 5), 2, (2, 2))):
        w = jnp.asarray(rng.normal(size=(*kernel, 1, 4)), jnp.float32)

        def loss(w, impl, stride=stride, padding=padding):
            return jnp.sum(jnp.sin(layers.depthwise_conv(x, w, stride, padding, impl=impl)))

        shift, xla = (jax.jit(jax.grad(loss), static_argnums=1)(w, impl)
                      for impl in ("shift", "xla"))
        np.testing.assert_allclose(shift, xla, atol=1e-4, rtol=1e-4)


def test_group_size_fits_the_budget_and_leaves_eight_groups(monkeypatch):
    monkeypatch.setattr(layers, "_GROUP_BYTES", 100)
    assert [layers._group_size(n, 30) for n in (1, 6, 8, 32, 48)] == [1, 1, 1, 2, 3]
    assert layers._group_size(32, 1000) == 1  # one image over the budget: groups of one
    monkeypatch.setattr(layers, "_GROUP_BYTES", 1000)
    assert layers._group_size(64, 30) == 8  # at least 8 groups


def test_sharded_depthwise_kernel_grad_is_one_all_reduce():
    """Over a batch sharded on 8 devices the kernel gradient of a 3x3 conv needs one
    all-reduce (of the per-group partial sums), not a collective per tap."""
    mesh = parallel.make_mesh()
    x = jax.device_put(jnp.ones((8, 6, 6, 4)), parallel.batch_sharding(mesh))
    w = jax.device_put(jnp.ones((3, 3, 1, 4)), parallel.replicated(mesh))
    grad = jax.jit(jax.grad(lambda w, x: jnp.sum(layers.depthwise_conv(x, w, 1, 1,
                                                                       impl="shift") ** 2)))
    hlo = grad.lower(w, x).compile().as_text()
    assert hlo.count(" all-gather(") + hlo.count(" all-gather-start(") == 0
    assert hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(") == 1


def test_depthwise_impl_choice():
    assert layers.default_depthwise_impl() == ("shift" if jax.default_backend() == "cpu"
                                               else "xla")
    with pytest.raises(ValueError, match="impl"):
        layers.depthwise_conv(jnp.zeros((1, 3, 3, 1)), jnp.zeros((3, 3, 1, 1)), impl="fft")


# --- BatchNorm ------------------------------------------------------------------------------------

def test_batch_norm_matches_nnx():
    """The custom-VJP training BatchNorm against nnx.BatchNorm: output, running statistics,
    gradients of input, scale and bias (also through a loss that uses the output twice), and
    eval mode; an off-centre input (|mean| >> std) checks the cancellation-prone parts."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(3.0, 0.5, size=(4, 6, 5, 7)), jnp.float32)
    w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    ours = layers.batch_norm(7, nnx.Rngs(0))
    ref = nnx.BatchNorm(7, momentum=layers.BN_MOMENTUM, epsilon=layers.BN_EPSILON,
                        rngs=nnx.Rngs(0))
    assert isinstance(ours, nnx.BatchNorm) and type(ours) is not nnx.BatchNorm
    for m in (ours, ref):
        m.scale[...] = jnp.linspace(0.5, 2.0, 7)
        m.bias[...] = jnp.linspace(-1.0, 1.0, 7)

    def loss(m, x):
        y = m(x)
        return jnp.sum(jnp.sin(y) * w) + jnp.sum(y * y)

    (l_ours, g_ours), (l_ref, g_ref) = (nnx.value_and_grad(loss, argnums=(0, 1))(m, x)
                                        for m in (ours, ref))
    np.testing.assert_allclose(l_ours, l_ref, rtol=1e-5)
    np.testing.assert_allclose(g_ours[1], g_ref[1], atol=1e-4, rtol=1e-4)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(g_ours[0][name][...], g_ref[0][name][...], atol=1e-3,
                                   rtol=1e-4)
    for name in ("mean", "var"):  # running statistics after one training call
        np.testing.assert_allclose(getattr(ours, name)[...], getattr(ref, name)[...],
                                   rtol=1e-5, atol=1e-6)
    ours.eval(), ref.eval()
    np.testing.assert_allclose(ours(x), ref(x), rtol=1e-5, atol=1e-5)


# --- Training ------------------------------------------------------------------------------------

def test_tiny_train_step_on_a_sharded_batch_uses_global_statistics():
    model = random_model("ddamfn_tiny", outputs={"va": 2, "expr": 8})
    model.train()
    graph, state = nnx.split(model)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 112, 112, 3)), jnp.float32)
    va, expr = jnp.asarray(rng.uniform(-1, 1, (8, 2)), jnp.float32), jnp.arange(8) % 8

    @jax.jit
    def step(state, x):
        model = nnx.merge(graph, state)

        def loss(model):
            out = model({"image": x})
            ce = -jnp.take_along_axis(jax.nn.log_softmax(out["expr"]), expr[:, None], 1).mean()
            return jnp.mean((out["va"] - va) ** 2) + ce

        value, grads = nnx.value_and_grad(loss)(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p, g: p - 0.01 * g, params, grads))
        return nnx.state(model), value

    mesh = Mesh(np.array(jax.devices()), ("data",))
    new_state, value = step(state, jax.device_put(x, NamedSharding(mesh, PartitionSpec("data"))))
    assert np.isfinite(value)
    before, after = (nnx.to_pure_dict(s) for s in (state, new_state))
    assert not np.allclose(before["tasks"]["va"]["kernel"], after["tasks"]["va"]["kernel"])
    # Running statistics move by 0.1 (PyTorch momentum) towards those of the whole batch, not
    # of one device's shard; nnx keeps the biased variance where PyTorch keeps the unbiased one.
    y = np.asarray(model.features[0].conv(x)).reshape(-1, 16)
    bn0, bn1 = before["features"][0]["bn"], after["features"][0]["bn"]
    np.testing.assert_allclose(bn1["mean"], 0.9 * bn0["mean"] + 0.1 * y.mean(0), atol=1e-5)
    np.testing.assert_allclose(bn1["var"], 0.9 * bn0["var"] + 0.1 * y.var(0), atol=1e-5)
