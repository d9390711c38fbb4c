"""What a task is: the model outputs it needs, its loss, its per-frame predictions, its metrics.

One table (`TASKS`), picked by name from the config. The trainer, the evaluator and the predictor
only call these methods; adding a task is one entry here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from abaw_jax import losses, metrics

LossOptions = Mapping[str, Any]


def _va_loss(out, batch, opts):
    return losses.ccc_loss(jnp.tanh(out["va"]), batch["va"], batch["va_mask"])


def _expr_loss(out, batch, opts):
    return losses.cross_entropy(out["expr"], batch["expr"], batch["expr_mask"],
                                opts.get("class_weights"))


def _au_loss(out, batch, opts):
    return losses.binary_cross_entropy(out["au"], batch["au"], batch["au_mask"],
                                       opts.get("pos_weight"))


_LABEL_KEYS = ("va", "expr", "au", "va_mask", "expr_mask", "au_mask")
_LABEL_LOSSES = {"va": _va_loss, "expr": _expr_loss, "au": _au_loss}
_ACTIVATIONS = {"va": jnp.tanh, "expr": jax.nn.softmax, "au": jax.nn.sigmoid}


@dataclasses.dataclass(frozen=True)
class Task:
    """A task over one or more of the label heads va (2), expr (8), au (12)."""

    name: str
    heads: tuple[str, ...]
    score: str  # the validation metric that picks the best checkpoint (higher is better)

    @property
    def outputs(self) -> dict[str, int]:
        """Model output layers: name -> size."""
        return {h: {"va": 2, "expr": 8, "au": 12}[h] for h in self.heads}

    def loss(self, out: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
             opts: LossOptions, step: jax.Array | int = 0
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Total loss and its parts: label losses (weighted for multi-task) + head diversity
        (from step `head_start_step` on: stage 2 of a two-stage fine-tuning)."""
        if out[self.heads[0]].ndim == 3:  # clips (B, T, size): a loss over their frames
            out = {**out, **{h: out[h].reshape(-1, out[h].shape[-1]) for h in self.heads}}
            batch = {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()
                     if k in _LABEL_KEYS}
        weights = opts.get("task_weights") or {}
        parts = {h: _LABEL_LOSSES[h](out, batch, opts) for h in self.heads}
        total = sum(weights.get(h, 1.0) * parts[h] for h in self.heads)
        head_weight = opts.get("head_weight", 0.0)
        if head_weight and "heads" in out:
            parts["heads"] = losses.head_diversity(out["heads"])
            on = jnp.asarray(step) >= opts.get("head_start_step", 0)
            total = total + jnp.where(on, head_weight, 0.0) * parts["heads"]
        return total, {f"loss_{k}": v for k, v in parts.items()}

    def predict(self, out: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Per-frame predictions: VA in [-1, 1], EXPR class probabilities, AU probabilities."""
        return {h: _ACTIVATIONS[h](out[h].astype(jnp.float32)) for h in self.heads}

    def metrics(self, preds: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                thresholds: np.ndarray | None = None) -> dict[str, Any]:
        """Metrics over the frames valid for each head, flattened to `<head>/<name>` plus the
        task's `score`."""
        out: dict[str, Any] = {}
        parts = {}
        for h in self.heads:
            valid = np.asarray(labels[f"{h}_mask"], bool)
            p, y = np.asarray(preds[h])[valid], np.asarray(labels[h])[valid]
            if h == "va":
                parts[h] = metrics.va_metrics(p, y)
            elif h == "expr":
                parts[h] = metrics.expr_metrics(p, y)
            else:
                parts[h] = metrics.au_metrics(p, y, thresholds)
            out.update({f"{h}/{k}": v for k, v in parts[h].items()})
            out[f"{h}/frames"] = int(valid.sum())
            out[f"{h}/constant_baseline"] = metrics.constant_baseline(h, y)
        if self.name == "mtl":
            out["p_score"] = metrics.p_score(parts["va"], parts["expr"], parts["au"])
            out["p_score_thresholded"] = metrics.p_score(parts["va"], parts["expr"], parts["au"],
                                                         thresholded=True)
        out["score"] = out[self.score]
        return out


TASKS = {
    "va": Task("va", ("va",), "va/ccc_mean"),
    "expr": Task("expr", ("expr",), "expr/f1_macro"),
    "au": Task("au", ("au",), "au/f1_mean"),
    "mtl": Task("mtl", ("va", "expr", "au"), "p_score"),
}


def get(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]
