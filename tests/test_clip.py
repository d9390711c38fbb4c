"""CLIP towers and converter: parity with transformers' PyTorch CLIPModel through a converted
tiny random model folder (image and prompt embeddings), the converter's key checks, the
activations by `hidden_act` name, and build_random."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.activations import ACT2FN

from abaw_jax import convert
from abaw_jax.convert import clip as conv
from abaw_jax.errors import ConfigError, WeightsError
from abaw_jax.models import clip, vit

TOL = 1e-4
# Character tokens, two merges ("fa", "face</w>"), and CLIP's specials with EOS as the last id.
LETTERS = "abcdefghijklmnopqrstuvwxyz."
MERGES = ["f a", "c e</w>", "fa ce</w>"]
VOCAB = ["<|startoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS), "fa", "ce</w>", "face</w>",
         "<|endoftext|>"]
EOS = len(VOCAB) - 1
IMAGE = 32


def _write_tokenizer(folder):
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")


def _hf_folder(folder, hidden_act="quick_gelu", eos_token_id=EOS, seed=0):
    """A tiny random CLIPModel saved as transformers does, with the test's tokenizer. Every
    parameter is perturbed (transformers initialises biases to 0 and LayerNorms to 1)."""
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 hidden_act=hidden_act)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=len(VOCAB), max_position_embeddings=40,
                         eos_token_id=eos_token_id, bos_token_id=0, pad_token_id=EOS),
        vision_config=dict(tower, image_size=IMAGE, patch_size=8), projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    _write_tokenizer(folder)
    return model


def _images(n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, IMAGE, IMAGE, 3)).astype(np.float32)


def _vision(out):
    """The converted image tower, restored with convert.load_into."""
    model = conv.abstract_model(convert.read_meta(out, "clip")["config"], text=False)
    convert.load_into(model, out)
    return model.vision


@pytest.mark.parametrize("hidden_act,legacy_eos", [("quick_gelu", False), ("gelu", True)])
def test_parity_with_transformers(tmp_path, hidden_act, legacy_eos):
    """Image embeddings (several images) and prompt embeddings match PyTorch within 1e-4; with
    eos_token_id 2 the pooling is transformers' legacy largest-id one."""
    ref = _hf_folder(tmp_path / "hf", hidden_act, eos_token_id=2 if legacy_eos else EOS)
    out = conv.convert_folder(tmp_path / "hf", tmp_path / "out")
    images = _images()
    with torch.no_grad():
        pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
        want_embeds = ref.get_image_features(pixel_values=pixels).pooler_output.numpy()
        want_pooled = ref.vision_model(pixel_values=pixels).pooler_output.numpy()
    got = _vision(out)(jnp.asarray(images))
    np.testing.assert_allclose(got["image_embeds"], want_embeds, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(got["pooled"], want_pooled, atol=TOL, rtol=TOL)

    prompts, embeds = conv.load_prompts(out)
    assert prompts == list(conv.DEFAULT_PROMPTS) and embeds.shape == (8, 16)
    tokens = CLIPTokenizer.from_pretrained(tmp_path / "hf")(
        prompts, padding="max_length", max_length=40, return_tensors="pt")
    assert "face</w>" in tokens.tokens(0)  # the merges were applied
    with torch.no_grad():
        want_text = ref.get_text_features(**tokens).pooler_output.numpy()
    np.testing.assert_allclose(embeds, want_text, atol=TOL, rtol=TOL)
    meta = convert.read_meta(out)
    assert meta["image_size"] == IMAGE and meta["mean"] == list(conv.CLIP_MEAN)
    assert meta["config"]["text_config"]["hidden_act"] == hidden_act


def test_state_is_the_image_tower(tmp_path):
    """The converted state is exactly CLIP(text=False)'s (load_into refuses extra variables):
    the image tower, its projection and logit_scale, as the PyTorch model's."""
    ref = _hf_folder(tmp_path / "hf")
    out = conv.convert_folder(tmp_path / "hf", tmp_path / "out")
    model = conv.abstract_model(convert.read_meta(out)["config"], text=False)
    convert.load_into(model, out)
    assert model.text is None
    np.testing.assert_array_equal(model.logit_scale[...], ref.logit_scale.detach().numpy())
    np.testing.assert_array_equal(model.vision.visual_projection.kernel[...],
                                  ref.visual_projection.weight.detach().numpy().T)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip") / "hf"
    _hf_folder(folder)
    return folder


def _edited(hf_dir, tmp_path, edit):
    """A copy of hf_dir whose tensors are edited in place by `edit(dict)`."""
    folder = tmp_path / "edited"
    shutil.copytree(hf_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_missing_key_is_named(hf_dir, tmp_path):
    key = "vision_model.encoder.layers.1.mlp.fc2.bias"
    folder = _edited(hf_dir, tmp_path, lambda t: t.pop(key))
    with pytest.raises(WeightsError, match=r"missing keys \['vision_model\.encoder\.layers\.1\."
                                           r"mlp\.fc2\.bias \(32,\)'\]"):
        conv.convert_folder(folder, tmp_path / "out")


def test_unexpected_key_is_named(hf_dir, tmp_path):
    def edit(t):
        t["text_model.encoder.layers.2.mlp.fc1.weight"] = np.zeros((37, 32), np.float32)
    folder = _edited(hf_dir, tmp_path, edit)
    with pytest.raises(WeightsError, match=r"unexpected keys \['text_model\.encoder\.layers\.2\."
                                           r"mlp\.fc1\.weight'\]"):
        conv.convert_folder(folder, tmp_path / "out")


def test_misshaped_key_is_named(hf_dir, tmp_path):
    def edit(t):
        t["visual_projection.weight"] = t["visual_projection.weight"][:8]
    folder = _edited(hf_dir, tmp_path, edit)
    with pytest.raises(WeightsError, match=r"visual_projection\.weight \(8, 32\), expected "
                                           r"\(16, 32\)"):
        conv.convert_folder(folder, tmp_path / "out")


def test_position_ids_buffers_are_ignored(hf_dir, tmp_path):
    def edit(t):
        t["text_model.embeddings.position_ids"] = np.arange(40)[None]
    out = conv.convert_folder(_edited(hf_dir, tmp_path, edit), tmp_path / "out")
    assert convert.read_meta(out)["unused_keys"] == ["text_model.embeddings.position_ids"]


def test_eos_outside_the_tokenizer_fails(tmp_path):
    """A config whose eos_token_id the tokenizer never emits would pool position 0."""
    absent = VOCAB.index("q")  # in no prompt: the search finds nothing and gives position 0
    _hf_folder(tmp_path / "hf", eos_token_id=absent)
    with pytest.raises(WeightsError, match=f"eos_token_id {absent} pools token ids \\[0, 0"):
        conv.convert_folder(tmp_path / "hf", tmp_path / "out")


def test_cli_with_prompts_file(hf_dir, tmp_path, capsys):
    texts = [f"a face {w}." for w in ("calm", "mad", "sick", "scared", "glad", "sad", "amazed",
                                      "else")]
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n\n")
    argv = ["clip", f"--hf_dir={hf_dir}", f"--out={tmp_path / 'out'}",
            f"--prompts={tmp_path / 'prompts.txt'}"]
    assert convert.main(argv) == 0
    assert conv.load_prompts(tmp_path / "out")[0] == texts
    assert convert.main(argv) == 1  # exists, no --overwrite
    assert convert.main([*argv, "--overwrite"]) == 0
    (tmp_path / "prompts.txt").write_text("\n".join(texts[:7]))
    with pytest.raises(ConfigError, match=r"prompts\.txt: 7 prompts, expected 8"):
        conv.read_prompts(tmp_path / "prompts.txt")
    assert convert.main(argv) == 1
    assert "7 prompts, expected 8" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(vit.ACTIVATIONS))
def test_activation_matches_transformers(name):
    x = np.linspace(-6, 6, 1001, dtype=np.float32)
    want = ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(vit.ACTIVATIONS[name](jnp.asarray(x)), want, atol=1e-6, rtol=1e-5)


def test_unknown_activation_is_a_config_error():
    with pytest.raises(ConfigError, match="hidden_act 'gelu_10'"):
        vit.activation("gelu_10")


def test_build_random(tmp_path):
    """A tiny random converted folder without downloads: loads, embeds images, and its prompt
    embeddings are distinct."""
    out = conv.build_random(tmp_path / "out", "tiny", seed=3)
    prompts, embeds = conv.load_prompts(out)
    assert prompts == list(conv.DEFAULT_PROMPTS) and embeds.shape == (8, 16)
    unit = embeds / np.linalg.norm(embeds, axis=1, keepdims=True)
    cosine = unit @ unit.T
    assert cosine[~np.eye(8, dtype=bool)].max() < 0.99
    vision = _vision(out)
    assert vision(jnp.asarray(_images()))["image_embeds"].shape == (3, 16)
    assert conv.random_config("b16")["vision_config"]["patch_size"] == 16


def test_bfloat16_compute_keeps_float32_params(tmp_path):
    """dtype=bfloat16 computes in bfloat16 from the same float32 parameters, close to float32."""
    out = conv.build_random(tmp_path / "out", "tiny", seed=0)
    config = convert.read_meta(out)["config"]
    images = jnp.asarray(_images())
    want = _vision(out)(images)["image_embeds"]
    model = nnx.eval_shape(lambda: clip.CLIP(config, text=False, dtype=jnp.bfloat16,
                                             rngs=nnx.Rngs(0)))
    convert.load_into(model, out)
    got = model.vision(images)["image_embeds"]
    assert got.dtype == jnp.bfloat16
    assert model.vision.visual_projection.kernel[...].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.1, rtol=0.1)
