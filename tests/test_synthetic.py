"""Tests of the synthetic Aff-Wild2 generator: layout, dirt, determinism, counts, visible labels.

The recounts parse the written text independently of the generator's internals, the way a reader
would, so they check what is on disk rather than what the generator meant to write.
"""

import json
import subprocess
import sys
import wave
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from abaw_jax.data import affwild2, synthetic
from abaw_jax.data.synthetic import SyntheticSpec, generate

SPEC = SyntheticSpec(num_videos=8, frames_per_video=60, seed=3, pair_fraction=0.3, sample_rate=8000)
CHALLENGES = {
    "va": "VA_Estimation_Challenge",
    "expr": "EXPR_Recognition_Challenge",
    "au": "AU_Detection_Challenge",
}
SPLIT_DIRS = {"train": "Train_Set", "validation": "Validation_Set"}
HEADERS = {
    "va": "valence,arousal",
    "expr": "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other",
    "au": "AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26",
}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, generate(out, SPEC, workers=1)


def _data_lines(path: Path) -> tuple[str, list[list[str]]]:
    """Header and split data lines, tolerating CRLF, spaces and trailing blank lines."""
    lines = path.read_bytes().decode("ascii").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows = [[value.strip() for value in line.split(",")] for line in lines[1:]]
    return lines[0], rows


def _invalid(task: str, row: list[str]) -> bool:
    if task == "va":
        return any(float(v) == -5 for v in row)
    return any(int(v) == -1 for v in row)


def _crop(root: Path, video: dict, name: str, frame: int) -> Path:
    return root / video["image_root"] / name / f"{frame:05d}.jpg"


def _annotated(manifest: dict, task: str):
    for name, video in manifest["videos"].items():
        split = video["challenges"].get(task)
        if split in SPLIT_DIRS:
            yield name, video, split


def test_same_seed_gives_identical_bytes_in_process_and_in_a_pool(tree, tmp_path, monkeypatch):
    out, _ = tree
    monkeypatch.setattr(synthetic, "_MIN_POOL_FRAMES", 0)  # force the spawn pool
    generate(tmp_path, SPEC, workers=2)
    first, second = _tree(out), _tree(tmp_path)
    assert first.keys() == second.keys()
    assert first == second
    for suffix in (".jpg", ".wav", ".mp4", ".avi"):
        assert any(k.endswith(suffix) for k in first), suffix


def test_another_seed_differs(tree, tmp_path):
    out, manifest = tree
    other = generate(tmp_path, SyntheticSpec(**{**vars(SPEC), "seed": 4}), workers=1)
    assert other["counts"] != manifest["counts"] or other["videos"] != manifest["videos"]
    first, second = _tree(out), _tree(tmp_path)
    common = [k for k in first.keys() & second.keys() if not k.endswith("manifest.json")]
    media = (".txt", ".jpg", ".wav", ".mp4")
    assert all(first[k] != second[k] for k in common if k.endswith(media))
    assert first != second


def test_annotation_files_have_header_and_one_line_per_frame(tree):
    out, manifest = tree
    for task, challenge in CHALLENGES.items():
        for name, video, split in _annotated(manifest, task):
            header, rows = _data_lines(
                out / "annotations" / challenge / SPLIT_DIRS[split] / f"{name}.txt"
            )
            assert header == HEADERS[task]
            assert len(rows) == video["num_frames"]
            width = {"va": 2, "expr": 1, "au": 12}[task]
            assert all(len(row) == width for row in rows)
            values = np.array(rows, float)
            if task == "va":
                assert np.all((np.abs(values) <= 1) | (values == -5))
            elif task == "expr":
                assert set(values.ravel()) <= set(range(-1, 8))
            else:
                assert set(values.ravel()) <= {-1, 0, 1}
        # A video's files live only in its own split's folder.
        for split, folder in SPLIT_DIRS.items():
            names = {p.stem for p in (out / "annotations" / challenge / folder).iterdir()}
            assert names == {n for n, _, s in _annotated(manifest, task) if s == split}


def test_real_file_dirt_is_planted(tree):
    out, _ = tree
    texts = [p.read_bytes() for p in (out / "annotations").rglob("*_Set/*.txt")]
    assert any(b"\r\n" in t for t in texts) and any(b"\r\n" not in t for t in texts)
    assert any(not t.endswith(b"\n") for t in texts)
    assert any(t.endswith((b"\n\n", b"\r\n\r\n")) for t in texts)
    assert any(b", " in t.split(b"\n", 1)[1] for t in texts)


def test_crops_exist_exactly_where_the_manifest_says(tree):
    out, manifest = tree
    sizes = set()
    for name, video in manifest["videos"].items():
        folder = out / video["image_root"] / name
        frames = {int(p.stem) for p in folder.iterdir()}
        assert all(len(p.stem) == 5 and p.suffix == ".jpg" for p in folder.iterdir())
        expected = set(range(1, video["num_frames"] + 1)) - set(video["missing"])
        assert frames == expected
        assert video["missing"], "every video should have a detector gap at 3 %"
        other_root = {"cropped_aligned": "cropped_aligned_new"}.get(
            video["image_root"], "cropped_aligned"
        )
        assert not (out / other_root / name).exists()
        sizes.add(video["size"])
        img = cv2.imread(str(folder / f"{min(frames):05d}.jpg"))
        assert img.shape == (video["size"], video["size"], 3)
    assert sizes == {112, 128}


def test_pairs_second_root_and_test_videos(tree):
    out, manifest = tree
    videos = manifest["videos"]
    lefts = [n for n in videos if n.endswith("_left")]
    assert lefts and all(n[: -len("_left")] + "_right" in videos for n in lefts)
    for name in lefts:
        assert videos[name]["raw"] == name[: -len("_left")]
    assert {v["image_root"] for v in videos.values()} == {"cropped_aligned", "cropped_aligned_new"}
    for task, challenge in CHALLENGES.items():
        listed = (out / "test_lists" / f"{challenge}_test_set_release.txt").read_text().split()
        assert listed == manifest["test"][task] and listed
        for name in listed:
            assert (out / videos[name]["image_root"] / name).is_dir()
            assert not list((out / "annotations" / challenge).rglob(f"{name}.txt"))
    images = (out / "test_lists" / "MTL_Challenge_test_set_release.txt").read_text().split()
    assert len(images) == manifest["test"]["mtl"] > 0
    for image in images:
        name, file = image.split("/")
        assert (out / videos[name]["image_root"] / name / file).is_file()
    # Most annotated videos are in all three challenges, some in fewer.
    annotated = [v["challenges"] for v in videos.values() if "test" not in v["challenges"].values()]
    assert any(len(c) == 4 for c in annotated) and any(len(c) < 3 for c in annotated)


def test_video_info_agrees_with_the_manifest(tree):
    out, manifest = tree
    lines = (out / "video_info.csv").read_text().splitlines()
    assert lines[0] == "video,fps,num_frames,width,height"
    raws = manifest["raw_videos"]
    assert len(lines) - 1 == SPEC.num_videos == len(raws)
    for line in lines[1:]:
        raw, fps, frames, width, height = line.split(",")
        tracks = [v for v in manifest["videos"].values() if v["raw"] == raw]
        assert int(fps) in (25, 30) and all(v["fps"] == int(fps) for v in tracks)
        assert int(frames) == max(v["num_frames"] for v in tracks) == raws[raw]["num_frames"]
        assert (int(width), int(height)) == (raws[raw]["width"], raws[raw]["height"])
        assert raws[raw]["tracks"] == [n for n, v in manifest["videos"].items() if v["raw"] == raw]


def test_raw_videos_and_wavs_are_the_files_the_manifest_lists(tree):
    out, manifest = tree
    raws = manifest["raw_videos"]
    listed = {raw[key] for raw in raws.values() for key in ("file", "wav") if raw[key]}
    assert {f"videos/{p.name}" for p in (out / "videos").iterdir()} == listed
    suffixes = [Path(raw["file"]).suffix for raw in raws.values()]
    assert suffixes.count(".avi") == 1 and suffixes.count(".mp4") == len(raws) - 1
    assert all(Path(raw["file"]).stem == name for name, raw in raws.items())
    for raw in raws.values():
        if raw["wav"]:
            assert raw["wav"] == str(Path(raw["file"]).with_suffix(".wav"))
            assert raw["has_audio"]
        if raw["has_audio"]:
            assert raw["audio_follows"] == raw["tracks"][0]
    # The planted audio cases: none at all, the track only, the odd rate once.
    voiced = [raw for raw in raws.values() if raw["has_audio"]]
    assert 0 < len(voiced) < len(raws)
    assert all(raw["audio_track"] for raw in voiced)
    assert any(not raw["wav"] for raw in voiced)
    assert sum(bool(raw["wav"]) for raw in voiced) > len(voiced) / 2
    rates = [raw["sample_rate"] for raw in voiced]
    assert rates.count(22050) == 1 and set(rates) == {22050, SPEC.sample_rate}
    assert all(raw["sample_rate"] is None for raw in raws.values() if not raw["has_audio"])
    pairs = [raw for raw in raws.values() if len(raw["tracks"]) == 2]
    assert pairs and all(raw["tracks"][0].endswith("_left") for raw in pairs)


def _decode_video(path: Path) -> tuple[Fraction, list[np.ndarray], list[float]]:
    """The video stream's average frame rate, its frames as BGR and their times in seconds."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        rate = stream.average_rate  # read while open: PyAV answers None after closing
    return rate, [f.to_ndarray(format="bgr24") for f in frames], [f.time for f in frames]


def test_decoded_videos_have_the_manifests_frames_fps_and_size(tree):
    out, manifest = tree
    for name, raw in manifest["raw_videos"].items():
        rate, frames, times = _decode_video(out / raw["file"])
        assert len(frames) == raw["num_frames"], name
        assert rate == raw["fps"], name
        assert frames[0].shape == (raw["height"], raw["width"], 3), name
        assert np.allclose(times, np.arange(len(frames)) / raw["fps"]), name


def test_video_frames_show_the_crops_where_the_manifest_says(tree):
    out, manifest = tree
    for raw in manifest["raw_videos"].values():
        _, frames, _ = _decode_video(out / raw["file"])
        ends = [x for x, _ in raw["crop_places"][1:]] + [raw["width"]]
        for name, (x, y), end in zip(raw["tracks"], raw["crop_places"], ends, strict=True):
            video = manifest["videos"][name]
            width = min(video["size"], end - x)  # a pair's right person is in front
            errors = []
            for frame in range(1, video["num_frames"] + 1, 5):
                crop = _crop(out, video, name, frame)
                if crop.exists():
                    pasted = frames[frame - 1][y : y + video["size"], x : x + width]
                    jpg = cv2.imread(str(crop))[:, :width]
                    errors.append(np.abs(pasted.astype(float) - jpg).mean())
            # Two lossy codecs apart: about 5 (one crop moved by 2 pixels: 9 to 12).
            assert len(errors) > 3 and np.mean(errors) < 7.5, (name, np.mean(errors))
        assert np.ptp(frames[0][:4, :4], axis=(0, 1)).max() < 10  # a plain frame around them


def _decode_audio(path: Path) -> tuple[int, int, np.ndarray] | None:
    """(sample rate, channels, mono samples in [-1, 1]) of the file's first audio stream."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate, channels = stream.rate, stream.channels
        frames = [f.to_ndarray() for f in container.decode(stream)]
    samples = np.concatenate(frames, axis=-1).reshape(-1)
    if samples.dtype == np.int16:  # the AVI's PCM; AAC decodes to float
        return rate, channels, samples.astype(np.float32) / 32768
    return rate, channels, samples


def _read_wav(path: Path) -> tuple[int, np.ndarray]:
    with wave.open(str(path)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (1, 2)
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
        return wav.getframerate(), pcm.astype(np.float32) / 32768


def test_audio_tracks_and_wavs_have_the_manifests_rate_and_length(tree):
    out, manifest = tree
    for name, raw in manifest["raw_videos"].items():
        track = _decode_audio(out / raw["file"])
        if not raw["has_audio"]:
            assert track is None and not raw["wav"], name
            continue
        expected = round(raw["num_frames"] * raw["sample_rate"] / raw["fps"])
        rate, channels, samples = track
        assert (rate, channels) == (raw["sample_rate"], 1), name
        # AAC pads its last 1024-sample frame; the AVI's PCM is exact.
        assert expected <= samples.size < expected + 1024, name
        if raw["wav"]:
            wav_rate, wav = _read_wav(out / raw["wav"])
            assert wav_rate == raw["sample_rate"] and wav.size == expected, name
            # The same sound, aligned: the lossy track follows the wav sample for sample.
            assert np.corrcoef(samples[:expected], wav)[0, 1] > 0.99, name


def test_switches_write_no_videos_or_no_audio(tmp_path):
    base = SyntheticSpec(num_videos=5, frames_per_video=20, images=False)
    silent = generate(tmp_path / "silent", SyntheticSpec(**{**vars(base), "audio": False}))
    assert not list((tmp_path / "silent").rglob("*.wav"))
    for raw in silent["raw_videos"].values():
        assert _decode_audio(tmp_path / "silent" / raw["file"]) is None
        assert not raw["has_audio"] and not raw["audio_track"] and raw["sample_rate"] is None
    # Without videos every voice is a .wav, those that would be a track only included.
    voiced = generate(tmp_path / "voiced", base)["raw_videos"]
    wavs = generate(tmp_path / "wavs", SyntheticSpec(**{**vars(base), "videos": False}))
    assert {p.suffix for p in (tmp_path / "wavs" / "videos").iterdir()} == {".wav"}
    for name, raw in wavs["raw_videos"].items():
        assert raw["file"] is None and not raw["audio_track"]
        assert raw["has_audio"] == voiced[name]["has_audio"]
        assert bool(raw["wav"]) == raw["has_audio"]
        assert raw["sample_rate"] == voiced[name]["sample_rate"]
    assert any(raw["has_audio"] and not raw["wav"] for raw in voiced.values())


def test_sample_rate_must_suit_the_encoders(tmp_path):
    with pytest.raises(ValueError, match="sample_rate"):
        generate(tmp_path, SyntheticSpec(sample_rate=22050))


def test_manifest_counts_match_a_recount_of_the_files(tree):
    out, manifest = tree
    for task, challenge in CHALLENGES.items():
        for split, folder in SPLIT_DIRS.items():
            count = dict.fromkeys(("videos", "annotated", "invalid", "missing_image"), 0)
            for path in (out / "annotations" / challenge / folder).iterdir():
                video = manifest["videos"][path.stem]
                count["videos"] += 1
                for frame, row in enumerate(_data_lines(path)[1], start=1):
                    count["annotated"] += 1
                    if _invalid(task, row):
                        count["invalid"] += 1
                    elif not _crop(out, video, path.stem, frame).exists():
                        count["missing_image"] += 1
            count["curated"] = count["annotated"] - count["invalid"] - count["missing_image"]
            assert manifest["counts"][task][split] == count, (task, split)


def _mtl_recount(path: Path, has_crop) -> dict:
    header, rows = _data_lines(path)
    assert header == "image,valence,arousal,expression,aus"
    count = {"annotated": 0, "missing_image": 0, "invalid_all": 0, "curated": 0}
    count |= {"strict_curated": 0, "valid": dict.fromkeys(CHALLENGES, 0)}
    for row in rows:
        assert len(row) == 16
        name, file = row[0].split("/")
        invalid = {"va": _invalid("va", row[1:3]), "expr": _invalid("expr", row[3:4])}
        invalid["au"] = _invalid("au", row[4:])
        count["annotated"] += 1
        if all(invalid.values()):
            count["invalid_all"] += 1
        elif not has_crop(name, int(file[:5])):
            count["missing_image"] += 1
        else:
            count["curated"] += 1
            count["strict_curated"] += not any(invalid.values())
            for task, bad in invalid.items():
                count["valid"][task] += not bad
    return count


MTL_FILES = {
    "train": "training_set_annotations.txt",
    "validation": "validation_set_annotations.txt",
}


def test_mtl_counts_match_a_recount(tree):
    out, manifest = tree

    def has_crop(name: str, frame: int) -> bool:
        return _crop(out, manifest["videos"][name], name, frame).exists()

    for split, file in MTL_FILES.items():
        count = _mtl_recount(out / "annotations" / "MTL_Challenge" / file, has_crop)
        assert count["annotated"] > 0
        assert manifest["counts"]["mtl"][split] == count, split


def test_mtl_dirt_on_longer_videos(tmp_path):
    # Tiny videos have ~12 MTL rows each, too few for the 1 % of all-invalid rows to appear.
    spec = SyntheticSpec(
        num_videos=8, frames_per_video=500, images=False, videos=False, audio=False
    )
    manifest = generate(tmp_path, spec)
    missing = {name: set(v["missing"]) for name, v in manifest["videos"].items()}

    def has_crop(name: str, frame: int) -> bool:
        return frame not in missing[name]

    for split, file in MTL_FILES.items():
        count = _mtl_recount(tmp_path / "annotations" / "MTL_Challenge" / file, has_crop)
        assert manifest["counts"]["mtl"][split] == count, split
        assert count["invalid_all"] > 0 and count["missing_image"] > 0
        assert count["strict_curated"] < count["curated"]


def test_mtl_rows_use_every_kth_frame_and_the_challenge_labels(tree):
    out, manifest = tree
    _, rows = _data_lines(out / "annotations" / "MTL_Challenge" / "training_set_annotations.txt")
    name = rows[0][0].split("/")[0]
    frames = [int(r[0].split("/")[1][:5]) for r in rows if r[0].startswith(name + "/")]
    n = manifest["videos"][name]["num_frames"]
    assert frames == list(range(1, n + 1, SPEC.mtl_stride))
    split = manifest["videos"][name]["challenges"]["va"]
    _, va = _data_lines(out / "annotations" / CHALLENGES["va"] / SPLIT_DIRS[split] / f"{name}.txt")
    mtl = {int(r[0].split("/")[1][:5]): r[1:3] for r in rows if r[0].startswith(name + "/")}
    agree = [mtl[f] == va[f - 1] for f in frames if "-5" not in mtl[f] and "-5" not in va[f - 1]]
    assert agree and all(agree)


def test_annotation_only_mode_writes_no_jpgs_and_the_same_annotations(tree, tmp_path):
    out, manifest = tree
    spec = SyntheticSpec(**{**vars(SPEC), "images": False, "videos": False, "audio": False})
    bare = generate(tmp_path, spec, workers=1)
    assert not list(tmp_path.rglob("*.jpg")) and not (tmp_path / "videos").exists()
    assert bare["images"] is False and manifest["images"] is True
    assert bare["counts"] == manifest["counts"] and bare["videos"] == manifest["videos"]
    full, ann = _tree(out), _tree(tmp_path)
    for key in ann:
        if key.endswith((".txt", ".csv")):
            assert ann[key] == full[key], key


def test_rerun_replaces_a_tree_and_foreign_directories_are_refused(tmp_path):
    spec = SyntheticSpec(num_videos=3, frames_per_video=20, images=False, audio=False)
    generate(tmp_path, spec)
    (tmp_path / "audio").mkdir()  # where earlier versions wrote the .wavs
    manifest = generate(tmp_path, SyntheticSpec(**{**vars(spec), "seed": 9}))
    assert not (tmp_path / "audio").exists()
    assert {p.stem for p in (tmp_path / "videos").iterdir()} == set(manifest["raw_videos"])
    on_disk = {p.stem for p in (tmp_path / "annotations").rglob("*_Set/*.txt")}
    assert on_disk <= set(manifest["videos"])
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate(tmp_path, spec)


def test_invalid_spec_is_rejected(tmp_path):
    with pytest.raises(ValueError):
        generate(tmp_path, SyntheticSpec(invalid_va_rate=1.5))


# --- The labels are visible in the images -----------------------------------------------------


def _labelled_crops(out: Path, manifest: dict, task: str):
    """(image, valid label row, video) for every valid line whose crop exists."""
    for name, video, split in _annotated(manifest, task):
        path = out / "annotations" / CHALLENGES[task] / SPLIT_DIRS[split] / f"{name}.txt"
        for frame, row in enumerate(_data_lines(path)[1], start=1):
            crop = _crop(out, video, name, frame)
            if not _invalid(task, row) and crop.exists():
                yield cv2.imread(str(crop)).astype(float), [float(v) for v in row], video


def _patch(img: np.ndarray, video: dict, dx: float, dy: float) -> np.ndarray:
    """Mean BGR of a 3x3 patch at (dx, dy) face units from the video's face centre."""
    face, size = video["face"], video["size"]
    x = round(size * face["x"] + dx * size * face["scale"])
    y = round(size * face["y"] + dy * size * face["scale"])
    return img[y - 1 : y + 2, x - 1 : x + 2].mean((0, 1))


def test_arousal_sets_background_brightness(tree):
    out, manifest = tree
    high, low = [], []
    for img, (_, arousal), _ in _labelled_crops(out, manifest, "va"):
        corner = img[:6, :6].mean()
        if arousal > 0.3:
            high.append(corner)
        elif arousal < -0.3:
            low.append(corner)
    assert len(high) > 10 and len(low) > 10
    assert np.mean(high) - np.mean(low) > 60


def test_valence_tints_the_face(tree):
    out, manifest = tree
    red_minus_blue = {True: [], False: []}
    for img, (valence, _), video in _labelled_crops(out, manifest, "va"):
        if abs(valence) > 0.3:
            b, _, r = _patch(img, video, 0.0, 0.0)
            red_minus_blue[valence > 0].append(r - b)
    assert min(map(len, red_minus_blue.values())) > 10
    assert np.mean(red_minus_blue[True]) - np.mean(red_minus_blue[False]) > 20


def test_each_au_darkens_its_own_mark(tree):
    out, manifest = tree
    samples = list(_labelled_crops(out, manifest, "au"))
    for k, marks in enumerate(synthetic.AU_MARKS):
        on, off = [], []
        for img, row, video in samples:
            (on if row[k] else off).append(_patch(img, video, *marks[0]).mean())
        assert len(on) >= 5 and len(off) >= 5, affwild2.AU_NAMES[k]
        assert np.mean(off) - np.mean(on) > 40, affwild2.AU_NAMES[k]


def test_expression_class_is_readable_from_the_forehead(tree):
    out, manifest = tree
    colours, classes = [], []
    for img, (cls,), video in _labelled_crops(out, manifest, "expr"):
        colours.append(_patch(img, video, *synthetic._FOREHEAD))
        classes.append(int(cls))
    colours, classes = np.array(colours), np.array(classes)
    present = np.unique(classes)
    assert present.size >= 3
    means = np.stack([colours[classes == c].mean(0) for c in present])
    nearest = present[np.argmin(((colours[:, None] - means[None]) ** 2).sum(-1), 1)]
    assert (nearest == classes).mean() > 0.8


def test_cli_writes_a_tree_and_prints_a_summary(tmp_path):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--videos=3", "--frames=20", "--noimages", "--novideos", "--noaudio"]
    result = subprocess.run(
        [sys.executable, "-m", "abaw_jax.data.synthetic", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "3 raw videos" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec"]["num_videos"] == 3 and manifest["images"] is False
    assert manifest["spec"]["videos"] is False and not (out / "videos").exists()


# --- The labels are audible ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def voices(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Wavs only (no crops, no videos): enough validation frames of several classes."""
    out = tmp_path_factory.mktemp("voices")
    spec = SyntheticSpec(
        num_videos=24, frames_per_video=300, seed=5, images=False, videos=False, sample_rate=16000
    )
    return out, generate(out, spec)


def _band_energies(out: Path, manifest: dict, task: str, edges: np.ndarray):
    """Per valid annotated frame of each split: log energies of the bands between edges (Hz) in
    a 64 ms Hann window centred on the frame's time, and the label row."""
    features = {split: [] for split in SPLIT_DIRS}
    labels = {split: [] for split in SPLIT_DIRS}
    for name, video, split in _annotated(manifest, task):
        raw = manifest["raw_videos"][video["raw"]]
        if raw["audio_follows"] != name:
            continue
        rate, wav = _read_wav(out / raw["wav"])
        half = round(0.032 * rate)
        padded = np.pad(wav, half)
        bands = np.searchsorted(np.fft.rfftfreq(2 * half, 1 / rate), edges)
        path = out / "annotations" / CHALLENGES[task] / SPLIT_DIRS[split] / f"{name}.txt"
        for frame, row in enumerate(_data_lines(path)[1], start=1):
            if _invalid(task, row):
                continue
            centre = round((frame - 1) / raw["fps"] * rate) + half
            window = padded[centre - half : centre + half] * np.hanning(2 * half)
            power = np.abs(np.fft.rfft(window)) ** 2
            energy = [power[lo:hi].sum() for lo, hi in zip(bands[:-1], bands[1:], strict=True)]
            features[split].append(np.log(np.array(energy) + 1e-9))
            labels[split].append([float(v) for v in row])
    return (
        {split: np.array(f) for split, f in features.items()},
        {split: np.array(v) for split, v in labels.items()},
    )


def _macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    scores = []
    for c in np.union1d(truth, predicted):
        tp = np.sum((truth == c) & (predicted == c))
        scores.append(2 * tp / (np.sum(truth == c) + np.sum(predicted == c)))
    return float(np.mean(scores))


def _speaking(voice_band: np.ndarray, threshold: float | None = None) -> tuple[np.ndarray, float]:
    """Frames whose voice band (log energy) is 70 % of the way from the quietest frame to the
    loudest: the person speaks (pauses hold only the noise floor, ~20 dB below; at the midpoint,
    frames at a pause's edge, half silent, took the arousal correlation from 0.83-0.98 to
    0.52-0.72 on seeds 5-7)."""
    if threshold is None:
        threshold = voice_band.min() + 0.7 * (voice_band.max() - voice_band.min())
    return voice_band > threshold, threshold


def test_expression_class_is_learnable_from_the_audio(voices):
    out, manifest = voices
    # The voice's band (60-450 Hz), then 18 log-spaced bands over 450 Hz to 3.8 kHz, where the
    # class tones are. Pauses are silent: the class is heard while the person speaks.
    x, y = _band_energies(out, manifest, "expr", np.r_[60.0, np.geomspace(450, 3800, 19)])
    on_train, threshold = _speaking(x["train"][:, 0])
    on_val, _ = _speaking(x["validation"][:, 0], threshold)
    assert 0.3 < on_train.mean() < 0.9, on_train.mean()  # pauses: two fifths of the time
    train, val = y["train"][on_train, 0].astype(int), y["validation"][on_val, 0].astype(int)
    assert np.unique(val).size >= 4 and val.size > 200
    # Nearest centroid in standardised log band energies, fitted on the train videos only.
    tones_train, tones_val = x["train"][on_train, 1:], x["validation"][on_val, 1:]
    mean, std = tones_train.mean(0), tones_train.std(0)
    z_train, z_val = (tones_train - mean) / std, (tones_val - mean) / std
    classes = np.unique(train)
    centroids = np.stack([z_train[train == c].mean(0) for c in classes])
    predicted = classes[((z_val[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
    constant = np.full_like(val, np.bincount(train).argmax())
    learnt, baseline = _macro_f1(val, predicted), _macro_f1(val, constant)
    assert learnt > baseline + 0.4, (learnt, baseline)


def test_arousal_is_audible_in_the_low_bands(voices):
    out, manifest = voices
    x, y = _band_energies(out, manifest, "va", np.array([60.0, 450.0]))  # the voice's band
    loudness, arousal = x["train"][:, 0], y["train"][:, 1]
    speaking, _ = _speaking(loudness)
    assert speaking.sum() > 300
    assert np.corrcoef(loudness[speaking], arousal[speaking])[0, 1] > 0.6  # seeds 5-7: 0.87-0.98
