"""Annotation parsing, malformed-input errors and curation accounting."""

import numpy as np
import pytest

from abaw_jax.data import affwild2
from abaw_jax.data.affwild2 import DataError

VA_HEADER = "valence,arousal"
AU_HEADER = ",".join(affwild2.AU_NAMES)


def _write(path, text, newline="\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode())
    return path


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
    assert stats["dropped"] == {"invalid_label": 1, "missing_image": 1}
    assert stats["missing_images"] == 1  # frame 3; frame 2's crop exists but its label is -5
    affwild2.check_accounting(stats)
