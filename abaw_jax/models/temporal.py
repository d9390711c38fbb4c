"""Temporal heads over clips: an LSTM ("lstm") or a transformer encoder ("transformer") over
per-frame embeddings, one linear task layer per output, per frame; and the MAE fusion model
("fusion": the transformer on cached visual features joined with audio features, `FusionHead`).

The embeddings come from any registered frame family run per frame (`model.backbone`, e.g.
"ddamfn_tiny": the ABAW DDAMFN+LSTM systems, built with `model.backbone_kwargs`; its model's
"embedding" output and `embed_dim`, see family.py), or from the feature cache (`data.features`: one
or several `--mode=extract` outputs concatenated per frame, e.g. visual + audio for the MAE
fusion; then `backbone` may be None and `feature_dim` is the cache's width).

Inputs: {"image": (B, T, S, S, 3)} through the backbone, or {"features": (B, T, D)}; the
transformer also takes "frame_mask" (B, T), False where a clip is padded (its attention skips
those frames). Outputs: {task: (B, T, size)}, "embedding" (B, T, D), and the backbone's own
"losses" over the B*T frames.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from abaw_jax.errors import ConfigError
from abaw_jax.models import family as family_lib
from abaw_jax.models import layers as layers_lib
from abaw_jax.models.family import Family, Inputs, register


class _Temporal(nnx.Module):
    """The part both heads share: the backbone per frame (or cached features), task layers."""

    def _init_backbone(self, backbone: str | None, feature_dim: int, rngs: nnx.Rngs,
                       backbone_kwargs: Mapping | None) -> int:
        self.backbone_name = backbone
        if backbone is None:
            if not feature_dim:
                raise ConfigError("a temporal head without a backbone trains on cached features: "
                                  "set data.features")
            self.backbone = None
            return feature_dim
        self.backbone = family_lib.get(backbone).build(outputs={}, rngs=rngs,
                                                       **dict(backbone_kwargs or {}))
        width = self.backbone.embed_dim
        if feature_dim and feature_dim != width:
            raise ConfigError(f"cached features of width {feature_dim} cannot stand for the "
                              f"{backbone} backbone's {width}-wide embedding")
        return width

    def _init_tasks(self, outputs: Mapping[str, int], width: int, rngs: nnx.Rngs) -> None:
        self.outputs = dict(outputs)
        self.tasks = nnx.Dict({name: nnx.Linear(width, size, rngs=rngs)
                               for name, size in self.outputs.items()})

    @property
    def embed_dim(self) -> int:
        return self.width

    def _embeddings(self, inputs: Inputs, rngs: nnx.Rngs | None) -> tuple[jax.Array, dict]:
        if "features" in inputs:
            return inputs["features"], {}
        x = inputs["image"]
        b, t = x.shape[:2]
        frames = self.backbone({"image": x.reshape(b * t, *x.shape[2:])}, rngs=rngs)
        extra = {"losses": frames["losses"]} if "losses" in frames else {}
        return frames["embedding"].reshape(b, t, -1), extra

    def _outputs(self, h: jax.Array) -> dict:
        return {name: self.tasks[name](h) for name in self.outputs}


class LSTMHead(_Temporal):
    def __init__(self, outputs: Mapping[str, int], *, backbone: str | None = None,
                 feature_dim: int = 0, hidden: int = 256, layers: int = 1,
                 bidirectional: bool = False, backbone_kwargs: Mapping | None = None,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.width = width = self._init_backbone(backbone, feature_dim, rngs, backbone_kwargs)
        self.inputs = ("image",) if backbone else ("features",)
        self.rnn = nnx.List()
        for _ in range(layers):
            def rnn(reverse: bool, width=width):
                return nnx.RNN(nnx.OptimizedLSTMCell(width, hidden, rngs=rngs), reverse=reverse,
                               keep_order=True, rngs=rngs)

            self.rnn.append(nnx.Bidirectional(rnn(False), rnn(True), rngs=rngs) if bidirectional
                            else rnn(False))
            width = hidden * (2 if bidirectional else 1)
        self._init_tasks(outputs, width, rngs)

    def __call__(self, inputs: Inputs, rngs: nnx.Rngs | None = None) -> dict:
        embedding, out = self._embeddings(inputs, rngs)
        h = embedding
        for layer in self.rnn:
            h = layer(h)
        return {**out, "embedding": embedding, **self._outputs(h)}


class EncoderLayer(nnx.Module):
    """PyTorch's nn.TransformerEncoderLayer (post-norm, ReLU MLP, dropout after attention, in
    the MLP and after it)."""

    def __init__(self, width: int, heads: int, mlp: int, dropout: float, rngs: nnx.Rngs):
        self.attention = nnx.MultiHeadAttention(heads, width, dropout_rate=dropout, decode=False,
                                                rngs=rngs)
        self.norm1 = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
        self.fc1 = nnx.Linear(width, mlp, rngs=rngs)
        self.fc2 = nnx.Linear(mlp, width, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x: jax.Array, mask: jax.Array | None, rngs: nnx.Rngs | None) -> jax.Array:
        a = self.attention(x, mask=mask, rngs=rngs)
        x = self.norm1(x + self.dropout(a, rngs=rngs))
        h = self.fc2(self.dropout(jax.nn.relu(self.fc1(x)), rngs=rngs))
        return self.norm2(x + self.dropout(h, rngs=rngs))


class TransformerHead(_Temporal):
    """Conv1d projections over time (`proj`, ReLU between), `layers` encoder layers of `heads`
    heads, per-frame task layers: the MAE fusion team's head (Conv1d 256, Conv1d 128, 4 layers,
    4 heads, dropout 0.3; the `fusion` family below is it on cached features and audio)."""

    def __init__(self, outputs: Mapping[str, int], *, backbone: str | None = None,
                 feature_dim: int = 0, proj: tuple[int, ...] = (256, 128), kernel: int = 1,
                 layers: int = 4, heads: int = 4, mlp: int = 0, dropout: float = 0.3,
                 backbone_kwargs: Mapping | None = None, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        width = self._init_backbone(backbone, feature_dim, rngs, backbone_kwargs)
        self.width = width
        self.inputs = ("image" if backbone else "features", "frame_mask")
        self._init_encoder(outputs, width, proj, kernel, layers, heads, mlp, dropout, rngs)

    def _init_encoder(self, outputs: Mapping[str, int], width: int, proj: tuple[int, ...],
                      kernel: int, layers: int, heads: int, mlp: int, dropout: float,
                      rngs: nnx.Rngs) -> None:
        self.proj = nnx.List()
        for out in proj:
            self.proj.append(nnx.Conv(width, out, (kernel,), padding=[(kernel // 2,) * 2],
                                      rngs=rngs))
            width = out
        self.layers = nnx.List([EncoderLayer(width, heads, mlp or 4 * width, dropout, rngs)
                                for _ in range(layers)])
        self._init_tasks(outputs, width, rngs)

    def _encode(self, x: jax.Array, frame_mask: jax.Array | None,
                rngs: nnx.Rngs | None) -> jax.Array:
        """(B, T, D) per-frame inputs -> (B, T, width) encoded frames. Padded frames are zero
        before every convolution (a kernel wider than 1 would otherwise carry a padding frame's
        input into its neighbours) and no attention key."""
        keep = None if frame_mask is None else (frame_mask > 0)[..., None].astype(x.dtype)
        h = x
        for i, conv in enumerate(self.proj):
            h = conv(h if keep is None else h * keep)
            h = h if i == len(self.proj) - 1 else jax.nn.relu(h)
        mask = None if frame_mask is None else (frame_mask > 0)[:, None, None, :]
        for layer in self.layers:  # mask: (B, 1 head, 1 query, T keys)
            h = layer(h, mask, rngs)
        return h

    def __call__(self, inputs: Inputs, rngs: nnx.Rngs | None = None) -> dict:
        embedding, out = self._embeddings(inputs, rngs)
        h = self._encode(embedding, inputs.get("frame_mask"), rngs)
        return {**out, "embedding": embedding, **self._outputs(h)}


class FusionHead(TransformerHead):
    """The MAE fusion team's temporal model (6th ABAW) on cached per-frame features: the
    feature caches of `data.features` joined per frame (the frozen MAE's visual embedding, 768
    at ViT-B, and optionally a second cache of audio embeddings, the GCSA audio branch's from
    `--mode=extract`), with `audio_bands` > 0 also the pooled log-mel statistics of each
    frame's sound window ("audio_stats": each band's mean and std in dB), batch-normed first
    over the clips' real frames: dB values sit ~100x off the embeddings' scale, and what tells
    sounds apart is a band's level against its usual level (a logistic regression on the
    default synthetic set's statistics reaches EXPR F1 0.81 standardised per band; the CPU
    default fusion run, configs/mae/fusion_expr.py, 0.65 batch-normed, 0.57 with each
    frame's vector layer-normed), then Conv1d `proj` (256, 128) over time, `layers`
    transformer encoder layers, per-frame task layers.

    Inputs: "features" (B, T, feature_dim), "audio_stats" (B, T, 2 * audio_bands) when
    `audio_bands`, "frame_mask" (B, T). Outputs: {task: (B, T, size)}, "embedding": the
    joined per-frame input (B, T, width).
    """

    def __init__(self, outputs: Mapping[str, int], *, feature_dim: int = 0,
                 audio_bands: int = 0, proj: tuple[int, ...] = (256, 128), kernel: int = 3,
                 layers: int = 4, heads: int = 4, mlp: int = 0, dropout: float = 0.3,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.backbone_name, self.backbone = None, None
        self.audio_bands = int(audio_bands)
        if not feature_dim and not self.audio_bands:  # (a run checks data.features itself)
            raise ConfigError("the fusion model reads cached per-frame features: set "
                              "data.features to --mode=extract outputs")
        self.audio_norm = (layers_lib.batch_norm(2 * self.audio_bands, rngs) if self.audio_bands
                           else None)
        self.width = feature_dim + 2 * self.audio_bands
        self.inputs = ("features", *(("audio_stats",) if self.audio_bands else ()), "frame_mask")
        self._init_encoder(outputs, self.width, proj, kernel, layers, heads, mlp, dropout, rngs)

    def __call__(self, inputs: Inputs, rngs: nnx.Rngs | None = None) -> dict:
        x, frame_mask = inputs["features"], inputs.get("frame_mask")
        if self.audio_bands:
            stats = inputs["audio_stats"]
            if stats.shape[-1] != 2 * self.audio_bands:
                raise ConfigError(f"model.audio_bands={self.audio_bands} but the audio input "
                                  f"has {stats.shape[-1] // 2} mel bands (data.audio.n_mels)")
            real = None if frame_mask is None else (frame_mask > 0)[..., None]
            x = jnp.concatenate([x, self.audio_norm(stats, mask=real).astype(x.dtype)], -1)
        h = self._encode(x, frame_mask, rngs)
        return {"embedding": x, **self._outputs(h)}


def frame(model: _Temporal) -> tuple[Family, nnx.Module] | None:
    """The backbone's family and module (None on cached features only)."""
    if model.backbone is None:
        return None
    return family_lib.get(model.backbone_name), model.backbone


def frozen(model: _Temporal) -> tuple[str, ...]:
    """What the backbone's family never trains (e.g. CLIP's pretrained tower), under `backbone/`."""
    found = frame(model)
    if found is None:
        return ()
    return tuple(f"^backbone/{p[1:]}" if p.startswith("^") else f"^backbone/.*{p}"
                 for p in found[0].frozen_patterns(found[1]))


for _name, _cls in (("lstm", LSTMHead), ("transformer", TransformerHead)):
    register(Family(_name, _cls, backbone=("^backbone/",), frozen=frozen, clips=True,
                    frame=frame))
register(Family("fusion", FusionHead, clips=True, frame=frame))
