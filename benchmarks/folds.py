r"""Cross-validation folds at Aff-Wild2's AU scale: the cost of making the folds and of reading
a fold's record subset (frame index, labels, the training folds' label counts), and how even
the folds come out.

  python benchmarks/folds.py [--folds=5] [--repeats=3]

Writes, with the records' own writers, the frame index and labels files of a train and a
validation split the size of the real AU challenge's (8th ABAW, Table 2: 1,381,411 + 454,022
annotation lines over 295 + 105 videos, a tenth of them `_left`/`_right` pairs, 1.6 % of the
lines without a crop), then times each step (best of `--repeats`).
"""

import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from abaw_jax.data import affwild2, folds, records

flags.DEFINE_integer("folds", 5, "Number of folds.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (the best is printed).")
FLAGS = flags.FLAGS

SPLITS = {"train": (295, 1_381_411), "validation": (105, 454_022)}  # videos, lines


def _write_split(out: Path, split: str, videos: int, lines: int, rng) -> None:
    # Videos 20k and 20k + 1 are the two people of one raw video.
    names = [f"{split}{i}_left" if i % 20 == 0 else f"{split}{i - 1}_right" if i % 20 == 1
             else f"{split}{i}" for i in range(videos)]
    lengths = rng.multinomial(lines - videos * 100, np.full(videos, 1 / videos)) + 100
    video = np.repeat(np.arange(videos, dtype=np.int32), lengths)
    frame = affwild2.line_frames(lengths)
    au = rng.integers(0, 2, (lines, 12)).astype(np.int32)
    annotated = affwild2.Annotated.build(names, video, frame, {"au": au})
    records.write_labels(out, split, annotated)
    crop = rng.random(lines) > 0.016
    table = affwild2.FrameTable(
        names, (), video[crop], frame[crop], np.zeros(crop.sum(), np.int8),
        np.zeros((crop.sum(), 2), np.float32), np.zeros(crop.sum(), np.int32), au[crop],
        np.zeros(crop.sum(), bool), np.zeros(crop.sum(), bool), np.ones(crop.sum(), bool),
        lengths.astype(np.int32))
    records.write_frame_index(out, split, table, rng.permutation(len(table)))


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv):
    del argv
    out = Path(tempfile.mkdtemp(prefix="bench_folds_"))
    rng = np.random.default_rng(0)
    for split, (videos, lines) in SPLITS.items():
        _write_split(out, split, videos, lines, rng)
    data = {"train_split": "train", "eval_split": "validation", "folds": FLAGS.folds,
            "fold": 0, "fold_seed": 0}
    n = sum(len(records.read_frame_index(out, s)[1]) for s in SPLITS)
    seconds, made = _best(lambda: folds.read(data, out), FLAGS.repeats)
    print(f"folds_make: {seconds:.3f} s ({n} records, {FLAGS.folds} folds)")
    load = np.array([sum(made.records[v] for v in f) for f in made.videos])
    print(f"folds_imbalance: {100 * (load.max() - load.min()) / load.mean():.3f} % of a fold's "
          "records (max - min)")
    train, held = folds.run_splits(data, out)
    seconds, _ = _best(lambda: records.read_frame_index(out, train), FLAGS.repeats)
    print(f"folds_train_index: {seconds:.3f} s")
    seconds, _ = _best(lambda: records.subset_rows(out, train), FLAGS.repeats)
    print(f"folds_train_rows: {seconds:.3f} s")
    seconds, _ = _best(lambda: records.read_labels(out, held), FLAGS.repeats)
    print(f"folds_eval_labels: {seconds:.3f} s")
    seconds, _ = _best(lambda: folds.histogram(out, train), FLAGS.repeats)
    print(f"folds_train_histogram: {seconds:.3f} s")


if __name__ == "__main__":
    app.run(main)
