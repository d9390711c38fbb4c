"""DDAMFN (Zhang et al. 2023): MixedFeatureNet trunk, dual-direction attention heads, GDConv.

A faithful port of the reference PyTorch `DDAMNet` (see shared/specs/ddamfn.md) in NHWC. Module
and attribute names mirror the PyTorch module tree (`features.3.model.0.conv_dw...`,
`heads.0.Linear_h` for `cat_head0.CoordAtt.Linear_h`, `gdconv` for `Linear`) so the converter is a
rename of leaf names. The parts of the reference that exist but are never applied (each MixConv's
`bn`/`prelu`, each head's 7x7 `Linear` block, the final `BatchNorm1d`) are not built.

Inputs: {"image": (N, 112, 112, 3) float32, normalised with the ImageNet mean/std} or, from the
feature cache, {"features": (N, W)}: the model's own embeddings, through the task layers only.
Registered as the families "ddamfn" (official trunk) and "ddamfn_tiny". `gcsa=True`
(`model.gcsa`) inserts the GCSA paper's global channel-spatial attention (models/gcsa.py)
between the trunk and the attention heads; converted weights leave it initialised.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from abaw_jax import convert, losses
from abaw_jax.errors import ConfigError
from abaw_jax.models.family import Family, Inputs, Preprocess, register
from abaw_jax.models.gcsa import GCSA
from abaw_jax.models.layers import (
    ConvBlock,
    CoordAtt,
    CoordAttCore,
    Impl,
    LinearBlock,
    MixedDepthwiseConv,
)

INPUT_SIZE = 112
OFFICIAL_OUTPUTS = {"logits": 8}
RESERVED_OUTPUTS = ("feature_map", "heads", "embedding", "losses")


@dataclasses.dataclass(frozen=True)
class Mix:
    """One MixDepthWise block: expansion width and its channel groups' kernel sizes."""

    groups: int
    kernels: tuple[int, ...]
    splits: tuple[int, ...]

    def __post_init__(self):
        if len(self.kernels) != len(self.splits) or sum(self.splits) != self.groups:
            raise ValueError(f"splits {self.splits} must match kernels {self.kernels} and sum "
                             f"to groups={self.groups}")


@dataclasses.dataclass(frozen=True)
class Level:
    """A stride-2 MixDepthWise to `width` channels, then `blocks` residual MixDepthWise."""

    width: int
    down: Mix
    blocks: int
    residual: Mix


@dataclasses.dataclass(frozen=True)
class Trunk:
    """The MixedFeatureNet stage table: stride-2 stem conv, depthwise conv, levels, 1x1 conv."""

    stem: int
    levels: tuple[Level, ...]
    width: int

    @property
    def map_size(self) -> int:
        """Side of the final feature map: the stem and every level halve the input."""
        return INPUT_SIZE >> (1 + len(self.levels))


# The spec's table, features.0 .. features.8 of the reference.
OFFICIAL_TRUNK = Trunk(
    stem=64,
    levels=(
        Level(64, Mix(128, (3, 5, 7), (64, 32, 32)), 9, Mix(128, (3, 5), (96, 32))),
        Level(128, Mix(256, (3, 5, 7), (128, 64, 64)), 16, Mix(256, (3, 5), (192, 64))),
        Level(256, Mix(1024, (3, 5, 7, 9), (256,) * 4), 6, Mix(512, (3, 5, 7), (172, 170, 170))),
    ),
    width=512,
)

# Same block types and 112 -> 7x7 geometry, one residual block per level and a quarter of the
# widths; the final map (and the embedding) is 128 wide instead of 512. For CPU tests.
TINY_TRUNK = Trunk(
    stem=16,
    levels=(
        Level(16, Mix(32, (3, 5, 7), (16, 8, 8)), 1, Mix(32, (3, 5), (24, 8))),
        Level(32, Mix(64, (3, 5, 7), (32, 16, 16)), 1, Mix(64, (3, 5), (48, 16))),
        Level(64, Mix(128, (3, 5, 7, 9), (32,) * 4), 1, Mix(128, (3, 5, 7), (44, 42, 42))),
    ),
    width=128,
)


class MixDepthWise(nnx.Module):
    """1x1 ConvBlock -> mixed depthwise conv -> coordinate attention -> 1x1 LinearBlock (+ x)."""

    def __init__(self, in_features: int, out_features: int, mix: Mix, *, stride: int,
                 residual: bool, impl: Impl, rngs: nnx.Rngs):
        if residual and (in_features != out_features or stride != 1):
            raise ValueError("a residual MixDepthWise needs in == out and stride 1")
        self.conv = ConvBlock(in_features, mix.groups, 1, rngs=rngs)
        self.conv_dw = MixedDepthwiseConv(mix.kernels, mix.splits, stride=stride, impl=impl,
                                          rngs=rngs)
        self.CA = CoordAtt(mix.groups, rngs=rngs)
        self.project = LinearBlock(mix.groups, out_features, 1, rngs=rngs)
        self.residual = residual

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.project(self.CA(self.conv_dw(self.conv(x))))
        return x + y if self.residual else y


class MixResidual(nnx.Module):
    """`blocks` residual MixDepthWise at constant width."""

    def __init__(self, features: int, mix: Mix, blocks: int, *, impl: Impl, rngs: nnx.Rngs):
        self.model = nnx.List([
            MixDepthWise(features, features, mix, stride=1, residual=True, impl=impl, rngs=rngs)
            for _ in range(blocks)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.model:
            x = block(x)
        return x


class DualDirectionAttention(CoordAttCore):
    """A DDAMFN attention head (`cat_head{i}.CoordAtt`): coordinate attention whose pooling is
    learned, a depthwise (1, S) conv along W and (S, 1) along H; returns the map a_w * a_h."""

    def __init__(self, features: int, map_size: int, *, impl: Impl, rngs: nnx.Rngs):
        super().__init__(features, max(8, features // 32), rngs)
        self.Linear_h = LinearBlock(features, features, (1, map_size), depthwise=True, impl=impl,
                                    rngs=rngs)
        self.Linear_w = LinearBlock(features, features, (map_size, 1), depthwise=True, impl=impl,
                                    rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        a_h, a_w = self.attention(self.Linear_h(x), self.Linear_w(x))
        return a_w * a_h


def _trunk(cfg: Trunk, impl: Impl, rngs: nnx.Rngs) -> list[nnx.Module]:
    layers = [ConvBlock(3, cfg.stem, 3, stride=2, padding=1, rngs=rngs),
              ConvBlock(cfg.stem, cfg.stem, 3, padding=1, depthwise=True, impl=impl, rngs=rngs)]
    width = cfg.stem
    for level in cfg.levels:
        layers.append(MixDepthWise(width, level.width, level.down, stride=2, residual=False,
                                   impl=impl, rngs=rngs))
        layers.append(MixResidual(level.width, level.residual, level.blocks, impl=impl,
                                  rngs=rngs))
        width = level.width
    layers.append(ConvBlock(width, cfg.width, 1, rngs=rngs))
    return layers


class DDAMFN(nnx.Module):
    """DDAMFN with one linear layer per task on the GDConv embedding.

    outputs: task name -> size, one `nnx.Linear(width, size)` each under `tasks.<name>`; None is
      the official classifier {"logits": 8} (the converter maps the reference `fc` to it).
    num_head: attention heads, combined by an element-wise maximum.
    trunk: the stage table (OFFICIAL_TRUNK or TINY_TRUNK).
    gcsa: GCSA (module `gcsa`) on the trunk's final map, before the attention heads.
    depthwise_impl: forces 'shift' or 'xla' depthwise convs; None picks per backend.
    rngs: parameter initialisation; None is nnx.Rngs(0).

    Returns {"feature_map": (N, S, S, W), "heads": [num_head x (N, S, S, W)], "embedding": (N, W),
    "losses": {"head": the attention-head diversity loss}, <task>: (N, size) per task} with S = 7
    and W = trunk.width (512 official, 128 tiny); from cached "features" only the embedding and
    the task outputs.
    Train / eval BatchNorm via `model.train()` / `model.eval()`.
    """

    def __init__(self, outputs: Mapping[str, int] | None = None, *, num_head: int = 2,
                 trunk: Trunk = OFFICIAL_TRUNK, depthwise_impl: Impl = None,
                 gcsa: bool = False, rngs: nnx.Rngs | None = None):
        outputs = dict(OFFICIAL_OUTPUTS if outputs is None else outputs)
        clash = sorted(set(outputs) & set(RESERVED_OUTPUTS))
        if clash:
            raise ConfigError(f"output names {clash} are reserved ({RESERVED_OUTPUTS})")
        if num_head < 1:
            raise ConfigError(f"num_head must be >= 1, got {num_head}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.trunk, self.num_head, self.outputs = trunk, num_head, outputs
        self.features = nnx.List(_trunk(trunk, depthwise_impl, rngs))
        self.gcsa = GCSA(trunk.width, rngs=rngs) if gcsa else None
        self.heads = nnx.List([
            DualDirectionAttention(trunk.width, trunk.map_size, impl=depthwise_impl, rngs=rngs)
            for _ in range(num_head)])
        # GDConv: a depthwise conv over the whole map is a learned global pooling.
        self.gdconv = LinearBlock(trunk.width, trunk.width, trunk.map_size, depthwise=True,
                                  impl=depthwise_impl, rngs=rngs)
        self.tasks = nnx.Dict({name: nnx.Linear(trunk.width, size, rngs=rngs)
                               for name, size in outputs.items()})

    @property
    def embed_dim(self) -> int:
        return self.trunk.width

    inputs = ("image",)

    def __call__(self, inputs: Inputs, rngs: nnx.Rngs | None = None) -> dict:
        if "features" in inputs:  # cached embeddings: the task layers only
            embedding = inputs["features"]
            return {"embedding": embedding,
                    **{name: self.tasks[name](embedding) for name in self.outputs}}
        x = inputs["image"]
        if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"DDAMFN expects (N, {INPUT_SIZE}, {INPUT_SIZE}, 3), got {x.shape}")
        for layer in self.features:
            x = layer(x)
        if self.gcsa is not None:
            x = self.gcsa(x)
        heads = [head(x) for head in self.heads]
        attention = functools.reduce(jnp.maximum, heads)
        embedding = self.gdconv(x * attention).reshape(x.shape[0], -1)
        out = {"feature_map": x, "heads": heads, "embedding": embedding,
               "losses": {"head": losses.head_diversity([h.astype(jnp.float32) for h in heads])}}
        out.update({name: self.tasks[name](embedding) for name in self.outputs})
        return out


def _build(trunk: Trunk, *, feature_dim: int = 0, **kwargs) -> DDAMFN:
    if feature_dim and feature_dim != trunk.width:
        raise ConfigError(f"cached features of width {feature_dim} cannot replace this DDAMFN's "
                          f"{trunk.width}-wide embedding")
    return DDAMFN(trunk=trunk, **kwargs)


def ddamfn(**kwargs) -> DDAMFN:
    """The official trunk (registry name 'ddamfn'); kwargs as DDAMFN."""
    return _build(OFFICIAL_TRUNK, **kwargs)


def ddamfn_tiny(**kwargs) -> DDAMFN:
    """TINY_TRUNK, for CPU tests (registry name 'ddamfn_tiny'); kwargs as DDAMFN."""
    return _build(TINY_TRUNK, **kwargs)


def embed(model: DDAMFN, inputs: Inputs) -> jax.Array:
    """A frame's GDConv embedding (N, W): what the feature cache stores."""
    return model(inputs)["embedding"]


def load_weights(model: DDAMFN, path) -> list[str]:
    """A converted DDAMFN into the model; its GCSA (not in the public model) stays initialised."""
    return convert.load_into(model, path, absent=("gcsa.",))


PREPROCESS = Preprocess(INPUT_SIZE)  # ImageNet mean / std, as the official training
for _name, _factory in (("ddamfn", ddamfn), ("ddamfn_tiny", ddamfn_tiny)):
    register(Family(_name, _factory, preprocess=PREPROCESS, embed=embed,
                    backbone=("^(features|gcsa|heads|gdconv)/",), load_weights=load_weights))
