"""GCSA (ABAW-8, Yu et al. 2025): global channel-spatial attention, the RHCNN visual and MCNN
audio networks, and their audio-visual model with one output per branch.

- `GCSA(C)` on any NHWC feature map: channel attention (an MLP over the channel axis, C -> C/4 ->
  ReLU -> C, sigmoid) times the map; a channel shuffle of 4 groups; spatial attention (7x7 conv to
  C/4 -> BN -> ReLU -> 7x7 conv to C -> BN -> sigmoid) times the shuffled map.
- `RHCNN` (visual, "image" input): two conv-BN-ReLU blocks, then stages of residual blocks (1x1
  conv -> NxN depthwise conv -> 1x1 conv, channel shuffle after each), GCSA, global average
  pooling, dropout, the task layers.
- `MCNN` (audio, "audio" input: the per-frame log-mel window (N, W, M) in dB): BatchNorm of the
  input, three branches of two stride-2 conv-BN-ReLU blocks (local: square kernels; temporal:
  kernels along time; spatial: along the mel bands), concatenated, max-pooled 2x2, GCSA, global
  pooling, dropout, task layers.
- `AudioVisual` ("image" and "audio"): both networks side by side, each giving its own task
  outputs, returned as `{"branches": {"visual": {...}, "audio": {...}}}`; `tasks.Task` trains
  each branch with the head's loss (summed) and predicts the head as the mean of the branches'
  probabilities; the weights of the paper's decision fusion P = (m P_audio + n P_visual) /
  (m + n) are searched on validation (`postprocess.Post`).

The paper leaves the networks' sizes open: `RHCNN_REAL` / `MCNN_REAL` are ours (a few million
multiply-adds a frame), `*_TINY` the CPU defaults (configs/gcsa/). `gcsa=False` leaves the
module out (the paper's "Base" ablation); `DDAMFN(gcsa=True)` inserts it into DDAMFN's trunk.
Registered as the families "gcsa_visual", "gcsa_audio" and "gcsa_av".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from abaw_jax.errors import ConfigError
from abaw_jax.models.family import Family, Inputs, Preprocess, register
from abaw_jax.models.layers import Impl, LinearBlock, batch_norm

Kernel = tuple[int, int]

# The paper's module: channel MLP and spatial convs reduce to C/4, the shuffle has 4 groups.
REDUCTION, GROUPS, SPATIAL_KERNEL = 4, 4, 7

# Sizes the paper does not give (ours). Real: 112x112 faces -> 56x56 after the stem -> 7x7x256;
# the audio window of 101 steps x 64 bands -> 13x8, 3 x 32 channels. GCSA's two 7x7 convs cost
# 49 C^2 / 2 multiply-adds a position: 79M a face at 7x7x256, 24M a window at 13x8x96 (at 26x16
# with 3 x 64 channels: 16x that, 620 ms of forward and backward at batch 16 on the 2-core CPU).
RHCNN_REAL = {"image_size": 112, "stem": 32, "stages": ((64, 2, 2), (128, 3, 2), (256, 2, 2)),
              "kernel": 3, "expand": 2}
MCNN_REAL = {"widths": (16, 32), "branches": {"local": ((3, 3), (5, 5)),
                                             "temporal": ((9, 1), (15, 1)),
                                             "spatial": ((1, 9), (1, 15))}}
# CPU defaults: 64x64 faces -> 32x32 after the stem -> 8x8x64; audio -> 13x8, 3 x 16 channels.
RHCNN_TINY = {"image_size": 64, "stem": 16, "stages": ((32, 1, 2), (64, 1, 2)), "kernel": 3,
              "expand": 2}
MCNN_TINY = {"widths": (8, 16), "branches": MCNN_REAL["branches"]}
DROPOUT = 0.2  # before the task layers (the paper's fully connected layer)


def _check_groups(channels: int, groups: int) -> None:
    if channels % groups:
        raise ConfigError(f"channel shuffle: {channels} channels do not split into {groups} "
                          "groups")


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """ShuffleNet's shuffle of the last (channel) axis: split into `groups` groups, transpose
    (group, channel within group), flatten. A permutation of the channels."""
    c = x.shape[-1]
    _check_groups(c, groups)
    return x.reshape(*x.shape[:-1], groups, c // groups).swapaxes(-1, -2).reshape(x.shape)


class GCSA(nnx.Module):
    """Global channel-spatial attention on an NHWC map of `features` channels (same shape out).

    The 7x7 convs are padded to keep the map's size, so any map size works; they have no bias
    (BatchNorm follows each).
    """

    def __init__(self, features: int, *, reduction: int = REDUCTION, groups: int = GROUPS,
                 kernel: int = SPATIAL_KERNEL, rngs: nnx.Rngs):
        _check_groups(features, groups)
        hidden = max(1, features // reduction)
        self.groups = groups
        self.channel_fc1 = nnx.Linear(features, hidden, rngs=rngs)
        self.channel_fc2 = nnx.Linear(hidden, features, rngs=rngs)
        self.spatial1 = LinearBlock(features, hidden, kernel, padding=kernel // 2, rngs=rngs)
        self.spatial2 = LinearBlock(hidden, features, kernel, padding=kernel // 2, rngs=rngs)

    def channel_attention(self, x: jax.Array) -> jax.Array:
        """Per position, sigmoid(MLP(channels)): a map of x's shape in (0, 1)."""
        return jax.nn.sigmoid(self.channel_fc2(jax.nn.relu(self.channel_fc1(x))))

    def spatial_attention(self, x: jax.Array) -> jax.Array:
        """sigmoid(BN(conv7x7(ReLU(BN(conv7x7(x)))))): a map of x's shape in (0, 1)."""
        return jax.nn.sigmoid(self.spatial2(jax.nn.relu(self.spatial1(x))))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = channel_shuffle(x * self.channel_attention(x), self.groups)
        return x * self.spatial_attention(x)


class ConvReLU(LinearBlock):
    """conv -> BatchNorm -> ReLU (the paper's convolutional block), symmetric padding k // 2."""

    def __init__(self, in_features: int, out_features: int, kernel: int | Kernel, *,
                 stride: int = 1, rngs: nnx.Rngs):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        super().__init__(in_features, out_features, (kh, kw), stride=stride,
                         padding=(kh // 2, kw // 2), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(super().__call__(x))


class ResidualBlock(nnx.Module):
    """RHCNN's block: 1x1 conv (to `expand` x the input width) -> BN -> ReLU -> NxN depthwise
    (stride) -> BN -> ReLU -> 1x1 conv -> BN, plus the input when the shapes allow, then a
    channel shuffle."""

    def __init__(self, in_features: int, out_features: int, *, kernel: int, stride: int,
                 expand: int, impl: Impl, rngs: nnx.Rngs):
        _check_groups(out_features, GROUPS)
        hidden = in_features * expand
        self.expand = LinearBlock(in_features, hidden, 1, rngs=rngs)
        self.depthwise = LinearBlock(hidden, hidden, kernel, stride=stride, padding=kernel // 2,
                                     depthwise=True, impl=impl, rngs=rngs)
        self.project = LinearBlock(hidden, out_features, 1, rngs=rngs)
        self.residual = stride == 1 and in_features == out_features

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.project(jax.nn.relu(self.depthwise(jax.nn.relu(self.expand(x)))))
        return channel_shuffle(x + y if self.residual else y, GROUPS)


class _Classifier(nnx.Module):
    """The shared end of both networks: optional GCSA, global average pooling (the embedding),
    dropout, one linear layer per task."""

    def _init_head(self, width: int, outputs: Mapping[str, int], gcsa: bool, dropout: float,
                   rngs: nnx.Rngs) -> None:
        self.outputs, self.embed_dim = dict(outputs), width
        self.gcsa = GCSA(width, rngs=rngs) if gcsa else None
        self.dropout = nnx.Dropout(dropout)
        self.tasks = nnx.Dict({name: nnx.Linear(width, size, rngs=rngs)
                               for name, size in self.outputs.items()})

    def _head(self, x: jax.Array, rngs: nnx.Rngs | None) -> dict[str, jax.Array]:
        if self.gcsa is not None:
            x = self.gcsa(x)
        return self._tasks(x.mean(axis=(1, 2)), rngs)

    def _tasks(self, embedding: jax.Array, rngs: nnx.Rngs | None) -> dict[str, jax.Array]:
        dropped = self.dropout(embedding, rngs=rngs)
        return {"embedding": embedding,
                **{name: self.tasks[name](dropped) for name in self.outputs}}


class RHCNN(_Classifier):
    """The visual network on (N, S, S, 3) normalised faces, S = `image_size`.

    stem: width of the two conv blocks (the first of stride 2); stages: (width, blocks,
    stride) each, the first block of a stage takes its stride and width; kernel: N of the NxN
    convs; expand: the residual blocks' 1x1 expansion. From cached "features" (its own
    embeddings), the task layers only.
    """

    inputs = ("image",)

    def __init__(self, outputs: Mapping[str, int], *, image_size: int, stem: int,
                 stages: Sequence[Sequence[int]], kernel: int = 3, expand: int = 2,
                 gcsa: bool = True, dropout: float = DROPOUT, depthwise_impl: Impl = None,
                 feature_dim: int = 0, rngs: nnx.Rngs):
        self.preprocess = Preprocess(int(image_size))
        layers: list[nnx.Module] = [ConvReLU(3, stem, kernel, stride=2, rngs=rngs),
                                    ConvReLU(stem, stem, kernel, rngs=rngs)]
        width = stem
        for out, blocks, stride in stages:
            for b in range(blocks):
                layers.append(ResidualBlock(width, out, kernel=kernel,
                                            stride=stride if b == 0 else 1, expand=expand,
                                            impl=depthwise_impl, rngs=rngs))
                width = out
        if feature_dim and feature_dim != width:
            raise ConfigError(f"cached features of width {feature_dim} cannot replace this "
                              f"RHCNN's {width}-wide embedding")
        self.features = nnx.List(layers)
        self._init_head(width, outputs, gcsa, dropout, rngs)

    def feature_map(self, inputs: Inputs) -> jax.Array:
        """The map GCSA takes: (N, S / 4 / strides, ..., width)."""
        x = inputs["image"]
        size = self.preprocess.size
        if x.shape[1:] != (size, size, 3):
            raise ValueError(f"RHCNN expects (N, {size}, {size}, 3), got {x.shape}")
        for layer in self.features:
            x = layer(x)
        return x

    def __call__(self, inputs: Inputs, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
        if "features" in inputs:
            return self._tasks(inputs["features"], rngs)
        return self._head(self.feature_map(inputs), rngs)


class MCNN(_Classifier):
    """The audio network on the per-frame log-mel window (N, W, M) (time steps, mel bands).

    widths: the channels of each branch's two blocks (both stride 2); branches: name -> the
    (kh, kw) kernels of its two blocks over (time, mel). The input is BatchNorm-ed as one
    channel (the dB values, floor -100, are far from unit scale).
    """

    inputs = ("audio",)

    def __init__(self, outputs: Mapping[str, int], *, widths: Sequence[int],
                 branches: Mapping[str, Sequence[Kernel]], gcsa: bool = True,
                 dropout: float = DROPOUT, feature_dim: int = 0, rngs: nnx.Rngs):
        if feature_dim:
            raise ConfigError("gcsa_audio takes the audio input, not cached features")
        first, second = widths
        self.input_norm = batch_norm(1, rngs)
        self.branches = nnx.Dict({
            name: nnx.List([ConvReLU(1, first, tuple(k1), stride=2, rngs=rngs),
                            ConvReLU(first, second, tuple(k2), stride=2, rngs=rngs)])
            for name, (k1, k2) in branches.items()})
        self._init_head(second * len(branches), outputs, gcsa, dropout, rngs)

    def feature_map(self, inputs: Inputs) -> jax.Array:
        """The map GCSA takes: the branches' maps side by side, pooled: (N, W / 8, M / 8,
        3 x width)."""
        x = inputs["audio"]
        if x.ndim != 3:
            raise ValueError(f"MCNN expects log-mel windows (N, steps, bands), got {x.shape}")
        x = self.input_norm(x[..., None])
        maps = []
        for name in sorted(self.branches):
            y = x
            for block in self.branches[name]:
                y = block(y)
            maps.append(y)
        # Pooled 2x2 (max): a quarter of GCSA's cost (its 7x7 convs were ~2/3 of the tiny
        # audio-visual train step at 26x16, benchmarks/gcsa.py).
        return nnx.max_pool(jnp.concatenate(maps, axis=-1), (2, 2), (2, 2), "SAME")

    def __call__(self, inputs: Inputs, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
        return self._head(self.feature_map(inputs), rngs)


class AudioVisual(nnx.Module):
    """RHCNN and MCNN side by side: {"branches": {"visual": {task: (N, size)}, "audio": {...}}}
    (the decision fusion happens on their probabilities, outside the model)."""

    inputs = ("image", "audio")

    def __init__(self, outputs: Mapping[str, int], *, visual: Mapping[str, Any],
                 audio: Mapping[str, Any], feature_dim: int = 0, rngs: nnx.Rngs):
        if feature_dim:
            raise ConfigError("gcsa_av takes images and audio, not cached features")
        self.outputs = dict(outputs)
        self.visual = RHCNN(outputs, **dict(visual), rngs=rngs)
        self.audio = MCNN(outputs, **dict(audio), rngs=rngs)
        self.preprocess = self.visual.preprocess

    def __call__(self, inputs: Inputs, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
        branches = {}
        for branch, model in (("visual", self.visual), ("audio", self.audio)):
            got = model({k: inputs[k] for k in model.inputs}, rngs)
            branches[branch] = {name: got[name] for name in self.outputs}
        return {"branches": branches}


def embed(model: RHCNN | MCNN, inputs: Inputs) -> jax.Array:
    """A face's pooled RHCNN feature, or a frame's pooled MCNN feature of its sound window
    (N, width): what the feature cache stores (`--mode=extract`; the MCNN's is the audio
    input of the MAE fusion model, configs/mae/fusion_*.py)."""
    return model(inputs)["embedding"]


def _build(cls, outputs: Mapping[str, int], rngs: nnx.Rngs | None = None, **kwargs):
    return cls(dict(outputs or {}), rngs=rngs if rngs is not None else nnx.Rngs(0), **kwargs)


register(Family("gcsa_visual", lambda **kw: _build(RHCNN, **kw),
                preprocess=lambda model: model.preprocess, embed=embed,
                backbone=(r"^(features|gcsa)/",)))
register(Family("gcsa_audio", lambda **kw: _build(MCNN, **kw), embed=embed))
register(Family("gcsa_av", lambda **kw: _build(AudioVisual, **kw),
                preprocess=lambda model: model.preprocess))
