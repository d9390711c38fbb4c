"""Training losses (jax). Every label loss takes a per-frame validity mask and averages over the
valid frames only; a batch with no valid frame contributes 0 (not NaN)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from abaw_jax.errors import ConfigError, UnknownNameError


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
                  class_weights: Sequence[float] | None = None,
                  scale: jax.Array | None = None) -> jax.Array:
    """Softmax cross-entropy; with class weights, PyTorch's weighted mean sum(w_y l) / sum(w_y);
    `scale` multiplies each frame's loss, not the normaliser (the coarse-fine loss)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    weights = mask.astype(logits.dtype)
    if class_weights is not None:
        weights = weights * jnp.asarray(class_weights, logits.dtype)[labels]
    scaled = losses if scale is None else losses * scale
    return jnp.sum(scaled * weights) / jnp.maximum(jnp.sum(weights), 1e-8)


# The six coefficients of the coarse-fine loss, in `loss.coarse_mu`'s order: mu_12, mu_13, mu_14,
# mu_23, mu_24, mu_34 between the quadrants E1..E4 (heads.EXPR_QUADRANT's 0..3).
COARSE_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def coarse_penalties(mu: Sequence[float]) -> np.ndarray:
    """The symmetric (4, 4) matrix of penalties mu[i, j] for confusing quadrants i and j (0 on
    the diagonal) from the six coefficients in COARSE_PAIRS order."""
    mu = [float(m) for m in mu]
    if len(mu) != len(COARSE_PAIRS) or min(mu) < 0:
        raise ConfigError(f"loss.coarse_mu={mu}: expected 6 coefficients >= 0 (mu_12, mu_13, "
                          "mu_14, mu_23, mu_24, mu_34)")
    out = np.zeros((4, 4), np.float32)
    for (i, j), m in zip(COARSE_PAIRS, mu, strict=True):
        out[i, j] = out[j, i] = m
    return out


def coarse_fine(logits: jax.Array, labels: jax.Array, mask: jax.Array, mu: Sequence[float],
                quadrants: Sequence[int], class_weights: Sequence[float] | None = None
                ) -> jax.Array:
    """The GCSA paper's coarse-fine granularity loss (eq. 8): each frame's cross-entropy times
    1 + mu(quadrant of its class, quadrant of the predicted class), mu from `coarse_penalties`
    (0 when the quadrants agree), `quadrants[c]` the quadrant of class c (the config's default:
    heads.EXPR_QUADRANT). Averaged as `cross_entropy` (over the valid frames, weighted
    by class with `class_weights`), so with every mu 0 it is that loss. The factor depends on
    the argmax only: no gradient flows through it."""
    q = np.asarray(quadrants)
    if q.shape != (logits.shape[-1],) or not np.isin(q, range(4)).all():
        raise ConfigError(f"loss.expr_quadrants={q.tolist()}: expected one quadrant 0-3 per "
                          f"class ({logits.shape[-1]})")
    penalty = jnp.asarray(coarse_penalties(mu)[q[:, None], q[None, :]], logits.dtype)
    factor = 1.0 + penalty[labels, jnp.argmax(logits, -1)]
    return cross_entropy(logits, labels, mask, class_weights, scale=factor)


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


def _expr_coarse_fine(out: jax.Array, batch: Mapping[str, jax.Array], opts: Mapping[str, Any]
                      ) -> jax.Array:
    return coarse_fine(out, batch["expr"], batch["expr_mask"], opts["coarse_mu"],
                       opts["expr_quadrants"], opts.get("class_weights"))


def _expr_contrastive(out: jax.Array, batch: Mapping[str, jax.Array], opts: Mapping[str, Any]
                      ) -> jax.Array:
    return contrastive(out, batch["expr"], batch["expr_mask"])


# The losses a head can train with, picked by `config.loss.<head>`: (head output, batch with the
# labels and masks, config.loss) -> scalar.
HEAD_LOSSES: dict[str, dict[str, Callable[..., jax.Array]]] = {
    "va": {"ccc": _va_ccc},
    "expr": {"ce": _expr_ce, "coarse_fine": _expr_coarse_fine, "contrastive": _expr_contrastive},
    "au": {"bce": _au_bce},
}


def head_loss(head: str, name: str) -> Callable[..., jax.Array]:
    """The loss `name` of `head` (KeyError naming the known ones)."""
    known = HEAD_LOSSES.get(head, {})
    if name not in known:
        raise UnknownNameError(f"loss.{head}={name!r} is not a loss of head {head!r}; known: "
                               f"{sorted(known)}")
    return known[name]
