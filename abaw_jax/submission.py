"""ABAW prediction files: one file per video with a header and one line for EVERY frame,
frames without a prediction (no face crop) filled from their neighbours; for the multi-task
challenge (s-Aff-Wild2) one file in the layout of its annotation file, one line per listed
test image."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from abaw_jax import heads
from abaw_jax.data import affwild2, records

MTL_FILE = "predictions.txt"  # the multi-task submission, in its head folder `mtl/`


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


def filled_videos(head: str, videos: list[str], video: np.ndarray, frame: np.ndarray,
                  values: np.ndarray, video_frames: Mapping[str, int]
                  ) -> Iterator[tuple[int, str, np.ndarray]]:
    """(index, name, outputs of frames 1..N) of every video with predictions, N its frame count
    (or its last predicted frame, if later): the rows of its per-video submission file."""
    interpolate = heads.get(head).interpolate
    for i, name in enumerate(videos):
        rows = np.flatnonzero(video == i)
        if len(rows):
            n = max(int(video_frames.get(name, 0)), int(frame[rows].max()))
            yield i, name, fill(frame[rows], values[rows], n, interpolate=interpolate)


def write_videos(out_dir: Path, head: str, videos: list[str], video: np.ndarray,
                 frame: np.ndarray, values: np.ndarray, video_frames: Mapping[str, int],
                 thresholds: np.ndarray | float = 0.5) -> list[Path]:
    """Writes `<out_dir>/<video>.txt` for every video with predictions; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name, per_frame in filled_videos(head, videos, video, frame, values, video_frames):
        # Records from elsewhere than prepare (which checks names) must not write outside.
        affwild2.check_video_name(name, f"{out_dir}: the records' video {i}")
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


def mtl_test_images(data_dir: str | Path) -> tuple[list[str], str]:
    """The images a multi-task submission lists, in order, and where that list came from: the
    organisers' test list (found next to the annotation folder the records were prepared from),
    else every test record in (video, frame) order."""
    stats = Path(data_dir) / "stats.json"
    annotations = json.loads(stats.read_text()).get("annotations") if stats.is_file() else None
    if annotations and Path(annotations).is_dir():
        try:
            path = affwild2.Layout(Path(annotations), ()).test_list("mtl")
        except affwild2.DataError:
            path = None
        if path is not None:
            return affwild2.read_test_list(path, images=True), str(path)
    videos, video, frame = records.read_frame_index(data_dir, "test")
    return ([f"{videos[v]}/{f:05d}.jpg" for v, f in zip(video, frame, strict=True)],
            f"{data_dir} (test records in video, frame order: no test list found)")


def write_mtl(path: Path, images: list[str], videos: list[str], video: np.ndarray,
              frame: np.ndarray, values: Mapping[str, np.ndarray],
              thresholds: np.ndarray | float = 0.5) -> Path:
    """The multi-task submission: header `image,valence,arousal,expression,aus`, then
    `video/NNNNN.jpg,v,a,expr,au1..au12` for every listed image in order, images without a
    prediction filled from their video's neighbours as in the per-video files."""
    pairs = [_image_frame(image) for image in images]
    body = {h: heads.get(h).format_values(at_images(pairs, videos, video, frame, values[h], h),
                                          thresholds if h == "au" else 0.5)
            for h in ("va", "expr", "au")}
    lines = [",".join(affwild2.MTL_HEADER),
             *(f"{image},{va},{expr},{au}" for image, va, expr, au in zip(
                 images, body["va"], body["expr"], body["au"], strict=True))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _image_frame(image: str) -> tuple[str, int]:
    name, _, file = image.rpartition("/")
    return name, int(file.removesuffix(".jpg"))


def at_images(pairs: list[tuple[str, int]], videos: list[str], video: np.ndarray,
              frame: np.ndarray, values: np.ndarray, head: str) -> np.ndarray:
    """`values` (one row per record) at the listed (video, frame) pairs, filled per video: the
    rows of the multi-task submission."""
    names = np.array([v for v, _ in pairs])
    wanted = np.array([f for _, f in pairs], np.int64)
    out = np.zeros((len(pairs), *np.shape(values)[1:]))
    unknown = sorted(set(names.tolist()) - set(videos))
    if unknown:
        raise ValueError(f"listed test videos without predictions: {unknown[:5]}")
    for i, name in enumerate(videos):
        at, rows = np.flatnonzero(names == name), np.flatnonzero(video == i)
        if len(at):
            n = max(int(wanted[at].max()), int(frame[rows].max(initial=0)))
            filled = fill(frame[rows], values[rows], n, heads.get(head).interpolate)
            out[at] = filled[wanted[at] - 1].reshape(out[at].shape)
    return out


def check_mtl(directory: str | Path, images: list[str]) -> list[str]:
    """Problems of a multi-task submission folder (`<directory>/predictions.txt`), empty when it
    is valid: the header, one line per listed image in the list's order, values of the right
    form (valence, arousal in [-1, 1], one expression 0-7, 12 AUs 0/1). The first bad line is
    reported."""
    directory = Path(directory)
    path = directory / MTL_FILE
    errors = [f"{p}: not the submission file {MTL_FILE}" for p in sorted(directory.glob("*.txt"))
              if p.name != MTL_FILE]
    if not path.is_file():
        return [*errors, f"{path}: missing"]
    lines = path.read_text().splitlines()
    header = ",".join(affwild2.MTL_HEADER)
    if not lines or lines[0] != header:
        errors.append(f"{path}:1: header {lines[0] if lines else ''!r}, expected {header!r}")
    if len(lines) - 1 != len(images):
        errors.append(f"{path}: {len(lines) - 1} image lines, the test list has {len(images)}")
    for i, (line, image) in enumerate(zip(lines[1:], images, strict=False), 2):
        problem = _mtl_line_problem(image, line)
        if problem:
            errors.append(f"{path}:{i}: {problem}: {line!r}")
            break
    return errors


def _mtl_line_problem(image: str, line: str) -> str | None:
    name, *fields = line.split(",")
    if name != image:
        return f"expected image {image}"
    if len(fields) != 15:
        return "expected 15 values: valence, arousal, expression, 12 AUs"
    return (heads.get("va").line_problem(fields[:2]) or heads.get("expr").line_problem(fields[2:3])
            or heads.get("au").line_problem(fields[3:]))


def main(argv) -> None:
    """`python -m abaw_jax.submission --dir=DIR --head=va --records=RECORDS [--split=test]`:
    checks a submission folder against the videos and frame counts of a records split (with
    `--head=mtl`, `DIR/predictions.txt` against the multi-task test list)."""
    from absl import flags

    del argv
    f = flags.FLAGS
    if f.head == "mtl":
        images, source = mtl_test_images(f.records)
        errors, what = check_mtl(f.dir, images), f"{len(images)} images of {source}"
    else:
        lengths = records.read_video_frames(f.records, f.split)
        errors = check(f.dir, f.head, lengths)
        what = f"{len(lengths)} videos, {sum(lengths.values())} frames"
    for e in errors:
        print(e)
    print(f"{f.dir}: {'INVALID, ' + str(len(errors)) + ' problems' if errors else 'valid'} "
          f"({what})")
    raise SystemExit(1 if errors else 0)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("dir", None, "Submission folder of one head (<video>.txt files; for "
                        "mtl the folder of predictions.txt).")
    flags.DEFINE_enum("head", None, [*heads.HEADS, "mtl"], "va, expr, au or mtl.")
    flags.DEFINE_string("records", None, "Records folder with the split's frame index.")
    flags.DEFINE_string("split", "test", "Split whose videos the submission must cover.")
    flags.mark_flags_as_required(["dir", "head", "records"])
    app.run(main)
