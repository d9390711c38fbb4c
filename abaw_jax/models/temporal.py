"""DDAMFN+LSTM: the DDAMFN backbone per frame, an LSTM over each clip's per-frame embeddings,
one linear task layer per output, per frame (the ABAW DDAMFN+LSTM systems).

Inputs: a clip batch (B, T, 112, 112, 3) of normalised frames, or, from the feature cache
(`--mode=extract`), the backbone's embeddings (B, T, D) with `features=True`. Outputs:
{task: (B, T, size)}, and for image input the backbone's per-frame "heads" (B*T, ...) for the
attention-head loss and "embedding" (B, T, D).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx

from abaw_jax.models import ddamfn


class TemporalDDAMFN(nnx.Module):
    def __init__(self, outputs: Mapping[str, int], *, backbone: str = "ddamfn",
                 hidden: int = 256, layers: int = 1, bidirectional: bool = False,
                 num_head: int = 2, depthwise_impl: ddamfn.Impl = None,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        factory = {"ddamfn": ddamfn.ddamfn, "ddamfn_tiny": ddamfn.ddamfn_tiny}[backbone]
        self.backbone = factory(outputs={}, num_head=num_head, depthwise_impl=depthwise_impl,
                                rngs=rngs)
        self.outputs = dict(outputs)
        self.rnn = nnx.List()
        width = self.backbone.embed_dim
        for _ in range(layers):
            def rnn(reverse: bool, width=width):
                return nnx.RNN(nnx.OptimizedLSTMCell(width, hidden, rngs=rngs), reverse=reverse,
                               keep_order=True, rngs=rngs)

            self.rnn.append(nnx.Bidirectional(rnn(False), rnn(True), rngs=rngs) if bidirectional
                            else rnn(False))
            width = hidden * (2 if bidirectional else 1)
        self.tasks = nnx.Dict({name: nnx.Linear(width, size, rngs=rngs)
                               for name, size in self.outputs.items()})

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    def __call__(self, x: jax.Array, features: bool = False) -> dict:
        out = {}
        if features:
            embedding = x
        else:
            b, t = x.shape[:2]
            frames = self.backbone(x.reshape(b * t, *x.shape[2:]))
            embedding = frames["embedding"].reshape(b, t, -1)
            out["heads"] = frames["heads"]
        out["embedding"] = embedding
        h = embedding
        for layer in self.rnn:
            h = layer(h)
        out.update({name: self.tasks[name](h) for name in self.outputs})
        return out


def ddamfn_lstm(**kwargs) -> TemporalDDAMFN:
    return TemporalDDAMFN(backbone="ddamfn", **kwargs)


def ddamfn_tiny_lstm(**kwargs) -> TemporalDDAMFN:
    return TemporalDDAMFN(backbone="ddamfn_tiny", **kwargs)
