"""Faces in frames (abaw_jax/faces.py): tracks with stable ids from a detector registered here,
searches near each track between whole-frame searches, crops, detector names."""

import cv2
import numpy as np
import pytest

from abaw_jax import errors, faces
from abaw_jax.data import synthetic

H, W = 120, 160


class Squares:
    """A stand-in detector: the bright squares of an image (connected components), exactly;
    it keeps the size of every image it was given."""

    smallest = 8

    def __init__(self, arg: str = ""):
        self.seen: list[tuple[int, int]] = []

    def __call__(self, rgb, min_size, max_size):
        self.seen.append(rgb.shape[:2])
        _, _, stats, _ = cv2.connectedComponentsWithStats((rgb[..., 0] > 128).astype(np.uint8))
        boxes = stats[1:, :4].astype(np.float64)
        side = boxes[:, 2:].max(1)
        keep = (side >= min_size) & (side <= max_size)
        return boxes[keep], np.ones(keep.sum())


def _squares(i: int) -> dict[str, tuple[int, int, int]]:
    """Frame i (1-based): P stays; Q moves right, is gone for frames 10-14 (less than the
    tracker's max_gap of 6) and 25-34 (more); R appears at frame 3, far from both."""
    out = {"P": (10, 10, 20)}
    if not (10 <= i <= 14 or 25 <= i <= 34):
        out["Q"] = (60 + i, 60, 24)
    if i >= 3:
        out["R"] = (120, 92, 16)
    return out


def test_tracks_keep_their_ids_over_short_gaps_and_new_faces_wait_for_a_full_search(
        monkeypatch):
    monkeypatch.setitem(faces.DETECTORS, "squares", Squares)
    detector = faces.detector("squares")
    tracker = faces.Tracker(detector, min_face=8, full_every=10, max_gap=6)
    seen: dict[str, list[tuple[int, int]]] = {}
    ended = {}
    for i in range(1, 46):
        frame = np.zeros((H, W, 3), np.uint8)
        for x, y, s in _squares(i).values():
            frame[y:y + s, x:x + s] = 255
        calls = len(detector.seen)
        found = tracker(frame)
        full = (i - 1) % 10 == 0
        # A whole-frame search every 10 frames; otherwise one region per live track.
        assert (detector.seen[calls:] == [(H, W)]) == full, (i, detector.seen[calls:])
        for t in tracker.ended:
            ended[t] = i
        for face in found:
            name = next(n for n, b in _squares(i).items()
                        if np.array_equal(face.box, [b[0], b[1], b[2], b[2]]))
            seen.setdefault(name, []).append((i, face.track))
    assert seen["P"] == [(i, 0) for i in range(1, 46)]
    q = dict(seen["Q"])
    assert {q[i] for i in range(1, 25) if i in q} == {1}  # back after 5 frames: the same id
    assert sorted(i for i in q if i < 25) == [i for i in range(1, 25) if not 10 <= i <= 14]
    assert ended == {1: 31}  # gone for more than 6 frames: ended ...
    assert [t for i, t in seen["R"]] == [2] * (45 - 10) and seen["R"][0][0] == 11
    assert min(i for i in q if i > 24) == 41 and {q[i] for i in q if i > 24} == {3}  # ... new


def _confirmations(min_hits: int, frames: int = 30) -> tuple[dict, dict, dict, list]:
    """Squares: P from frame 1 on; F in frame 1 only (a one-frame false detection); G from frame
    11 (a full search) on, but missed in frame 12. {name: [(frame, track)]} of the faces the
    tracker returned, {frame: confirmed} and {frame: dropped} where not empty, and what
    `finish` dropped."""
    squares = {"P": (10, 10, 20), "F": (100, 20, 16), "G": (60, 70, 24)}
    tracker = faces.Tracker(Squares(), min_face=8, full_every=10, max_gap=6, min_hits=min_hits)
    seen, confirmed, dropped = {}, {}, {}
    for i in range(1, frames + 1):
        frame = np.zeros((H, W, 3), np.uint8)
        for name, (x, y, s) in squares.items():
            if name == "P" or (name == "F" and i == 1) or (name == "G" and i >= 11 and i != 12):
                frame[y:y + s, x:x + s] = 255
        for face in tracker(frame):
            name = next(n for n, b in squares.items() if face.box[0] == b[0])
            seen.setdefault(name, []).append((i, face.track))
        if tracker.confirmed:
            confirmed[i] = tracker.confirmed
        if tracker.dropped:
            dropped[i] = tracker.dropped
    tracker.finish()
    return seen, confirmed, dropped, tracker.dropped


def test_new_tracks_are_confirmed_after_min_hits_frames_and_one_frame_detections_dropped():
    seen, confirmed, dropped, _ = _confirmations(min_hits=2)
    # Tentative faces carry provisional ids (< -1) until their track's second frame.
    assert seen["P"] == [(1, -2)] + [(i, 0) for i in range(2, 31)]
    assert seen["F"] == [(1, -3)]
    # G: found at 11 (tentative), missed at 12 (within max_gap: still tentative), found at 13.
    assert seen["G"] == [(11, -4)] + [(i, 1) for i in range(13, 31)]
    assert confirmed == {2: {-2: 0}, 13: {-4: 1}}  # ids from 0, with no gap for F
    assert dropped == {8: [-3]}  # F unseen for more than max_gap = 6 frames
    # min_hits=1: every new track at once, F included; min_hits=3: G waits for frame 14.
    once = _confirmations(min_hits=1)
    assert once[0]["F"] == [(1, 1)] and once[0]["G"][0] == (11, 2)
    assert once[1] == {1: {-2: 0, -3: 1}, 11: {-4: 2}}
    assert _confirmations(min_hits=3)[1] == {3: {-2: 0}, 14: {-4: 1}}
    # The end: a track still tentative is dropped.
    assert _confirmations(min_hits=3, frames=13)[3] == [-4]


def test_whole_frames_without_a_detector_and_searches_at_a_reduced_scale(monkeypatch):
    assert [(f.track, f.box.tolist()) for f in faces.Tracker(None)(np.zeros((H, W, 3)))] == [
        (0, [0, 0, W, H])]
    monkeypatch.setitem(faces.DETECTORS, "squares", Squares)
    detector = faces.detector("squares")
    frame = np.zeros((H, W, 3), np.uint8)
    frame[40:80, 60:100] = 255
    # The smallest face wanted, 24 pixels, is the detector's 8 in a frame searched at 1/3.
    (face,) = faces.Tracker(detector, min_face=24)(frame)
    assert detector.seen == [(40, 53)]
    np.testing.assert_allclose(face.box, [60, 40, 40, 40], atol=3)


def test_crops_are_squares_with_a_margin_black_outside_the_frame():
    frame = np.arange(H * W * 3, dtype=np.uint32).reshape(H, W, 3)
    inside = faces.crop(frame, np.array([50.0, 40.0, 20.0, 30.0]), margin=0.5)
    # side 30 * 2 = 60 around the centre (60, 55)
    np.testing.assert_array_equal(inside, frame[25:85, 30:90])
    corner = faces.crop(frame, np.array([-10.0, -10.0, 30.0, 30.0]), margin=0.0)
    assert corner.shape == (30, 30, 3)
    np.testing.assert_array_equal(corner[10:, 10:], frame[:20, :20])
    assert not corner[:10].any() and not corner[:, :10].any()


def test_detector_names_and_their_files(tmp_path):
    with pytest.raises(errors.UnknownNameError, match="unknown face detector 'retina'"):
        faces.detector("retina")
    with pytest.raises(errors.ConfigError, match="yunet:<path"):
        faces.detector("yunet")
    with pytest.raises(errors.NotFoundError, match=f"{tmp_path / 'y.onnx'}: no such YuNet"):
        faces.detector(f"yunet:{tmp_path / 'y.onnx'}")
    (tmp_path / "bad.xml").write_text("<opencv_storage></opencv_storage>")
    with pytest.raises(errors.NotFoundError, match="not a Haar cascade"):
        faces.detector(f"haar:{tmp_path / 'bad.xml'}")
    assert faces.detector("none") is None and faces.detector("haar").smallest == 24


def test_the_haar_cascade_finds_drawn_faces_where_they_are_drawn():
    rng = np.random.default_rng(3)
    haar = faces.Haar()
    for _ in range(20):
        side = float(rng.uniform(50, 160))
        x, y = float(rng.uniform(5, 315 - side)), float(rng.uniform(5, 235 - side))
        frame = np.full((240, 320, 3), int(rng.integers(40, 230)), np.uint8)
        synthetic.draw_face(frame, (x, y, side), tuple(int(v) for v in rng.integers(120, 230, 3)))
        boxes, _ = haar(frame, 24, 240)
        assert len(boxes) == 1
        bx, by, bw, _ = boxes[0]
        # The cascade's sizes come in steps of 10 %: 15 % of the side, 8 % off-centre at most.
        assert abs(bw / side - 1) < 0.15
        assert np.hypot(bx + bw / 2 - x - side / 2, by + bw / 2 - y - side / 2) < 0.08 * side
