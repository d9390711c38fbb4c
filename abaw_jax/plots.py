"""Evaluation figures (matplotlib, written as PNG files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; clusters have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from abaw_jax import heads  # noqa: E402


def confusion_matrix(probs: np.ndarray, target: np.ndarray, path: Path) -> Path:
    """Row-normalised confusion matrix of the 8 expression classes."""
    names = heads.get("expr").columns
    k = len(names)
    counts = np.zeros((k, k))
    np.add.at(counts, (target, np.argmax(probs, -1)), 1)
    norm = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true",
           title="EXPR confusion matrix (rows sum to 1)")
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def au_f1_bars(f1_05: np.ndarray, f1_t: np.ndarray, thresholds: np.ndarray, path: Path) -> Path:
    """Per-AU F1 at 0.5 and at the searched thresholds (written above the bars)."""
    names = heads.get("au").columns
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(x - 0.2, f1_05, 0.4, label=f"threshold 0.5 (mean {np.mean(f1_05):.3f})")
    ax.bar(x + 0.2, f1_t, 0.4, label=f"searched thresholds (mean {np.mean(f1_t):.3f})")
    for i, t in enumerate(thresholds):
        ax.text(i + 0.2, f1_t[i] + 0.01, f"{t:.2f}", ha="center", fontsize=7)
    ax.set(xticks=x, ylim=(0, 1.1), ylabel="F1", title="AU F1 per action unit")
    ax.set_xticklabels(names)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def va_over_time(series: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path
                 ) -> Path:
    """Predicted vs true valence and arousal along a few videos: {video: (frames, pred, true)}."""
    fig, axes = plt.subplots(len(series), 2, figsize=(11, 2.2 * len(series)), squeeze=False)
    for row, (video, (frames, pred, true)) in zip(axes, series.items(), strict=True):
        for d, (ax, name) in enumerate(zip(row, heads.get("va").columns, strict=True)):
            ax.plot(frames, true[:, d], lw=1, label="true")
            ax.plot(frames, pred[:, d], lw=1, label="predicted")
            ax.set(ylim=(-1.05, 1.05), title=f"{video}: {name}", xlabel="frame")
            ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
