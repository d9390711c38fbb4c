"""Evaluation figures (matplotlib, written as PNG files)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; clusters have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from abaw_jax import heads, metrics  # noqa: E402


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
    """Per-AU F1 at 0.5 and at the searched thresholds, each threshold written above its bar."""
    names = heads.get("au").columns
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(x - 0.2, f1_05, 0.4, label=f"threshold 0.5 (mean {np.mean(f1_05):.3f})")
    ax.bar(x + 0.2, f1_t, 0.4, label=f"searched thresholds (mean {np.mean(f1_t):.3f}); "
                                     "the number above a bar is its threshold")
    for i, t in enumerate(thresholds):
        ax.text(i + 0.2, f1_t[i] + 0.01, f"{t:.2f}", ha="center", fontsize=7)
    ax.set(xticks=x, ylim=(0, 1.1), ylabel="F1", title="AU F1 per action unit")
    ax.set_xticklabels(names)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=8)  # below
    return _save(fig, path)


VIDEOS_PER_PAGE = 8  # rows of one over-time figure; more videos go to further pages


def va_over_time(series: dict[str, tuple[np.ndarray, ...]], path: Path, smoothing: str | None
                 ) -> list[Path]:
    """True, raw and (when a smoothing was chosen) smoothed valence and arousal along every
    video, {video: (frames, raw, smoothed, true)}, with each video's CCC in its titles.

    `VIDEOS_PER_PAGE` videos per figure: `path`, then `<stem>-2.png`, ...; returns the paths.
    """
    videos = list(series)
    pages = [videos[i:i + VIDEOS_PER_PAGE] for i in range(0, len(videos), VIDEOS_PER_PAGE)]
    paths = []
    for number, page in enumerate(pages, 1):
        name = path if number == 1 else path.with_name(f"{path.stem}-{number}{path.suffix}")
        paths.append(_va_page({v: series[v] for v in page}, name, smoothing,
                              f"page {number} of {len(pages)}"))
    return paths


def _va_page(series: dict[str, tuple[np.ndarray, ...]], path: Path, smoothing: str | None,
             page: str) -> Path:
    fig, axes = plt.subplots(len(series), 2, figsize=(11, 2.2 * len(series) + 0.8),
                             squeeze=False)
    for row, (video, (frames, raw, smoothed, true)) in zip(axes, series.items(), strict=True):
        for d, (ax, name) in enumerate(zip(row, heads.get("va").columns, strict=True)):
            ax.plot(frames, true[:, d], lw=1, color="k", label="true")
            ax.plot(frames, raw[:, d], lw=1, alpha=0.7, label="predicted, raw")
            title = f"{video}: {name}, CCC raw {metrics.ccc(raw[:, d], true[:, d]):.3f}"
            if smoothing:
                ax.plot(frames, smoothed[:, d], lw=1, label=f"predicted, smoothed ({smoothing})")
                title += f", smoothed {metrics.ccc(smoothed[:, d], true[:, d]):.3f}"
            ax.set(ylim=(-1.05, 1.05), title=title, xlabel="frame", ylabel=name)
            ax.title.set_fontsize(9)
    # One legend above the grid, outside every curve.
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8,
               bbox_to_anchor=(0.5, 1.0), title=f"valence and arousal over time ({page})")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / fig.get_figheight()))
    return _save(fig, path, layout=False)


TRACKS_SHOWN = 6  # columns of a video's figure: its longest tracks


def video_tracks(table: Mapping[str, np.ndarray], path: Path, title: str) -> Path:
    """A video's per-frame table (`abaw_jax.video`) per track, one column each (the
    `TRACKS_SHOWN` longest): valence and arousal over time, the expression timeline (the
    predicted class of each frame), the AU probabilities as a heatmap; rows for the heads the
    table has."""
    track = table["track"]
    ids, counts = np.unique(track[track >= 0], return_counts=True)
    shown = sorted(ids[np.argsort(-counts, kind="stable")][:TRACKS_SHOWN].tolist())
    panels = [h for h, column in (("va", "valence"), ("expr", "expression"), ("au", "AU1"))
              if column in table]
    if not shown or not panels:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.set_axis_off()
        ax.text(0.5, 0.5, f"{title}: no face found" if not shown else
                f"{title}: no VA, EXPR or AU output", ha="center", va="center")
        return _save(fig, path)
    fig, axes = plt.subplots(len(panels), len(shown), squeeze=False, sharex="col",
                             figsize=(4.5 * len(shown) + 1, 2.6 * len(panels) + 0.6))
    for col, t in enumerate(shown):
        rows = track == t
        for ax, panel in zip(axes[:, col], panels, strict=True):
            _TRACK_PANELS[panel](ax, table, rows)
        axes[0, col].set_title(f"track {t} ({rows.sum()} frames)", fontsize=9)
        axes[-1, col].set_xlabel("time (s)")
    more = f"; {len(ids) - len(shown)} shorter tracks not shown" if len(ids) > len(shown) else ""
    fig.suptitle(f"{title}: per-frame outputs per face track{more}", fontsize=10)
    return _save(fig, path)


def _on_grid(table: Mapping[str, np.ndarray], rows: np.ndarray, columns: list[str]
             ) -> tuple[np.ndarray, np.ndarray]:
    """(times, values (frames, columns)) of a track on every analysed frame from its first to
    its last, nan where it was not found (lines break and heatmaps stay blank there)."""
    frames = table["frame"][rows]
    step = int(np.min(np.diff(frames))) if len(frames) > 1 else 1
    grid = np.arange(frames[0], frames[-1] + 1, step)
    values = np.full((len(grid), len(columns)), np.nan)
    values[(frames - frames[0]) // step] = np.stack([table[c][rows] for c in columns], -1)
    return np.interp(grid, frames, table["timestamp"][rows]), values


def _va_track(ax, table: Mapping[str, np.ndarray], rows: np.ndarray) -> None:
    names = list(heads.get("va").columns)
    time, values = _on_grid(table, rows, names)
    for name, v in zip(names, values.T, strict=True):
        ax.plot(time, v, lw=1, label=name)
    ax.set(ylim=(-1.05, 1.05), ylabel="value")
    ax.legend(fontsize=7, loc="upper right")


def _expr_track(ax, table: Mapping[str, np.ndarray], rows: np.ndarray) -> None:
    names = heads.get("expr").columns
    index = {n: i for i, n in enumerate(names)}
    classes = np.array([index[c] for c in table["expression"][rows]])
    ax.scatter(table["timestamp"][rows], classes, c=classes, cmap="tab10", vmin=0, vmax=9, s=6)
    ax.set(yticks=range(len(names)), ylim=(-0.5, len(names) - 0.5))
    ax.set_yticklabels(names, fontsize=7)


def _au_track(ax, table: Mapping[str, np.ndarray], rows: np.ndarray) -> None:
    names = heads.get("au").columns
    time, probs = _on_grid(table, rows, [f"p_{n}" for n in names])
    half = (time[1] - time[0]) / 2 if len(time) > 1 else 0.5
    image = ax.imshow(probs.T, aspect="auto", origin="lower", interpolation="nearest",
                      extent=(time[0] - half, time[-1] + half, -0.5, len(names) - 0.5),
                      vmin=0, vmax=1, cmap="viridis")
    ax.set(yticks=range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.figure.colorbar(image, ax=ax, pad=0.01, label="AU probability")


_TRACK_PANELS = {"va": _va_track, "expr": _expr_track, "au": _au_track}


def reconstructions(original: np.ndarray, masked: np.ndarray, reconstructed: np.ndarray,
                    path: Path, title: str) -> Path:
    """MAE's figure: one row per face (N, H, W, 3 RGB in [0, 1]), the original, what the
    encoder sees (removed patches blank) and the reconstruction (visible patches as given)."""
    columns = {"original": original, "masked": masked, "reconstructed": reconstructed}
    n = len(original)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n + 0.4), squeeze=False)
    for row in range(n):
        for col, (name, images) in enumerate(columns.items()):
            ax = axes[row, col]
            ax.imshow(np.clip(images[row], 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path, layout: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
