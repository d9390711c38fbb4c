"""Curation against the generator's planted counts, record round trips and the offset index."""

import json

import numpy as np
import pytest

from abaw_jax.data import affwild2, prepare, records
from abaw_jax.data.affwild2 import DataError


@pytest.mark.parametrize("task", affwild2.TASKS)
@pytest.mark.parametrize("split", affwild2.SPLITS)
def test_curation_counts_match_planted_dirt(tiny_tree, task, split):
    root, manifest = tiny_tree
    _, stats = affwild2.curate(affwild2.Layout.discover(root), task, split)
    want = manifest["counts"][task][split]
    assert stats["videos"] == want["videos"]
    assert stats["annotated"] == want["annotated"]
    assert stats["dropped"] == {"invalid_label": want["invalid"], "out_of_range": 0,
                                "not_finite": 0, "missing_image": want["missing_image"]}
    assert stats["curated"] == want["curated"]
    assert want["invalid"] > 0 and want["missing_image"] > 0  # the dirt is really there
    affwild2.check_accounting(stats)


@pytest.mark.parametrize("split", affwild2.SPLITS)
def test_mtl_masks_and_strict_filter(tiny_tree, split):
    root, manifest = tiny_tree
    want = manifest["counts"]["mtl"][split]
    layout = affwild2.Layout.discover(root)
    table, stats = affwild2.curate(layout, "mtl", split)
    assert stats["curated"] == want["curated"]
    assert stats["valid"] == want["valid"]
    assert stats["dropped"]["invalid_all"] == want["invalid_all"]
    strict, strict_stats = affwild2.curate(layout, "mtl", split, strict=True)
    assert strict_stats["curated"] == want["strict_curated"] < stats["curated"]
    assert strict.va_mask.all() and strict.expr_mask.all() and strict.au_mask.all()
    assert not table.expr_mask.all()  # per-task masks keep frames with an invalid expression


def test_test_split_lists_every_crop_of_test_videos(tiny_tree):
    root, manifest = tiny_tree
    table, stats = affwild2.curate(affwild2.Layout.discover(root), "va", "test")
    assert sorted(table.videos) == sorted(manifest["test"]["va"])
    want = sum(manifest["videos"][v]["num_frames"] - len(manifest["videos"][v]["missing"])
               for v in manifest["test"]["va"])
    assert len(table) == want and not table.va_mask.any()


def _annotation_rows(root, video, split):
    folder = root / "annotations/VA_Estimation_Challenge" / affwild2.SPLIT_DIRS[split]
    path = folder / f"{video}.txt"
    lines = path.read_text().splitlines()[1:]
    return [tuple(float(x) for x in line.split(",")) for line in lines if line.strip()]


def test_round_trip_bytes_and_labels(tiny_tree, tiny_records):
    """Every record holds the JPEG bytes exactly as on disk and the labels of its text line."""
    root, manifest = tiny_tree
    stats = json.loads((tiny_records / "stats.json").read_text())["splits"]
    for split in affwild2.SPLITS:
        source = records.RecordSource(tiny_records, split)
        assert len(source) == stats[split]["curated"] == manifest["counts"]["va"][split]["curated"]
        videos, video, frame = records.read_frame_index(tiny_records, split)
        seen = set()
        for i in range(len(source)):
            ex = source[i]
            name, number = ex["video"], int(ex["frame"])
            assert (name, number) == (videos[video[i]], frame[i])
            info = manifest["videos"][name]
            jpg = root / info["image_root"] / name / f"{number:05d}.jpg"
            assert ex["image"] == jpg.read_bytes()
            np.testing.assert_allclose(ex["va"], _annotation_rows(root, name, split)[number - 1])
            assert ex["va_mask"] and not ex["expr_mask"] and not ex["au_mask"]
            seen.add((name, number))
        assert len(seen) == len(source)


def test_random_access_agrees_with_sequential_reads(tiny_records):
    import grain

    source = records.RecordSource(tiny_records, "train")
    sequential = [bytes(r) for path in source.paths
                  for r in grain.experimental.TFRecordIterDataset(str(path))]
    assert len(sequential) == len(source)
    assert all(source.read(i) == sequential[i] for i in range(len(source)))
    order = np.random.default_rng(0).permutation(len(source))
    assert all(source.read(int(i)) == sequential[i] for i in order)


def test_tensorflow_reads_the_shards_and_checks_their_crcs(tiny_records, tmp_path):
    import tensorflow as tf

    source = records.RecordSource(tiny_records, "validation")
    got = [r.numpy() for r in tf.data.TFRecordDataset([str(p) for p in source.paths])]
    assert got == [source.read(i) for i in range(len(source))]
    bad = tmp_path / "bad.tfrecord"
    data = bytearray(source.paths[0].read_bytes())
    data[40] ^= 0xFF  # flip a byte inside the first record's payload
    bad.write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError):
        list(tf.data.TFRecordDataset([str(bad)]))


def test_train_split_is_shuffled_deterministically(tiny_tree, tmp_path):
    root, _ = tiny_tree
    layout = affwild2.Layout.discover(root)
    outs = [tmp_path / name for name in ("a", "b", "c")]
    for out, seed, workers in zip(outs, (0, 0, 1), (1, 2, 1), strict=True):
        prepare.prepare(layout, "va", out, splits=["train"], num_shards=2, seed=seed,
                        workers=workers, progress=False)
    shard = records.shard_name("train", "tfrecord", 1, 2)
    assert (outs[0] / shard).read_bytes() == (outs[1] / shard).read_bytes()  # workers don't matter
    assert (outs[0] / shard).read_bytes() != (outs[2] / shard).read_bytes()  # the seed does
    _, _, frames = records.read_frame_index(outs[0], "train")
    assert not np.all(np.diff(frames) >= 0)


def test_array_record_format_and_tfds_metadata(tiny_tree, tiny_records, tmp_path):
    import tensorflow_datasets as tfds

    root, _ = tiny_tree
    out = tmp_path / "ar"
    prepare.prepare(affwild2.Layout.discover(root), "va", out, fmt="array_record", num_shards=2,
                    workers=1, progress=False)
    ar = records.RecordSource(out, "validation")
    tf = records.RecordSource(tiny_records, "validation")
    assert ar.format == "array_record" and len(ar) == len(tf)
    assert all(ar.read(i) == tf.read(i) for i in range(len(ar)))
    builder = tfds.builder_from_directory(str(tiny_records))
    assert builder.info.splits["validation"].num_examples == len(tf)
    assert set(builder.info.features) == set(records.features())
    ds = tfds.builder_from_directory(str(out)).as_data_source(split="validation")
    assert ds[3]["frame"] == tf[3]["frame"]


def test_corrupt_jpeg_is_counted_and_named(tiny_tree, tmp_path):
    import shutil

    root, manifest = tiny_tree
    copy = tmp_path / "tree"
    shutil.copytree(root, copy)
    video = sorted(v for v, i in manifest["videos"].items()
                   if i["challenges"].get("va") == "train")[0]
    info = manifest["videos"][video]
    frame = next(f for f in range(1, info["num_frames"]) if f not in info["missing"])
    bad = copy / info["image_root"] / video / f"{frame:05d}.jpg"
    bad.write_bytes(bad.read_bytes()[:100])  # a truncated download
    stats = prepare.prepare(affwild2.Layout.discover(copy), "va", tmp_path / "out",
                            splits=["train"], workers=1, progress=False)["train"]
    assert stats["dropped"]["corrupt_image"] == 1
    assert stats["corrupt_images"] == [f"{bad}: not a complete JPEG"]
    assert stats["curated"] == manifest["counts"]["va"]["train"]["curated"] - 1 == stats["records"]


def test_broken_records_folder_errors(tiny_records, tmp_path):
    with pytest.raises(DataError, match="no dataset_info.json"):
        records.RecordSource(tmp_path, "train")
    with pytest.raises(DataError, match=r"no split 'test'"):
        records.RecordSource(tiny_records, "test")
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_records, copy)
    idx = copy / (records.shard_name("train", "tfrecord", 0, 3) + ".idx")
    idx.write_bytes(idx.read_bytes()[:-8])
    with pytest.raises(DataError, match=r"\.idx: index of .* does not match the shard"):
        records.RecordSource(copy, "train")


def test_a_test_list_naming_a_video_without_frames_is_an_error(tiny_tree, tmp_path):
    root, _ = tiny_tree
    layout = affwild2.Layout.discover(root)
    lists = tmp_path / "test_lists"
    lists.mkdir()
    (lists / "VA_Estimation_Challenge_test_set_release.txt").write_text("video2\nno_such_video\n")
    moved = affwild2.Layout(layout.annotations, layout.image_roots, tmp_path)
    with pytest.raises(affwild2.DataError, match="test video 'no_such_video' has no crops"):
        affwild2.curate(moved, "va", "test")


def test_a_label_changed_in_place_fails_its_crc_naming_shard_and_record(tiny_records, tmp_path):
    import shutil
    import struct

    copy = tmp_path / "va"
    shutil.copytree(tiny_records, copy)
    source = records.RecordSource(copy, "train")
    shard, local = source.paths[1], 2  # a record inside a shard, not at its start
    index = int(source._starts[1]) + local
    framed_at = int(source._offsets[1][local])
    data = bytearray(shard.read_bytes())
    label = struct.pack("<f", float(source[index]["va"][0]))
    at = data.index(label, framed_at + 12)  # the valence float inside this record's bytes
    data[at:at + 4] = struct.pack("<f", 0.5)  # still a valid valence: only the CRC can tell
    end = int(source._offsets[1][local + 1])
    assert records.parse(bytes(data[framed_at + 12:end - 4]))["va"][0] == 0.5  # the label itself
    shard.write_bytes(bytes(data))
    fresh = records.RecordSource(copy, "train")
    with pytest.raises(DataError, match=rf"{shard}: record {local} of this shard is corrupt "
                                        r"\(TFRecord data CRC mismatch\)"):
        fresh[index]
    untouched = records.RecordSource(tiny_records, "train")
    assert all(fresh.read(i) == untouched.read(i) for i in range(len(fresh)) if i != index)


def test_array_record_hash_errors_name_shard_and_record(tiny_tree, tmp_path):
    root, _ = tiny_tree
    out = tmp_path / "ar"
    prepare.prepare(affwild2.Layout.discover(root), "va", out, splits=["validation"],
                    fmt="array_record", num_shards=1, workers=1, progress=False)
    source = records.RecordSource(out, "validation")
    shard = source.paths[0]
    data = bytearray(shard.read_bytes())
    middle = len(data) // 3
    data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
    shard.write_bytes(bytes(data))
    damaged = records.RecordSource(out, "validation")
    errors = []
    for i in range(len(damaged)):
        try:
            damaged.read(i)
        except DataError as e:
            errors.append(str(e))
    assert errors and all(e.startswith(f"{shard}: record ") and "corrupt" in e for e in errors)


def test_the_task_is_written_and_else_read_from_the_data(tiny_tree, tiny_records, tmp_path):
    import shutil

    assert json.loads((tiny_records / records.METADATA_FILE).read_text()) == {"task": "va"}
    bare = tmp_path / "bare"
    shutil.copytree(tiny_records, bare)
    (bare / records.METADATA_FILE).unlink()
    (bare / "stats.json").unlink()
    assert records.written_task(bare) == "va"  # from the masks of the records
    root, _ = tiny_tree
    mtl = tmp_path / "mtl"
    prepare.prepare(affwild2.Layout.discover(root), "mtl", mtl, splits=["validation"], workers=1,
                    progress=False)
    (mtl / records.METADATA_FILE).unlink()
    (mtl / "stats.json").unlink()
    assert records.written_task(mtl) == "mtl"
