"""The audio side table of a records folder (data/audio_table.py) and the `audio` input of the
pipelines: prepared once per raw video, cut per frame, carried by frames, clips and feature
caches; frame counts from the raw videos; bad input counted per reason."""

import json
import shutil
import wave

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config

from abaw_jax import models, trainers
from abaw_jax.data import (
    affwild2,
    audio,
    audio_table,
    features,
    pipeline,
    prepare,
    records,
    synthetic,
    video,
)
from abaw_jax.data.affwild2 import DataError

CFG = audio.AudioConfig(window_ms=210.0, freq_masks=1, time_masks=1)
SR = 16000


def _signal(num_frames: int, fps: float, seed: int) -> np.ndarray:
    """Noise with a loud click every 7th frame: windows of different frames differ."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.01, round(num_frames / fps * SR)).astype(np.float32)
    for f in range(1, num_frames + 1, 7):
        at = round(audio.frame_time(f, fps) * SR)
        x[at: at + 40] += 0.8
    return x


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A tiny synthetic tree with raw videos written beside it: one without an audio track,
    one missing (its fps and frame count from video_info.csv only)."""
    root = tmp_path_factory.mktemp("affwild2")
    spec = synthetic.SyntheticSpec(num_videos=4, frames_per_video=40, seed=5, audio=False,
                                   videos=False, pair_fraction=0.5)
    synthetic.generate(root, spec)
    (root / "videos").mkdir()
    info = video.read_info_csv(root / affwild2.VIDEO_INFO_FILE)
    raws = sorted(info)
    layout = affwild2.Layout.discover(root)
    expr = sorted({video.raw_name(p.stem) for split in affwild2.SPLITS
                   for p in layout.task_dir("expr", split).glob("*.txt")})
    silent, missing = expr[0], expr[1]  # both among the videos the expr records read
    for i, raw in enumerate(raws):
        if raw == missing:
            continue
        fps, n = info[raw].fps, info[raw].num_frames
        video.write_video(root / "videos" / f"{raw}.mp4", fps, n,
                          audio=None if raw == silent else _signal(n, fps, i), sample_rate=SR)
    return root, {"silent": silent, "missing": missing, "info": info, "expr": expr}


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory):
    root, _ = tree
    out = tmp_path_factory.mktemp("records") / "expr"
    stats = prepare.prepare(affwild2.Layout.discover(root), "expr", out, num_shards=2,
                            workers=1, progress=False, audio=CFG)
    return out, stats


def _expected(root, name: str, frame: int, info) -> np.ndarray:
    raw = video.raw_name(name)
    mel = audio.log_mel(audio.decode(root / "videos" / f"{raw}.mp4", SR), CFG)
    return audio.frame_window(mel.astype(np.float16), frame, info[raw].fps, CFG)


def test_prepare_counts_audio_and_frame_counts_per_reason(tree, prepared):
    root, planted = tree
    out, _ = prepared
    summary = json.loads((out / "stats.json").read_text())
    counts = summary["audio"]
    assert counts["videos"] == len(planted["expr"])
    assert counts["no_audio"] == 2  # the track-less video and the missing one
    assert counts["ok"] == len(planted["expr"]) - 2
    assert set(counts["first"]) == {"no_audio"}
    assert summary["raw_videos"]["files"] == len(planted["expr"]) - 1
    assert summary["raw_videos"]["frames_from_video_info.csv"] == 1
    mismatches = 0
    for split in ("train", "validation"):
        # Labelled videos keep their annotation's length; a second person's track of a raw
        # video may be annotated over fewer frames than the video has (counted, kept).
        lines = records.read_video_frames(out, split)
        expected = sum(n != planted["info"][video.raw_name(v)].num_frames
                       for v, n in lines.items())
        assert summary["splits"][split]["frame_counts"]["mismatch"] == expected
        mismatches += expected
        assert summary["splits"][split]["audio_past_end"] == 0
    assert mismatches > 0


def test_frames_and_clips_carry_the_windows_of_their_timestamps(tree, prepared):
    root, planted = tree
    out, _ = prepared
    videos, video_index, frame = records.read_frame_index(out, "train")
    stream = pipeline.eval_dataset(out, "train", batch_size=4, size=0, audio=CFG)
    seen = 0
    for batch in stream:
        assert batch["audio"].shape == (4, CFG.window_steps, CFG.n_mels)
        for i, w in zip(batch["index"], batch["audio"], strict=True):
            if i < 0:
                np.testing.assert_array_equal(w, audio.SILENCE_DB)
                continue
            name, f = videos[video_index[i]], int(frame[i])
            if video.raw_name(name) in (planted["silent"], planted["missing"]):
                np.testing.assert_array_equal(w, audio.SILENCE_DB)
            else:
                np.testing.assert_array_equal(w, _expected(root, name, f, planted["info"]))
                seen += 1
    stream.close()
    assert seen > 0
    clips = pipeline.clip_eval_dataset(out, "train", length=5, stride=5, batch_size=2,
                                       size=8, audio=CFG)
    batch = next(iter(clips))
    clips.close()
    assert batch["audio"].shape == (2, 5, CFG.window_steps, CFG.n_mels)
    assert batch["image"].shape == (2, 5, 8, 8, 3)


def test_training_masks_bands_and_steps_to_silence_only(prepared):
    out, _ = prepared
    train = pipeline.train_dataset(out, "train", batch_size=8, seed=0, augment_cfg=None,
                                   audio=CFG)
    reader = pipeline.FrameReader(out, "train", audio=CFG)
    batch = next(iter(train))
    train.close()
    changed = 0
    for i, w in zip(batch["index"], batch["audio"], strict=True):
        plain = reader(int(i))["audio"]
        differs = w != plain
        assert np.all(w[differs] == audio.SILENCE_DB)  # masking only silences
        changed += int(differs.any())
    assert changed > 0


def test_feature_caches_carry_the_audio_too(prepared, tmp_path):
    out, _ = prepared
    videos, video_index, frame = records.read_frame_index(out, "train")
    labels = records_labels(out, "train")
    features.write_split(tmp_path, "train", np.zeros((len(frame), 3)), labels, videos,
                         video_index, frame)
    features.write_meta(tmp_path, {"splits": {"train": len(frame)}}, np.zeros(3))
    reader = pipeline.FrameReader(out, "train", features=[tmp_path], audio=CFG)
    assert reader.records is None  # labels from the cache: no record read
    with_images = pipeline.FrameReader(out, "train", size=8, audio=CFG)
    sounds = 0
    for i in range(len(frame)):
        np.testing.assert_array_equal(reader(i)["audio"], with_images(i)["audio"])
        sounds += bool(np.any(reader(i)["audio"] != audio.SILENCE_DB))
    assert sounds > 0


def records_labels(out, split):
    source = records.RecordSource(out, split)
    rows = [source[i] for i in range(len(source))]
    return {k: np.stack([r[k] for r in rows]) for k in ("va", "expr", "au", "va_mask",
                                                         "expr_mask", "au_mask")}


def test_a_flipped_byte_in_a_shard_is_caught(prepared, tmp_path):
    out, _ = prepared
    copy = tmp_path / "records"
    shutil.copytree(out, copy)
    index = audio_table.read_index(copy)
    raw, entry = next((r, e) for r, e in index["videos"].items() if e["status"] == "ok")
    shard = copy / audio_table.DIR / f"mel-{entry['shard']:05d}.npy"
    data = bytearray(shard.read_bytes())
    data[-(2 * CFG.n_mels * 3)] ^= 0xFF  # in the last video's block
    shard.write_bytes(bytes(data))
    table = audio_table.AudioTable(copy, CFG)
    last = max((e["start"], r) for r, e in index["videos"].items() if e["status"] == "ok")[1]
    with pytest.raises(DataError, match=f"{last}.*CRC"):
        table.spectrogram(last)


def test_other_parameters_than_prepared_are_refused(prepared):
    out, _ = prepared
    with pytest.raises(DataError, match="prepare the records again"):
        audio_table.AudioTable(out, audio.AudioConfig(n_mels=40))


def test_missing_audio_stops_preparation_when_configured(tree, tmp_path):
    root, planted = tree
    strict = audio.AudioConfig(missing="error")
    with pytest.raises(DataError, match="no audio track"):
        prepare.prepare(affwild2.Layout.discover(root), "expr", tmp_path / "r", workers=1,
                        progress=False, audio=strict)


def test_wavs_without_their_videos_are_found_in_the_video_folder(tmp_path):
    """Sound extracted to `.wav` files whose videos were not kept (fps from video_info.csv)."""
    spec = synthetic.SyntheticSpec(num_videos=4, frames_per_video=40, seed=5, videos=False)
    manifest = synthetic.generate(tmp_path / "tree", spec)
    assert not any(v["file"] for v in manifest["raw_videos"].values())
    layout = affwild2.Layout.discover(tmp_path / "tree")
    prepare.prepare(layout, "expr", tmp_path / "r", workers=1, progress=False, audio=CFG)
    summary = json.loads((tmp_path / "r" / "stats.json").read_text())
    counts = summary["audio"]
    voiced = {r for r, v in manifest["raw_videos"].items() if v["wav"]}
    read = {video.raw_name(n) for split in ("train", "validation")
            for n in records.read_video_frames(tmp_path / "r", split)}
    assert counts["ok"] == len(voiced & read) > 0 and counts["videos"] == len(read)
    assert summary["raw_videos"]["files"] == 0


def test_test_videos_take_their_frame_count_from_the_raw_video(tree, tmp_path, caplog):
    root, planted = tree
    out = tmp_path / "test"
    with caplog.at_level("WARNING"):
        prepare.prepare(affwild2.Layout.discover(root), "expr", out, splits=("test",),
                        workers=1, progress=False, audio=None)
    counts = records.read_video_frames(out, "test")
    for name, n in counts.items():
        assert n == planted["info"][video.raw_name(name)].num_frames, name
    assert not (out / audio_table.DIR).exists()  # audio=None: no side table


def test_without_a_raw_video_the_count_is_the_last_crop_with_a_warning(tree, tmp_path, caplog):
    root, planted = tree
    copy = tmp_path / "tree"
    shutil.copytree(root, copy)
    layout = affwild2.Layout.discover(copy)
    name = affwild2.read_test_list(layout.test_list("expr"))[0]
    raw = video.raw_name(name)
    (copy / "videos" / f"{raw}.mp4").unlink(missing_ok=True)
    info = copy / affwild2.VIDEO_INFO_FILE
    info.write_text("".join(line for line in info.read_text().splitlines(keepends=True)
                            if not line.startswith(f"{raw},")))
    with caplog.at_level("WARNING"):
        prepare.prepare(affwild2.Layout.discover(copy), "expr", tmp_path / "r",
                        splits=("test",), workers=1, progress=False, audio=None)
    crops = [int(p.stem) for r in layout.image_roots for p in (r / name).glob("*.jpg")]
    assert records.read_video_frames(tmp_path / "r", "test")[name] == max(crops)
    assert "from the last crop" in caplog.text and name in caplog.text


class Hears(nnx.Module):
    """A model of the audio alone: the mean level of each mel band over the 11 steps around the
    frame's (110 ms), a linear task layer."""

    inputs = ("audio",)

    def __init__(self, outputs, *, rngs: nnx.Rngs, **kwargs):
        self.outputs = dict(outputs)
        self.tasks = nnx.Dict({k: nnx.Linear(CFG.n_mels, n, rngs=rngs)
                               for k, n in outputs.items()})

    def __call__(self, inputs, rngs=None):
        x = inputs["audio"]
        centre = x.shape[1] // 2
        pooled = (jnp.mean(x[:, centre - 5: centre + 6], axis=1) - audio.SILENCE_DB) / 50
        return {k: self.tasks[k](pooled) for k in self.outputs}


def test_a_model_that_takes_audio_trains_and_evaluates_on_it(prepared, tmp_path, monkeypatch):
    out, _ = prepared
    monkeypatch.setitem(models.FAMILIES, "hears", models.Family("hears", Hears))
    config = tiny_config(out, "expr", **{"data.audio": {k: v for k, v in CFG.__dict__.items()}})
    config.model = {"name": "hears"}
    metrics = trainers.train_and_evaluate(config, tmp_path / "run")
    assert metrics["expr/frames"] == len(records.RecordSource(out, "validation"))
    assert np.isfinite(metrics["expr/f1_macro"])


def test_bad_videos_are_counted_per_reason_and_past_the_end_is_silence_or_an_error(
        tree, tmp_path):
    """A corrupt video, a truncated one, a .wav at another rate than the track, and a track
    shorter than its video: counted in stats.json; `missing=error` names the video."""
    root, planted = tree
    copy = tmp_path / "tree"
    shutil.copytree(root, copy)
    ok = [r for r in planted["expr"] if r not in (planted["silent"], planted["missing"])]
    (short,) = ok  # the one video of the expr records with a full track: make it short
    info = planted["info"][short]
    path = copy / "videos" / f"{short}.mp4"
    path.unlink()
    half = _signal(info.num_frames, info.fps, 0)[: round(info.num_frames / info.fps * SR / 2)]
    video.write_video(path, info.fps, info.num_frames, audio=half, sample_rate=SR)
    wav_signal = np.zeros(round(info.num_frames / info.fps * 8000) // 2, np.int16)
    with wave.open(str(path.with_suffix(".wav")), "wb") as w:  # the .wav is what is read
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(wav_signal.tobytes())
    (copy / "videos" / f"{planted['silent']}.mp4").write_bytes(b"\0" * 4096)  # corrupt
    layout = affwild2.Layout.discover(copy)
    stats = prepare.prepare(layout, "expr", tmp_path / "r", workers=1, progress=False,
                            audio=CFG)
    counts = json.loads((tmp_path / "r" / "stats.json").read_text())["audio"]
    assert counts["unreadable"] == 1 and counts["first"]["unreadable"] == planted["silent"]
    assert counts["sample_rate_mismatch"] == 1 and counts["ok"] == 1
    past = sum(st["audio_past_end"] for st in stats.values())
    assert past > 0  # the second half of `short`'s frames: silence
    table = audio_table.AudioTable(tmp_path / "r", CFG)
    np.testing.assert_array_equal(table.window(short, info.num_frames), audio.SILENCE_DB)
    with pytest.raises(DataError, match=planted["silent"]):
        prepare.prepare(layout, "expr", tmp_path / "e", workers=1, progress=False,
                        audio=audio.AudioConfig(missing="error"))


def test_an_audio_model_learns_the_synthetic_expressions(synthetic_cache, tmp_path, monkeypatch,
                                                          one_device):
    """The whole path: the synthetic tree's raw videos (a tone per expression class), the data
    cache's audio table, the windows, a linear model of band levels through the trainer."""
    monkeypatch.setenv("ABAW_JAX_CACHE", str(synthetic_cache))
    monkeypatch.setitem(models.FAMILIES, "hears", models.Family("hears", Hears))
    config = tiny_config(None, "expr", **{
        "total_steps": 1000, "eval_every_steps": 1000, "log_every_steps": 500,
        "checkpoint_every_steps": 1000, "batch_size": 32, "optim.lr": 3e-2})  # default tree
    config.model = {"name": "hears"}
    assert config.data.audio.window_ms == 1000  # the default window
    metrics = trainers.train_and_evaluate(config, tmp_path / "run")
    baseline = metrics["expr/constant_baseline"]
    # 0.729 against 0.055 when measured (1,000 steps; the default tree: its pauses of 1-2.7 s
    # leave 40 % of the frames silent, and 16 videos of 150 frames gave 0.166).
    assert metrics["expr/f1_macro"] > max(3 * baseline, baseline + 0.15), metrics
