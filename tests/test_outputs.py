"""What a user reads after training: multi-task submissions, eval's checkpoint line, plots and
inference from a converted folder without a classifier."""

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config

from abaw_jax import (
    convert,
    evaluate,
    inference,
    models,
    plots,
    predict,
    submission,
    tasks,
    trainers,
)
from abaw_jax.data import affwild2, cache, records, schema
from abaw_jax.evaluators import abaw


def test_mtl_predict_writes_the_checked_annotation_layout_and_eval_names_its_step(
        tiny_tree, tmp_path, monkeypatch, caplog, one_device):
    monkeypatch.setenv("ABAW_JAX_CACHE", str(tmp_path / "cache"))
    root, _ = tiny_tree
    config = tiny_config(None, task="mtl", total_steps=2,
                         **{"data.records": None, "data.root": str(root)})
    workdir = tmp_path / "mtl"
    trainers.train_and_evaluate(config, workdir)
    # --mode=eval says which checkpoint its figures are from, and by which metric it is best.
    caplog.set_level(logging.INFO)
    metrics = evaluate.run(config, workdir)
    assert "evaluating checkpoint step 2 (best by challenge_score: " in caplog.text
    stored = json.loads((workdir / "eval/validation-step2/metrics.json").read_text())
    assert stored["score"] == stored["challenge_score"] == pytest.approx(metrics["score"])
    assert list(stored["au/thresholds"]) == list(affwild2.AU_NAMES)
    assert (workdir / "eval/validation-step2/au_f1.png").is_file()

    out = predict.run(config, workdir) / "mtl"
    listed = affwild2.read_test_list(root / "test_lists" / "MTL_Challenge_test_set_release.txt",
                                     images=True)
    # One file in the layout of the multi-task annotation file: its reader takes it back, one
    # line per listed image in the list's order, expression 0-7 and AUs 0/1.
    ann = affwild2.read_mtl_annotation(out / submission.MTL_FILE)
    assert [f"{v}/{f:05d}.jpg" for v, f in zip(ann.videos, ann.frames, strict=True)] == listed
    assert np.all(np.abs(ann.va) <= 1) and set(ann.expr) <= set(range(8))
    assert set(np.unique(ann.au)) <= {0, 1}
    assert sorted(p.name for p in out.iterdir()) == [submission.MTL_FILE]
    # The command-line checker accepts it and names the first bad line of a damaged copy.
    data = cache.records_for(config.data, "mtl", test=True)
    cli = [sys.executable, "-m", "abaw_jax.submission", f"--dir={out}", "--head=mtl",
           f"--records={data}"]
    done = subprocess.run(cli, capture_output=True, text=True, check=False)
    assert done.returncode == 0 and f"{out}: valid ({len(listed)} images of " in done.stdout
    lines = (out / submission.MTL_FILE).read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 13)[0] + ",9," + ",".join(["0"] * 12)
    (out / submission.MTL_FILE).write_text("\n".join(lines[:-1]) + "\n")
    errors = submission.check_mtl(out, listed)
    assert errors == [f"{out / submission.MTL_FILE}: {len(listed) - 1} image lines, the test "
                      f"list has {len(listed)}",
                      f"{out / submission.MTL_FILE}:3: expected one class in 0..7: "
                      f"{lines[2]!r}"]


def _validation(records_dir, noise: float, seed: int = 0) -> dict:
    """A split result (`split.predict_split`) of VA predictions = labels + white noise."""
    source = records.RecordSource(records_dir, "validation")
    labels = {k: np.stack([source[i][k] for i in range(len(source))]) for k in schema.LABEL_KEYS}
    rng = np.random.default_rng(seed)
    preds = {"va": np.clip(labels["va"] + rng.normal(scale=noise, size=labels["va"].shape), -1, 1)}
    return {"preds": preds, "labels": labels}


def test_va_over_time_shows_every_video_raw_and_smoothed_with_its_ccc(tiny_records, tmp_path,
                                                                     monkeypatch):
    figures = {}
    save = plots._save

    def keep(fig, path, **kwargs):
        fig.canvas.draw()  # lay out, so the legend's place can be compared with the axes'
        figures[path.name] = (fig, [a.get_window_extent() for a in fig.axes],
                              [leg.get_window_extent() for leg in fig.legends])
        return save(fig, path, **kwargs)

    monkeypatch.setattr(plots, "_save", keep)
    monkeypatch.setattr(plots, "VIDEOS_PER_PAGE", 1)  # the tiny split has 2 videos: 2 pages
    result = _validation(tiny_records, noise=0.6)
    task = tasks.get("va")
    metrics = abaw.metrics(task, result, tiny_records, "validation")
    assert metrics["post/va/method"] != "none"  # white noise: a smoothing is chosen
    abaw.write_outputs(tmp_path, tiny_records, "validation", result, metrics, task.heads)
    videos, video, _ = records.read_frame_index(tiny_records, "validation")
    shown = [v for i, v in enumerate(videos) if np.any(video[result["labels"]["va_mask"]] == i)]
    assert len(shown) >= 2
    pages = ["va_over_time.png", *(f"va_over_time-{k}.png" for k in range(2, len(shown) + 1))]
    assert sorted(n for n in figures if n.startswith("va_over_time")) == sorted(pages)
    titles, ylabels = [], []
    for name in pages:
        fig, axes, legends = figures[name]
        assert (tmp_path / name).is_file()
        titles += [a.get_title() for a in fig.axes]
        ylabels += [a.get_ylabel() for a in fig.axes]
        # One legend for the figure, outside every plot, naming raw and smoothed outputs.
        assert len(legends) == 1 and not any(a.get_legend() for a in fig.axes)
        assert not any(legends[0].overlaps(box) for box in axes)
        texts = [t.get_text() for t in fig.legends[0].get_texts()]
        assert texts[:2] == ["true", "predicted, raw"]
        assert texts[2].startswith(("predicted, smoothed (Gaussian", "predicted, smoothed (moving"))
    assert ylabels == ["valence", "arousal"] * len(shown)
    for v in shown:  # every video, each with its own CCC raw and smoothed
        mine = [t for t in titles if t.startswith(f"{v}: ")]
        assert len(mine) == 2 and all("CCC raw " in t and ", smoothed " in t for t in mine)


def test_au_bars_say_the_numbers_above_them_are_the_thresholds(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, **kw: figures.append(fig) or path)
    plots.au_f1_bars(np.full(12, 0.4), np.full(12, 0.6), np.full(12, 0.3), tmp_path / "au.png")
    (ax,) = figures[0].axes
    said = ax.get_title() + " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "number above a bar is its threshold" in said
    assert [t.get_text() for t in ax.texts] == ["0.30"] * 12


def test_converted_folder_without_classifier_gives_its_embedding(tmp_path, caplog):
    model = models.build("ddamfn_tiny", outputs={}, rngs=nnx.Rngs(0), num_head=2)
    folder = convert.save(tmp_path / "converted", nnx.to_pure_dict(nnx.state(model)), {
        "family": "ddamfn", "model": "ddamfn_tiny", "model_kwargs": {"num_head": 2},
        "outputs": {}, "source": "test"})
    caplog.set_level(logging.WARNING)
    predict = inference.load(folder)
    assert "holds no task output" in caplog.text and "--keep_fc" in caplog.text
    faces = np.random.default_rng(0).integers(0, 255, (2, 90, 90, 3), dtype=np.uint8)
    out = predict(faces)
    assert out["embedding"].shape == (2, 128)
    np.testing.assert_array_equal(out["embedding"], predict(faces, embedding=True)["embedding"])


def test_mtl_file_follows_the_test_list_and_fills_listed_images_without_a_crop(tmp_path):
    annotations, data = tmp_path / "annotations", tmp_path / "records"
    annotations.mkdir()
    data.mkdir()
    listed = ["b/00002.jpg", "a/00001.jpg", "a/00003.jpg", "b/00001.jpg"]  # a/00003: no crop
    (annotations / "MTL_Challenge_test_set_release.txt").write_text("\n".join(listed) + "\n")
    (data / "stats.json").write_text(json.dumps({"annotations": str(annotations)}))
    video, frame = np.array([0, 1, 1]), np.array([1, 1, 2])  # the records: (video, frame) order
    np.savez(records.frames_path(data, "test"), videos=np.array(["a", "b"]), video=video,
             frame=frame, video_frames=np.array([3, 2]))
    images, source = submission.mtl_test_images(data)
    assert images == listed and source.endswith("MTL_Challenge_test_set_release.txt")
    values = {"va": np.array([[0.5, -0.5], [0.1, 0.2], [0.3, 0.4]]), "expr": np.eye(8)[[1, 2, 3]],
              "au": np.array([[0.9] * 12, [0.1] * 12, [0.6] * 12])}
    path = submission.write_mtl(tmp_path / "mtl" / submission.MTL_FILE, images, ["a", "b"],
                                video, frame, values, np.full(12, 0.5))
    ones, zeros = ",".join(["1"] * 12), ",".join(["0"] * 12)
    assert path.read_text().splitlines() == [
        "image,valence,arousal,expression,aus", f"b/00002.jpg,0.3000,0.4000,3,{ones}",
        f"a/00001.jpg,0.5000,-0.5000,1,{ones}",
        f"a/00003.jpg,0.5000,-0.5000,1,{ones}",  # its video's nearest prediction
        f"b/00001.jpg,0.1000,0.2000,2,{zeros}"]
    assert submission.check_mtl(path.parent, listed) == []
    assert submission.check_mtl(path.parent, sorted(listed))[0] == (
        f"{path}:2: expected image a/00001.jpg: 'b/00002.jpg,0.3000,0.4000,3,{ones}'")
    # Without the list (records moved away from their annotations): the records' order.
    (data / "stats.json").write_text("{}")
    assert submission.mtl_test_images(data)[0] == ["a/00001.jpg", "b/00001.jpg", "b/00002.jpg"]


def test_submission_files_never_leave_their_folder(tmp_path):
    # Records not written by prepare (which checks names) may hold any video name.
    out = tmp_path / "sub" / "va"
    with pytest.raises(affwild2.DataError, match=r"video name '\.\./\.\./escaped'.*separator"):
        submission.write_videos(out, "va", ["../../escaped"], np.zeros(3, np.int64),
                                np.arange(1, 4), np.zeros((3, 2), np.float32), {})
    assert not list(tmp_path.rglob("escaped*"))
