"""What a task is: the label heads it trains, how their losses combine, its per-frame
predictions and its metrics. One table (`TASKS`), picked by `config.task`; the head facts
(sizes, names, metrics) come from `heads.py`, the loss of each head from `config.loss.<head>`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from abaw_jax import heads as heads_lib
from abaw_jax import losses, metrics
from abaw_jax.data import schema
from abaw_jax.errors import UnknownNameError

LossOptions = Mapping[str, Any]
_ACTIVATIONS = {"regression": jnp.tanh, "classes": jax.nn.softmax, "binary": jax.nn.sigmoid}


@dataclasses.dataclass(frozen=True)
class Task:
    """A task over one or more of the label heads va (2), expr (8), au (12)."""

    name: str
    heads: tuple[str, ...]
    score: str  # the validation metric that picks the best checkpoint (higher is better)

    @property
    def outputs(self) -> dict[str, int]:
        """Model output layers: name -> size."""
        return {h: heads_lib.get(h).size for h in self.heads}

    def check_losses(self, opts: LossOptions) -> None:
        """Every head's configured loss exists (at setup, before anything runs)."""
        for h in self.heads:
            losses.head_loss(h, opts.get(h, _DEFAULT_LOSS[h]))

    def outputs_of(self, out: Mapping[str, Any]) -> dict[str, jax.Array]:
        """The model's outputs of this task's heads by name: `<head>` for its own, and
        `<head>.<branch>` (heads.branch_output) for each of its "branches" (a multi-branch
        model's {"branches": {branch: {head: output}}})."""
        named = {h: out[h] for h in self.heads if h in out}
        for branch, outs in (out.get("branches") or {}).items():
            named.update({heads_lib.branch_output(h, branch): outs[h] for h in self.heads
                          if h in outs})
        missing = sorted(set(self.heads) - {heads_lib.head_of(k) for k in named})
        if missing:
            raise KeyError(f"the model gives no output of {missing}, of its own or by branch")
        return named

    def loss(self, out: Mapping[str, Any], batch: Mapping[str, jax.Array],
             opts: LossOptions) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The weighted sum of the label losses (`loss.task_weights` for multi-task) and each
        part as `loss_<head>`. Every output of a head takes its loss: a multi-branch model's
        branches are trained jointly, their losses summed (`loss_<head>.<branch>`)."""
        named = self.outputs_of(out)
        if next(iter(named.values())).ndim == 3:  # clips (B, T, size): over their frames
            named = {k: v.reshape(-1, v.shape[-1]) for k, v in named.items()}
            batch = {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()
                     if k in schema.LABEL_KEYS}
        weights = opts.get("task_weights") or {}
        parts = {}
        for name, value in named.items():
            h = heads_lib.head_of(name)
            parts[name] = losses.head_loss(h, opts.get(h, _DEFAULT_LOSS[h]))(value, batch, opts)
        total = sum(weights.get(heads_lib.head_of(k), 1.0) * v for k, v in parts.items())
        return total, {f"loss_{k}": v for k, v in parts.items()}

    def predict(self, out: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Per-frame predictions: VA in [-1, 1], EXPR class probabilities, AU probabilities; per
        branch of a multi-branch model as `<head>.<branch>`, the head's own being then their
        mean (equal weights; `postprocess.Post` fits the fusion on validation)."""
        preds = {name: _ACTIVATIONS[heads_lib.get(heads_lib.head_of(name)).kind](
            value.astype(jnp.float32)) for name, value in self.outputs_of(out).items()}
        for h in self.heads:
            if h not in preds:
                parts = [preds[heads_lib.branch_output(h, b)]
                         for b in heads_lib.branches(preds, h)]
                preds[h] = sum(parts) / len(parts)
        return preds

    def metrics(self, preds: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                thresholds: np.ndarray | None = None) -> dict[str, Any]:
        """Metrics over the frames valid for each head, flattened to `<head>/<name>` plus the
        task's `score`."""
        out: dict[str, Any] = {}
        parts = {}
        for h in self.heads:
            head = heads_lib.get(h)
            valid = np.asarray(labels[f"{h}_mask"], bool)
            p, y = np.asarray(preds[h])[valid], np.asarray(labels[h])[valid]
            parts[h] = head.metrics(p, y, thresholds)
            out.update({f"{h}/{k}": v for k, v in parts[h].items()})
            out[f"{h}/frames"] = int(valid.sum())
            out[f"{h}/constant_baseline"] = head.constant_baseline(y)
        if self.name == "mtl":
            out["p_score"] = metrics.p_score(parts["va"], parts["expr"], parts["au"])
            out["p_score_thresholded"] = metrics.p_score(parts["va"], parts["expr"], parts["au"],
                                                         thresholded=True)
        out["score_metric"] = self.score  # the figure `score` is (evaluators.abaw may change it)
        out["score"] = out[self.score]
        return out


_DEFAULT_LOSS = {"va": "ccc", "expr": "ce", "au": "bce"}

TASKS = {
    "va": Task("va", ("va",), "va/ccc_mean"),
    "expr": Task("expr", ("expr",), "expr/f1_macro"),
    # AU scores at the thresholds searched on validation: what the checkpoint's post-processing
    # applies to a submission (F1 at 0.5 stays in the metrics as `au/f1_mean_at_0.5`).
    "au": Task("au", ("au",), "au/f1_mean_thresholded"),
    "mtl": Task("mtl", ("va", "expr", "au"), "p_score_thresholded"),
}


def get(name: str) -> Task:
    if name not in TASKS:
        raise UnknownNameError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]
