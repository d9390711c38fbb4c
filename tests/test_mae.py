"""MAE: parity of the converted pretraining MAE and fine-tuning encoder with a tiny PyTorch
reference (tests/reference/mae.py, random weights) through `python -m abaw_jax.convert mae` and
`inference.load`; the masking, the loss, the position embeddings; the converter's key checks,
its expected differences and its safe reading of checkpoints with an `args` Namespace."""

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from reference import mae as ref

from abaw_jax import convert, inference, models
from abaw_jax.convert import mae as conv
from abaw_jax.errors import ConfigError, WeightsError
from abaw_jax.models import mae, vit

TOL = 1e-4
SIZE, PATCHES = 32, 16  # the reference's tiny MAE: 32x32 images, patches of 8
TINY_HEADS = ["--heads=4", "--decoder_heads=2"]
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _save(path, state_dict, **args):
    """A checkpoint as the reference's training saves it: {'model', 'epoch', and 'args' (an
    argparse Namespace) when given}."""
    obj = {"model": state_dict, "epoch": 3}
    if args:
        obj["args"] = argparse.Namespace(model="mae_vit_tiny", input_size=SIZE, **args)
    torch.save(obj, path)
    return path


def _convert(tmp_path, checkpoint, *flags, name="out"):
    out = tmp_path / name
    assert convert.main(["mae", f"--checkpoint={checkpoint}", f"--out={out}", *TINY_HEADS,
                         *flags]) == 0
    return out


def _images(n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, SIZE, SIZE)).astype(np.float32)


def _noise(n=3, seed=1):
    return np.random.default_rng(seed).uniform(size=(n, PATCHES)).astype(np.float32)


def _reference_outputs(model, images, noise, ratio):
    x, z = torch.from_numpy(images), torch.from_numpy(noise)
    with torch.no_grad():
        loss, pred, mask = model(x, ratio, noise=z)
        latent, _, ids_restore = model.forward_encoder(x, ratio, noise=z)
    return {"loss": loss.numpy(), "pred": pred.numpy(), "mask": mask.numpy(),
            "latent": latent.numpy(), "ids_restore": ids_restore.numpy()}


def _assert_outputs(got, want):
    np.testing.assert_array_equal(got["ids_restore"], want["ids_restore"])
    np.testing.assert_array_equal(got["mask"], want["mask"])
    for name in ("loss", "pred", "latent"):
        np.testing.assert_allclose(got[name], want[name], atol=TOL, rtol=TOL, err_msg=name)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(reference MAE, its checkpoint file, the converted folder) of a tiny pretraining MAE."""
    folder = tmp_path_factory.mktemp("mae")
    model = ref.tiny_pretrain(seed=0)
    path = _save(folder / "pretrain.pth", model.state_dict(), norm_pix_loss=False,
                 mask_ratio=0.75)
    return model, path, _convert(folder, path)


@pytest.mark.parametrize("norm_pix_loss,ratio", [(False, 0.75), (True, 0.5)])
def test_pretraining_parity_through_inference(tmp_path, norm_pix_loss, ratio):
    """The converted MAE (sizes, norm_pix_loss and mask_ratio from the file) gives the
    reference's loss, pred, mask, latent and ids_restore for the same noise, from normalised
    float NCHW images and from uint8 NHWC faces."""
    model = ref.tiny_pretrain(seed=2, norm_pix_loss=norm_pix_loss)
    path = _save(tmp_path / "ckpt.pth", model.state_dict(), norm_pix_loss=norm_pix_loss,
                 mask_ratio=ratio)
    predict = inference.load(_convert(tmp_path, path))
    images, noise = _images(), _noise()
    got = predict(images, noise=noise)
    assert set(got) == set(mae.PRETRAIN_OUTPUTS)
    assert got["pred"].shape == (3, PATCHES, 8 * 8 * 3)
    _assert_outputs(got, _reference_outputs(model, images, noise, ratio))

    faces = np.random.default_rng(3).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    normalised = ((faces / 255 - MEAN) / STD).transpose(0, 3, 1, 2).astype(np.float32)
    _assert_outputs(predict(faces, noise=noise),
                    _reference_outputs(model, normalised, noise, ratio))


def test_without_noise_the_masking_is_drawn_per_call(pretrained):
    _, _, out = pretrained
    predict = inference.load(out, seed=5)
    first, second = predict(_images())["mask"], predict(_images())["mask"]
    assert (first.sum(1) == PATCHES - 4).all() and (second.sum(1) == PATCHES - 4).all()
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(inference.load(out, seed=5)(_images())["mask"], first)


def test_finetuned_checkpoint_parity(tmp_path):
    """A fine-tuned reference ViT (global pooling, fc_norm, head; drop path, eval mode)
    converted with --keep_head gives its logits and its pooled features."""
    model = ref.tiny_finetune(seed=4, num_classes=5, drop_path_rate=0.1)
    out = _convert(tmp_path, _save(tmp_path / "ft.pth", model.state_dict()), "--keep_head")
    meta = convert.read_meta(out, "mae")
    assert meta["model"] == "mae" and meta["outputs"] == {"logits": 5}
    assert meta["unused_keys"] == [] and meta["initialised_keys"] == []
    images = _images()
    got = inference.load(out)(images, embedding=True)
    with torch.no_grad():
        x = torch.from_numpy(images)
        np.testing.assert_allclose(got["logits"], model(x).numpy(), atol=TOL, rtol=TOL)
        np.testing.assert_allclose(got["embedding"], model.forward_features(x).numpy(),
                                   atol=TOL, rtol=TOL)


def test_pretraining_checkpoint_as_the_fine_tuning_encoder(pretrained, tmp_path):
    """--model=mae on a pretraining file: norm, the decoder and mask_token are listed unused,
    fc_norm starts fresh (1, 0), and the encoder runs every patch as the reference's blocks."""
    model, path, _ = pretrained
    out = _convert(tmp_path, path, "--model=mae")
    meta = convert.read_meta(out)
    keys = model.state_dict()
    assert meta["unused_keys"] == sorted(k for k in keys if re.match(
        r"norm\.|decoder_|mask_token", k))
    assert meta["initialised_keys"] == ["fc_norm.bias", "fc_norm.weight"]
    images = _images()
    with torch.no_grad():
        x = model.patch_embed(torch.from_numpy(images))
        x = torch.cat([model.cls_token.expand(3, -1, -1), x], 1) + model.pos_embed
        for block in model.blocks:
            x = block(x)
        want = F.layer_norm(x[:, 1:].mean(1), (32,), eps=1e-6).numpy()
    got = inference.load(out)(images)["embedding"]  # no task output: the embedding
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)


def test_encoder_only_release(pretrained, tmp_path):
    """Without the decoder the default is the encoder (`norm` unused, `fc_norm` fresh); the
    pretraining model is refused, saying why."""
    model, _, _ = pretrained
    encoder = {k: v for k, v in model.state_dict().items()
               if not k.startswith(("decoder_", "mask_token"))}
    path = _save(tmp_path / "enc.pth", encoder)
    meta = convert.read_meta(_convert(tmp_path, path))
    assert meta["model"] == "mae" and meta["unused_keys"] == ["norm.bias", "norm.weight"]
    assert meta["initialised_keys"] == ["fc_norm.bias", "fc_norm.weight"]
    with pytest.raises(WeightsError, match=r"enc\.pth: no decoder \(an encoder-only file\): it "
                                           r"converts as --model=mae"):
        conv.convert_checkpoint(path, tmp_path / "pre", "mae_pretrain", heads=4)


def _edited(model, tmp_path, edit):
    state = dict(model.state_dict())
    edit(state)
    return _save(tmp_path / "edited.pth", state)


def test_missing_unexpected_and_misshaped_keys_are_named(pretrained, tmp_path, capsys):
    model, _, _ = pretrained
    key = "decoder_blocks.0.mlp.fc1.bias"
    with pytest.raises(WeightsError, match=rf"missing keys \['{re.escape(key)} \(64,\)'\]"):
        conv.convert_checkpoint(_edited(model, tmp_path, lambda s: s.pop(key)),
                                tmp_path / "a", heads=4, decoder_heads=2)

    def add(state):
        state["blocks.0.attn.q_bias"] = torch.zeros(32)
    with pytest.raises(WeightsError, match=r"unexpected keys \['blocks\.0\.attn\.q_bias'\]"):
        conv.convert_checkpoint(_edited(model, tmp_path, add), tmp_path / "b", heads=4,
                                decoder_heads=2)

    def cut(state):
        state["decoder_pred.weight"] = state["decoder_pred.weight"][:100]
    argv = ["mae", f"--checkpoint={_edited(model, tmp_path, cut)}", f"--out={tmp_path / 'c'}",
            *TINY_HEADS]
    assert convert.main(argv) == 1
    assert "decoder_pred.weight (100, 16), expected (192, 16)" in capsys.readouterr().err

    # Fine-tuned weights are no pretraining MAE: fine-tuning's keys against pretraining's.
    finetuned = {k: v.numpy() for k, v in ref.tiny_finetune().state_dict().items()}
    spec = conv.infer_spec({k: v.numpy() for k, v in model.state_dict().items()}, heads=4,
                           decoder_heads=2)
    with pytest.raises(WeightsError) as error:
        conv.convert_state(finetuned, spec, "mae_pretrain")
    assert re.search(r"missing keys \[.*'norm\.weight \(32,\)'", str(error.value))
    assert re.search(r"unexpected keys \['fc_norm\.bias', 'fc_norm\.weight', 'head\.bias', "
                     r"'head\.weight'\]", str(error.value))


def test_args_namespace_is_read_safely_and_code_is_refused(pretrained, tmp_path):
    model, _, _ = pretrained
    path = _save(tmp_path / "args.pth", model.state_dict(), norm_pix_loss=True, mask_ratio=0.6)
    with pytest.raises(Exception, match="Namespace"):  # why the converter allows that class
        torch.load(path, weights_only=True)
    meta = convert.read_meta(_convert(tmp_path, path))
    assert meta["model_kwargs"]["norm_pix_loss"] is True
    assert meta["model_kwargs"]["mask_ratio"] == 0.6
    assert meta["args"]["model"] == "mae_vit_tiny" and meta["args"]["input_size"] == SIZE

    marker = tmp_path / "ran"

    class Payload:  # unpickling it would call open(marker, "w")
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"model": model.state_dict(), "args": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match=r"evil\.pth: refused .*GLOBAL.*open"):
        conv.read_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_cli_refuses_to_overwrite(pretrained, tmp_path, capsys):
    _, path, _ = pretrained
    argv = ["mae", f"--checkpoint={path}", f"--out={tmp_path / 'out'}", *TINY_HEADS]
    assert convert.main(argv) == 0
    assert "as mae_pretrain (32px, patch 8, width 32, depth 2, heads 4)" in capsys.readouterr().out
    assert convert.main(argv) == 1
    assert convert.main([*argv, "--overwrite"]) == 0
    assert convert.main(["mae", f"--checkpoint={path}", f"--out={tmp_path / 'x'}"]) == 1
    assert "width 32 is none of the reference's [768, 1024, 1280]: pass --heads" in \
        capsys.readouterr().err


@pytest.mark.parametrize("size", ["b16", "l16"])
def test_reference_sizes_have_the_reference_keys_and_shapes(size):
    """Every key and shape of the reference's ViT-B/16 and ViT-L/16 MAE (built on torch's
    meta device: no memory) is what the converter expects of our model of that size."""
    with torch.device("meta"):
        model = ref.MaskedAutoencoderViT(**ref.SIZES[size], **ref.DECODER)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert conv.expected_shapes(mae.PRETRAIN, mae.make_spec(size), {}) == want


def test_masking_keeps_the_least_noisy_patches_and_restores():
    rng = np.random.default_rng(0)
    length = 196
    tokens = jnp.broadcast_to(jnp.arange(length, dtype=jnp.float32)[None, :, None],
                              (4, length, 2))
    for ratio in (0.75, 0.5, 0.1, 0.0):
        noise = rng.uniform(size=(4, length)).astype(np.float32)
        kept, mask, ids_restore = mae.random_masking(tokens, ratio, jnp.asarray(noise))
        keep = int(length * (1 - ratio))
        order = np.argsort(noise, axis=1)
        assert kept.shape == (4, keep, 2)
        np.testing.assert_array_equal(kept[..., 0], order[:, :keep])  # least noise first
        assert (np.asarray(mask).sum(1) == length - keep).all()
        removed = np.ones((4, length))
        np.put_along_axis(removed, order[:, :keep], 0, axis=1)
        np.testing.assert_array_equal(mask, removed)
        np.testing.assert_array_equal(np.take_along_axis(order, np.asarray(ids_restore), 1),
                                      np.broadcast_to(np.arange(length), (4, length)))


def test_loss_counts_masked_patches_only():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    target = np.asarray(vit.patchify(jnp.asarray(images), 8))  # (2, 4, 192)
    mask = np.array([[1, 0, 0, 1], [0, 1, 0, 0]], np.float32)
    pred = target + rng.normal(size=target.shape).astype(np.float32) * (1 - mask[..., None])
    assert float(mae.reconstruction_loss(images, pred, mask, 8)) == 0  # errors where visible
    pred = rng.normal(size=target.shape).astype(np.float32)
    for norm_pix in (False, True):
        t = target
        if norm_pix:
            t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
        per_patch = ((pred - t) ** 2).mean(-1)
        want = np.mean([per_patch[0, 0], per_patch[0, 3], per_patch[1, 1]])
        got = float(mae.reconstruction_loss(images, pred, mask, 8, norm_pix))
        assert got == pytest.approx(want, rel=1e-5)


def test_position_embeddings_match_the_closed_form():
    width, grid = 16, 3
    table = mae.sincos_pos_embed(width, grid)
    assert table.shape == (1 + grid * grid, width) and not table[0].any()
    w = 10000.0 ** (-np.arange(4) / 4)
    for i in range(grid):
        for j in range(grid):
            want = np.concatenate([np.sin(j * w), np.cos(j * w), np.sin(i * w), np.cos(i * w)])
            np.testing.assert_allclose(table[1 + i * grid + j], want, atol=1e-7)
    for width, grid in ((32, 4), (768, 14), (512, 14)):
        np.testing.assert_allclose(mae.sincos_pos_embed(width, grid),
                                   ref.get_2d_sincos_pos_embed(width, grid, cls_token=True),
                                   atol=1e-6)


def test_drop_path_drops_whole_samples_in_training_only():
    """Each sample's output is x + a * attn + b * mlp with a, b in {0, 1 / keep}: a whole
    sample's branch dropped or scaled, as timm's DropPath; none in eval mode."""
    layer = vit.EncoderLayer(8, 2, 16, "gelu", 1e-6, drop_path=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (64, 5, 8))
    got = layer(x, rngs=nnx.Rngs(2))

    def combo(a, b):
        h = x + a * layer.self_attn(layer.layer_norm1(x))
        return h + b * layer.mlp(layer.layer_norm2(h))

    combos = {(a, b): combo(a, b) for a in (0.0, 2.0) for b in (0.0, 2.0)}
    picked = [next(k for k, v in combos.items() if np.allclose(got[s], v[s], atol=1e-5))
              for s in range(64)]
    assert len(set(picked)) == 4  # every combination drawn over 64 samples
    layer.eval()
    np.testing.assert_allclose(layer(x), combo(1.0, 1.0), atol=1e-6)


def test_the_mae_family_embeds_frames_and_names_its_backbone():
    model = models.build("mae", outputs={"va": 2, "expr": 8}, rngs=nnx.Rngs(0), size="tiny")
    family = models.get("mae")
    assert family.image_preprocess(model).size == SIZE and model.embed_dim == 32
    model.eval()
    images = jnp.asarray(_images().transpose(0, 2, 3, 1))
    embedding = family.embed_frames(model, {"image": images})
    out = model({"features": embedding})
    np.testing.assert_allclose(out["va"], model({"image": images})["va"], atol=1e-6)
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    backbone = [p for p in paths if any(re.search(b, p) for b in family.backbone)]
    assert sorted(set(paths) - set(backbone)) == sorted(
        p for p in paths if p.startswith("tasks/"))
    with pytest.raises(ConfigError, match="cannot replace this MAE-ViT's 32-wide"):
        models.build("mae", outputs={}, rngs=nnx.Rngs(0), size="tiny", feature_dim=16)
    with pytest.raises(ConfigError, match="no task outputs"):
        models.build("mae_pretrain", outputs={"va": 2}, rngs=nnx.Rngs(0), size="tiny")
    with pytest.raises(ConfigError, match="unknown MAE fields \\['dept'\\]"):
        mae.make_spec("tiny", dept=3)


def test_pretraining_init_is_the_references():
    """Fixed sin-cos position embeddings; xavier_uniform kernels, q/k/v drawn with the fans of
    the reference's one qkv layer; tokens normal(0.02)."""
    model = mae.MAE(rngs=nnx.Rngs(0), size="tiny")
    np.testing.assert_array_equal(model.pos_embed[...][0], mae.sincos_pos_embed(32, 4))
    np.testing.assert_array_equal(model.decoder_pos_embed[...][0], mae.sincos_pos_embed(16, 4))
    assert not isinstance(model.pos_embed, nnx.Param)  # never trained
    q = np.asarray(model.encoder.layers[0].self_attn.q_proj.kernel[...])
    assert 0.9 < np.abs(q).max() / np.sqrt(6 / (32 + 96)) <= 1
    pred = np.asarray(model.decoder_pred.kernel[...])
    assert 0.9 < np.abs(pred).max() / np.sqrt(6 / (16 + 192)) <= 1
    assert np.std(np.asarray(model.mask_token[...])) == pytest.approx(0.02, rel=0.5)
