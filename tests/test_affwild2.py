"""Annotation parsing, malformed-input errors, curation accounting and prepare's per-crop checks."""

import logging
import re

import cv2
import numpy as np
import pytest

from abaw_jax.data import affwild2, prepare
from abaw_jax.data.affwild2 import DataError

VA_HEADER = "valence,arousal"
AU_HEADER = ",".join(affwild2.AU_NAMES)


def _write(path, text, newline="\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode())
    return path


def _jpeg(seed: int = 0) -> bytes:
    """A real 112x112 face-crop-sized JPEG (smooth noise, so the scan is a few kB)."""
    img = np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", cv2.GaussianBlur(img, (9, 9), 3))[1].tobytes()


def _va_tree(root, splits, crops):
    """VA annotations {split: {video: lines}} and real crops {video: frames} under `root`."""
    for split, videos in splits.items():
        for video, lines in videos.items():
            _write(root / "annotations/VA_Estimation_Challenge" / affwild2.SPLIT_DIRS[split]
                   / f"{video}.txt", VA_HEADER + "\n" + "\n".join(lines) + "\n")
    for video, frames in crops.items():
        for frame in frames:
            path = root / "cropped_aligned" / video / f"{frame:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_jpeg(frame))
    return affwild2.Layout.discover(root)


def test_va_parses_real_dirt(tmp_path):
    text = f"{VA_HEADER}\n0.1,-0.2\n-5,-5\n0.3, 0.4\n1.5,0\n\n\n"
    labels = affwild2.read_annotation(_write(tmp_path / "v.txt", text, "\r\n"), "va")
    np.testing.assert_allclose(labels, [[0.1, -0.2], [-5, -5], [0.3, 0.4], [1.5, 0]])
    np.testing.assert_array_equal(affwild2.valid_mask("va", labels), [1, 0, 1, 0])


def test_expr_and_au_without_final_newline(tmp_path):
    expr_header = ",".join(affwild2.EXPR_NAMES)
    expr = affwild2.read_annotation(_write(tmp_path / "e.txt", f"{expr_header}\n3\n-1\n7"), "expr")
    np.testing.assert_array_equal(expr, [3, -1, 7])
    np.testing.assert_array_equal(affwild2.valid_mask("expr", expr), [1, 0, 1])
    rows = ["0,1,0,0,0,0,1,0,0,0,1,0", "-1," * 11 + "-1", "1,1,1,1,1,1,1,1,1,1,1,1"]
    au = affwild2.read_annotation(_write(tmp_path / "a.txt", AU_HEADER + "\n" + "\n".join(rows)),
                                  "au")
    assert au.shape == (3, 12)
    np.testing.assert_array_equal(affwild2.valid_mask("au", au), [1, 0, 1])


@pytest.mark.parametrize("text, task, message", [
    ("valence,arousal\n0.1,0.2\n0.3\n", "va",
     r"v\.txt:3: expected 2 comma-separated values, got 1"),
    ("valence,arousal\n0.1,0.2\n0.1,abc\n", "va", r"v\.txt:3: 'abc' is not a number"),
    ("arousal,valence\n0.1,0.2\n", "va", r"v\.txt:1: header"),
    ("", "va", r"v\.txt: empty file"),
    ("valence,arousal\n0.1,0.2\n\n0.1,0.2\n", "va", r"v\.txt:3: expected 2"),
    ("Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n1\n2.5\n", "expr",
     r"v\.txt:3: expected integers"),
])
def test_malformed_annotations_name_file_and_line(tmp_path, text, task, message):
    with pytest.raises(DataError, match=message):
        affwild2.read_annotation(_write(tmp_path / "v.txt", text), task)


def test_mtl_file(tmp_path):
    header = ",".join(affwild2.MTL_HEADER)
    lines = [header, "vid_left/00003.jpg,0.5,-0.5,4," + ",".join(["0"] * 12),
             "vid_left/00008.jpg,-5,-5,-1," + ",".join(["-1"] * 12)]
    ann = affwild2.read_mtl_annotation(_write(tmp_path / "m.txt", "\n".join(lines)))
    assert ann.videos == ["vid_left", "vid_left"]
    np.testing.assert_array_equal(ann.frames, [3, 8])
    np.testing.assert_array_equal(ann.expr, [4, -1])
    bad = _write(tmp_path / "b.txt", f"{header}\nvid/3.png,0,0,0," + ",".join(["0"] * 12))
    with pytest.raises(DataError, match=r"b\.txt:2: 'vid/3.png' is not `video/NNNNN.jpg`"):
        affwild2.read_mtl_annotation(bad)


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        affwild2.Layout.discover(tmp_path / "nope")
    (tmp_path / "cropped_aligned").mkdir()
    with pytest.raises(DataError, match="no annotation folder"):
        affwild2.Layout.discover(tmp_path)
    (tmp_path / "annotations" / "VA_Estimation_Challenge").mkdir(parents=True)
    layout = affwild2.Layout.discover(tmp_path)
    with pytest.raises(DataError, match=r"Train_Set: annotation folder is missing"):
        affwild2.curate(layout, "va", "train")


def test_curation_pairs_lines_with_crops_over_two_roots(tmp_path):
    _write(tmp_path / "annotations/VA_Estimation_Challenge/Train_Set/vid.txt",
           f"{VA_HEADER}\n0.1,0.1\n-5,-5\n0.3,0.3\n0.4,0.4\n")
    for root, frame in [("cropped_aligned", 1), ("cropped_aligned", 2), ("cropped_aligned_new", 4)]:
        _write(tmp_path / root / "vid" / f"{frame:05d}.jpg", "x")
    layout = affwild2.Layout.discover(tmp_path)
    table, stats = affwild2.curate(layout, "va", "train")
    np.testing.assert_array_equal(table.frame, [1, 4])
    assert table.image_path(1).endswith("cropped_aligned_new/vid/00004.jpg")
    assert stats["annotated"] == 4 and stats["curated"] == 2
    assert stats["dropped"] == {"invalid_label": 1, "out_of_range": 0, "not_finite": 0,
                                "missing_image": 1}
    assert stats["missing_images"] == 1  # frame 3; frame 2's crop exists but its label is -5
    affwild2.check_accounting(stats)


def test_label_faults_are_not_invalid_markers(tmp_path):
    lines = ["0.1,0.1", "-5,-5", "5.0,0.2", "nan,0.1", "0.2,inf", "0.3,0.3"]
    layout = _va_tree(tmp_path, {"train": {"vid": lines}}, {"vid": range(1, 7)})
    table, stats = affwild2.curate(layout, "va", "train")
    np.testing.assert_array_equal(table.frame, [1, 6])
    assert stats["dropped"] == {"invalid_label": 1, "out_of_range": 1, "not_finite": 2,
                                "missing_image": 0}
    path = layout.task_dir("va", "train") / "vid.txt"
    assert stats["first"] == {"out_of_range": f"{path}:4: 5,0.2",
                              "not_finite": f"{path}:5: nan,0.1"}
    affwild2.check_accounting(stats)


def test_expr_and_au_faults(tmp_path):
    expr = _write(tmp_path / "e.txt", ",".join(affwild2.EXPR_NAMES) + "\n3\n-1\n9\nnan\n-inf\n")
    faults = affwild2.unusable_labels("expr", affwild2.read_annotation(expr, "expr"))
    assert {k: v.tolist() for k, v in faults.items()} == {
        "invalid_label": [0, 1, 0, 0, 0], "out_of_range": [0, 0, 1, 0, 0],
        "not_finite": [0, 0, 0, 1, 1]}
    au = affwild2.read_annotation(
        _write(tmp_path / "a.txt", AU_HEADER + "\n" + "\n".join(
            ["0,1,0,0,0,0,1,0,0,0,1,0", "2,0,0,0,0,0,0,0,0,0,0,0", "-1,2,0,0,0,0,0,0,0,0,0,0"])),
        "au")
    faults = affwild2.unusable_labels("au", au)
    assert faults["out_of_range"].tolist() == [0, 1, 0]  # a -1 anywhere is the marker
    assert faults["invalid_label"].tolist() == [0, 0, 1]


def test_mtl_faults_count_dropped_frames_and_keep_masked_ones(tmp_path):
    aus = ",".join(["0"] * 12)
    lines = [",".join(affwild2.MTL_HEADER), f"v/00001.jpg,0.1,0.1,3,{aus}",
             f"v/00002.jpg,-5,-5,-1,{'-1,' * 11}-1", f"v/00003.jpg,nan,0,-1,{'-1,' * 11}-1",
             f"v/00004.jpg,-5,-5,9,{'-1,' * 11}-1", f"v/00005.jpg,0.2,0.2,nan,{aus}"]
    _write(tmp_path / "annotations/MTL_Challenge/training_set_annotations.txt", "\n".join(lines))
    for frame in range(1, 6):
        _write(tmp_path / "cropped_aligned" / "v" / f"{frame:05d}.jpg", "x")
    table, stats = affwild2.curate(affwild2.Layout.discover(tmp_path), "mtl", "train")
    assert stats["dropped"] == {"invalid_all": 1, "out_of_range": 1, "not_finite": 1,
                                "missing_image": 0}
    np.testing.assert_array_equal(table.frame, [1, 5])
    assert table.expr.tolist() == [3, -1] and table.expr_mask.tolist() == [True, False]
    assert stats["first"]["not_finite"].endswith("training_set_annotations.txt:4: nan,0,-1,"
                                                 + ",".join(["-1"] * 12))
    affwild2.check_accounting(stats)


def test_crops_past_the_annotations_are_counted(tmp_path):
    layout = _va_tree(tmp_path, {"train": {"vid": ["0.1,0.1", "0.2,0.2"]}}, {"vid": [1, 2, 3, 9]})
    table, stats = affwild2.curate(layout, "va", "train")
    assert len(table) == 2 and stats["no_annotation"] == 2
    assert "vid.txt: 2 frame lines, but 2 crops of 'vid' past them (up to frame 9)" in (
        stats["first"]["no_annotation"])
    assert "crops past the annotations (not kept): 2" in affwild2.format_stats({"va": {
        "train": stats}})
    affwild2.check_accounting(stats)


@pytest.mark.parametrize("name, problem", [
    ("../../etc", "holds a path separator"), ("..", "is `.` or `..`"),
    ("a\\b", "holds a path separator"), ("vid,1", "holds a comma"), ("", "is empty")])
def test_check_video_name(name, problem):
    with pytest.raises(DataError, match=re.escape(f"list.txt:7: video name {name!r} {problem}")):
        affwild2.check_video_name(name, "list.txt:7")
    assert affwild2.check_video_name("2-30-640x360_left", "x") == "2-30-640x360_left"


def test_names_from_data_cannot_leave_the_root(tmp_path):
    layout = _va_tree(tmp_path, {"train": {"vid": ["0.1,0.1"]}}, {"vid": [1]})
    test_list = _write(tmp_path / "VA_Estimation_Challenge_test_set.txt", "vid\n\n../../etc\n")
    with pytest.raises(DataError, match=rf"{test_list}:3: video name '../../etc' holds a path"):
        affwild2.curate(layout, "va", "test")
    mtl_list = _write(tmp_path / "MTL_Challenge_test_set.txt", "image\nv/00001.jpg\n../00002.jpg\n")
    with pytest.raises(DataError, match=rf"{mtl_list}:3: video name '..' is"):
        affwild2.read_test_list(mtl_list, images=True)
    mtl = _write(tmp_path / "m.txt", ",".join(affwild2.MTL_HEADER) + "\n..\\../v/00001.jpg,"
                 + ",".join(["0"] * 15))
    with pytest.raises(DataError, match=r"m\.txt:2: video name '\.\./\.\./v' holds a path"):
        affwild2.read_mtl_annotation(mtl)
    _write(layout.task_dir("va", "train") / "a,b.txt", VA_HEADER + "\n0.1,0.1\n")
    with pytest.raises(DataError, match=r"a,b\.txt: video name 'a,b' holds a comma"):
        affwild2.curate(layout, "va", "train")


def test_prepare_refuses_an_empty_split_before_writing(tmp_path):
    layout = _va_tree(tmp_path / "tree", {"train": {"vid": ["0.1,0.1"] * 3},
                                          "validation": {"val": ["0.1,0.1"] * 4}}, {"vid": [1, 2]})
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"^validation: 0 of 4 annotated frames of 1 videos in "
                       r".*Validation_Set are usable \(missing_image: 4\); crops are looked up "
                       r"under .*cropped_aligned$"):
        prepare.prepare(layout, "va", out, workers=1, progress=False)
    assert not list(out.glob("affwild2-*"))  # nothing written
    stats = prepare.prepare(layout, "va", out, splits=["train"], workers=1, progress=False)
    assert stats["train"]["records"] == 2  # only requested splits must have frames


def test_prepare_decodes_every_crop_and_warns_of_faults(tmp_path, caplog):
    lines = ["0.1,0.1"] * 4 + ["nan,0"]
    layout = _va_tree(tmp_path / "tree", {"train": {"vid": lines}}, {"vid": [1, 2, 3, 4]})
    folder = layout.image_roots[0] / "vid"
    good = (folder / "00002.jpg").read_bytes()
    half = len(good) // 2
    garbage = np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()
    (folder / "00002.jpg").write_bytes(good[:half] + garbage + good[half:])
    (folder / "00003.jpg").write_bytes(good[:half] + b"\xff\xd9")  # truncated, end marker re-added
    assert all(prepare._is_jpeg((folder / f"0000{i}.jpg").read_bytes()) for i in (2, 3))
    with caplog.at_level(logging.WARNING):
        stats = prepare.prepare(layout, "va", tmp_path / "out", splits=["train"], workers=1,
                                progress=False)["train"]
    assert stats["dropped"]["corrupt_image"] == 2 and stats["records"] == stats["curated"] == 2
    assert [why.split(": ")[0] for why in stats["corrupt_images"]] == [
        str(folder / "00002.jpg"), str(folder / "00003.jpg")]
    assert all("corrupt JPEG (libjpeg: Corrupt JPEG data" in why for why in stats["corrupt_images"])
    assert f"skipped 2 unreadable or corrupt crops (corrupt_image in stats.json), the first: " \
           f"{folder / '00002.jpg'}" in caplog.text
    annotations = layout.task_dir("va", "train") / "vid.txt"
    assert f"va train: not_finite, the first at {annotations}:6: nan,0" in caplog.text
    affwild2.check_accounting(stats)
