"""`python -m abaw_jax.video`: a raw video in, per-frame affect out, on short videos written here
with PyAV (faces drawn where OpenCV's Haar cascade finds them) and tiny converted models (DDAMFN,
GCSA audio-visual, MAE); the model's batches split over the suite's 8 fake CPU devices.

The task layers of these models act on standardised embeddings (`_standardise`), so that faces
get outputs that differ; that also magnifies the embeddings' last bits ~1000x. The video path's
outputs are compared with the predictor's on the same crops exactly (or at the CSV's 4 decimals):
a face's outputs do not depend on the batch it ran in (`inference.Predictor`).
"""

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import av
import cv2
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from flax import nnx
from helpers import random_model
from onnx import TensorProto, helper, numpy_helper

from abaw_jax import convert, errors, heads, inference, models, postprocess, tasks, video
from abaw_jax import state as state_lib
from abaw_jax.convert import clip as convert_clip
from abaw_jax.data import audio, pipeline, synthetic
from abaw_jax.data import video as video_lib
from abaw_jax.data.affwild2 import DataError
from abaw_jax.models import gcsa

REPO = Path(__file__).parents[1]
SIZE = (320, 240)
HEADS = {"va": 2, "expr": 8, "au": 12}
MARGIN = video.Options.margin
CSV_DIGITS = 0.5e-4  # the CSV's 4 decimals


def _boxes(i: int) -> dict[str, tuple[float, float, float]]:
    """The faces drawn in frame i (0-based): A moves right over frames 0-29; B drifts down and
    is gone for frames 12-17; C is there for frames 20-25 only; nobody from frame 30 on."""
    out = {}
    if i < 30:
        out["A"] = (40 + 2 * i, 60, 80)
    if i < 12 or 18 <= i < 30:
        out["B"] = (200, 50 + i, 72)
    if 20 <= i < 26:
        out["C"] = (120, 150, 64)
    return out


TONES = {"A": (150, 170, 200), "B": (200, 170, 140), "C": (170, 200, 150), "D": (220, 190, 160)}


def _write_faces(path: Path, frames: int, boxes=_boxes, faststart: bool = False,
                 sound: np.ndarray | None = None, size: tuple[int, int] = SIZE) -> None:
    """MPEG-4 at near-lossless quality, 25 fps; `sound` at 16 kHz as its AAC track."""
    def draw(i: int) -> np.ndarray:
        image = np.full((size[1], size[0], 3), 110, np.uint8)
        for name, box in boxes(i).items():
            synthetic.draw_face(image, box, TONES[name])
        return image

    video_lib.write_video(path, 25, frames, size=size, audio=sound, faststart=faststart,
                          draw=draw, quality=2)


def _frames(path: Path) -> dict[int, np.ndarray]:
    """The video's frames decoded here, by frame number from 1."""
    with av.open(str(path)) as container:
        return {i: f.to_ndarray(format="rgb24")
                for i, f in enumerate(container.decode(video=0), start=1)}


def _crop(frame: np.ndarray, x: float, y: float, w: float, h: float) -> np.ndarray:
    """The square around a box with the command's margin (these boxes lie inside the frame)."""
    side = round(max(w, h) * (1 + 2 * MARGIN))
    x0, y0 = round(x + w / 2 - side / 2), round(y + h / 2 - side / 2)
    assert 0 <= x0 and 0 <= y0 and x0 + side <= frame.shape[1] and y0 + side <= frame.shape[0]
    return frame[y0:y0 + side, x0:x0 + side]


@pytest.fixture(scope="module")
def faces_video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("videos") / "faces.mp4"
    _write_faces(path, 34)
    return path


def _drawn_faces(n: int) -> np.ndarray:
    """(n, 112, 112, 3) faces drawn at various places and sizes."""
    faces = np.full((n, 112, 112, 3), 110, np.uint8)
    for i, face in enumerate(faces):
        synthetic.draw_face(face, (8 + 3 * (i % 8), 10 + 2 * (i % 8), 90 - 4 * (i % 8)),
                            TONES["ABC"[i % 3]])
    return faces


def _standardise(kernel, bias, embeddings: np.ndarray) -> None:
    """Makes a linear layer (kernel (D, K), or (1, D, K) for a width-1 convolution) act on
    standardised embeddings: random weights give nearly the same embedding to any face, so
    that the outputs would hardly differ from face to face (and a mix-up of rows not show)."""
    mean, std = embeddings.mean(0), embeddings.std(0) + 1e-9
    w = np.asarray(kernel.get_value())
    scaled = w / std.reshape(-1, 1)
    kernel.set_value(jnp.asarray(scaled))
    bias.set_value(jnp.asarray(-mean @ scaled.reshape(len(mean), -1)))


def _save(folder: Path, model: nnx.Module, name: str, kwargs: dict, outputs: dict) -> Path:
    """The model as `python -m abaw_jax.convert` writes a converted folder."""
    return convert.save(folder, nnx.to_pure_dict(nnx.state(model)), {
        "family": name, "model": name, "model_kwargs": kwargs, "outputs": outputs,
        "source": "test"})


def _varied(model: nnx.Module, name: str, layers: dict) -> None:
    """Task layers ({head: Linear}) on standardised embeddings of drawn faces."""
    embed = inference.Predictor(model, models.get(name), ("image",), lambda out: {})
    e = embed(_drawn_faces(8))["embedding"]
    for layer in layers.values():
        _standardise(layer.kernel, layer.bias, e)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A converted tiny DDAMFN with the three heads and random weights, its task layers on
    standardised embeddings: outputs that differ from face to face."""
    model = random_model("ddamfn_tiny", outputs=HEADS, num_head=2)
    _varied(model, "ddamfn_tiny", model.tasks)
    return _save(tmp_path_factory.mktemp("model") / "tiny", model, "ddamfn_tiny",
                 {"num_head": 2}, HEADS)


@pytest.fixture(scope="module")
def predictor(converted) -> inference.Predictor:
    return inference.load(converted)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "abaw_jax.video", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _nearest_face(frame: int, row: dict, boxes=_boxes) -> tuple[str, float, float]:
    """The drawn face nearest to a row's box; how far apart their centres are (pixels) and
    their sides (a fraction of the drawn side)."""
    x, y, w = (float(row[k]) for k in "xyw")
    apart = {name: (np.hypot(x + w / 2 - bx - s / 2, y + w / 2 - by - s / 2), abs(w / s - 1))
             for name, (bx, by, s) in boxes(frame - 1).items()}
    name = min(apart, key=apart.get)
    return name, *apart[name]


def test_command_writes_a_row_per_frame_and_face_near_the_drawn_boxes_with_stable_ids(
        faces_video, converted, predictor, tmp_path):
    out = tmp_path / "out"
    result = _cli(f"--model={converted}", f"--input={faces_video}", f"--out={out}",
                  "--annotate")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _read_csv(out / "faces.csv")
    # Every face's frames, the first ones included: a new track (A and B in frame 1, C in 21)
    # is confirmed in its second frame (--min_hits=2), its first frame's row then written.
    assert [int(r["frame"]) for r in rows if r["track"] == ""] == [31, 32, 33, 34]
    faces_per_frame = {f: len(_boxes(f - 1)) for f in range(1, 35)}
    counted = {f: sum(1 for r in rows if int(r["frame"]) == f and r["track"] != "")
               for f in range(1, 35)}
    assert counted == faces_per_frame  # every frame, every face, nothing else
    for r in rows:
        if r["track"] == "":
            assert all(r[k] == "" for k in r if k not in ("frame", "timestamp"))
            continue
        assert float(r["timestamp"]) == pytest.approx((int(r["frame"]) - 1) / 25, abs=1e-3)
        name, centre, side = _nearest_face(int(r["frame"]), r)
        # The cascade's boxes come in steps of 10 % in size: measured up to 2.5 pixels apart
        # (centres) and 12.5 % (sides) on these 64-88-pixel faces.
        assert centre <= 6 and side <= 0.15, (r, name)
        assert int(r["track"]) == "ABC".index(name), r  # B keeps its id over its absence
    assert (out / "faces.png").stat().st_size > 20_000
    assert video_lib.probe(out / "faces_annotated.mp4").num_frames == 34
    # The outputs are inference.load's on the same crops of the same frames.
    frames = _frames(faces_video)
    faced = [r for r in rows if r["track"] != ""]
    crops = [_crop(frames[int(r["frame"])], *(float(r[k]) for k in "xywh")) for r in faced]
    want = predictor(np.stack([cv2.resize(c, (112, 112)) for c in crops]))
    got_va = np.array([[float(r["valence"]), float(r["arousal"])] for r in faced])
    np.testing.assert_allclose(got_va, want["va"], rtol=0, atol=CSV_DIGITS)
    names = {h: list(heads.get(h).columns) for h in ("expr", "au")}
    got_expr = np.array([[float(r[f"p_{n}"]) for n in names["expr"]] for r in faced])
    np.testing.assert_allclose(got_expr, want["expr"], rtol=0, atol=CSV_DIGITS)
    assert np.ptp(want["va"], axis=0).min() > 0.05  # the faces' outputs differ
    clear = np.sort(want["expr"], -1)[:, -1] - np.sort(want["expr"], -1)[:, -2] > 1e-3
    assert [r["expression"] for r, c in zip(faced, clear, strict=True) if c] == [
        names["expr"][k] for k in np.argmax(want["expr"], -1)[clear]]
    got_au = np.array([[float(r[f"p_{n}"]) for n in names["au"]] for r in faced])
    np.testing.assert_allclose(got_au, want["au"], rtol=0, atol=CSV_DIGITS)
    decided = np.array([[int(r[n]) for n in names["au"]] for r in faced])
    clear = np.abs(want["au"] - 0.5) > 1e-3
    np.testing.assert_array_equal(decided[clear], (want["au"] >= 0.5)[clear])


def _rows_by_track(table: dict) -> dict[int, np.ndarray]:
    return {int(t): np.flatnonzero(table["track"] == t)
            for t in np.unique(table["track"][table["track"] >= 0])}


def _row_crops(table: dict, frames: dict, rows: np.ndarray, size: int) -> np.ndarray:
    """The table rows' face boxes cut from their frames, resized to `size`."""
    return np.stack([cv2.resize(_crop(frames[table["frame"][i]], *(table[k][i] for k in "xywh")),
                                (size, size)) for i in rows])


def _windowed(crops: np.ndarray, predict, length: int = 16, stride: int = 8) -> np.ndarray:
    """A track's per-frame VA as the video path gives it: `predict(images, valid)` over each
    window of `length` crops every `stride` (zero-padded), averaged where windows overlap."""
    sums, counts = np.zeros((len(crops), 2)), np.zeros(len(crops))
    for window in pipeline.clip_index(np.zeros(len(crops)), np.arange(len(crops)), length,
                                      stride):
        valid = window >= 0
        images = np.where(valid[:, None, None, None], crops[window], 0).astype(np.uint8)
        out = predict(images, valid)
        sums[window[valid]] += out[valid]
        counts[window[valid]] += 1
    return sums / counts[:, None]


def test_the_checkpoints_smoothing_and_thresholds_apply_along_each_track(faces_video,
                                                                         predictor):
    raw = video.analyse(faces_video, predictor)
    post = postprocess.Post({"va": postprocess.Smoothing("gaussian", 2.0),
                             "expr": postprocess.Smoothing("mean", 5),
                             "au": postprocess.Smoothing("gaussian", 1.0)},
                            np.linspace(0.3, 0.7, 12))
    stored = copy.copy(predictor)  # the same compiled model, other post-processing
    stored.post = post
    table = video.analyse(faces_video, stored)
    np.testing.assert_array_equal(table["frame"], raw["frame"])
    np.testing.assert_array_equal(table["track"], raw["track"])
    face = table["track"] >= 0
    for head, columns in (("va", ["valence", "arousal"]),
                          ("expr", [f"p_{n}" for n in heads.get("expr").columns]),
                          ("au", [f"p_{n}" for n in heads.get("au").columns])):
        before = np.stack([raw[c][face] for c in columns], -1)
        after = np.stack([table[c][face] for c in columns], -1)
        want = postprocess.smooth_rows(before, table["track"][face], table["frame"][face],
                                       post.smoothing[head])
        np.testing.assert_allclose(after, want, atol=1e-9)
        assert np.abs(after - before).max() > 0.01, head  # the smoothing did something
    probs = np.stack([table[f"p_{n}"][face] for n in heads.get("au").columns], -1)
    decided = np.stack([table[n][face] for n in heads.get("au").columns], -1)
    np.testing.assert_array_equal(decided, probs >= post.thresholds)
    assert np.all(np.stack([table[n][~face] for n in heads.get("au").columns]) == -1)
    expr = np.stack([table[f"p_{n}"][face] for n in heads.get("expr").columns], -1)
    assert list(table["expression"][face]) == [heads.get("expr").columns[k]
                                                for k in np.argmax(expr, -1)]


def test_a_temporal_model_runs_over_each_tracks_faces_in_order(faces_video):
    """Windows of 16 faces every 8 and a last one ending at the track's end (tracks of 30 and
    24 faces), a track shorter than a window (6 faces) padded and masked; each frame's outputs
    the mean over its windows."""
    model = random_model("transformer", outputs={"va": 2}, backbone="ddamfn_tiny",
                         backbone_kwargs={"num_head": 2}, proj=(32,), layers=1, heads=2,
                         mlp=32, dropout=0.0)
    task = tasks.Task("va", ("va",), "")
    family = models.get("transformer")
    e = inference.Predictor(model, family, tuple(model.inputs), lambda out: {})(
        _drawn_faces(16), embedding=True)["embedding"]
    _standardise(model.proj[0].kernel, model.proj[0].bias, e)
    clips = inference.Predictor(model, family, tuple(model.inputs), task.predict,
                                feed=state_lib.Feed(112, (), 16, 8))
    table = video.analyse(faces_video, clips)
    frames = _frames(faces_video)
    tracks = _rows_by_track(table)
    assert [len(r) for r in tracks.values()] == [30, 24, 6]
    for rows in tracks.values():
        want = _windowed(_row_crops(table, frames, rows, 112),
                         lambda images, valid: clips(images, valid=valid)["va"])
        got = np.stack([table["valence"][rows], table["arousal"][rows]], -1)
        np.testing.assert_array_equal(got, want)
    assert np.ptp(table["valence"][table["track"] >= 0]) > 0.01


class Listens(nnx.Module):
    """A toy audio-visual model: the mean level of each mel band over the window's centre 11
    steps and the face's mean colour, a linear layer per head."""

    inputs = ("image", "audio")

    def __init__(self, outputs, *, rngs: nnx.Rngs, **kwargs):
        self.outputs = dict(outputs)
        bands = audio.AudioConfig().n_mels
        self.tasks = nnx.Dict({k: nnx.Linear(bands + 3, n, rngs=rngs)
                               for k, n in outputs.items()})

    def __call__(self, inputs, rngs=None):
        x = inputs["audio"]
        centre = x.shape[1] // 2
        heard = (jnp.mean(x[:, centre - 5: centre + 6], axis=1) - audio.SILENCE_DB) / 50
        seen = jnp.mean(inputs["image"], axis=(1, 2))
        return {k: self.tasks[k](jnp.concatenate([heard, seen], -1)) for k in self.outputs}


def _clicks(seconds: float, fps: float, rate: int = 16000) -> np.ndarray:
    """Quiet noise with a click every 7th frame: the windows of different frames differ."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.01, round(seconds * rate)).astype(np.float32)
    for f in range(1, round(seconds * fps) + 1, 7):
        at = round(audio.frame_time(f, fps) * rate)
        x[at: at + 40] += 0.8
    return x


def test_an_audio_visual_model_hears_the_videos_own_windows(tmp_path, monkeypatch, caplog):
    """A family registered here, loaded through inference.load like any other: each face gets
    the window of its frame's timestamp, as training cut them; a video without a track gives
    silence, with a warning."""
    monkeypatch.setitem(models.FAMILIES, "listens",
                        models.Family("listens", Listens, preprocess=models.Preprocess(16)))
    model = Listens({"va": 2}, rngs=nnx.Rngs(0))
    folder = convert.save(tmp_path / "listens", nnx.to_pure_dict(nnx.state(model)), {
        "family": "listens", "model": "listens", "model_kwargs": {}, "outputs": {"va": 2},
        "source": "test"})
    hears = inference.load(folder)
    path, silent = tmp_path / "talk.mp4", tmp_path / "silent.mp4"
    video_lib.write_video(path, 25, 30, size=(64, 48), audio=_clicks(30 / 25, 25))
    video_lib.write_video(silent, 25, 6, size=(64, 48))
    cfg = audio.AudioConfig()
    mel = audio.log_mel(audio.decode(path, cfg.sample_rate), cfg).astype(np.float16)
    got = {}
    for source, windows in ((path, [audio.frame_window(mel, f, 25, cfg) for f in range(1, 31)]),
                            (silent, [audio.frame_window(mel[:0], f, 25, cfg)
                                      for f in range(1, 7)])):
        with caplog.at_level("WARNING"):
            table = video.analyse(source, hears, detector="none")
        frames = np.stack(list(_frames(source).values()))
        got[source] = np.stack([table["valence"], table["arousal"]], -1)
        np.testing.assert_allclose(got[source], hears(frames, audio=np.stack(windows))["va"],
                                   atol=1e-5)
    assert f"{silent}: no audio track" in caplog.text
    # The talk's windows are not silence: with silence its outputs would differ.
    deaf = hears(np.stack(list(_frames(path).values())),
                 audio=np.full((30, cfg.window_steps, cfg.n_mels), audio.SILENCE_DB))["va"]
    assert np.abs(got[path] - deaf).max() > 1e-3


def test_detector_none_reads_a_folder_of_frames_by_their_numbers(tmp_path, predictor):
    folder = tmp_path / "crops"
    folder.mkdir()
    numbers = [1, 2, 3, 5, 6, 7]  # no crop for frame 4
    rng = np.random.default_rng(0)
    for n in numbers:
        face = np.full((100, 100, 3), int(rng.integers(60, 200)), np.uint8)
        synthetic.draw_face(face, (10, 10, 80), tuple(int(v) for v in rng.integers(120, 230, 3)))
        cv2.imwrite(str(folder / f"{n:05d}.jpg"), face)
    table = video.analyse(folder, predictor, detector="none", fps=30)
    assert table["frame"].tolist() == numbers and set(table["track"]) == {0}
    np.testing.assert_allclose(table["timestamp"], (np.array(numbers) - 1) / 30)
    assert {(x, y, w, h) for x, y, w, h in zip(*(table[k] for k in "xywh"), strict=True)} == {
        (0, 0, 100, 100)}
    images = np.stack([cv2.cvtColor(cv2.imread(str(folder / f"{n:05d}.jpg")), cv2.COLOR_BGR2RGB)
                       for n in numbers])
    np.testing.assert_array_equal(np.stack([table["valence"], table["arousal"]], -1),
                                  predictor(images)["va"])
    assert video.analyse(folder, predictor, detector="none", every=2)["frame"].tolist() == [
        1, 3, 6]


def test_bad_inputs_in_a_folder_are_listed_and_the_others_written(tmp_path, converted):
    """A file FFmpeg cannot open, a cut one (its frames before the cut written), one whose name
    cannot name files, a video without faces (a CSV of empty rows and a warning), a good one;
    exit status 1, one `error:` line."""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    _write_faces(folder / "good.mp4", 5)
    video_lib.write_video(folder / "empty.mp4", 25, 8, size=SIZE)
    _write_faces(tmp_path / "whole.mp4", 24, faststart=True)  # index first: plays until the cut
    data = (tmp_path / "whole.mp4").read_bytes()
    (folder / "cut.mp4").write_bytes(data[: len(data) * 3 // 4])  # past the first (key) frame
    (folder / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "notes.txt").write_text("not an input")
    (folder / "a,b.mp4").write_bytes((folder / "good.mp4").read_bytes())  # a comma: no name
    result = _cli(f"--model={converted}", f"--input={folder}", f"--out={out}", "--annotate")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 3 input(s) failed: ") and "Traceback" not in result.stderr
    assert f"{folder / 'cut.mp4'}: truncated" in last and f"{folder / 'junk.mp4'}" in last
    assert f"{folder / 'a,b.mp4'}: video name 'a,b' holds a comma" in last
    assert sorted(p.name for p in out.glob("*.csv")) == ["cut.csv", "empty.csv", "good.csv"]
    good, empty, cut = (_read_csv(out / f"{n}.csv") for n in ("good", "empty", "cut"))
    assert [r["frame"] for r in good] == [str(f) for f in range(1, 6) for _ in range(2)]
    assert [r["frame"] for r in empty] == [str(f) for f in range(1, 9)]
    assert all(v == "" for r in empty for k, v in r.items() if k not in ("frame", "timestamp"))
    assert list(empty[0]) == list(good[0])  # the model's columns, even without a face
    assert "no face found in its 8 frames" in result.stderr
    read = sorted({int(r["frame"]) for r in cut})
    assert 2 < len(read) < 24 and read == list(range(1, len(read) + 1))
    # The frames before the cut have their faces (the last one decoded may be partial).
    assert all(r["track"] != "" for r in cut if int(r["frame"]) < read[-1])
    assert video_lib.probe(out / "cut_annotated.mp4").num_frames == len(read)
    assert not (out / "empty_annotated.mp4").exists()  # no face to draw


def test_analyse_of_a_cut_video_is_an_error_naming_it(tmp_path, predictor):
    _write_faces(tmp_path / "whole.mp4", 12, faststart=True)
    data = (tmp_path / "whole.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{tmp_path / 'cut.mp4'}: truncated: [0-9]+ of the 12"):
        video.analyse(tmp_path / "cut.mp4", predictor)


def _with_a_flash(i: int) -> dict[str, tuple[float, float, float]]:
    """`_boxes` and D, drawn in frame 11 only (a whole-frame search's), away from where the
    others are or come (a tentative track lives max_gap frames): a one-frame face."""
    return {**_boxes(i), **({"D": (235, 165, 64)} if i == 10 else {})}


def test_min_hits_drops_a_one_frame_face_and_max_gap_ends_a_missing_track(tmp_path, converted,
                                                                           predictor):
    path, out = tmp_path / "flash.mp4", tmp_path / "out"
    _write_faces(path, 30, _with_a_flash)
    result = _cli(f"--model={converted}", f"--input={path}", f"--out={out}", "--min_hits=1",
                  "--max_gap=3")
    assert result.returncode == 0, result.stderr[-3000:]
    tracks: dict[str, dict[int, int]] = {}
    for r in _read_csv(out / "flash.csv"):
        if r["track"] != "":
            name, _, _ = _nearest_face(int(r["frame"]), r, _with_a_flash)
            tracks.setdefault(name, {})[int(r["frame"])] = int(r["track"])
    assert list(tracks["D"]) == [11]  # --min_hits=1: the flash is a track of its own
    # --max_gap=3: B, unseen in frames 13-18, ended; found again in the next whole-frame
    # search (frame 21), it is a new track.
    assert sorted(tracks["B"]) == [*range(1, 13), *range(21, 31)]
    assert len({tracks["B"][f] for f in range(1, 13)} | {tracks["B"][f] for f in range(21, 31)}
               | {tracks["D"][11]}) == 3
    # The defaults (--min_hits=2, --max_gap=15): no D; B keeps its id over its absence.
    table = video.analyse(path, predictor)
    faced = table["track"] >= 0
    names = [_nearest_face(int(f), {"x": x, "y": y, "w": w}, _with_a_flash)[0] for f, x, y, w
             in zip(*(table[k][faced] for k in ("frame", "x", "y", "w")), strict=True)]
    assert "D" not in names and sorted(set(table["track"][faced])) == [0, 1, 2]
    assert {t for t, n in zip(table["track"][faced], names, strict=True) if n == "B"} == {1}
    assert int(np.sum(faced)) == sum(len(_boxes(i)) for i in range(30))


def test_a_folder_of_frame_folders_gives_a_table_per_folder(tmp_path, predictor):
    """`cropped_aligned` layout: one sub-folder of numbered crops per video (gaps stay gaps); a
    sub-folder without images is no input."""
    root, out = tmp_path / "cropped_aligned", tmp_path / "out"
    rng = np.random.default_rng(1)
    numbers = {"video1": [1, 2, 4], "video2_left": [3, 4, 5, 6]}
    for name, frames in numbers.items():
        (root / name).mkdir(parents=True)
        for n in frames:
            face = np.full((96, 96, 3), int(rng.integers(60, 200)), np.uint8)
            synthetic.draw_face(face, (8, 8, 80), tuple(int(v) for v in rng.integers(120, 230, 3)))
            cv2.imwrite(str(root / name / f"{n:05d}.png"), face)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("no frames")
    assert video.run(predictor, root, out, video.Options(detector="none"), progress=False) == []
    assert sorted(p.name for p in out.glob("*.csv")) == ["video1.csv", "video2_left.csv"]
    for name, frames in numbers.items():
        rows = _read_csv(out / f"{name}.csv")
        assert [int(r["frame"]) for r in rows] == frames
        images = np.stack([cv2.cvtColor(cv2.imread(str(root / name / f"{n:05d}.png")),
                                        cv2.COLOR_BGR2RGB) for n in frames])
        np.testing.assert_allclose([[float(r["valence"]), float(r["arousal"])] for r in rows],
                                   predictor(images)["va"], rtol=0, atol=CSV_DIGITS)
    (root / "notes").rename(tmp_path / "notes")
    for name in numbers:
        for file in (root / name).iterdir():
            file.unlink()
    with pytest.raises(DataError, match="no videos .* and no folders of them"):
        video.find_inputs(root)


def test_a_faces_outputs_do_not_depend_on_its_batch_its_place_or_the_devices(faces_video,
                                                                             predictor):
    """Every model call runs `batch` faces on each device (the last padded): a face's outputs
    are the same bits in calls of any size, at any place in them, on one device or split over
    the suite's 8. (They were not: the video path's batches and the predictor's differed by up
    to 3.7e-3 here on a CPU without AVX-512, XLA's kernels summing in an order that follows the
    batch's shape, magnified by the standardised task layers.)"""
    assert jax.local_device_count() == 8
    small = predictor.sharded(1, batch=4)
    split = small.sharded(0)
    assert (split.mesh.size, split.batch) == (8, 4) and split.sharded(0) is split
    assert predictor.mesh is None and predictor.batch == inference.FRAMES_PER_DEVICE
    with pytest.raises(errors.ConfigError, match="devices=9: this process has 8 local devices"):
        predictor.sharded(9)
    assert {len(leaf.sharding.device_set) for leaf in jax.tree.leaves(split._state)} == {8}
    faces = _drawn_faces(37)
    whole = small(faces)
    assert np.ptp(whole["va"], axis=0).min() > 0.05  # the faces' outputs differ
    calls = {"one at a time": [small(faces[i:i + 1]) for i in range(37)],
             "uneven calls": [small(faces[a:b]) for a, b in ((0, 3), (3, 10), (10, 37))],
             "8 devices": [split(faces)], "reversed": [small(faces[::-1])]}
    for how, outs in calls.items():
        for k, v in whole.items():
            got = np.concatenate([o[k] for o in outs])
            np.testing.assert_array_equal(got[::-1] if how == "reversed" else got, v,
                                          err_msg=f"{how}: {k}")
    one, all_ = (video.analyse(faces_video, predictor, devices=d, batch=4) for d in (1, 0))
    assert set(one) == set(all_)
    for k, v in one.items():
        np.testing.assert_array_equal(all_[k], v, err_msg=k)


def test_a_clip_runs_whole_on_one_device_padding_clips_not_frames(predictor):
    """A clip model's batches are whole clips (padded with clips, not with frames): a
    bidirectional LSTM masks no frames, and frames padded onto its clip would reach its
    backward pass; the clip's outputs are the same bits split over the 8 devices."""
    model = random_model("lstm", outputs={"va": 2}, backbone="gcsa_visual",
                         backbone_kwargs=gcsa.RHCNN_TINY, hidden=8, bidirectional=True)
    clips = inference.Predictor(model, models.get("lstm"), tuple(model.inputs),
                                tasks.Task("va", ("va",), "").predict)
    assert clips.batch == inference.CLIPS_PER_DEVICE
    faces = _drawn_faces(5)
    whole = clips(faces)["va"]
    padded = clips(np.concatenate([faces, np.zeros((3, 112, 112, 3), np.uint8)]),
                   valid=np.arange(8) < 5)["va"][:5]
    assert np.abs(padded - whole).max() > 1e-4  # what padding frames would do
    np.testing.assert_array_equal(clips.sharded()(faces)["va"], whole)
    batched = clips.sharded(batch=2).clip_batch(np.stack([faces, faces[::-1]]))["va"]
    np.testing.assert_array_equal(batched[0], whole)
    np.testing.assert_array_equal(batched[1], clips(faces[::-1])["va"])
    with pytest.raises(errors.ConfigError, match="takes frames, not clips"):
        predictor.clip_batch(faces[None])


def _crops_and_windows(table: dict, path: Path, size: int, cfg: audio.AudioConfig | None = None
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """The faced rows' crops at the model's `size` and, with `cfg`, their frames' audio windows
    of the video's own track."""
    frames = _frames(path)
    faced = np.flatnonzero(table["track"] >= 0)
    crops = _row_crops(table, frames, faced, size)
    if cfg is None:
        return crops, None
    mel = audio.log_mel(audio.decode(path, cfg.sample_rate), cfg).astype(np.float16)
    return crops, np.stack([audio.frame_window(mel, table["frame"][i], 25, cfg) for i in faced])


def test_gcsa_audio_visual_model_sees_the_faces_and_hears_the_videos_own_track(tmp_path):
    """A converted tiny `gcsa_av` (RHCNN on 64x64 faces, MCNN on the log-mel windows) and
    decision fusion weights as a workdir stores them (`Post.fusion`): the table's outputs are
    inference.load's on the same crops and windows, fused."""
    kwargs = {"visual": gcsa.RHCNN_TINY, "audio": gcsa.MCNN_TINY}
    model = random_model("gcsa_av", outputs=HEADS, **kwargs)
    _varied(model.visual, "gcsa_visual", model.visual.tasks)
    loaded = inference.load(_save(tmp_path / "gcsa", model, "gcsa_av", kwargs, HEADS))
    fused = copy.copy(loaded)  # the same compiled model, the run's stored fusion
    fused.post = postprocess.Post({}, fusion={h: {"audio": 2, "visual": 5} for h in HEADS})
    path = tmp_path / "talk.mp4"
    _write_faces(path, 30, sound=_clicks(30 / 25, 25))
    table = video.analyse(path, fused)
    crops, windows = _crops_and_windows(table, path, 64, loaded.feed.audio)
    assert len(crops) == sum(len(_boxes(i)) for i in range(30))
    want = fused(crops, audio=windows)
    faced = table["track"] >= 0
    np.testing.assert_allclose(np.stack([table["valence"], table["arousal"]], -1)[faced],
                               want["va"], atol=1e-4)
    expr = np.stack([table[f"p_{n}"] for n in heads.get("expr").columns], -1)[faced]
    np.testing.assert_allclose(expr, want["expr"], atol=1e-4)
    np.testing.assert_allclose(want["expr"], (2 * want["expr.audio"] + 5 * want["expr.visual"])
                               / 7, atol=1e-6)
    # Both branches count: other windows (silence), or the plain mean, give other outputs.
    deaf = fused(crops, audio=np.full_like(windows, audio.SILENCE_DB))["expr"]
    assert np.abs(deaf - want["expr"]).max() > 1e-3
    assert np.abs(loaded(crops, audio=windows)["expr"] - want["expr"]).max() > 1e-3
    assert np.ptp(want["va"], axis=0).min() > 0.01


def test_a_fine_tuned_mae_runs_over_the_faces(faces_video, tmp_path):
    """A converted tiny `mae` (ViT on 32x32 faces, global pooling, task layers)."""
    model = random_model("mae", outputs=HEADS, size="tiny")
    _varied(model, "mae", model.tasks)
    predictor = inference.load(_save(tmp_path / "mae", model, "mae", {"size": "tiny"}, HEADS))
    table = video.analyse(faces_video, predictor)
    crops, _ = _crops_and_windows(table, faces_video, 32)
    want = predictor(crops)
    faced = table["track"] >= 0
    for head, columns in (("va", ["valence", "arousal"]),
                          ("au", [f"p_{n}" for n in heads.get("au").columns])):
        got = np.stack([table[c] for c in columns], -1)[faced]
        np.testing.assert_allclose(got, want[head], atol=1e-4)
    assert np.ptp(want["va"], axis=0).min() > 0.01


def test_a_converted_clip_runs_over_the_faces(faces_video, tmp_path):
    """CLIP's contrastive expression head (a converted random tiny CLIP): its own resize and
    normalisation of each crop, the same probabilities as the predictor on those crops."""
    predictor = inference.load(convert_clip.build_random(tmp_path / "clip", "tiny", seed=1))
    table = video.analyse(faces_video, predictor)
    frames = _frames(faces_video)
    rows = np.flatnonzero(table["track"] >= 0)
    crops = _row_crops(table, frames, rows, predictor.preprocess.size)
    columns = [f"p_{n}" for n in heads.get("expr").columns]
    got = np.stack([table[c][rows] for c in columns], -1)
    np.testing.assert_allclose(got, predictor(crops)["expr"], atol=2e-5)
    assert np.ptp(got) > 1e-3


def test_a_head_on_cached_features_is_refused_with_what_to_run_instead(faces_video):
    """The MAE fusion's temporal heads read `--mode=extract`'s embeddings: no video gives them."""
    model = random_model("transformer", outputs={"va": 2}, feature_dim=16, proj=(8,), layers=1,
                         heads=2, mlp=8, dropout=0.0)
    heads_only = inference.Predictor(model, models.get("transformer"), tuple(model.inputs),
                                     tasks.Task("va", ("va",), "").predict)
    with pytest.raises(errors.ConfigError, match=r"takes \['features'\], which the video path "
                                                 r"cannot give.*--backbone="):
        video.analyse(faces_video, heads_only)


def test_a_head_on_cached_features_runs_over_its_backbones_embeddings(faces_video):
    """`--backbone`: each face's embedding by the frame model (what `--mode=extract` cached)
    in place of the cache, then the temporal head over each track's windows, as without it."""
    frames_model = random_model("ddamfn_tiny", outputs={}, num_head=2)
    backbone = inference.Predictor(frames_model, models.get("ddamfn_tiny"), ("image",),
                                   lambda out: {})
    width = backbone.embed(_drawn_faces(2)).shape[-1]
    model = random_model("transformer", outputs={"va": 2}, feature_dim=width, proj=(16,),
                         layers=1, heads=2, mlp=16, dropout=0.0)
    _standardise(model.proj[0].kernel, model.proj[0].bias, backbone.embed(_drawn_faces(16)))
    head = inference.Predictor(model, models.get("transformer"), tuple(model.inputs),
                               tasks.Task("va", ("va",), "").predict,
                               feed=state_lib.Feed(0, (), 16, 8))
    table = video.analyse(faces_video, head, backbone=backbone)
    frames = _frames(faces_video)
    for rows in _rows_by_track(table).values():
        want = _windowed(_row_crops(table, frames, rows, 112), lambda images, valid: head(
            valid=valid, features=backbone.embed(images))["va"])
        got = np.stack([table["valence"][rows], table["arousal"][rows]], -1)
        np.testing.assert_array_equal(got, want)
    assert np.ptp(table["valence"][table["track"] >= 0]) > 0.01
    with pytest.raises(errors.ConfigError, match="a backbone feeds a head's cached"):
        inference.Stacked(backbone, backbone)


# YuNet's strides and what OpenCV's FaceDetectorYN reads per stride (objdetect/face_detect.cpp):
# cls, obj (N, 1), bbox (N, 4: centre offsets in cells, log width and height in strides), kps
# (N, 10), N the cells of the input padded to a multiple of 32.
YUNET_STRIDES = (8, 16, 32)
YUNET_WIDTHS = {"cls": 1, "obj": 1, "bbox": 4, "kps": 10}


def _yunet_stub(path: Path, size: tuple[int, int], cell: tuple[int, int], side: float,
                score: float) -> Path:
    """An ONNX graph with YuNet's input ("input", 1x3xHxW) and outputs (`cls_8` ... `kps_32`)
    whose values are constants: zero everywhere but one stride-32 cell (row, col) of score
    `score` and a box of `side` centred on it. Each output adds the constant to 0 * the input's
    mean, so that it is a layer's output (OpenCV cannot forward to a bare constant). Constants:
    right for inputs of `size` only."""
    w, h = size
    nodes = [helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=1),
             helper.make_node("Reshape", ["mean", "shape"], ["mean3"]),
             helper.make_node("Mul", ["mean3", "zero"], ["nothing"])]
    inits = [numpy_helper.from_array(np.array([1, 1, 1], np.int64), "shape"),
             numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), "zero")]
    outputs = []
    for kind, width in YUNET_WIDTHS.items():
        for stride in YUNET_STRIDES:
            rows, cols = h // stride, w // stride
            values = np.zeros((1, rows * cols, width), np.float32)
            if stride == 32:
                planted = {"cls": [score], "obj": [score], "kps": [0.5] * 10,
                           "bbox": [0.5, 0.5, np.log(side / 32), np.log(side / 32)]}
                values[0, cell[0] * cols + cell[1]] = planted[kind]
            name = f"{kind}_{stride}"
            inits.append(numpy_helper.from_array(values, f"{name}_value"))
            nodes.append(helper.make_node("Add", ["nothing", f"{name}_value"], [name]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                         list(values.shape)))
    graph = helper.make_graph(nodes, "yunet_stub", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, [1, 3, h, w])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_yunet_from_its_onnx_file_finds_the_planted_face(tmp_path, predictor):
    """The stub's cell (row 3, column 5) of stride 32 is centred on (176, 112); a box of side 64
    there is (144, 80, 64, 64), where the face is drawn. Whole-frame searches at full scale
    (--full_every=1, --min_face=16, YuNet's smallest face): the input the constants fit."""
    size = (320, 256)  # multiples of 32: no padding
    onnx_file = _yunet_stub(tmp_path / "yunet.onnx", size, (3, 5), 64, 0.9)
    path = tmp_path / "one.mp4"
    _write_faces(path, 4, lambda i: {"A": (144, 80, 64)}, size=size)
    table = video.analyse(path, predictor, detector=f"yunet:{onnx_file}", full_every=1,
                          min_face=16)
    assert table["frame"].tolist() == [1, 2, 3, 4] and set(table["track"]) == {0}
    np.testing.assert_array_equal(np.stack([table[k] for k in "xywh"], -1),
                                  [[144, 80, 64, 64]] * 4)
    np.testing.assert_allclose(table["score"], 0.9, rtol=1e-6)
    crops, _ = _crops_and_windows(table, path, 112)
    np.testing.assert_allclose(np.stack([table["valence"], table["arousal"]], -1),
                               predictor(crops)["va"], atol=1e-4)
    # A score under YuNet's threshold (0.6): no face.
    quiet = _yunet_stub(tmp_path / "quiet.onnx", size, (3, 5), 64, 0.5)
    assert set(video.analyse(path, predictor, detector=f"yunet:{quiet}", full_every=1,
                             min_face=16)["track"]) == {-1}
