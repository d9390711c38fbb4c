"""ABAW prediction files: one file per video with a header and one line for EVERY frame,
frames without a prediction (no face crop) filled from their neighbours."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from abaw_jax import heads


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
    record = heads.get(head)
    names = [f"{video}/{i:05d}.jpg" for i in range(1, len(values) + 1)]
    body = record.format_values(values, thresholds)
    return [record.header, *(f"{n},{b}" for n, b in zip(names, body, strict=True))]


def write_videos(out_dir: Path, head: str, videos: list[str], video: np.ndarray,
                 frame: np.ndarray, values: np.ndarray, video_frames: Mapping[str, int],
                 thresholds: np.ndarray | float = 0.5) -> list[Path]:
    """Writes `<out_dir>/<video>.txt` for every video with predictions; returns the paths."""
    interpolate = heads.get(head).interpolate
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(videos):
        rows = np.flatnonzero(video == i)
        if not len(rows):
            continue
        n = max(int(video_frames.get(name, 0)), int(frame[rows].max()))
        per_frame = fill(frame[rows], values[rows], n, interpolate=interpolate)
        path = out_dir / f"{name}.txt"
        path.write_text("\n".join(format_lines(head, name, per_frame, thresholds)) + "\n")
        paths.append(path)
    return paths


def check(directory: str | Path, head: str, video_frames: Mapping[str, int]) -> list[str]:
    """Problems of a submission folder for `head`, empty when it is valid: one file per video
    of `video_frames` and no other, the exact header, one line per frame in order
    (`<video>/<frame:05d>.jpg`), values of the right form (VA: two numbers in [-1, 1]; EXPR: one
    class 0-7; AU: 12 values 0/1). The first bad line of each file is reported."""
    record = heads.get(head)
    directory = Path(directory)
    errors = [f"{p}: not a video of the list" for p in sorted(directory.glob("*.txt"))
              if p.stem not in video_frames]
    for video, n in video_frames.items():
        path = directory / f"{video}.txt"
        if not path.is_file():
            errors.append(f"{path}: missing")
            continue
        lines = path.read_text().splitlines()
        if not lines or lines[0] != record.header:
            errors.append(f"{path}:1: header {lines[0] if lines else ''!r}, expected "
                          f"{record.header!r}")
        if len(lines) - 1 != n:
            errors.append(f"{path}: {len(lines) - 1} frame lines, the video has {n} frames")
        for i, line in enumerate(lines[1:], 1):
            problem = _line_problem(record, video, i, line)
            if problem:
                errors.append(f"{path}:{i + 1}: {problem}: {line!r}")
                break
    return errors


def _line_problem(record: heads.Head, video: str, i: int, line: str) -> str | None:
    name, *fields = line.split(",")
    if name != f"{video}/{i:05d}.jpg":
        return f"expected image {video}/{i:05d}.jpg"
    return record.line_problem(fields)


def main(argv) -> None:
    """`python -m abaw_jax.submission --dir=DIR --head=va --records=RECORDS [--split=test]`:
    checks a submission folder against the videos and frame counts of a records split."""
    from absl import flags

    from abaw_jax.data import records

    del argv
    f = flags.FLAGS
    lengths = records.read_video_frames(f.records, f.split)
    errors = check(f.dir, f.head, lengths)
    for e in errors:
        print(e)
    print(f"{f.dir}: {'INVALID, ' + str(len(errors)) + ' problems' if errors else 'valid'} "
          f"({len(lengths)} videos, {sum(lengths.values())} frames)")
    raise SystemExit(1 if errors else 0)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("dir", None, "Submission folder of one head (<video>.txt files).")
    flags.DEFINE_enum("head", None, list(heads.HEADS), "va, expr or au.")
    flags.DEFINE_string("records", None, "Records folder with the split's frame index.")
    flags.DEFINE_string("split", "test", "Split whose videos the submission must cover.")
    flags.mark_flags_as_required(["dir", "head", "records"])
    app.run(main)
