"""The challenge's figures: every annotated frame of the validation videos scored from the
submitted per-frame values, against scikit-learn on the files the evaluation writes; the labels
file they come from; the best checkpoint picked by them."""

import shutil
import struct
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import f1_score

from abaw_jax import checkpoint, evaluate, heads, postprocess, submission, tasks
from abaw_jax.data import affwild2, records, schema
from abaw_jax.errors import UserError
from abaw_jax.evaluators import abaw
from abaw_jax.trainers import loop

# Which annotation lines carry a label, by the format's rules (nan compares False).
VALID = {"va": lambda y: np.all((y >= -1) & (y <= 1), 1),
         "expr": lambda y: (y[:, 0] >= 0) & (y[:, 0] <= 7),
         "au": lambda y: np.all((y == 0) | (y == 1), 1)}
COLUMNS = {"va": slice(0, 2), "expr": slice(2, 3), "au": slice(3, 15)}  # of an s-Aff-Wild2 line


def _result(data_dir, task: str, noise: float, seed: int = 0) -> dict:
    """A split result (`split.predict_split`) of noisy predictions of the records' labels; the
    noise is constant over runs of 24 records (validation records are in frame order), so that
    the smoothing cannot remove it."""
    source = records.RecordSource(data_dir, "validation")
    labels = {k: np.stack([source[i][k] for i in range(len(source))]) for k in schema.LABEL_KEYS}
    rng = np.random.default_rng(seed)
    n = len(source)

    def runs(scale: float, width: int) -> np.ndarray:
        return np.repeat(rng.uniform(-scale, scale, (n // 24 + 1, width)), 24, 0)[:n]

    preds = {"va": np.clip(labels["va"] + runs(noise, 2), -1, 1),
             "expr": np.eye(8)[labels["expr"]] + runs(noise, 8),
             "au": np.clip(0.5 * labels["au"] + 0.25 + runs(noise / 2, 12), 0, 1)}
    return {"preds": {h: preds[h] for h in tasks.get(task).heads}, "labels": labels}


def _wrong_beside_gaps(result: dict, data_dir) -> dict:
    """`result` with the predictions of the records next to a frame without a record made
    plainly wrong, so that the frames without a crop, filled from them, count."""
    _, video, frame = records.read_frame_index(data_dir, "validation")
    have = set(zip(video.tolist(), frame.tolist(), strict=True))
    beside = np.array([(v, f - 1) not in have or (v, f + 1) not in have
                       for v, f in zip(video.tolist(), frame.tolist(), strict=True)])
    labels = result["labels"]
    wrong = {"va": -labels["va"], "expr": 10 * np.eye(8)[(labels["expr"] + 4) % 8],
             "au": 1.0 - labels["au"]}
    for h, p in result["preds"].items():
        p[beside] = wrong[h][beside]
    return result


def _annotations(root, task: str) -> dict[str, np.ndarray]:
    """{video: (lines, columns)} of the validation annotation files, read with numpy."""
    folder = affwild2.Layout.discover(root).task_dir(task, "validation")
    return {p.stem: np.loadtxt(p, delimiter=",", skiprows=1, ndmin=2, encoding="utf-8-sig")
            for p in sorted(folder.glob("*.txt"))}


def _file_values(path, names: list[str] | None = None) -> np.ndarray:
    """The values of a submission file's lines (checking their image names when given)."""
    lines = [line.split(",") for line in path.read_text().splitlines()[1:]]
    if names is not None:
        assert [line[0] for line in lines] == names
    return np.array([[float(x) for x in line[1:]] for line in lines])


def _ccc(p: np.ndarray, y: np.ndarray) -> float:
    cov = np.mean((p - p.mean()) * (y - y.mean()))
    return 2 * cov / (p.var() + y.var() + (p.mean() - y.mean()) ** 2)


def _reference(task: str, p: np.ndarray, y: np.ndarray) -> float:
    """The challenge's metric with scikit-learn (CCC by its formula: sklearn has none)."""
    if task == "va":
        return (_ccc(p[:, 0], y[:, 0]) + _ccc(p[:, 1], y[:, 1])) / 2
    if task == "expr":
        return f1_score(y[:, 0], p[:, 0], average="macro", labels=range(8), zero_division=0)
    return np.mean([f1_score(y[:, k], p[:, k], zero_division=0) for k in range(12)])


@pytest.mark.parametrize("task", ["va", "expr", "au"])
def test_challenge_figure_is_sklearn_over_every_annotated_frame_of_the_written_files(
        tiny_tree, tiny_task_records, tmp_path, task):
    data = tiny_task_records(task)
    result = _wrong_beside_gaps(_result(data, task, noise=0.6), data)
    metrics = abaw.metrics(tasks.get(task), result, data, "validation")
    abaw.write_outputs(tmp_path, data, "validation", result, metrics, (task,))
    videos, video, frame = records.read_frame_index(data, "validation")
    has_crop = {(videos[v], int(f)) for v, f in zip(video, frame, strict=True)}
    every, cropped = ([], []), ([], [])
    for name, y in _annotations(tiny_tree[0], task).items():
        p = _file_values(tmp_path / "predictions" / task / f"{name}.txt",
                         [f"{name}/{i:05d}.jpg" for i in range(1, len(y) + 1)])
        valid = VALID[task](y)
        crop = np.array([(name, i) in has_crop for i in range(1, len(y) + 1)])
        for (ps, ys), rows in ((every, valid), (cropped, valid & crop)):
            ps.append(p[rows])
            ys.append(y[rows])
    p, y = np.concatenate(every[0]), np.concatenate(every[1])
    key = f"{task}/challenge_{heads.get(task).challenge_score}"
    # (VA to 1e-7: the project parses the annotation files' labels as float32, numpy here as
    # float64; a 1e-9 difference.)
    assert metrics[key] == pytest.approx(_reference(task, p, y), abs=1e-7 if task == "va" else 0)
    assert metrics["score"] == metrics["challenge_score"] == metrics[key]
    assert metrics["score_metric"] == "challenge_score"
    # Every valid line counts; the crop-only figures (kept) count the frames with a crop, and
    # over those the same files give the crop-only figure after the same post-processing
    # (VA: up to the files' 4 decimals): the difference is the frames without a crop.
    assert metrics[f"{task}/challenge_frames"] == len(y) > metrics[f"{task}/frames"]
    assert metrics[f"{task}/challenge_frames_missing"] == 0
    crop_only = _reference(task, np.concatenate(cropped[0]), np.concatenate(cropped[1]))
    assert crop_only == pytest.approx(metrics[f"post/{task}/score"], abs=1e-4)
    assert abs(metrics[key] - metrics[f"post/{task}/score"]) > 1e-3


def test_multitask_challenge_is_p_over_the_listed_images_as_write_mtl_submits_them(
        tiny_tree, tiny_task_records, tmp_path):
    data = tiny_task_records("mtl")
    task = tasks.get("mtl")
    result = _result(data, "mtl", noise=0.6)
    metrics = abaw.metrics(task, result, data, "validation")
    path = affwild2.Layout.discover(tiny_tree[0]).task_dir("mtl", "validation")
    rows = [line.split(",") for line in path.read_text(encoding="utf-8-sig").splitlines()[1:]
            if line.strip()]
    images, y = [r[0].strip() for r in rows], np.array([[float(x) for x in r[1:]] for r in rows])
    post = postprocess.Post.from_metrics(metrics, task.heads)
    index = records.read_frame_index(data, "validation")
    out = submission.write_mtl(tmp_path / submission.MTL_FILE, images, *index,
                               post.apply(result["preds"], *index[1:]), post.thresholds)
    p = _file_values(out, images)
    parts = {}
    for h, cols in COLUMNS.items():
        valid = VALID[h](y[:, cols])
        parts[h] = _reference(h, p[valid, cols], y[valid, cols])
        assert metrics[f"{h}/challenge_frames"] == valid.sum()
        assert metrics[f"{h}/challenge_{heads.get(h).challenge_score}"] == pytest.approx(
            parts[h], abs=1e-7)
    assert metrics["score"] == metrics["challenge_score"] == pytest.approx(sum(parts.values()))


def _member_ends(path) -> dict[str, int]:
    """The offset of the last data byte of each member of an uncompressed .npz."""
    data = path.read_bytes()
    ends = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:
                                                            info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            ends[info.filename] = start + info.compress_size - 1
    return ends


def test_the_labels_file_keeps_every_annotated_line_and_its_checksums_catch_damage(
        tiny_tree, tiny_records, tmp_path):
    annotated = records.read_labels(tiny_records, "validation")
    written = _annotations(tiny_tree[0], "va")
    assert annotated.videos == sorted(written)
    for i, name in enumerate(annotated.videos):
        rows, y = annotated.rows(i), written[name]
        valid = VALID["va"](y)
        np.testing.assert_array_equal(annotated.frame[rows], np.arange(1, len(y) + 1))
        np.testing.assert_array_equal(annotated.masks["va"][rows], valid)
        np.testing.assert_array_equal(annotated.labels["va"][rows][valid],
                                      y[valid].astype(np.float32))  # as the records hold them
    # Lines without a crop and invalid lines are kept: more than the records.
    assert len(annotated.frame) > len(records.RecordSource(tiny_records, "validation"))
    assert not annotated.masks["va"].all()

    good = records.labels_path(tiny_records, "validation").read_bytes()
    copy = records.labels_path(tmp_path, "validation")
    ends = _member_ends(records.labels_path(tiny_records, "validation"))
    assert sorted(ends) == ["meta.npy", "offsets.npy", "va.npy", "videos.npy"]
    for where in ends.values():  # a flipped byte in any array is an error naming the file
        damaged = bytearray(good)
        damaged[where] ^= 0x10
        copy.write_bytes(damaged)
        with pytest.raises(affwild2.DataError, match=f"^{copy}: .*write the records again"):
            records.read_labels(tmp_path, "validation")
    # A label changed and the file written again whole (so the zip's own CRCs hold): the
    # file's CRC32C of each array still catches it.
    with np.load(records.labels_path(tiny_records, "validation")) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["va"][3, 0] += 0.5
    np.savez(copy, **arrays)
    with pytest.raises(affwild2.DataError, match=r"corrupt \(va: CRC32C mismatch\)"):
        records.read_labels(tmp_path, "validation")
    copy.unlink()
    with pytest.raises(UserError, match=f"^{copy}: missing"):
        records.read_labels(tmp_path, "validation")


def test_records_without_the_labels_file_score_the_frames_with_a_crop(tiny_records, tmp_path):
    data = tmp_path / "va"
    shutil.copytree(tiny_records, data)
    records.labels_path(data, "validation").unlink()
    metrics = abaw.metrics(tasks.get("va"), _result(data, "va", 0.3), data, "validation")
    assert metrics["score_metric"] == "va/ccc_mean"
    assert metrics["score"] == metrics["va/ccc_mean"] and "challenge_score" not in metrics


def test_the_best_checkpoint_follows_the_challenge_score(tiny_task_records, tmp_path):
    data = tiny_task_records("expr")
    task = tasks.get("expr")
    evaluated = [abaw.metrics(task, _result(data, "expr", noise=1.0, seed=s), data,
                              "validation") for s in range(8)]
    # Two evaluations that the crop-only score and the challenge's rank the other way round.
    pairs = [(a, b) for a in evaluated for b in evaluated
             if a[task.score] > b[task.score] and a["challenge_score"] < b["challenge_score"]]
    assert pairs
    crop_best, challenge_best = pairs[0]
    ckpt = checkpoint.Checkpoints(tmp_path, keep=10)
    state = {"w": jnp.zeros(4)}
    ckpt.save(2, state, metrics=loop._jsonable(challenge_best))
    ckpt.save(4, state, metrics=loop._jsonable(crop_best))
    ckpt.wait()
    assert ckpt.resolve("best") == 2
    # The log lines say which figure ranks the checkpoints.
    said = evaluate.describe_checkpoint("best", 2, ckpt.metrics(2), task.score)
    assert said == (f"checkpoint step 2 (best by challenge_score: "
                    f"{challenge_best['challenge_score']:.4f} at training time)")
    assert loop.describe_score(challenge_best).startswith(
        f"validation challenge_score {challenge_best['challenge_score']:.4f} (every annotated")
    assert loop.describe_score(challenge_best, {"folds": 5, "fold": 2}).startswith(
        "held-out fold 2 of 5 challenge_score")
    ckpt.close()
