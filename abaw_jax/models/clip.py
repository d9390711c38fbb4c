"""CLIP's vision and text towers (Flax NNX), built from a transformers `CLIPConfig` or its dict.

They compute what transformers' PyTorch `CLIPModel` computes (`tests/test_clip.py` checks it):
- `CLIPVision(pixels)`: pooled = post_layernorm(class token); image_embeds =
  visual_projection(pooled) (`get_image_features(...).pooler_output` in transformers 5).
- `CLIPText(input_ids, attention_mask)`: text_embeds = text_projection(final_layer_norm(h) at the
  EOS position), the position transformers takes for the config (`eos_positions`).

Module paths mirror transformers' keys: `vision.` is `vision_model.` there, `text.` is
`text_model.`, and the projections sit at the top (`convert/clip.py`). Images are NHWC floats,
already normalised with the model's mean / std, at the config's image size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from abaw_jax import convert
from abaw_jax.errors import ConfigError, NotFoundError, WeightsError
from abaw_jax.models import vit
from abaw_jax.models.family import Family, Inputs, Preprocess, register

FAMILY = "clip"
# A converted folder (`python -m abaw_jax.convert clip`): the image tower's state, meta.json
# (its CLIPConfig, image size, mean, std), the class prompts and their projected embeddings.
PROMPTS_FILE = "prompts.json"
PROMPT_EMBEDS_FILE = "prompt_embeds.npy"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# transformers' CLIPModel: `eos_token_id == 2` marks configs written before its PR #24773, whose
# pooling takes the largest token id (CLIP's EOS is the last id of its vocabulary).
LEGACY_EOS_TOKEN_ID = 2


def config_dict(config: Any) -> dict:
    """A `transformers.CLIPConfig` (or anything with `to_dict`) or a mapping, as a dict."""
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def _get(config: Mapping, key: str, where: str) -> Any:
    try:
        return config[key]
    except KeyError:
        raise ConfigError(f"CLIP config: no {where}{key}") from None


def _encoder(config: Mapping, where: str, dtype, rngs: nnx.Rngs) -> vit.Encoder:
    return vit.Encoder(
        _get(config, "num_hidden_layers", where), _get(config, "hidden_size", where),
        _get(config, "num_attention_heads", where), _get(config, "intermediate_size", where),
        _get(config, "hidden_act", where), _get(config, "layer_norm_eps", where),
        dtype=dtype, rngs=rngs)


def _layer_norm(config: Mapping, where: str, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return vit.layer_norm(_get(config, "hidden_size", where), _get(config, "layer_norm_eps", where),
                          dtype=dtype, rngs=rngs)


class VisionEmbeddings(nnx.Module):
    """Class token + patch embeddings + learned position embeddings (as stored)."""

    def __init__(self, config: Mapping, *, dtype=None, rngs: nnx.Rngs):
        where = "vision_config."
        width, size = _get(config, "hidden_size", where), _get(config, "image_size", where)
        patch = _get(config, "patch_size", where)
        if not isinstance(size, int) or not isinstance(patch, int) or size % patch:
            raise ConfigError(f"CLIP config: {where}image_size {size!r} must be an int multiple "
                              f"of {where}patch_size {patch!r}")
        self.image_size = size
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (width,)) * 0.02)
        self.patch_embedding = vit.PatchEmbed(patch, config.get("num_channels", 3), width,
                                              dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed((size // patch) ** 2 + 1, width, dtype=dtype,
                                            rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        if pixels.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"images {pixels.shape[1:3]}, the model takes "
                             f"{self.image_size}x{self.image_size}")
        patches = self.patch_embedding(pixels)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype),
                               (patches.shape[0], 1, patches.shape[-1]))
        tokens = jnp.concatenate([cls, patches], axis=1)
        return tokens + self.position_embedding.embedding[...].astype(tokens.dtype)


class CLIPVision(nnx.Module):
    """transformers' CLIPVisionModel + visual_projection: {"pooled", "image_embeds"}."""

    def __init__(self, vision_config: Mapping, projection_dim: int, *, dtype=None,
                 rngs: nnx.Rngs):
        where = "vision_config."
        self.embeddings = VisionEmbeddings(vision_config, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = _layer_norm(vision_config, where, dtype, rngs)  # (sic), as the keys
        self.encoder = _encoder(vision_config, where, dtype, rngs)
        self.post_layernorm = _layer_norm(vision_config, where, dtype, rngs)
        self.visual_projection = nnx.Linear(_get(vision_config, "hidden_size", where),
                                            projection_dim, use_bias=False, dtype=dtype, rngs=rngs)

    @property
    def image_size(self) -> int:
        return self.embeddings.image_size

    def __call__(self, pixels: jax.Array) -> dict[str, jax.Array]:
        """pixels (N, S, S, C) normalised floats -> pooled (N, width), image_embeds (N, proj)."""
        hidden = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        pooled = self.post_layernorm(hidden[:, 0])
        return {"pooled": pooled, "image_embeds": self.visual_projection(pooled)}


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """The token transformers' CLIPTextModel pools, per row of (B, L) ids: the first
    `eos_token_id`, or for legacy configs (eos_token_id 2) the first largest id."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class TextEmbeddings(nnx.Module):
    """Token embeddings + learned position embeddings of the first L positions."""

    def __init__(self, config: Mapping, *, dtype=None, rngs: nnx.Rngs):
        where = "text_config."
        width = _get(config, "hidden_size", where)
        self.token_embedding = nnx.Embed(_get(config, "vocab_size", where), width, dtype=dtype,
                                         rngs=rngs)
        self.position_embedding = nnx.Embed(_get(config, "max_position_embeddings", where),
                                            width, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        tokens = self.token_embedding(input_ids)
        positions = self.position_embedding.embedding[...][:input_ids.shape[-1]]
        return tokens + positions.astype(tokens.dtype)


class CLIPText(nnx.Module):
    """transformers' CLIPTextModel + text_projection: text_embeds (B, projection_dim)."""

    def __init__(self, text_config: Mapping, projection_dim: int, *, dtype=None,
                 rngs: nnx.Rngs):
        where = "text_config."
        width = _get(text_config, "hidden_size", where)
        self.eos_token_id = _get(text_config, "eos_token_id", where)
        if not isinstance(self.eos_token_id, int):
            raise ConfigError(f"CLIP config: {where}eos_token_id {self.eos_token_id!r} is not "
                              f"one token id")
        self.embeddings = TextEmbeddings(text_config, dtype=dtype, rngs=rngs)
        self.encoder = _encoder(text_config, where, dtype, rngs)
        self.final_layer_norm = _layer_norm(text_config, where, dtype, rngs)
        self.text_projection = nnx.Linear(width, projection_dim, use_bias=False, dtype=dtype,
                                          rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
                 ) -> jax.Array:
        """input_ids (B, L) ints, attention_mask (B, L) (1: token, 0: padding) -> (B, proj)."""
        hidden = self.encoder(self.embeddings(input_ids),
                              vit.causal_mask(input_ids.shape[-1], attention_mask))
        hidden = self.final_layer_norm(hidden)
        pooled = hidden[jnp.arange(hidden.shape[0]), eos_positions(input_ids, self.eos_token_id)]
        return self.text_projection(pooled)


class CLIP(nnx.Module):
    """Both towers (`vision`, `text`; text=False leaves the text tower out) and `logit_scale`."""

    def __init__(self, config: Any, *, text: bool = True, dtype=None, rngs: nnx.Rngs):
        config = config_dict(config)
        projection = _get(config, "projection_dim", "")
        self.vision = CLIPVision(_get(config, "vision_config", ""), projection, dtype=dtype,
                                 rngs=rngs)
        self.text = CLIPText(_get(config, "text_config", ""), projection, dtype=dtype,
                             rngs=rngs) if text else None
        self.logit_scale = nnx.Param(jnp.asarray(config.get("logit_scale_init_value", 2.6592),
                                                 jnp.float32))


def load_prompts(directory: str | Path) -> tuple[list[str], np.ndarray]:
    """(prompts, their (8, projection_dim) embeddings) of a converted CLIP folder."""
    directory = Path(directory)
    convert.read_meta(directory, FAMILY)
    paths = [directory / PROMPTS_FILE, directory / PROMPT_EMBEDS_FILE]
    for path in paths:
        if not path.is_file():
            raise NotFoundError(f"{directory}: no {path.name} (convert the model again)")
    return json.loads(paths[0].read_text()), np.load(paths[1])


# ----------------------------------------------------------------------------------------------
# The ABAW-8 CLIP system: frozen image tower, two dense layers, cosine against class prompts

# The default run's CLIP when no weights are given (no download here): a random image tower of
# convert/clip.py's "tiny" widths on the synthetic crops' 112 pixels (patches of 16), its
# prompts random unit vectors (nearly orthogonal in 16-d, so the head has 8 distinct targets;
# random text-tower prompts came out up to 0.94-0.99 alike).
TINY_RANDOM = {
    "projection_dim": 16, "logit_scale_init_value": 2.6592,
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "image_size": 112, "patch_size": 16,
                      "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
}


class CLIPExpr(nnx.Module):
    """CLIP's image tower (frozen) and, for the `expr` output, the ABAW-8 head: Dense(hidden) +
    ReLU, Dense(projection) linear, cosine similarity to each class prompt's embedding, scaled by
    1 / temperature (fixed, or learned with `learn_temperature`): the `expr` logits, trained with
    `loss.expr=contrastive` (losses.contrastive); the prediction is the most similar prompt.

    Inputs: {"image"} (normalised, at the config's size) or cached {"features"} (the tower's
    image_embeds). Outputs: "expr" (N, 8) when asked, "embedding" (N, projection): the tower's
    projected image embedding, what the feature cache stores and temporal heads read.
    """

    inputs = ("image",)

    def __init__(self, *, outputs: Mapping[str, int], rngs: nnx.Rngs, feature_dim: int = 0,
                 clip: Mapping | None = None, mean: tuple[float, ...] = CLIP_MEAN,
                 std: tuple[float, ...] = CLIP_STD, hidden: int = 512,
                 temperature: float = 0.07, learn_temperature: bool = False, dtype=None):
        """`clip`: the image tower's config (`model_kwargs(<converted folder>)`, which also
        gives its `mean` and `std`); None: a tiny random CLIP (`TINY_RANDOM`), trained."""
        unknown = sorted(set(outputs) - {"expr"})
        if unknown:
            raise ConfigError(f"model clip predicts expressions from class prompts: task expr, "
                              f"not {unknown}")
        config = dict(clip) if clip else _random_config()
        self.clip = CLIP(config, text=False, dtype=dtype, rngs=rngs)
        self.embed_dim = width = config["projection_dim"]
        if feature_dim and feature_dim != width:
            raise ConfigError(f"cached features of width {feature_dim} cannot stand for this "
                              f"CLIP's {width}-wide image embedding")
        self.frozen = (r"^clip/",) if clip else ()
        self.preprocess = Preprocess(self.clip.vision.image_size, tuple(mean), tuple(std))
        self.outputs = dict(outputs)
        # Not a Param: loaded with the weights (`load_weights`), never trained.
        self.prompts = nnx.Variable(_unit(jax.random.normal(rngs.params(), (8, width))))
        self.fc1 = nnx.Linear(width, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, width, dtype=dtype, rngs=rngs)
        scale = jnp.asarray(math.log(1 / temperature), jnp.float32)
        self.log_scale = nnx.Param(scale) if learn_temperature else nnx.Variable(scale)

    def __call__(self, inputs: Inputs, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
        if "features" in inputs:
            embedding = inputs["features"]
        else:
            embedding = self.clip.vision(inputs["image"])["image_embeds"]
        out = {"embedding": embedding, "image_embeds": embedding}  # CLIP's name for it
        if "expr" in self.outputs:
            z = self.fc2(jax.nn.relu(self.fc1(embedding)))
            prompts = _unit(self.prompts[...].astype(z.dtype))
            out["expr"] = (_unit(z) @ prompts.T) * jnp.exp(self.log_scale[...]).astype(z.dtype)
        return out


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


_said_random = False


def _random_config() -> dict:
    global _said_random
    if not _said_random:
        logging.warning("model clip without model.clip: a tiny RANDOM CLIP, trained with "
                        "the head (random features carry nothing to keep frozen); for the "
                        "paper's frozen pretrained towers convert a model folder with `python -m "
                        "abaw_jax.convert clip` and pass configs/clip/expr.py:weights=<dir>")
        _said_random = True
    return TINY_RANDOM


# What the image tower needs of a CLIPConfig: the model's `clip` keyword, kept in the run's
# config.json (a workdir restores without the converted folder).
_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "image_size", "patch_size", "num_channels", "hidden_act", "layer_norm_eps")


def vision_spec(config: Any) -> dict:
    """The image tower's part of a CLIPConfig (dict): projection, logit scale, vision_config."""
    config = config_dict(config)
    vision = config_dict(_get(config, "vision_config", ""))
    return {"projection_dim": _get(config, "projection_dim", ""),
            "logit_scale_init_value": config.get("logit_scale_init_value", 2.6592),
            "vision_config": {k: vision[k] for k in _VISION_KEYS if k in vision}}


def model_kwargs(directory: str | Path) -> dict:
    """The model keywords of a converted CLIP folder (`clip`, `mean`, `std`): what
    `configs/clip/*.py:weights=<folder>` puts in `config.model`."""
    return dict(convert.read_meta(directory, FAMILY)["model_kwargs"])


def load_weights(model: CLIPExpr, path: str | Path) -> list[str]:
    """A converted folder into the model: the image tower and the prompt embeddings."""
    convert.load_into(model.clip, path)
    _, embeds = load_prompts(path)
    if embeds.shape != model.prompts.shape:
        raise WeightsError(f"{path}/{PROMPT_EMBEDS_FILE}: shape {embeds.shape}, the model's "
                           f"prompts {model.prompts.shape}")
    model.prompts.set_value(jnp.asarray(embeds, model.prompts.dtype))
    return []


def embed(model: CLIPExpr, inputs: Inputs) -> jax.Array:
    """A frame's projected CLIP image embedding: what the feature cache stores."""
    return model(inputs)["embedding"]


# Cached embeddings replace the tower; its prompts go with it (the extracting model's are
# copied). A pretrained tower is never trained (the paper freezes both CLIP towers); the random
# one of a run without weights is (frozen, its features carry no expression: the default
# synthetic run reached macro F1 0.07-0.10 against a constant 0.055, and 0.33 trained).
register(Family(FAMILY, lambda **kw: CLIPExpr(**kw), preprocess=lambda model: model.preprocess,
                embed=embed, backbone=(r"^(clip/|prompts$)",), frozen=lambda model: model.frozen,
                load_weights=load_weights, returns=("image_embeds",)))
