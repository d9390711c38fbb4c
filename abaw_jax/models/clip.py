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

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from abaw_jax.errors import ConfigError
from abaw_jax.models import vit

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
