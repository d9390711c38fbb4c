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


def contrastive(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """CLIP's symmetric contrastive loss (ABAW-8's CLIP system, eqs. 1-3) from the (B, C)
    similarities of each image to each class prompt (cosine / temperature).

    The batch's pairs are (image i, prompt of its class y_i), so S[i, j] = logits[i, y_j]; images
    that share a class share their prompt, hence soft targets: uniform over the valid frames of
    the same class. L_img is the cross-entropy of each row of S, L_text of each column; the loss
    is their mean, over valid frames only (masked ones are neither pairs nor negatives).
    """
    valid = mask.astype(bool)
    sim = logits[:, labels]  # S[i, j]: image i against the prompt of pair j
    pair = (labels[:, None] == labels[None, :]) & valid[:, None] & valid[None, :]
    targets = pair / jnp.maximum(jnp.sum(pair, 1, keepdims=True), 1)
    neg_inf = jnp.finfo(logits.dtype).min
    rows = jnp.where(valid[None, :], sim, neg_inf)  # image i against every valid pair's prompt
    cols = jnp.where(valid[None, :], sim.T, neg_inf)  # prompt of pair i against every image
    img = -jnp.sum(targets * jax.nn.log_softmax(rows, -1), -1)
    text = -jnp.sum(targets * jax.nn.log_softmax(cols, -1), -1)
    return _masked_mean((img + text) / 2, valid)


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


def _expr_contrastive(out: jax.Array, batch: Mapping[str, jax.Array], opts: Mapping[str, Any]
                      ) -> jax.Array:
    return contrastive(out, batch["expr"], batch["expr_mask"])


# The losses a head can train with, picked by `config.loss.<head>`: (head output, batch with the
# labels and masks, config.loss) -> scalar.
HEAD_LOSSES: dict[str, dict[str, Callable[..., jax.Array]]] = {
    "va": {"ccc": _va_ccc},
    "expr": {"ce": _expr_ce, "contrastive": _expr_contrastive},
    "au": {"bce": _au_bce},
}


def head_loss(head: str, name: str) -> Callable[..., jax.Array]:
    """The loss `name` of `head` (KeyError naming the known ones)."""
    known = HEAD_LOSSES.get(head, {})
    if name not in known:
        raise UnknownNameError(f"loss.{head}={name!r} is not a loss of head {head!r}; known: "
                               f"{sorted(known)}")
    return known[name]
