r"""Curates Aff-Wild2 and writes sharded records, their TFDS metadata, offset indices and stats.

  python -m abaw_jax.data.prepare --root=/data/affwild2 --out=/data/records --task=va

writes `<out>/<task>/`: `affwild2-<split>.<format>-NNNNN-of-MMMMM` shards (+ `.idx` offset
indices for TFRecord), `frames-<split>.npz` ((video, frame) per record), `labels-<split>.npz`
(the labels of every annotation line of a labelled split, crop or not: what the challenge
scores), TFDS `dataset_info.json` / `features.json`, `stats.json` and, when the raw videos are
there, the audio side table `audio/` (data/audio_table.py). The train split is shuffled with
`--seed` before sharding; the other splits keep (video, frame) order. The output depends only on
the inputs, the seed and `--num_shards`, never on `--workers`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import app, flags, logging

from abaw_jax.data import affwild2, audio_table, augment, records, video
from abaw_jax.data import audio as audio_lib

EXAMPLES_PER_SHARD = 10_000
DEFAULT_AUDIO = audio_lib.AudioConfig()
_MAX_LISTED = 50  # corrupt files named in stats.json; the count covers all of them


@dataclasses.dataclass(frozen=True)
class _ShardJob:
    path: str
    fmt: str
    positions: np.ndarray  # rows of `table`, in record order
    table: affwild2.FrameTable  # only this shard's rows, so each job pickles little


def _is_jpeg(data: bytes) -> bool:
    # Start and end markers: names a truncated download plainly, before the decode.
    return data[:2] == b"\xff\xd8" and data.rstrip(b"\0")[-2:] == b"\xff\xd9"


class _Decoder:
    """Decodes crops with the training pipeline's decoder (`augment.decode`, OpenCV's libjpeg)
    and says what is wrong with one that does not decode cleanly.

    libjpeg decodes garbage between the markers, or a truncated file whose end marker was put
    back, with only a warning ("Corrupt JPEG data: ...", "Premature end of JPEG file") printed
    to the process's stderr, and returns grey or garbled rows. OpenCV offers no other way to see
    it, so stderr (fd 2) points at a temporary file during each decode. Prepare's worker
    processes write nothing else there; with one worker (no pool) a line another thread wrote
    to stderr during a decode would be taken for a warning and its crop dropped.
    """

    def __enter__(self) -> _Decoder:
        self._log = tempfile.TemporaryFile()
        self._stderr = os.dup(2)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._stderr)
        self._log.close()

    def problem(self, data: bytes) -> str | None:
        """None for a clean decode, else libjpeg's (first) complaint."""
        start = os.fstat(self._log.fileno()).st_size
        os.dup2(self._log.fileno(), 2)
        try:
            augment.decode(data)
        except augment.ImageDecodeError:
            return "OpenCV cannot decode it"
        finally:
            os.dup2(self._stderr, 2)
        if os.fstat(self._log.fileno()).st_size == start:
            return None
        self._log.seek(start)
        lines = self._log.read().decode(errors="replace").strip().splitlines()
        return f"libjpeg: {lines[0].strip() if lines else 'a warning'}"


def _write_job(job: _ShardJob) -> tuple[str, np.ndarray, list[tuple[int, str]]]:
    """Worker: writes one shard; returns (path, kept positions, [(position, why)] skipped)."""
    kept, skipped = [], []

    def examples(decoder: _Decoder):
        for pos in job.positions:
            path = job.table.image_path(int(pos))
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                skipped.append((int(pos), f"{path}: unreadable ({e.strerror})"))
                continue
            if not _is_jpeg(data):
                skipped.append((int(pos), f"{path}: not a complete JPEG"))
                continue
            # Decoded once here, so that a crop training would stop on (or learn from as a
            # half-grey face) never becomes a record.
            problem = decoder.problem(data)
            if problem:
                skipped.append((int(pos), f"{path}: corrupt JPEG ({problem})"))
                continue
            kept.append(int(pos))
            yield records.serialize(job.table, int(pos), data)

    with _Decoder() as decoder:
        records.write_shard(job.path, examples(decoder), job.fmt)
    return job.path, np.asarray(kept, np.int64), skipped


def write_split(table: affwild2.FrameTable, out: Path, split: str, fmt: str, num_shards: int,
                seed: int, pool=None, progress: bool = True) -> tuple[list[int], int, list]:
    """Writes one split's shards (in `pool`'s processes if given); returns (shard lengths, bytes,
    skipped frames)."""
    from tqdm import tqdm

    n = len(table)
    order = np.random.default_rng(seed).permutation(n) if split == "train" else np.arange(n)
    num_shards = num_shards or max(1, math.ceil(n / EXAMPLES_PER_SHARD))
    chunks = np.array_split(order, num_shards)
    jobs = [_ShardJob(str(out / records.shard_name(split, fmt, i, num_shards)), fmt,
                      np.arange(len(c)), table.take(c)) for i, c in enumerate(chunks)]
    results: dict[str, tuple[np.ndarray, list]] = {}
    bar = tqdm(total=n, desc=f"{split} records", unit="frame", disable=not progress)
    for path, kept, skipped in (pool.imap_unordered(_write_job, jobs) if pool
                                else map(_write_job, jobs)):
        results[path] = (kept, skipped)
        bar.update(len(kept) + len(skipped))
    bar.close()
    lengths, kept_rows, skipped_all = [], [], []
    for job, chunk in zip(jobs, chunks, strict=True):
        kept, skipped = results[job.path]
        lengths.append(len(kept))
        kept_rows.append(chunk[kept])
        skipped_all += [(int(chunk[p]), why) for p, why in skipped]
    records.write_frame_index(out, split, table, np.concatenate(kept_rows))
    if table.annotated is not None:  # labelled splits: what the challenge's score counts
        records.write_labels(out, split, table.annotated)
    size = sum(Path(j.path).stat().st_size for j in jobs)
    return lengths, size, skipped_all


def prepare(layout: affwild2.Layout, task: str, out: str | os.PathLike,
            splits: Sequence[str] = affwild2.SPLITS, fmt: str = "tfrecord", num_shards: int = 0,
            seed: int = 0, workers: int | None = None, strict: bool = False,
            progress: bool = True, audio: audio_lib.AudioConfig | None = DEFAULT_AUDIO) -> dict:
    """Curates and writes the records of one task; returns {split: stats} (also in stats.json).
    With `audio` and raw videos in the layout, also the audio side table of their videos."""
    if fmt not in records.FORMATS:
        raise affwild2.DataError(f"unknown --format {fmt!r}; expected one of {records.FORMATS}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    index = affwild2.ImageIndex(layout.image_roots)
    stats, lengths, sizes = {}, {}, {}
    # One pool for all splits. spawn, not fork: the trainer calls this with JAX's threads
    # running, and forking a multithreaded process can deadlock the child.
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        curated = {split: _curate(layout, task, split, strict, index) for split in splits}
        raws = _raw_videos(layout, {v for table, _ in curated.values() for v in table.videos})
        for split in splits:
            curated[split] = _frame_counts(*curated[split], raws, split)
        for split in splits:
            table, st = curated[split]
            t1 = time.perf_counter()
            lengths[split], sizes[split], skipped = write_split(
                table, out, split, fmt, num_shards, seed, pool, progress)
            _count_skipped(st, skipped)
            affwild2.check_accounting(st)
            affwild2.check_not_empty(split, st, layout.image_roots)
            st["seconds"]["write"] = round(time.perf_counter() - t1, 2)
            st["records"] = sum(lengths[split])
            stats[split] = st
        sound = _write_audio(out, raws, layout.video_roots, audio, stats, pool, progress)
    finally:
        if pool:  # idle after the last split; on an error, Ctrl-C or SIGTERM: stop writing now
            pool.terminate()
            pool.join()
    records.write_metadata(out, lengths, sizes, fmt, task, description=(
        f"Aff-Wild2 {task} frames curated by abaw_jax (strict={strict}, seed={seed})."))
    summary = {"task": task, "strict": strict, "seed": seed, "format": fmt,
               "annotations": str(layout.annotations),
               "image_roots": [str(r) for r in layout.image_roots],
               "video_roots": [str(r) for r in layout.video_roots],
               "raw_videos": _video_counts(raws), "audio": sound, "splits": stats}
    (out / "stats.json").write_text(json.dumps(summary, indent=1))
    return stats


def _curate(layout: affwild2.Layout, task: str, split: str, strict: bool,
            index: affwild2.ImageIndex) -> tuple[affwild2.FrameTable, dict]:
    """Curates one split and warns of its faults; every requested split is curated before
    anything is written, so that an empty one stops the run at once."""
    t0 = time.perf_counter()
    table, stats = affwild2.curate(layout, task, split, strict=strict, index=index)
    stats["seconds"] = {"curate": round(time.perf_counter() - t0, 2)}
    affwild2.check_not_empty(split, stats, layout.image_roots)
    for reason, where in stats["first"].items():
        logging.warning("%s %s: %s, the first at %s (counts in stats.json)", task, split, reason,
                        where)
    return table, stats


def _raw_videos(layout: affwild2.Layout, names: set[str]
                ) -> dict[str, tuple[Path | None, video.VideoInfo | None]]:
    """Each raw video of `names` (`_left`/`_right` share one): its file, and its fps and frame
    count probed from it (or read from video_info.csv when it is missing or unreadable: its
    audio then counts as `unreadable`)."""
    files = video.index_videos(layout.video_roots) if layout.video_roots else {}
    listed = video.read_info_csv(layout.video_info) if layout.video_info else {}
    out = {}
    for raw in sorted({video.raw_name(n) for n in names}):
        path, info = files.get(raw), None
        if path is not None:
            try:
                info = video.probe(path)
            except affwild2.DataError as e:
                logging.warning("%s (its frame count from %s if listed there)", e,
                                affwild2.VIDEO_INFO_FILE)
        out[raw] = (path, info or listed.get(raw))
    return out


def _video_counts(raws: dict) -> dict[str, int]:
    sources = [info.source if info else "none" for _, info in raws.values()]
    return {"raw_videos": len(raws), "files": sum(p is not None for p, _ in raws.values()),
            **{f"frames_from_{s}": sources.count(s) for s in sorted(set(sources))}}


def _frame_counts(table: affwild2.FrameTable, stats: dict, raws: dict, split: str
                  ) -> tuple[affwild2.FrameTable, dict]:
    """Test videos take their frame count (the submission's lines) from the raw video; without
    one, from the last crop, warned. Labelled videos keep their annotation's count, and a raw
    video of another length is counted (`frame_count_mismatch`)."""
    counts = table.video_frames.copy()
    mismatch, fallback = [], []
    for i, name in enumerate(table.videos):
        info = raws[video.raw_name(name)][1]
        if info is None:
            fallback.append(name)
        elif split == "test":
            counts[i] = info.num_frames
        elif info.num_frames != counts[i]:
            mismatch.append(f"{name}: {counts[i]} annotation lines, {info.num_frames} video "
                            f"frames ({info.source})")
    stats["frame_counts"] = {"from_video": len(table.videos) - len(fallback),
                             "without_video": len(fallback), "mismatch": len(mismatch),
                             "videos_without_video": fallback[:_MAX_LISTED]}
    if split == "test" and fallback:
        logging.warning("%d test videos without a raw video or video_info.csv line, their "
                        "frame count (submission lines) from the last crop: %s", len(fallback),
                        ", ".join(fallback[:5]))
    if mismatch:
        stats["first"].setdefault("frame_count_mismatch", mismatch[0])
    return dataclasses.replace(table, video_frames=counts), stats


def _write_audio(out: Path, raws: dict, roots: Sequence[Path], cfg: audio_lib.AudioConfig | None,
                 stats: dict, pool, progress: bool) -> dict | None:
    """The audio side table of the raw videos (none without any video or `.wav`), and per
    split the frames whose timestamp lies past their audio (`audio_past_end`)."""
    wavs = {raw: video.find_wav(raw, path, roots) for raw, (path, _) in raws.items()}
    if cfg is None or not any(p or info or wavs[raw] for raw, (p, info) in raws.items()):
        return None
    sources = {raw: audio_table.Source(
        video=str(path) if path else None, wav=str(wavs[raw]) if wavs[raw] else None,
        fps=info.fps if info else None, track_rate=info.sample_rate if info else None)
        for raw, (path, info) in raws.items()}
    counts = audio_table.write(out, sources, cfg, pool, progress)
    for split, st in stats.items():
        past, first = audio_table.frames_past_end(out, *records.read_frame_index(out, split))
        if past and cfg.missing == "error":
            raise affwild2.DataError(f"{first}: frame past the end of its audio "
                                     "(data.audio.missing=error)")
        st["audio_past_end"] = past
        if first:
            st["first"].setdefault("audio_past_end", first)
    for reason, raw in counts["first"].items():
        logging.warning("audio: %d raw videos with %s, the first %s (silence for their frames; "
                        "counts in stats.json)", counts[reason], reason, raw)
    return counts


def _count_skipped(stats: dict, skipped: list[tuple[int, str]]) -> None:
    """Frames whose JPEG turned out unreadable move from curated to a named drop reason."""
    stats["dropped"]["corrupt_image"] = len(skipped)
    stats["curated"] -= len(skipped)
    if skipped:
        skipped = sorted(skipped)
        stats["corrupt_images"] = [why for _, why in skipped[:_MAX_LISTED]]
        logging.warning("skipped %d unreadable or corrupt crops (corrupt_image in stats.json), "
                        "the first: %s", len(skipped), skipped[0][1])


def main(argv: Sequence[str]) -> None:
    del argv
    FLAGS = flags.FLAGS
    if not FLAGS.root or not FLAGS.out:
        raise app.UsageError("--root and --out are required")
    try:
        layout = affwild2.Layout.discover(FLAGS.root, FLAGS.annotations, FLAGS.image_roots,
                                          FLAGS.video_roots)
        out = Path(FLAGS.out) / FLAGS.task
        stats = prepare(layout, FLAGS.task, out, FLAGS.splits, FLAGS.format, FLAGS.num_shards,
                        FLAGS.seed, FLAGS.workers or None, FLAGS.strict,
                        audio=DEFAULT_AUDIO if FLAGS.audio else None)
    except affwild2.DataError as e:
        raise SystemExit(f"error: {e}") from None
    print(affwild2.format_stats({FLAGS.task: stats}))
    print(f"records and stats.json in {out}")


def define_flags() -> None:
    """The CLI's flags, defined only when run as a program so that importing this module (the
    trainer builds its data cache with `prepare`) adds nothing to the global absl flags."""
    flags.DEFINE_string("root", None, "Aff-Wild2 folder (annotations + cropped_aligned*).")
    flags.DEFINE_string("out", None, "Output folder; records go to <out>/<task>/.")
    flags.DEFINE_enum("task", "va", affwild2.ALL_TASKS, "Which annotations to curate.")
    flags.DEFINE_list("splits", list(affwild2.SPLITS), "Splits to write (train, validation, test).")
    flags.DEFINE_enum("format", "tfrecord", records.FORMATS, "Record file format.")
    flags.DEFINE_integer("num_shards", 0, f"Shards per split (0: one per {EXAMPLES_PER_SHARD}).")
    flags.DEFINE_integer("seed", 0, "Seed of the train split's record order.")
    flags.DEFINE_integer("workers", 0, "Writer processes (0: all cores).")
    flags.DEFINE_bool("strict", False, "mtl: drop a frame when any task is invalid (7th ABAW).")
    flags.DEFINE_string("annotations", None, "Annotation folder, if not found under --root.")
    flags.DEFINE_list("image_roots", None, "Image roots, if not the cropped_aligned* under --root.")
    flags.DEFINE_list("video_roots", None, "Raw video folders, if not the video*/raw_video* "
                      "under --root.")
    flags.DEFINE_bool("audio", True, "Write the audio side table (default parameters) when "
                      "the raw videos are there.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
