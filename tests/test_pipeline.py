"""grain pipelines: per-process shards, complete eval, clips, exact resume, decode errors."""

import json

import numpy as np
import pytest
from helpers import fake_feature_cache

from abaw_jax.data import augment, features, pipeline, records, schema
from abaw_jax.data.affwild2 import DataError

AUG = augment.AugmentConfig(size=32)


def _take(stream, n):
    try:
        return [{k: np.array(v) for k, v in next(stream).items()} for _ in range(n)]
    finally:
        stream.close()


def test_processes_share_each_global_batch_exactly_as_one_process_reads_it(tiny_records):
    n = len(records.RecordSource(tiny_records, "train"))
    count, batch = 3, 4
    steps = 2 * n // (count * batch) + 2  # a little over two epochs
    one = _take(pipeline.train_dataset(tiny_records, "train", batch_size=count * batch, seed=7,
                                       augment_cfg=AUG), steps)
    parts = [_take(pipeline.train_dataset(tiny_records, "train", batch_size=batch, seed=7,
                                          augment_cfg=AUG, shard=pipeline.Shard(p, count)), steps)
             for p in range(count)]
    for b in range(steps):  # same records, same augmentation, in process order
        for key in ("index", "image", "va"):
            np.testing.assert_array_equal(
                np.concatenate([parts[p][b][key] for p in range(count)]), one[b][key])
    # Every record once per epoch, a new order every epoch.
    index = np.concatenate([b["index"] for b in one])
    assert 2 * n < len(index) and sorted(index[:n]) == list(range(n))
    assert list(index[n:]) != list(index[: len(index) - n])
    assert sorted(index[n: 2 * n]) == list(range(n))


def test_batches_hold_labels_of_their_records(tiny_records):
    source = records.RecordSource(tiny_records, "train")
    (b,) = _take(pipeline.train_dataset(tiny_records, "train", batch_size=8, seed=0,
                                        augment_cfg=AUG), 1)
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8
    for j, i in enumerate(b["index"]):
        np.testing.assert_array_equal(b["va"][j], source[int(i)]["va"])
        assert b["va_mask"][j]


def test_several_splits_shuffle_together_as_one(tiny_records):
    # One epoch of train + validation holds each record of both once, their labels with them.
    sources = {s: records.RecordSource(tiny_records, s) for s in ("train", "validation")}
    va = np.concatenate([np.stack([src[i]["va"] for i in range(len(src))])
                         for src in sources.values()])
    both = records.whole_splits(tiny_records, ("train", "validation"))
    stream = pipeline.train_dataset(tiny_records, both, batch_size=len(va), seed=3,
                                    augment_cfg=augment.AugmentConfig(
                                        size=8, flip=0, affine_prob=0, erase_prob=0))
    state = json.loads(stream.get_state())
    assert state["split"] == "train,validation" and state["records"] == len(va)
    (b,) = _take(stream, 1)
    assert sorted(b["index"].tolist()) == list(range(len(va)))  # each record once ...
    np.testing.assert_array_equal(b["va"], va[b["index"]])  # ... with its labels
    assert b["index"].tolist() != list(range(len(va)))  # shuffled
    assert records.whole_splits(tiny_records, ("train",)) == "train"


@pytest.mark.parametrize("count", [1, 3])
def test_eval_yields_every_record_once_in_order(tiny_records, count):
    n = len(records.RecordSource(tiny_records, "validation"))
    batches = []
    for p in range(count):
        ds = pipeline.eval_dataset(tiny_records, "validation", batch_size=16, size=32,
                                   shard=pipeline.Shard(p, count))
        got = [{k: np.array(v) for k, v in b.items()} for b in ds]
        assert len(got) == pipeline.eval_steps(n, 16, count)  # the same on every process
        batches += got
    index = np.concatenate([b["index"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(index[mask], np.arange(n))
    assert (index[~mask] == -1).all()
    assert not np.concatenate([b["va_mask"] for b in batches])[~mask].any()


def test_iterator_state_restores_the_exact_next_batch(tiny_records):
    it = pipeline.train_dataset(tiny_records, "train", batch_size=4, seed=1, augment_cfg=AUG)
    for _ in range(5):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    it.close()
    # A fresh pipeline, even with worker processes, continues from the saved state.
    fresh = pipeline.train_dataset(tiny_records, "train", batch_size=4, seed=1, augment_cfg=AUG,
                                   loader=pipeline.Loader(num_workers=2))
    fresh.set_state(state)
    got = [{k: np.array(v) for k, v in next(fresh).items()} for _ in range(3)]
    fresh.close()
    for w, g in zip(want, got, strict=True):
        for k in w:
            np.testing.assert_array_equal(w[k], g[k], err_msg=k)
    other = pipeline.train_dataset(tiny_records, "train", batch_size=4, seed=2, augment_cfg=AUG)
    with pytest.raises(DataError, match=r"differs from this one.*'seed': \(1, 2\)"):
        other.set_state(state)


def test_stream_state_goes_through_grain_orbax_handler(tiny_records, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    it = pipeline.train_dataset(tiny_records, "train", batch_size=4, seed=1, augment_cfg=AUG)
    next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        want = next(it)
        fresh = pipeline.train_dataset(tiny_records, "train", batch_size=4, seed=1,
                                       augment_cfg=AUG)
        mngr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(next(fresh)["index"], want["index"])
    it.close()
    fresh.close()


def test_clips_stay_in_one_video_and_cover_every_frame(tiny_records):
    videos, video, frame = records.read_frame_index(tiny_records, "validation")
    clips = pipeline.clip_index(video, frame, length=10, stride=4)
    for clip in clips:
        rows = clip[clip >= 0]
        assert len(set(video[rows])) == 1
        present = np.flatnonzero(clip >= 0)
        # consecutive frame numbers: frame(pos) - pos is constant over the clip
        assert len(set(frame[rows] - present)) == 1
    assert set(clips[clips >= 0]) == set(range(len(frame)))
    assert (clips < 0).any()  # missing crops inside a window are masked, not skipped


def test_a_video_shorter_than_the_clip_is_one_padded_clip():
    video, frame = np.array([0, 0, 0, 1, 1]), np.array([1, 2, 4, 1, 2])
    clips = pipeline.clip_index(video, frame, length=6, stride=2)
    np.testing.assert_array_equal(clips, [[0, 1, -1, 2, -1, -1], [3, 4, -1, -1, -1, -1]])


def _splits(data_dir):
    return {"train": data_dir, "validation": data_dir}


def test_frames_of_several_feature_caches_without_images(tiny_records, tmp_path):
    a = fake_feature_cache(tmp_path / "a", _splits(tiny_records), 4, 0)
    b = fake_feature_cache(tmp_path / "b", _splits(tiny_records), 3, 1)
    (batch,) = _take(pipeline.train_dataset(tiny_records, "train", batch_size=8, seed=0,
                                            augment_cfg=None, features=(a, b)), 1)
    assert "image" not in batch and batch["features"].shape == (8, 7)
    source = records.RecordSource(tiny_records, "train")
    sa, sb = features.FeatureSource(a, "train"), features.FeatureSource(b, "train")
    for row, i in zip(batch["features"], batch["index"], strict=True):
        np.testing.assert_allclose(row, np.concatenate([sa.embeddings(i), sb.embeddings(i)]))
        np.testing.assert_array_equal(batch["va"][list(batch["index"]).index(i)],
                                      source[int(i)]["va"])
    ev = list(pipeline.eval_dataset(tiny_records, "validation", batch_size=16, size=32,
                                    features=(a,)))
    assert ev[0]["image"].shape == (16, 32, 32, 3) and ev[0]["features"].shape == (16, 4)
    pad = ev[-1]["index"] < 0  # padding rows: the cache's padding embedding
    np.testing.assert_allclose(ev[-1]["features"][pad], np.repeat(sa.pad[None], pad.sum(), 0))
    other = tmp_path / "other"  # a cache of other frames is refused
    fake_feature_cache(other, _splits(tiny_records), 4, 2)
    (other / "validation" / "frames.npz").unlink()
    features.write_split(other, "validation", np.zeros((3, 4)),
                         {k: v[:3] for k, v in np.load(a / "validation/frames.npz").items()
                          if k in schema.LABEL_KEYS}, ["x"], np.zeros(3, int), np.arange(3))
    with pytest.raises(DataError, match="cached features are of other frames"):
        pipeline.eval_dataset(tiny_records, "validation", batch_size=16, size=0,
                              features=(other,))


def test_clip_batches(tiny_records):
    (b,) = _take(pipeline.clip_train_dataset(tiny_records, "train", length=6, stride=3,
                                             batch_size=2, seed=0, augment_cfg=AUG), 1)
    assert b["image"].shape == (2, 6, 32, 32, 3) and b["va"].shape == (2, 6, 2)
    missing = b["index"] < 0
    assert not b["va_mask"][missing].any() and (b["image"][missing] == 0).all()
    ev = pipeline.clip_eval_dataset(tiny_records, "validation", length=6, stride=3,
                                    batch_size=4, size=32)
    assert sum(int(np.sum(e["mask"])) for e in ev) == len(
        pipeline.clip_index(*records.read_frame_index(tiny_records, "validation")[1:], 6, 3))


def test_undecodable_image_names_the_record(tiny_records):
    class Broken:
        split = "train"

        def __getitem__(self, i):
            return {"image": b"not a jpeg", "video": "vid_left", "frame": np.int32(12)}

    reader = pipeline.FrameReader(tiny_records, "train", size=32)
    reader.records = Broken()
    with pytest.raises(augment.ImageDecodeError, match=r"train record 0 \(vid_left/00012\.jpg\)"):
        reader(0)
