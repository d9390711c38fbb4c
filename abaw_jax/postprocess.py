"""Post-processing of per-frame outputs along each video: temporal smoothing, chosen on the
validation split, then AU thresholds searched on the smoothed probabilities.

Per video, the outputs of the frames with a crop are first spread to every frame (linear
interpolation, `submission.fill`), smoothed there (a Gaussian of `sigma` frames or a centred
moving mean of `window` frames, edges repeated), and read back at the frames wanted. Smoothing
the filled sequence keeps a gap of missing crops from pulling its neighbours towards the far
side. The choice per head (method and width, or none) is the one with the best validation score
(`Post.fit`); it is stored with the checkpoint's metrics and applied by eval and predict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from abaw_jax import heads as head_table
from abaw_jax import metrics, submission

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


@dataclasses.dataclass(frozen=True)
class Post:
    """Per-head smoothing and the AU thresholds that follow it."""

    smoothing: Mapping[str, Smoothing]
    thresholds: np.ndarray | None = None

    @classmethod
    def fit(cls, heads: tuple[str, ...], preds: Mapping[str, np.ndarray],
            labels: Mapping[str, np.ndarray], video: np.ndarray, frame: np.ndarray
            ) -> tuple[Post, dict[str, Any]]:
        """The best smoothing per head on these (validation) frames, and a report:
        `post/<head>/score` before and after, the choice."""
        chosen, report, thresholds = {}, {}, None
        for h in heads:
            head = head_table.get(h)
            valid = np.asarray(labels[f"{h}_mask"], bool)
            target = np.asarray(labels[h])[valid]
            scored = []
            for how in candidates():
                smoothed = smooth_rows(np.asarray(preds[h]), video, frame, how)[valid]
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
        return cls(chosen, thresholds), report

    @classmethod
    def from_metrics(cls, stored: Mapping[str, Any] | None, heads: tuple[str, ...]) -> Post:
        """The post-processing stored with a checkpoint's metrics (none if it has none)."""
        stored = stored or {}
        smoothing = {h: Smoothing(stored.get(f"post/{h}/method", "none"),
                                  float(stored.get(f"post/{h}/width", 0.0))) for h in heads}
        thresholds = stored.get("post/au/thresholds", stored.get("au/thresholds"))
        return cls(smoothing, None if thresholds is None else metrics.au_values(thresholds))

    def apply(self, preds: Mapping[str, np.ndarray], video: np.ndarray, frame: np.ndarray
              ) -> dict[str, np.ndarray]:
        return {h: smooth_rows(np.asarray(p), video, frame, self.smoothing.get(h, Smoothing()))
                for h, p in preds.items()}
