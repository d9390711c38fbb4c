"""Post-processing of per-frame outputs along each video: the decision fusion of a multi-branch
model's predictions, temporal smoothing, both chosen on the validation split, then AU thresholds
searched on the smoothed probabilities.

Fusion (GCSA's audio-visual model, whose branches predict each head apart as `<head>.<branch>`):
the head's prediction is sum_b w_b P_b / sum_b w_b over its branches, the paper's
P = (m P_audio + n P_visual) / (m + n), with integer weights 1..5 (`FUSION_WEIGHTS`), searched
on validation by the head's selection score (the smallest weights of a ratio on ties).

Per video, the outputs of the frames with a crop are first spread to every frame (linear
interpolation, `submission.fill`), smoothed there (a Gaussian of `sigma` frames or a centred
moving mean of `window` frames, edges repeated), and read back at the frames wanted. Smoothing
the filled sequence keeps a gap of missing crops from pulling its neighbours towards the far
side. The choice per head (method and width, or none) is the one with the best validation score
(`Post.fit`); it is stored with the checkpoint's metrics and applied by eval and predict.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np

from abaw_jax import heads as head_table
from abaw_jax import metrics, submission

FUSION_WEIGHTS = range(1, 6)  # the paper's integers 0 < m, n < 6
SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)
WINDOWS = (3, 5, 9, 17, 33)


def gaussian(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing along axis 0 (truncated at 3 sigma, edges repeated)."""
    radius = int(3 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return _filter(values, taps / taps.sum())


def moving_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving mean along axis 0 over an odd `window` of frames (edges repeated)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"moving-mean window {window} must be odd and positive")
    return _filter(values, np.full(window, 1.0 / window))


def _filter(values: np.ndarray, taps: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64)
    flat = values.reshape(len(values), -1)
    r = len(taps) // 2
    padded = np.concatenate([np.repeat(flat[:1], r, 0), flat, np.repeat(flat[-1:], r, 0)])
    out = np.stack([np.convolve(padded[:, d], taps, mode="valid") for d in range(flat.shape[1])],
                   -1)
    return out.reshape(values.shape)


_METHODS = {"gaussian": gaussian, "mean": moving_mean}


@dataclasses.dataclass(frozen=True)
class Smoothing:
    method: str = "none"  # none | gaussian | mean
    width: float = 0.0  # sigma (gaussian) or window (mean), in frames

    def __call__(self, values: np.ndarray) -> np.ndarray:
        if self.method == "none":
            return np.asarray(values, np.float64)
        if self.method == "mean":
            return moving_mean(values, int(self.width))
        return _METHODS[self.method](values, self.width)


def candidates() -> list[Smoothing]:
    return ([Smoothing()] + [Smoothing("gaussian", s) for s in SIGMAS]
            + [Smoothing("mean", w) for w in WINDOWS])


def smooth_rows(values: np.ndarray, video: np.ndarray, frame: np.ndarray, how: Smoothing
                ) -> np.ndarray:
    """Smoothed values at the given rows (record order), each video on its own frame axis."""
    if how.method == "none":
        return np.asarray(values, np.float64)
    out = np.empty(values.shape, np.float64)
    for v in np.unique(video):
        rows = np.flatnonzero(video == v)
        first, last = int(frame[rows].min()), int(frame[rows].max())
        filled = submission.fill(frame[rows] - first + 1, values[rows], last - first + 1,
                                 interpolate=True)
        out[rows] = how(filled)[frame[rows] - first].reshape(values[rows].shape)
    return out


def fuse(preds: Mapping[str, np.ndarray], head: str, weights: Mapping[str, int]
         ) -> np.ndarray:
    """sum_b w_b P_b / sum_b w_b over the branch predictions `<head>.<b>` of `weights`."""
    total = sum(weights.values())
    return sum(w * np.asarray(preds[head_table.branch_output(head, b)], np.float64)
               for b, w in weights.items()) / total


def search_fusion(head: str, preds: Mapping[str, np.ndarray], target: np.ndarray,
                  valid: np.ndarray) -> tuple[dict[str, int], dict[str, Any]]:
    """The branch weights (each in FUSION_WEIGHTS) with the best selection score of the fused
    predictions on the valid frames, and a report: the weights (`post/<head>/fusion/<branch>`)
    and each branch's score alone (`post/<head>/score_<branch>`)."""
    names = head_table.branches(preds, head)
    scorer = head_table.get(head).selection_score
    best: tuple[float, dict[str, int]] | None = None
    for combo in itertools.product(FUSION_WEIGHTS, repeat=len(names)):
        weights = dict(zip(names, combo, strict=True))
        score = scorer(fuse(preds, head, weights)[valid], target)
        if best is None or score > best[0]:  # ties: the first, the smallest weights
            best = (score, weights)
    report = {f"post/{head}/fusion/{b}": w for b, w in best[1].items()}
    report.update({f"post/{head}/score_{b}": scorer(np.asarray(
        preds[head_table.branch_output(head, b)])[valid], target) for b in names})
    return best[1], report


@dataclasses.dataclass(frozen=True)
class Post:
    """Per-head fusion of branches (head -> branch -> weight), smoothing, and the AU thresholds
    that follow it."""

    smoothing: Mapping[str, Smoothing]
    thresholds: np.ndarray | None = None
    fusion: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)

    @classmethod
    def fit(cls, heads: tuple[str, ...], preds: Mapping[str, np.ndarray],
            labels: Mapping[str, np.ndarray], video: np.ndarray, frame: np.ndarray
            ) -> tuple[Post, dict[str, Any]]:
        """The best fusion (heads with branches) and then the best smoothing per head on these
        (validation) frames, and a report: `post/<head>/score` before and after, the choices."""
        chosen, report, thresholds, fusion = {}, {}, None, {}
        for h in heads:
            head = head_table.get(h)
            valid = np.asarray(labels[f"{h}_mask"], bool)
            target = np.asarray(labels[h])[valid]
            values = np.asarray(preds[h])
            if head_table.branches(preds, h):
                fusion[h], fused = search_fusion(h, preds, target, valid)
                report.update(fused)
                values = fuse(preds, h, fusion[h])
            scored = []
            for how in candidates():
                smoothed = smooth_rows(values, video, frame, how)[valid]
                scored.append((head.selection_score(smoothed, target), -len(scored), how,
                               smoothed))
            best = max(scored, key=lambda s: s[:2])
            chosen[h] = best[2]
            report.update({f"post/{h}/method": best[2].method, f"post/{h}/width": best[2].width,
                           f"post/{h}/score_raw": scored[0][0], f"post/{h}/score": best[0]})
            searched = head.search_thresholds(best[3], target)
            if searched is not None:  # AU: thresholds searched on the smoothed probabilities
                thresholds = searched
                report[f"post/{h}/thresholds"] = metrics.by_au(thresholds)
        return cls(chosen, thresholds, fusion), report

    @classmethod
    def from_metrics(cls, stored: Mapping[str, Any] | None, heads: tuple[str, ...]) -> Post:
        """The post-processing stored with a checkpoint's metrics (none if it has none)."""
        stored = stored or {}
        smoothing = {h: Smoothing(stored.get(f"post/{h}/method", "none"),
                                  float(stored.get(f"post/{h}/width", 0.0))) for h in heads}
        thresholds = stored.get("post/au/thresholds", stored.get("au/thresholds"))
        fusion = {h: {b: int(stored[f"post/{h}/fusion/{b}"])
                      for b in _stored_branches(stored, h)} for h in heads}
        return cls(smoothing, None if thresholds is None else metrics.au_values(thresholds),
                   {h: w for h, w in fusion.items() if w})

    def fuse(self, preds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`preds` with each fused head's prediction made from its branches' (the branches
        kept); what inference applies (it has no video to smooth along)."""
        return {**preds, **{h: fuse(preds, h, w) for h, w in self.fusion.items()}}

    def apply(self, preds: Mapping[str, np.ndarray], video: np.ndarray, frame: np.ndarray
              ) -> dict[str, np.ndarray]:
        return {h: smooth_rows(np.asarray(p), video, frame, self.smoothing.get(h, Smoothing()))
                for h, p in self.fuse(preds).items()}


def _stored_branches(stored: Mapping[str, Any], head: str) -> list[str]:
    prefix = f"post/{head}/fusion/"
    return sorted(k[len(prefix):] for k in stored if k.startswith(prefix))
