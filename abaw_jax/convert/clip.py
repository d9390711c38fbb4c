"""Hugging Face CLIP model folders -> a converted CLIP folder (image tower + prompt embeddings).

  python -m abaw_jax.convert clip --hf_dir=MODEL_FOLDER --out=DIR [--prompts=FILE] [--overwrite]

MODEL_FOLDER is a transformers CLIP folder (e.g. `openai/clip-vit-base-patch16` downloaded):
config.json, model.safetensors (read with numpy: no PyTorch), the tokenizer files and, if
present, preprocessor_config.json. Every key maps onto `models.clip.CLIP` (the module paths are
the keys renamed: `hf_key`); a missing or unexpected key stops the conversion, naming it (the
`position_ids` buffers some files carry are ignored and listed in meta.json). The folder's
CLIPTokenizer tokenises the 8 class prompts once (padded to the text length) and the Flax text
tower embeds them, so training and inference need neither the tokenizer nor the text tower.

DIR (the form of `abaw_jax.convert`, plus the prompts):
  state              nnx.state(CLIP(config, text=False)): `vision` (tower and visual_projection)
                     and `logit_scale`. The text tower is left out: its only use is embedding
                     prompts, done here (ViT-B/16's is 63M of its 150M values); other prompts
                     mean converting again with --prompts.
  meta.json          family and model "clip", config (the CLIPConfig dict), image_size, mean and
                     std (fractions of 255: preprocessor_config.json, else CLIP's), source,
                     unused_keys
  prompts.json       the 8 prompts, in class order (EXPR_NAMES)
  prompt_embeds.npy  (8, projection_dim) float32 text embeddings, projected, not L2-normalised
"""

from __future__ import annotations

import argparse
import json
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from abaw_jax import convert
from abaw_jax.data.affwild2 import EXPR_NAMES
from abaw_jax.errors import ConfigError, NotFoundError, WeightsError
from abaw_jax.models import clip
from abaw_jax.models.clip import (  # noqa: F401  (the folder form, re-exported)
    CLIP_MEAN,
    CLIP_STD,
    PROMPT_EMBEDS_FILE,
    PROMPTS_FILE,
    load_prompts,
)

FAMILY = clip.FAMILY

# The ABAW-8 CLIP system's public wording, one per class of EXPR_NAMES.
DEFAULT_PROMPTS = ("A face showing neutrality.", "A face showing anger.",
                   "A face showing disgust.", "A face showing fear.",
                   "A face showing happiness.", "A face showing sadness.",
                   "A face showing surprise.", "A face showing an undefined emotion.")
# transformers' CLIPImageProcessor defaults (OPENAI_CLIP_MEAN / STD).

# Model path prefix -> key prefix; the projections sit at the top of transformers' CLIPModel.
_PREFIXES = (("vision.visual_projection.", "visual_projection."), ("vision.", "vision_model."),
             ("text.text_projection.", "text_projection."), ("text.", "text_model."))
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# Non-persistent buffers that older files still carry; nothing to load.
_BUFFERS = re.compile(r"(^|\.)position_ids$")

# build_random's sizes: "tiny" for tests and the default synthetic run, "b16" as ViT-B/16.
SIZES = {
    "tiny": {"projection_dim": 16,
             "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
             "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 4}},
    "b16": {"projection_dim": 512,
            "vision_config": {"hidden_size": 768, "intermediate_size": 3072,
                              "num_hidden_layers": 12, "num_attention_heads": 12,
                              "image_size": 224, "patch_size": 16},
            "text_config": {"hidden_size": 512, "intermediate_size": 2048,
                            "num_hidden_layers": 12, "num_attention_heads": 8}},
}


def hf_key(path: str) -> str:
    """The transformers CLIPModel key of a model path ('vision.encoder.layers.0.mlp.fc1.kernel'
    -> 'vision_model.encoder.layers.0.mlp.fc1.weight')."""
    for prefix, replacement in _PREFIXES:
        if path.startswith(prefix):
            path = replacement + path[len(prefix):]
            break
    head, _, leaf = path.rpartition(".")
    return f"{head}.{_LEAVES.get(leaf, leaf)}" if head else _LEAVES.get(leaf, leaf)


def _from_hf(leaf: str, array: np.ndarray) -> np.ndarray:
    """Linear weights (out, in) -> kernels (in, out); the patch conv OIHW -> HWIO."""
    if leaf != "kernel":
        return array
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T


def _hf_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf != "kernel":
        return shape
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]


def abstract_model(config: Any, text: bool = True) -> clip.CLIP:
    """CLIP of `config` built with nnx.eval_shape: shapes only, nothing initialised."""
    return nnx.eval_shape(lambda: clip.CLIP(config, text=text, rngs=nnx.Rngs(0)))


def filled_model(config: Any, state: Mapping, text: bool = True) -> clip.CLIP:
    """CLIP of `config` holding `state` (a pure dict of numpy arrays)."""
    graphdef, abstract = nnx.split(abstract_model(config, text))
    nnx.replace_by_pure_dict(abstract, jax.tree.map(jnp.asarray, dict(state)))
    return nnx.merge(graphdef, abstract)


def convert_state(tensors: Mapping[str, np.ndarray], config: Any, source: str = "weights"
                  ) -> tuple[dict, list[str]]:
    """transformers CLIPModel tensors -> (pure-dict state of `CLIP(config)`, ignored keys).

    WeightsError names every missing, unexpected or mis-shaped key; only `position_ids` buffers
    are ignored.
    """
    target = nnx.to_pure_dict(nnx.state(abstract_model(config)))
    missing, wrong = [], []

    def one(keypath, spec):
        path = convert.dotted(keypath)
        leaf, key = path.rpartition(".")[2], hf_key(path)
        expected = _hf_shape(leaf, spec.shape)
        if key not in tensors:
            missing.append(f"{key} {expected}")
            return None
        if tensors[key].shape != expected:
            wrong.append(f"{key} {tensors[key].shape}, expected {expected}")
            return None
        return _from_hf(leaf, np.asarray(tensors[key])).astype(spec.dtype)

    state = jax.tree_util.tree_map_with_path(one, target)
    used = {hf_key(p) for p in convert.flatten(target)}
    ignored = sorted(k for k in tensors if k not in used and _BUFFERS.search(k))
    unexpected = sorted(k for k in tensors if k not in used and not _BUFFERS.search(k))
    problems = [f"missing keys {missing}"] * bool(missing) + \
        [f"unexpected keys {unexpected}"] * bool(unexpected) + [f"mis-shaped {wrong}"] * bool(wrong)
    if problems:
        raise WeightsError(f"{source}: not the CLIPModel of its config.json: "
                           f"{'; '.join(problems)}")
    return state, ignored


def read_safetensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """model.safetensors, or the shards its index names, as numpy arrays."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if not index.is_file():
        raise NotFoundError(f"{hf_dir}: no model.safetensors (nor its index)")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {k: v for shard in shards for k, v in load_file(hf_dir / shard).items()}


def read_prompts(path: str | Path) -> list[str]:
    """A prompts file: one prompt per line, one line per EXPR class (blank lines skipped)."""
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
    except FileNotFoundError:
        raise NotFoundError(f"--prompts: no file {path}") from None
    prompts = [line for line in lines if line]
    if len(prompts) != len(EXPR_NAMES):
        raise ConfigError(f"--prompts {path}: {len(prompts)} prompts, expected "
                          f"{len(EXPR_NAMES)} (one per line: {', '.join(EXPR_NAMES)})")
    return prompts


def embed_prompts(text: clip.CLIPText, tokenizer, prompts: Sequence[str], length: int
                  ) -> np.ndarray:
    """(len(prompts), projection_dim) float32 embeddings of `prompts` by the text tower, tokenised
    as transformers does (padded to `length`). Raises WeightsError when a prompt's pooled
    token is not the tokenizer's EOS (the config's eos_token_id does not match the tokenizer)."""
    encoded = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                        return_tensors="np")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    pooled = ids[np.arange(len(ids)), np.asarray(clip.eos_positions(ids, text.eos_token_id))]
    if (pooled != tokenizer.eos_token_id).any():
        raise WeightsError(f"text_config.eos_token_id {text.eos_token_id} pools token ids "
                           f"{pooled.tolist()}, not the tokenizer's EOS {tokenizer.eos_token_id}")
    return np.asarray(text(jnp.asarray(ids), jnp.asarray(mask)), np.float32)


def _preprocessing(hf_dir: Path) -> tuple[list[float], list[float]]:
    path = hf_dir / "preprocessor_config.json"
    if not path.is_file():
        return list(CLIP_MEAN), list(CLIP_STD)
    settings = json.loads(path.read_text())
    return (list(settings.get("image_mean", CLIP_MEAN)),
            list(settings.get("image_std", CLIP_STD)))


def write(out: str | Path, model: clip.CLIP, config: Mapping, prompts: Sequence[str],
          embeds: np.ndarray, meta: Mapping[str, Any], overwrite: bool = False) -> Path:
    """The converted folder of `model` (its text tower is left out) and its prompt embeddings."""
    state = nnx.to_pure_dict(nnx.state(model))
    state.pop("text", None)
    meta = {"family": FAMILY, "model": FAMILY, "config": dict(config),
            "image_size": model.vision.image_size, "outputs": {"expr": len(prompts)},
            "model_kwargs": {"clip": clip.vision_spec(config), "mean": list(meta["mean"]),
                             "std": list(meta["std"])}, **meta}
    out = convert.save(out, state, meta, overwrite=overwrite)
    (out / PROMPTS_FILE).write_text(json.dumps(list(prompts), indent=2) + "\n")
    np.save(out / PROMPT_EMBEDS_FILE, np.asarray(embeds, np.float32))
    return out


def convert_folder(hf_dir: str | Path, out: str | Path, prompts: Sequence[str] | None = None,
                   overwrite: bool = False) -> Path:
    """Convert a transformers CLIP model folder into `out` (see the module doc); returns out."""
    from transformers import CLIPConfig, CLIPTokenizer  # only conversion needs transformers

    hf_dir = Path(hf_dir).resolve()
    if not (hf_dir / "config.json").is_file():
        raise NotFoundError(f"{hf_dir}: no config.json (not a transformers model folder)")
    raw = json.loads((hf_dir / "config.json").read_text())
    if raw.get("model_type") != "clip":
        raise WeightsError(f"{hf_dir / 'config.json'}: model_type {raw.get('model_type')!r}, "
                           f"not 'clip' (a full CLIPModel folder)")
    config = CLIPConfig.from_pretrained(hf_dir).to_dict()  # transformers' defaults filled in
    state, ignored = convert_state(read_safetensors(hf_dir), config,
                                   str(hf_dir / "model.safetensors"))
    model = filled_model(config, state)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(hf_dir)
    except (OSError, TypeError, ValueError) as e:
        raise NotFoundError(f"{hf_dir}: no usable CLIP tokenizer ({e})") from None
    prompts = list(prompts or DEFAULT_PROMPTS)
    embeds = embed_prompts(model.text, tokenizer, prompts,
                           config["text_config"]["max_position_embeddings"])
    mean, std = _preprocessing(hf_dir)
    return write(out, model, config, prompts, embeds,
                 {"mean": mean, "std": std, "source": str(hf_dir), "unused_keys": ignored},
                 overwrite=overwrite)


def char_tokenizer():
    """A CLIPTokenizer whose vocabulary is single characters (no merges): build_random's, as
    no CLIP vocabulary is at hand without a download. EOS is the last id, as in CLIP's."""
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = ["<|startoftext|>", *chars, *(c + "</w>" for c in chars), "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def random_state(target: Mapping, seed: int, logit_scale: float) -> dict:
    """Random values for an abstract pure-dict state (numpy: no XLA compile per shape):
    kernels N(0, 1/fan_in), embeddings N(0, 0.02^2), LayerNorm scale 1 and biases 0."""
    rng = np.random.default_rng(seed)

    def one(keypath, spec):
        leaf = convert.dotted(keypath).rpartition(".")[2]
        if leaf == "scale":
            return np.ones(spec.shape, np.float32)
        if leaf == "bias":
            return np.zeros(spec.shape, np.float32)
        if leaf == "logit_scale":
            return np.asarray(logit_scale, np.float32)
        std = np.prod(spec.shape[:-1]) ** -0.5 if leaf == "kernel" else 0.02
        return (rng.standard_normal(spec.shape) * std).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, dict(target))


def random_config(size: str = "tiny") -> dict:
    """The CLIPConfig dict of a build_random size, with transformers' defaults filled in."""
    from transformers import CLIPConfig

    if size not in SIZES:
        raise ConfigError(f"CLIP size {size!r}; known: {sorted(SIZES)}")
    spec = SIZES[size]
    vocab = len(char_tokenizer())
    text = {**spec["text_config"], "vocab_size": vocab, "eos_token_id": vocab - 1,
            "bos_token_id": 0, "pad_token_id": vocab - 1}
    return CLIPConfig(text_config=text, vision_config=spec["vision_config"],
                      projection_dim=spec["projection_dim"]).to_dict()


def build_random(out: str | Path, size: str = "tiny", seed: int = 0,
                 prompts: Sequence[str] | None = None, overwrite: bool = False) -> Path:
    """A converted folder of a randomly initialised CLIP of `size` ("tiny", "b16"), prompts
    tokenised by `char_tokenizer`: no download. Returns out."""
    config = random_config(size)
    target = nnx.to_pure_dict(nnx.state(abstract_model(config)))
    model = filled_model(config, random_state(target, seed, config["logit_scale_init_value"]))
    prompts = list(prompts or DEFAULT_PROMPTS)
    embeds = embed_prompts(model.text, char_tokenizer(), prompts,
                           config["text_config"]["max_position_embeddings"])
    return write(out, model, config, prompts, embeds,
                 {"mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                  "source": f"random {size} CLIP (seed {seed})", "unused_keys": []},
                 overwrite=overwrite)


def main(argv: Sequence[str]) -> int:
    """CLI: convert --hf_dir into --out. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m abaw_jax.convert clip",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf_dir", required=True, help="transformers CLIP model folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--prompts", help=f"file of {len(EXPR_NAMES)} prompts, one per line, "
                        f"in class order ({', '.join(EXPR_NAMES)})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    prompts = read_prompts(args.prompts) if args.prompts else None
    out = convert_folder(args.hf_dir, args.out, prompts, args.overwrite)
    meta = convert.read_meta(out)
    print(f"converted the image tower and the prompt embeddings of {args.hf_dir} into {out}; "
          f"ignored keys: {meta['unused_keys'] or 'none'}")
    return 0
