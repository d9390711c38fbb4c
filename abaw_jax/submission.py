"""ABAW prediction files: one file per video with a header and one line for EVERY frame,
frames without a prediction (no face crop) filled from their neighbours."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from abaw_jax.data.affwild2 import AU_NAMES, EXPR_NAMES

HEADERS = {
    "va": "image_location,valence,arousal",
    "expr": "image_location," + ",".join(EXPR_NAMES),
    "au": "image_location," + ",".join(AU_NAMES),
}


def fill(frames: np.ndarray, values: np.ndarray, num_frames: int, interpolate: bool
         ) -> np.ndarray:
    """Per-frame values for frames 1..num_frames from predictions at `frames` (1-based).

    Gaps are filled by linear interpolation (continuous outputs) or by the nearest predicted
    frame (probabilities that are then thresholded or arg-maxed); ends take the nearest value.
    """
    if len(frames) == 0:
        raise ValueError("no predicted frame to fill the video from")
    order = np.argsort(frames)
    frames, values = np.asarray(frames)[order], np.asarray(values, np.float64)[order]
    values = values.reshape(len(frames), -1)
    wanted = np.arange(1, num_frames + 1)
    if interpolate:
        return np.stack([np.interp(wanted, frames, values[:, d])
                         for d in range(values.shape[1])], -1)
    pos = np.clip(np.searchsorted(frames, wanted), 1, max(len(frames) - 1, 1))
    left = frames[np.maximum(pos - 1, 0)]
    right = frames[np.minimum(pos, len(frames) - 1)]
    nearest = np.where(np.abs(wanted - left) <= np.abs(right - wanted), pos - 1, pos)
    return values[np.clip(nearest, 0, len(frames) - 1)]


def format_lines(head: str, video: str, values: np.ndarray,
                 thresholds: np.ndarray | float = 0.5) -> list[str]:
    """Submission lines for one video's per-frame outputs (VA values, EXPR/AU probabilities)."""
    names = [f"{video}/{i:05d}.jpg" for i in range(1, len(values) + 1)]
    if head == "va":
        body = [f"{v:.4f},{a:.4f}" for v, a in np.clip(values, -1, 1)]
    elif head == "expr":
        body = [str(int(c)) for c in np.argmax(values, -1)]
    elif head == "au":
        active = (values >= np.asarray(thresholds)).astype(int)
        body = [",".join(map(str, row)) for row in active]
    else:
        raise KeyError(f"unknown head {head!r}")
    return [HEADERS[head], *(f"{n},{b}" for n, b in zip(names, body, strict=True))]


def write_videos(out_dir: Path, head: str, videos: list[str], video: np.ndarray,
                 frame: np.ndarray, values: np.ndarray, video_frames: Mapping[str, int],
                 thresholds: np.ndarray | float = 0.5) -> list[Path]:
    """Writes `<out_dir>/<video>.txt` for every video with predictions; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(videos):
        rows = np.flatnonzero(video == i)
        if not len(rows):
            continue
        n = max(int(video_frames.get(name, 0)), int(frame[rows].max()))
        per_frame = fill(frame[rows], values[rows], n, interpolate=head == "va")
        path = out_dir / f"{name}.txt"
        path.write_text("\n".join(format_lines(head, name, per_frame, thresholds)) + "\n")
        paths.append(path)
    return paths
