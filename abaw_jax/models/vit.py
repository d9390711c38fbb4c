"""Pre-norm transformer encoder pieces (Flax NNX) shared by the ViT families (CLIP, MAE).

Tokens are (batch, length, width). Module and parameter names follow transformers' CLIP
(`self_attn.{q,k,v,out}_proj`, `mlp.fc1/fc2`, `layer_norm1/2`), so a converter maps keys by
renaming leaves (`kernel` -> `weight`) and transposing Dense kernels (MAE's timm blocks: by
renaming modules and splitting the fused `attn.qkv` into thirds, `convert/mae.py`).
Parameters are float32; `dtype` is the compute dtype (None: float32), with softmax and
layer-norm statistics in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from abaw_jax.errors import ConfigError

# transformers' `hidden_act` names (transformers.activations.ACT2CLS) -> the same function.
# "gelu" is the exact erf form; the tanh forms (gelu_new, gelu_pytorch_tanh, gelu_fast) are one
# formula written three ways there.
_TANH_GELU = functools.partial(jax.nn.gelu, approximate=True)
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": _TANH_GELU,
    "gelu_pytorch_tanh": _TANH_GELU,
    "gelu_fast": _TANH_GELU,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation transformers calls `name` (a config's `hidden_act`)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"hidden_act {name!r} is not supported; known: "
                          f"{sorted(ACTIVATIONS)}") from None


def causal_mask(length: int, padding: jax.Array | None = None) -> jax.Array:
    """Boolean attention mask (True: attend), (1, 1, L, L) or with `padding` (B, L; 1 for real
    tokens) (B, 1, L, L): each query sees itself, earlier tokens, and no padding."""
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if padding is None:
        return mask
    return mask & (padding[:, None, None, :] > 0)


class Attention(nnx.Module):
    """Multi-head self-attention with biased q/k/v/out projections (1/sqrt(head width) scale).

    timm's fused `qkv` projection (MAE) is loaded as three: one 768 x 2304 product was no faster
    on XLA:CPU than three 768 x 768 ones (ViT-B width, 32 x 197 tokens: 169 against 122 ms
    forward, 464 against 375 ms with the gradient).
    """

    def __init__(self, width: int, heads: int, *, dtype=None, rngs: nnx.Rngs):
        if width % heads:
            raise ConfigError(f"width {width} is not a multiple of {heads} attention heads")
        self.heads = heads
        dense = functools.partial(nnx.Linear, width, width, dtype=dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = dense(), dense(), dense(), dense()

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x (B, L, D); mask broadcastable to (B, heads, L, L), True where a query attends."""
        b, length, width = x.shape
        split = (b, length, self.heads, width // self.heads)

        # Heads first (B, H, L, d): XLA:CPU's batched dots want leading batch dimensions. With
        # (B, L, H, d) operands it transposed inside each product: the attention of a ViT-B/16
        # layer (batch 32) took 221 ms against 85 ms, 130 ms with these explicit transposes.
        def heads(dense, scale=1.0):
            return (dense(x).reshape(split) * scale).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj, split[-1] ** -0.5), heads(self.k_proj), heads(self.v_proj)
        logits = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32)
        if mask is not None:  # the lowest finite value, as transformers: no NaN for empty rows
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = (weights @ v).transpose(0, 2, 1, 3)
        return self.out_proj(out.reshape(b, length, width))


class MLP(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, width: int, hidden: int, act: str, *, dtype=None, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(width, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, width, dtype=dtype, rngs=rngs)
        self.act = activation(act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


def layer_norm(width: int, eps: float, *, dtype=None, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=eps, dtype=dtype, rngs=rngs)


def stochastic_depth(rate: float) -> nnx.Dropout:
    """Stochastic depth on (B, L, D) tokens, as timm's DropPath: in training, a sample's whole
    residual branch is dropped with probability `rate` and kept ones scaled by 1 / (1 - rate);
    nothing in eval mode (`model.eval()`). No variables: a model's state is the same with it."""
    return nnx.Dropout(rate, broadcast_dims=(1, 2))


class EncoderLayer(nnx.Module):
    """x + attn(LN1(x)), then x + MLP(LN2(x)); each branch through
    `stochastic_depth(drop_path)` (0: none)."""

    def __init__(self, width: int, heads: int, hidden: int, act: str, eps: float, *,
                 drop_path: float = 0.0, dtype=None, rngs: nnx.Rngs):
        self.layer_norm1 = layer_norm(width, eps, dtype=dtype, rngs=rngs)
        self.self_attn = Attention(width, heads, dtype=dtype, rngs=rngs)
        self.layer_norm2 = layer_norm(width, eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(width, hidden, act, dtype=dtype, rngs=rngs)
        self.drop_path = stochastic_depth(drop_path)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        x = x + self.drop_path(self.self_attn(self.layer_norm1(x), mask), rngs=rngs)
        return x + self.drop_path(self.mlp(self.layer_norm2(x)), rngs=rngs)


class Encoder(nnx.Module):
    """`depth` encoder layers (`layers.N`); drop path rising linearly from 0 in the first layer
    to `drop_path` in the last (timm's and MAE's stochastic depth decay rule)."""

    def __init__(self, depth: int, width: int, heads: int, hidden: int, act: str, eps: float, *,
                 drop_path: float = 0.0, dtype=None, rngs: nnx.Rngs):
        self.layers = nnx.List([EncoderLayer(width, heads, hidden, act, eps,
                                             drop_path=float(rate), dtype=dtype, rngs=rngs)
                                for rate in np.linspace(0, drop_path, depth)])

    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        for layer in self.layers:
            x = layer(x, mask, rngs)
        return x


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """NHWC images -> (B, patches, patch * patch * C): non-overlapping patches in row-major
    order, each flattened (row, column, channel), as MAE's `patchify` of NCHW images."""
    b, h, w, c = images.shape
    p = patch
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch: int, channels: int = 3) -> jax.Array:
    """The inverse of `patchify` for square images: (B, g * g, p * p * C) -> (B, g*p, g*p, C)."""
    b, n, _ = patches.shape
    g, p = int(round(n ** 0.5)), patch
    if g * g != n:
        raise ValueError(f"{n} patches do not tile a square image")
    x = patches.reshape(b, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * p, g * p, channels)


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches of NHWC images -> (B, patches, width), row-major.

    The kernel is stored as a conv's (p, p, C, width) (HWIO, as nnx.Conv) and applied as one
    matrix product over the flattened patches: the same result as the stride-p conv, and a dot
    is fast on every backend.
    """

    def __init__(self, patch: int, channels: int, width: int, *, use_bias: bool = False,
                 dtype=None, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()  # nnx.Conv's default
        self.kernel = nnx.Param(init(rngs.params(), (patch, patch, channels, width)))
        self.bias = nnx.Param(jnp.zeros((width,))) if use_bias else None
        self.patch, self.dtype = patch, dtype

    def __call__(self, images: jax.Array) -> jax.Array:
        p, c = self.patch, images.shape[-1]
        dtype = self.dtype or jnp.float32
        patches = patchify(images, p).astype(dtype)
        out = patches @ self.kernel[...].reshape(p * p * c, -1).astype(dtype)
        return out if self.bias is None else out + self.bias[...].astype(dtype)
