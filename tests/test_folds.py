"""Cross-validation folds (data/folds.py), the record subsets they are read through, and the
fold ensemble (abaw_jax/ensemble.py)."""

import json

import numpy as np
import pytest
from helpers import fake_feature_cache, tiny_config

from abaw_jax import checkpoint, config_lib, ensemble, heads, submission, trainers
from abaw_jax.data import affwild2, augment, folds, pipeline, prepare, records
from abaw_jax.data.video import raw_name
from abaw_jax.errors import ConfigError
from abaw_jax.trainers import supervised


def _data(folds_: int = 3, fold: int = 0, seed: int = 0) -> dict:
    return {"train_split": "train", "eval_split": "validation", "folds": folds_, "fold": fold,
            "fold_seed": seed}


def _planted_videos(n: int, seed: int) -> dict[str, int]:
    """n raw videos of 10-1000 frames, a third of them as _left/_right pairs."""
    rng = np.random.default_rng(seed)
    frames = {}
    for i in range(n):
        if i % 3 == 0:
            frames[f"v{i}_left"], frames[f"v{i}_right"] = rng.integers(10, 1000, 2).tolist()
        else:
            frames[f"v{i}"] = int(rng.integers(10, 1000))
    return frames


def test_folds_are_disjoint_by_raw_video_cover_all_and_are_balanced():
    frames = _planted_videos(60, seed=1)
    lists = folds.make_folds(frames, 5, seed=0)
    assert len(lists) == 5 and all(lists)
    assert sorted(v for f in lists for v in f) == sorted(frames)  # every video once
    raws = [{raw_name(v) for v in f} for f in lists]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not raws[i] & raws[j]
    fold_of = {v: i for i, f in enumerate(lists) for v in f}
    for i in range(0, 60, 3):  # _left and _right together
        assert fold_of[f"v{i}_left"] == fold_of[f"v{i}_right"]
    load = [sum(frames[v] for v in f) for f in lists]
    largest = max(frames[f"v{i}_left"] + frames[f"v{i}_right"] if i % 3 == 0 else frames[f"v{i}"]
                  for i in range(60))
    assert max(load) - min(load) <= largest
    # Balanced far better than a split by name order would be.
    assert max(load) - min(load) < 0.1 * np.mean(load)


def test_folds_are_deterministic_per_seed_and_need_enough_raw_videos():
    frames = _planted_videos(40, seed=2)
    assert folds.make_folds(frames, 5, 7) == folds.make_folds(dict(reversed(frames.items())),
                                                              5, 7)
    assert folds.make_folds(frames, 5, 7) != folds.make_folds(frames, 5, 8)
    with pytest.raises(folds.DataError, match="3 raw videos cannot make 4 folds"):
        folds.make_folds({"a_left": 5, "a_right": 5, "b": 1, "c": 2}, 4, 0)


def test_fold_config_is_checked():
    config = config_lib.experiment("va")
    config_lib.check(config, 1)  # folds off by default
    config.data.folds, config.data.fold = 5, 4
    config_lib.check(config, 1)
    config.data.fold = 5
    with pytest.raises(ConfigError, match=r"data.fold=5 must be in 0..4"):
        config_lib.check(config, 1)
    config.data.folds = 1
    with pytest.raises(ConfigError, match="data.folds=1 must be 0"):
        config_lib.check(config, 1)


def test_record_folds_cover_train_and_validation_and_the_subsets_split_them(tiny_records):
    train_videos = records.read_frame_index(tiny_records, "train")[0]
    val_videos = records.read_frame_index(tiny_records, "validation")[0]
    found = folds.read(_data(3), tiny_records)
    assert sorted(v for f in found.videos for v in f) == sorted(train_videos + val_videos)
    n_records = sum(len(records.read_frame_index(tiny_records, s)[1])
                    for s in ("train", "validation"))
    for fold in range(3):
        train, held = folds.run_splits(_data(3, fold), tiny_records)
        held_videos = set(records.read_frame_index(tiny_records, held)[0])
        train_videos_ = set(records.read_frame_index(tiny_records, train)[0])
        assert held_videos == set(found.videos[fold])
        assert not {raw_name(v) for v in held_videos} & {raw_name(v) for v in train_videos_}
        n = len(records.read_frame_index(tiny_records, held)[1])
        assert n + len(records.read_frame_index(tiny_records, train)[1]) == n_records
        frames = records.read_video_frames(tiny_records, held)
        assert sorted(frames) == sorted(held_videos)
        labels = records.read_labels(tiny_records, held)
        assert sorted(labels.videos) == sorted(held_videos)
        assert labels.offsets[-1] == sum(frames.values())  # one line per frame
    assert folds.run_splits(_data(0), tiny_records) == ("train", "validation")


def _source_of(data_dir, subset):
    """Subset index -> (split, record) it stands for, from `records.subset_rows`."""
    rows = records.subset_rows(data_dir, subset)
    starts = np.cumsum([0] + [len(r) for _, r in rows])

    def source(j: int) -> tuple[str, int]:
        part = int(np.searchsorted(starts, j, side="right")) - 1
        return rows[part][0], int(rows[part][1][j - starts[part]])

    return source


def test_fold_streams_read_only_their_folds_records(tiny_records):
    data = _data(3, fold=1)
    train, held = folds.run_splits(data, tiny_records)
    held_raw = {raw_name(v) for v in folds.read(data, tiny_records).videos[1]}
    readers = {s: pipeline.FrameReader(tiny_records, s, size=16)
               for s in ("train", "validation")}
    # Evaluation: every held-out record once, each the record (image, labels) it stands for.
    source = _source_of(tiny_records, held)
    videos, video, _ = records.read_frame_index(tiny_records, held)
    seen = []
    for batch in pipeline.eval_dataset(tiny_records, held, batch_size=16, size=16):
        for k in np.flatnonzero(batch["mask"]):
            j = int(batch["index"][k])
            want = readers[source(j)[0]](source(j)[1])
            assert raw_name(videos[video[j]]) in held_raw
            np.testing.assert_array_equal(batch["image"][k], want["image"])
            np.testing.assert_array_equal(batch["va"][k], want["va"])
            seen.append(j)
    assert sorted(seen) == list(range(len(video)))
    # Training: shuffled records of the other folds only, with their own labels.
    source = _source_of(tiny_records, train)
    videos, video, _ = records.read_frame_index(tiny_records, train)
    stream = pipeline.train_dataset(tiny_records, train, batch_size=16, seed=0,
                                    augment_cfg=augment.AugmentConfig(size=16))
    picked = set()
    for _, batch in zip(range(len(video) // 16 + 2), stream, strict=False):
        for k, j in enumerate(batch["index"].tolist()):
            assert raw_name(videos[video[j]]) not in held_raw
            np.testing.assert_array_equal(batch["va"][k], readers[source(j)[0]](
                source(j)[1])["va"])
            picked.add(j)
    stream.close()
    assert picked == set(range(len(video)))  # a whole epoch and more: every training record
    assert json.loads(stream.get_state())["split"] == "folds-but-1-of-3"


def test_fold_clips_and_feature_caches_read_the_same_records(tiny_records, tmp_path):
    """Temporal models and cached features (CLIP, MAE fusion) read folds like images."""
    cache_dir = fake_feature_cache(tmp_path / "features", {s: tiny_records for s in
                                                           ("train", "validation")}, 4, 0)
    _, held = folds.run_splits(_data(3, fold=2), tiny_records)
    source = _source_of(tiny_records, held)
    readers = {s: pipeline.FrameReader(tiny_records, s, features=[cache_dir])
               for s in ("train", "validation")}
    subset = pipeline.frame_reader(tiny_records, held, features=[cache_dir])
    for j in range(len(subset)):
        np.testing.assert_array_equal(subset(j)["features"],
                                      readers[source(j)[0]](source(j)[1])["features"])
    videos, video, frame = records.read_frame_index(tiny_records, held)
    seen = np.zeros(len(video), int)
    for batch in pipeline.clip_eval_dataset(tiny_records, held, length=8, stride=4,
                                            batch_size=4, size=0, features=[cache_dir]):
        for clip in batch["index"][batch["mask"]]:
            clip = clip[clip >= 0]
            assert len(set(video[clip])) == 1  # a window never crosses videos
            assert np.all(np.diff(frame[clip]) > 0)
            seen[clip] += 1
    assert seen.min() >= 1  # every held-out record in a window


def test_subset_label_counts_match_the_prepared_stats(tiny_task_records):
    data_dir = tiny_task_records("au")
    videos = tuple(records.read_frame_index(data_dir, "train")[0])
    whole = records.Subset("all-train", (("train", videos),))
    stats = json.loads((data_dir / "stats.json").read_text())["splits"]["train"]["histogram"]
    assert folds.histogram(data_dir, whole) == {k: stats[k] for k in ("au_positive",
                                                                      "au_frames")}
    assert folds.histogram(data_dir, "train") == stats


def test_va_averages_the_members():
    members = np.array([[[0.2, 0.4], [-1.0, 0.0]], [[0.4, -0.2], [0.5, 0.5]],
                        [[0.0, 0.1], [0.2, -0.2]]])
    np.testing.assert_allclose(heads.get("va").combine(members),
                               [[0.2, 0.1], [-0.1, 0.1]])


def _probs(*rows):
    """(frames, 8) probabilities: each row is {class: probability}, the rest shared evenly."""
    out = np.zeros((len(rows), 8))
    for i, row in enumerate(rows):
        out[i] = (1 - sum(row.values())) / (8 - len(row))
        for c, p in row.items():
            out[i, c] = p
    return out


def test_expr_majority_vote_breaks_ties_by_mean_probability():
    expr = heads.get("expr")
    # Frame 0: three members say 1 (barely), one says 3 (surely): the majority wins, though
    # the mean probability favours 3. Frame 1: two votes each for 2 and 5; 5 has the higher
    # mean probability (the first class, 2, is not taken). Frame 2: unanimous.
    members = np.stack([
        _probs({1: 0.3, 3: 0.25}, {2: 0.5, 5: 0.3}, {4: 0.9}),
        _probs({1: 0.3, 3: 0.2}, {2: 0.4, 5: 0.3}, {4: 0.6}),
        _probs({3: 0.95}, {5: 0.9}, {4: 0.5}),
        _probs({1: 0.4}, {5: 0.5, 2: 0.1}, {4: 0.7}),
    ])
    voted = expr.combine(members)
    assert expr.submitted(voted).tolist() == [1, 5, 4]
    assert expr.submitted(members.mean(0))[0] == 3  # what averaging would have said
    assert voted.sum(-1).tolist() == [1, 1, 1]  # one-hot


def test_au_majority_vote_of_decisions_at_the_thresholds():
    au = heads.get("au")
    thresholds = np.full(12, 0.5)
    thresholds[1] = 0.2
    p = np.zeros((3, 2, 12))
    p[:, 0, 0] = [0.6, 0.55, 0.0]  # two of three on: on (the mean 0.38 is below 0.5)
    p[:, 0, 1] = [0.25, 0.1, 0.1]  # one of three at 0.2: off
    p[:, 1, 2] = [0.9, 0.9, 0.4]  # on
    voted = au.combine(p, thresholds)
    assert au.submitted(voted).tolist() == [[1] + [0] * 11, [0, 0, 1] + [0] * 9]
    # Two members, one each way: the mean probability at the threshold decides.
    tie = np.zeros((2, 1, 12))
    tie[:, 0, 0] = [0.9, 0.3]  # mean 0.6: on
    tie[:, 0, 1] = [0.25, 0.05]  # mean 0.15 < 0.2: off
    assert au.submitted(au.combine(tie, thresholds))[0, :2].tolist() == [1, 0]


def _fold_workdir(path, task="au", folds_=2, fold=0, videos=(("a",), ("b",)), **data):
    config = config_lib.experiment(task)
    config.data.folds, config.data.fold = folds_, fold
    config.data.update(data)
    path.mkdir()
    (path / "config.json").write_text(config.to_json())
    (path / folds.FOLDS_FILE).write_text(json.dumps({"videos": [list(v) for v in videos]}))
    return path


def test_ensemble_refuses_runs_that_are_not_one_cross_validation(tmp_path):
    a = _fold_workdir(tmp_path / "a", fold=0)
    cases = [
        (_fold_workdir(tmp_path / "b", fold=0), "both hold out fold 0"),
        (_fold_workdir(tmp_path / "c", task="expr", fold=1), "task='expr', but"),
        (_fold_workdir(tmp_path / "d", folds_=3, fold=1), "data.folds=3, but"),
        (_fold_workdir(tmp_path / "e", fold=1, fold_seed=4), "data.fold_seed=4, but"),
        (_fold_workdir(tmp_path / "f", fold=1, videos=(("a",), ("c",))), "other videos"),
        (_fold_workdir(tmp_path / "g", folds_=0), "not a fold run"),
    ]
    for other, message in cases:
        with pytest.raises(ConfigError, match=message):
            ensemble.run([a, other], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fold_ensemble_end_to_end_writes_every_test_frame(tiny_tree, tmp_path, one_device):
    root, manifest = tiny_tree
    data = tmp_path / "au"  # in this process: a pool's start-up (~30 s loaded) outweighs the work
    prepare.prepare(affwild2.Layout.discover(root), "au", data, splits=(*affwild2.SPLITS, "test"),
                    workers=1, progress=False)
    workdirs = [tmp_path / f"fold{fold}" for fold in range(2)]
    for fold, workdir in enumerate(workdirs):
        # No balancing: weights from each fold's counts are constants of the train step, so
        # the second fold would compile its own (11 s); the weights are tested above.
        config = tiny_config(data, task="au", total_steps=2, **{
            "data.folds": 2, "data.fold": fold, "loss.balance": False})
        trainers.train_and_evaluate(config, workdir)
    # The balanced weights a fold run would use come from its training folds' counts.
    balanced = tiny_config(data, task="au", **{"data.folds": 2, "data.fold": 0})
    hist = folds.histogram(data, folds.run_splits(balanced.data, data)[0])
    pos = np.maximum(np.array(list(hist["au_positive"].values()), np.float64), 1)
    weights = supervised.loss_options(balanced, data)["pos_weight"]
    np.testing.assert_allclose(weights, (hist["au_frames"] - pos) / pos)
    balanced.data.folds = 0
    assert not np.allclose(weights, supervised.loss_options(balanced, data)["pos_weight"])
    lists = [folds.read_file(w) for w in workdirs]
    assert lists[0]["videos"] == lists[1]["videos"] and [f["fold"] for f in lists] == [0, 1]
    report = ensemble.run(workdirs, tmp_path / "ensemble")
    lengths = records.read_video_frames(data, "test")
    assert sorted(lengths) == sorted(manifest["test"]["au"])
    out = tmp_path / "ensemble" / "au"
    assert submission.check(out, "au", lengths) == []
    for video, n in lengths.items():  # every frame of every test video, crop or not
        assert len((out / f"{video}.txt").read_text().splitlines()) == 1 + n
    # Each run evaluated on its held-out fold: the frames it scored are the fold's in the
    # ensemble's report, and together they are the pooled out-of-fold frames.
    frames = [f["au/challenge_frames"] for f in report["folds"]]
    for workdir, n in zip(workdirs, frames, strict=True):
        ckpt = checkpoint.Checkpoints(workdir / "checkpoints", read_only=True)
        assert ckpt.metrics(ckpt.resolve("best"))["au/challenge_frames"] == n
        ckpt.close()
    assert sum(frames) == report["pooled"]["au/challenge_frames"] > 0
    assert len(report["pooled"]["post/au/thresholds"]) == 12
    written = json.loads((tmp_path / "ensemble" / ensemble.REPORT_FILE).read_text())
    assert written["folds"] == report["folds"]
