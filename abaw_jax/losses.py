"""Training losses (jax). Every label loss takes a per-frame validity mask and averages over the
valid frames only; a batch with no valid frame contributes 0 (not NaN)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from abaw_jax.errors import UnknownNameError


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def ccc(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Concordance correlation coefficient per column of (B, D) arrays over the valid rows."""
    m = mask.astype(pred.dtype)[:, None]
    n = jnp.maximum(jnp.sum(m), 1.0)
    mp, mt = jnp.sum(pred * m, 0) / n, jnp.sum(target * m, 0) / n
    vp = jnp.sum(m * (pred - mp) ** 2, 0) / n
    vt = jnp.sum(m * (target - mt) ** 2, 0) / n
    cov = jnp.sum(m * (pred - mp) * (target - mt), 0) / n
    return 2 * cov / (vp + vt + (mp - mt) ** 2 + 1e-8)


def ccc_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - mean(CCC_valence, CCC_arousal) over the batch's valid frames (0 with none)."""
    return jnp.where(jnp.any(mask), 1.0 - jnp.mean(ccc(pred, target, mask)), 0.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                  class_weights: Sequence[float] | None = None) -> jax.Array:
    """Softmax cross-entropy; with class weights, PyTorch's weighted mean sum(w_y l) / sum(w_y)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    weights = mask.astype(logits.dtype)
    if class_weights is not None:
        weights = weights * jnp.asarray(class_weights, logits.dtype)[labels]
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1e-8)


def binary_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                         pos_weight: Sequence[float] | None = None) -> jax.Array:
    """Sigmoid BCE over (B, K) labels, mean over valid frames and K; `pos_weight` per column
    scales the positive term as PyTorch's BCEWithLogitsLoss does."""
    labels = labels.astype(logits.dtype)
    log_p, log_not_p = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
    pw = 1.0 if pos_weight is None else jnp.asarray(pos_weight, logits.dtype)
    losses = -(pw * labels * log_p + (1 - labels) * log_not_p)
    return _masked_mean(jnp.mean(losses, -1), mask)


def head_diversity(heads: Sequence[jax.Array]) -> jax.Array:
    """DDAMFN's attention-head loss: n_pairs / (sum of pairwise MSE + eps); 0 for one head.

    Small when the heads attend to different places, so minimising it spreads them out.
    """
    if len(heads) < 2:
        return jnp.zeros((), jnp.float32)
    mses = [jnp.mean((heads[i] - heads[j]) ** 2)
            for i in range(len(heads)) for j in range(i + 1, len(heads))]
    eps = jnp.finfo(jnp.float32).eps
    return len(mses) / (sum(mses) + eps)


def _va_ccc(out: jax.Array, batch: Mapping[str, jax.Array], opts: Mapping[str, Any]) -> jax.Array:
    return ccc_loss(jnp.tanh(out), batch["va"], batch["va_mask"])


def _expr_ce(out: jax.Array, batch: Mapping[str, jax.Array], opts: Mapping[str, Any]
             ) -> jax.Array:
    return cross_entropy(out, batch["expr"], batch["expr_mask"], opts.get("class_weights"))


def _au_bce(out: jax.Array, batch: Mapping[str, jax.Array], opts: Mapping[str, Any]) -> jax.Array:
    return binary_cross_entropy(out, batch["au"], batch["au_mask"], opts.get("pos_weight"))


# The losses a head can train with, picked by `config.loss.<head>`: (head output, batch with the
# labels and masks, config.loss) -> scalar.
HEAD_LOSSES: dict[str, dict[str, Callable[..., jax.Array]]] = {
    "va": {"ccc": _va_ccc},
    "expr": {"ce": _expr_ce},
    "au": {"bce": _au_bce},
}


def head_loss(head: str, name: str) -> Callable[..., jax.Array]:
    """The loss `name` of `head` (KeyError naming the known ones)."""
    known = HEAD_LOSSES.get(head, {})
    if name not in known:
        raise UnknownNameError(f"loss.{head}={name!r} is not a loss of head {head!r}; known: "
                               f"{sorted(known)}")
    return known[name]
