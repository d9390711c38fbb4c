"""ABAW metrics in plain numpy, usable on any prediction file: CCC, macro F1, AU F1, per-AU
threshold search and the 7th ABAW multi-task score P. Which of them a head uses, and its
constant baseline, is in `heads`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from abaw_jax.data.affwild2 import AU_NAMES

THRESHOLD_GRID = np.round(np.arange(0.01, 1.0, 0.01), 2)


def ccc(pred: np.ndarray, target: np.ndarray) -> float:
    """Concordance correlation coefficient of two 1-D arrays (population moments)."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if pred.size == 0:
        return float("nan")
    mp, mt = pred.mean(), target.mean()
    cov = np.mean((pred - mp) * (target - mt))
    denom = pred.var() + target.var() + (mp - mt) ** 2
    return float(2 * cov / denom) if denom > 0 else 0.0


def va_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """CCC of valence and arousal over all frames pooled, and their mean (the VA score)."""
    v, a = ccc(pred[:, 0], target[:, 0]), ccc(pred[:, 1], target[:, 1])
    return {"ccc_valence": v, "ccc_arousal": a, "ccc_mean": (v + a) / 2}


def f1_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """One-vs-rest F1 of each class (0 where a class is neither predicted nor present)."""
    pred, target = np.asarray(pred), np.asarray(target)
    out = np.zeros(num_classes)
    for c in range(num_classes):
        out[c] = binary_f1(pred == c, target == c)
    return out


def binary_f1(pred: np.ndarray, target: np.ndarray) -> float:
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    tp = np.sum(pred & target)
    denom = np.sum(pred) + np.sum(target)
    return float(2 * tp / denom) if denom else 0.0


def expr_metrics(probs: np.ndarray, target: np.ndarray) -> dict:
    """Macro F1 over the 8 classes from per-frame class scores (argmax)."""
    per_class = f1_per_class(np.argmax(probs, -1), target, probs.shape[-1])
    return {"f1_macro": float(per_class.mean()), "f1_per_class": per_class.tolist(),
            "accuracy": float(np.mean(np.argmax(probs, -1) == target))}


def au_f1(probs: np.ndarray, target: np.ndarray, thresholds: float | np.ndarray = 0.5
          ) -> np.ndarray:
    """Per-AU binary F1 of probabilities thresholded per column (>= threshold is active)."""
    pred = probs >= np.broadcast_to(np.asarray(thresholds, np.float64), probs.shape[-1:])
    return np.array([binary_f1(pred[:, k], target[:, k]) for k in range(probs.shape[-1])])


def search_thresholds(probs: np.ndarray, target: np.ndarray,
                      grid: np.ndarray = THRESHOLD_GRID) -> np.ndarray:
    """Per-AU threshold maximising that AU's F1 on these frames (ties: the one nearest 0.5).

    Works on probabilities; searching on already-binarised outputs would only ever find 0/1.
    """
    best = np.full(probs.shape[-1], 0.5)
    order = np.argsort(np.abs(grid - 0.5), kind="stable")  # prefer thresholds near 0.5
    for k in range(probs.shape[-1]):
        scores = np.array([binary_f1(probs[:, k] >= t, target[:, k]) for t in grid[order]])
        best[k] = grid[order][int(np.argmax(scores))]
    return best


def au_metrics(probs: np.ndarray, target: np.ndarray,
               thresholds: np.ndarray | None = None) -> dict:
    """Mean AU F1 at 0.5 (`f1_mean_at_0.5`) and with per-AU thresholds (searched here when not
    given: `f1_mean_thresholded`, the headline score, as submissions apply thresholds); per-AU
    values and the thresholds keyed by AU name."""
    f1_05 = au_f1(probs, target, 0.5)
    if thresholds is None:
        thresholds = search_thresholds(probs, target)
    f1_t = au_f1(probs, target, thresholds)
    return {"f1_mean_at_0.5": float(f1_05.mean()), "f1_per_au_at_0.5": by_au(f1_05),
            "f1_mean_thresholded": float(f1_t.mean()), "f1_per_au_thresholded": by_au(f1_t),
            "thresholds": by_au(thresholds)}


def by_au(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Per-AU values keyed by AU name, as metrics.json and checkpoints hold them."""
    return {name: float(v) for name, v in zip(AU_NAMES, np.ravel(values), strict=True)}


def au_values(stored: Mapping[str, float] | Sequence[float]) -> np.ndarray:
    """Per-AU values in AU order from a dict keyed by AU name, or from a list in that order
    (checkpoints written before the values were named)."""
    if isinstance(stored, Mapping):
        return np.array([stored[name] for name in AU_NAMES], np.float64)
    return np.asarray(stored, np.float64)


def p_score(va: dict, expr: dict, au: dict, thresholded: bool = False) -> float:
    """7th ABAW multi-task score P = CCC_mean + F1_EXPR + F1_AU."""
    au_key = "f1_mean_thresholded" if thresholded else "f1_mean_at_0.5"
    return float(va["ccc_mean"] + expr["f1_macro"] + au[au_key])
