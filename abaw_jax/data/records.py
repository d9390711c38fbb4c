"""Curated frames as sharded records: the example schema, shard writers and a random-access source.

One record = one `tf.train.Example` (the TFDS serialisation of `features()`): the JPEG bytes
exactly as stored on disk, the video name, the 1-based frame number, the labels of every task and a
validity mask per task. A records folder is a TFDS dataset (`tfds.builder_from_directory(folder)`
reads it) plus, for TFRecord shards, one offset index per shard (`<shard>.idx`: little-endian int64
offsets of every record and of the end of file) that gives grain random access. ArrayRecord shards
need no index. `metadata.json` (TFDS's metadata file) names the task the records were curated for.

Every record read is verified: TFRecord's masked CRC32C of its length and of its data here,
ArrayRecord's (Riegeli's) chunk hashes by its reader. A corrupt record is a `DataError` naming
the shard and the record, never a silently wrong example.

Neither writing nor reading imports TensorFlow (a multi-second import in every worker).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import google_crc32c
import numpy as np

from abaw_jax.data import affwild2, schema
from abaw_jax.data.affwild2 import AU_NAMES, DataError, FrameTable

DATASET_NAME = "affwild2"
FORMATS = ("tfrecord", "array_record")
_TFRECORD_OVERHEAD = 16  # uint64 length + uint32 crc(length) + data + uint32 crc(data)
METADATA_FILE = "metadata.json"  # TFDS's; written with {"task": ...}


@functools.cache
def features():
    """The TFDS feature spec of one record (built lazily: importing TFDS takes half a second)."""
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "video": tfds.features.Text(),
        "frame": np.int32,
        "va": tfds.features.Tensor(shape=(2,), dtype=np.float32),
        "expr": np.int32,
        "au": tfds.features.Tensor(shape=(len(AU_NAMES),), dtype=np.int32),
        "va_mask": np.bool_,
        "expr_mask": np.bool_,
        "au_mask": np.bool_,
    })


def serialize(table: FrameTable, i: int, jpeg: bytes) -> bytes:
    """The serialised record of frame i of a curated table, in TFDS's encoding of `features()`
    (bytes for image and text, int64 for integers and booleans, float for VA).

    Built here rather than with `features().serialize_example`: protobuf map order is per
    process, so TFDS's serialisation differed between writer processes; deterministic=True
    makes the shards byte-identical for any number of workers (and it is several times faster).
    """
    example = _example_pb2().Example()
    feature = example.features.feature
    feature["image"].bytes_list.value.append(jpeg)
    feature["video"].bytes_list.value.append(table.videos[table.video[i]].encode())
    feature["frame"].int64_list.value.append(int(table.frame[i]))
    feature["va"].float_list.value.extend(table.va[i].tolist())
    feature["expr"].int64_list.value.append(int(table.expr[i]))
    feature["au"].int64_list.value.extend(table.au[i].tolist())
    for key in schema.MASKS:
        feature[key].int64_list.value.append(int(getattr(table, key)[i]))
    return example.SerializeToString(deterministic=True)


def parse(record: bytes) -> dict:
    """A serialised record -> dict of numpy values; `image` stays JPEG bytes, `video` a str.

    Reads the protobuf directly for this fixed schema: TFDS's generic numpy parser costs ~170 us
    per record, as much as decoding and augmenting the image; this costs ~20 us.
    """
    f = _example_pb2().Example.FromString(record).features.feature
    return {
        "image": f["image"].bytes_list.value[0],
        "video": f["video"].bytes_list.value[0].decode(),
        "frame": np.int32(f["frame"].int64_list.value[0]),
        "va": np.array(f["va"].float_list.value, np.float32),
        "expr": np.int32(f["expr"].int64_list.value[0]),
        "au": np.array(f["au"].int64_list.value, np.int32),
        **{k: np.bool_(f[k].int64_list.value[0]) for k in schema.MASKS},
    }


@functools.cache
def _example_pb2():
    from tensorflow_datasets.proto import tf_example_pb2  # the proto without TensorFlow

    return tf_example_pb2


# ----------------------------------------------------------------------------------------------
# Writing


def shard_name(split: str, fmt: str, shard: int, num_shards: int) -> str:
    """TFDS's default file name, so that `tfds.builder_from_directory` finds the shards."""
    return f"{DATASET_NAME}-{split}.{fmt}-{shard:05d}-of-{num_shards:05d}"


def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _unframe(framed: bytes, size: int) -> bytes:
    """The data of one framed TFRecord (`_frame_tfrecord`'s layout) after checking its CRCs;
    ValueError says what is wrong."""
    if len(framed) != size:
        raise ValueError(f"only {len(framed)} of its {size} bytes are readable")
    header, data = framed[:8], framed[12:-4]
    if framed[8:12] != _masked_crc(header) or struct.unpack("<Q", header)[0] != len(data):
        raise ValueError("its length or the length's CRC does not match the offset index")
    if framed[-4:] != _masked_crc(data):
        raise ValueError("TFRecord data CRC mismatch")
    return data


def _frame_tfrecord(record: bytes) -> bytes:
    """TFRecord framing: length, masked CRC32C of the length, data, masked CRC32C of the data.

    Written here rather than with TensorFlow's writer: importing TF costs each writer process
    ~6 s, longer than writing the default synthetic set. TF's reader checks these CRCs (tested).
    """
    header = struct.pack("<Q", len(record))
    return header + _masked_crc(header) + record + _masked_crc(record)


def write_shard(path: str | os.PathLike, records: Iterator[bytes], fmt: str) -> np.ndarray:
    """Writes one shard; returns the record sizes. TFRecord shards also get their `.idx`."""
    path = Path(path)
    sizes = []
    if fmt == "tfrecord":
        with open(path, "wb") as f:
            for record in records:
                f.write(_frame_tfrecord(record))
                sizes.append(len(record))
        offsets = np.concatenate([[0], np.cumsum(np.add(sizes, _TFRECORD_OVERHEAD))])
        offsets.astype("<i8").tofile(f"{path}.idx")
    elif fmt == "array_record":
        from array_record.python import array_record_module

        writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
        for record in records:
            writer.write(record)
            sizes.append(len(record))
        writer.close()
    else:
        raise ValueError(f"unknown record format {fmt!r}; expected one of {FORMATS}")
    return np.asarray(sizes, np.int64)


def write_metadata(out: Path, split_lengths: dict[str, list[int]], split_bytes: dict[str, int],
                   fmt: str, task: str, description: str) -> None:
    """TFDS metadata (dataset_info.json, features.json, metadata.json with the task) for the
    shards already in `out`."""
    import tensorflow_datasets as tfds

    template = tfds.core.ShardedFileTemplate(
        data_dir=out, dataset_name=DATASET_NAME, filetype_suffix=fmt,
        template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
    splits = [tfds.core.SplitInfo(name=s, shard_lengths=lengths, num_bytes=split_bytes[s],
                                  filename_template=template)
              for s, lengths in split_lengths.items()]
    tfds.folder_dataset.write_metadata(data_dir=out, features=features(), split_infos=splits,
                                       filename_template=template, check_data=False,
                                       description=description,
                                       metadata=tfds.core.MetadataDict(task=task))


# ----------------------------------------------------------------------------------------------
# Reading


def read_info(data_dir: str | os.PathLike) -> dict:
    """The record format and, per split, its shard paths and lengths (from dataset_info.json)."""
    data_dir = Path(data_dir)
    info_path = data_dir / "dataset_info.json"
    if not info_path.is_file():
        raise DataError(f"{data_dir}: not a records folder (no dataset_info.json); write one with "
                        "`python -m abaw_jax.data.prepare`")
    info = json.loads(info_path.read_text())
    fmt = "array_record" if "array" in info.get("fileFormat", "tfrecord").lower() else "tfrecord"
    splits = {}
    for split in info.get("splits", []):
        lengths = [int(n) for n in split.get("shardLengths", [])]
        paths = [data_dir / shard_name(split["name"], fmt, i, len(lengths))
                 for i in range(len(lengths))]
        splits[split["name"]] = {"paths": paths, "lengths": lengths}
    return {"format": fmt, "splits": splits}


def written_task(data_dir: str | os.PathLike, sample: int = 256) -> str | None:
    """The task a records folder was curated for: from its metadata.json, else (folders written
    before it existed) its stats.json, else from the data: the tasks whose validity mask is set
    in the first `sample` records of a labelled split (one task -> it; several -> mtl). None when
    nothing says (a folder with only the test split, which has no labels)."""
    data_dir = Path(data_dir)
    for name in (METADATA_FILE, "stats.json"):
        path = data_dir / name
        if path.is_file() and "task" in (written := json.loads(path.read_text())):
            return written["task"]
    splits = read_info(data_dir)["splits"]
    for split in ("train", "validation"):
        if split in splits:
            source = RecordSource(data_dir, split)
            examples = [source[i] for i in range(min(sample, len(source)))]
            source.close()
            tasks = [head for head, mask in zip(schema.HEADS, schema.MASKS, strict=True)
                     if any(ex[mask] for ex in examples)]
            if tasks:
                return tasks[0] if len(tasks) == 1 else "mtl"
    return None


class RecordSource:
    """Random access to the records of one split: `len`, and `source[i]` -> parsed example.

    Picklable (file handles open lazily in each process), so grain can hand it to its workers.
    """

    # Check TFRecord CRCs on every read. Off only in benchmarks/pipeline.py, to print its cost.
    verify: bool = True

    def __init__(self, data_dir: str | os.PathLike, split: str):
        info = read_info(data_dir)
        if split not in info["splits"]:
            raise DataError(f"{data_dir}: no split {split!r}; it has {sorted(info['splits'])}")
        self.data_dir, self.split, self.format = Path(data_dir), split, info["format"]
        self.paths: list[Path] = info["splits"][split]["paths"]
        lengths = info["splits"][split]["lengths"]
        self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._offsets = [self._load_index(p, n) for p, n in zip(self.paths, lengths, strict=True)]
        self._files: dict[int, object] = {}

    def _load_index(self, path: Path, n: int) -> np.ndarray | None:
        if not path.is_file():
            raise DataError(f"{path}: shard listed in dataset_info.json is missing")
        if self.format != "tfrecord":
            return None
        idx = Path(f"{path}.idx")
        if not idx.is_file():
            raise DataError(f"{idx}: offset index missing; rewrite the records with prepare")
        offsets = np.fromfile(idx, "<i8")
        if len(offsets) != n + 1 or offsets[-1] != path.stat().st_size:
            raise DataError(f"{idx}: index of {len(offsets) - 1} records does not match the shard "
                            f"({n} records, {path.stat().st_size} bytes)")
        return offsets

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}

    def read(self, index: int) -> bytes:
        """The serialised record at a global index, its checksums verified."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        local = index - int(self._starts[shard])
        if self.format == "array_record":
            try:
                return self._file(shard).read([local])[0]
            except RuntimeError as e:  # Riegeli's "chunk data hash mismatch" and kin
                raise self._corrupt(shard, local, str(e).split(";")[0]) from None
        start, end = self._offsets[shard][local], self._offsets[shard][local + 1]
        framed = os.pread(self._file(shard), int(end - start), int(start))
        if not self.verify:
            return framed[12:-4]
        try:
            return _unframe(framed, int(end - start))
        except ValueError as e:
            raise self._corrupt(shard, local, str(e)) from None

    def _corrupt(self, shard: int, local: int, why: str) -> DataError:
        return DataError(f"{self.paths[shard]}: record {local} of this shard is corrupt ({why}); "
                         "write the records again with prepare")

    def _file(self, shard: int):
        if shard not in self._files:
            path = str(self.paths[shard])
            if self.format == "array_record":
                from array_record.python import array_record_module

                self._files[shard] = array_record_module.ArrayRecordReader(
                    path, "readahead_buffer_size:0")
            else:
                self._files[shard] = os.open(path, os.O_RDONLY)
        return self._files[shard]

    def __getitem__(self, index: int) -> dict:
        return parse(self.read(index))

    def __repr__(self) -> str:
        return f"RecordSource({str(self.data_dir)!r}, {self.split!r}, {len(self)} records)"

    def close(self) -> None:
        for f in self._files.values():
            if isinstance(f, int):
                os.close(f)
            else:
                f.close()
        self._files = {}



def frames_path(data_dir: str | os.PathLike, split: str) -> Path:
    return Path(data_dir) / f"frames-{split}.npz"


def write_frame_index(data_dir: Path, split: str, table: FrameTable, order: np.ndarray) -> None:
    """(video, frame) of every record in record order, so clips and per-video outputs need no
    pass over the images."""
    np.savez(frames_path(data_dir, split), videos=np.asarray(table.videos, dtype=str),
             video=table.video[order], frame=table.frame[order], video_frames=table.video_frames)


@dataclasses.dataclass(frozen=True)
class Subset:
    """Some videos of one or more splits, read as one split (cross-validation folds:
    data/folds.py): the records of each part's videos in their split's record order, part after
    part. The split readers here and the pipeline's take one wherever they take a split name;
    nothing is written for it. `name` names it in logs, stream states and output folders."""

    name: str
    parts: tuple[tuple[str, tuple[str, ...]], ...]  # (split, the names of its videos)

    def __str__(self) -> str:
        return self.name


Split = str | Subset  # what the split readers take


def whole_splits(data_dir: str | os.PathLike, splits: Sequence[str]) -> Split:
    """Every record of `splits` read as one split (MAE pretraining on train + validation): the
    split itself when there is one, else the Subset of all their videos, named "a,b"."""
    if len(splits) == 1:
        return splits[0]
    return Subset(",".join(splits),
                  tuple((s, tuple(read_frame_index(data_dir, s)[0])) for s in splits))


def subset_rows(data_dir: str | os.PathLike, subset: Subset) -> list[tuple[str, np.ndarray]]:
    """(split, its record indices in the subset) of each part, in the subset's record order."""
    out = []
    for split, names in subset.parts:
        videos, video, _ = read_frame_index(data_dir, split)
        out.append((split, np.flatnonzero(_kept_videos(videos, names)[video])))
    return out


def _kept_videos(videos: list[str], names: tuple[str, ...]) -> np.ndarray:
    return np.isin(np.asarray(videos, dtype=str), np.asarray(names, dtype=str))


def read_frame_index(data_dir: str | os.PathLike, split: Split) -> tuple[list[str], np.ndarray,
                                                                          np.ndarray]:
    """Video names, and per record its video index and frame number."""
    if isinstance(split, Subset):
        return _subset_frame_index(data_dir, split)
    with np.load(_frames_file(data_dir, split)) as z:
        return z["videos"].tolist(), z["video"], z["frame"]


def _subset_frame_index(data_dir: str | os.PathLike, subset: Subset
                        ) -> tuple[list[str], np.ndarray, np.ndarray]:
    names: list[str] = []
    video, frame = [np.zeros(0, np.int32)], [np.zeros(0, np.int32)]
    for split, wanted in subset.parts:
        videos, v, f = read_frame_index(data_dir, split)
        kept = np.flatnonzero(_kept_videos(videos, wanted))
        remap = np.full(len(videos), -1, np.int64)
        remap[kept] = np.arange(len(names), len(names) + len(kept))
        names += [videos[i] for i in kept]
        rows = np.flatnonzero(remap[v] >= 0)  # as `subset_rows`
        video.append(remap[v[rows]].astype(v.dtype))
        frame.append(f[rows])
    return names, np.concatenate(video), np.concatenate(frame)


def read_video_frames(data_dir: str | os.PathLike, split: Split) -> dict[str, int]:
    """Frames of each video of a split (all of them, with or without a record)."""
    if isinstance(split, Subset):
        return {name: n for part, wanted in split.parts
                for name, n in read_video_frames(data_dir, part).items() if name in wanted}
    with np.load(_frames_file(data_dir, split)) as z:
        return dict(zip(z["videos"].tolist(), z["video_frames"].tolist(), strict=True))


def _frames_file(data_dir: str | os.PathLike, split: str) -> Path:
    path = frames_path(data_dir, split)
    if not path.is_file():
        raise DataError(f"{path}: frame index missing; rewrite the records with prepare")
    return path


# ----------------------------------------------------------------------------------------------
# The labels of every annotation line (the organisers' scoring frames)

LABELS_FORMAT = 1


def labels_path(data_dir: str | os.PathLike, split: str) -> Path:
    return Path(data_dir) / f"labels-{split}.npz"


def has_labels(data_dir: str | os.PathLike, split: Split) -> bool:
    """Whether the split (each split of a subset) has its labels file."""
    parts = [p for p, _ in split.parts] if isinstance(split, Subset) else [split]
    return all(labels_path(data_dir, p).is_file() for p in parts)


def array_crc(x: np.ndarray) -> str:
    """The records' masked CRC32C of an array's dtype, shape and bytes (the labels files, the
    audio table)."""
    x = np.ascontiguousarray(x)
    return _masked_crc(f"{x.dtype.str}{x.shape}".encode() + x.tobytes()).hex()


def write_labels(data_dir: Path, split: str, annotated: affwild2.Annotated) -> None:
    """`labels-<split>.npz`: the videos, per-video line offsets, one array per task of the label
    of every annotation line (its invalid marker where it has none), the lines' frames only when
    they are not 1..n per video (s-Aff-Wild2 lists images), and the CRC32C of each array."""
    arrays = {"videos": np.asarray(annotated.videos, dtype=str), "offsets": annotated.offsets,
              **annotated.labels}
    if not np.array_equal(annotated.frame,
                          affwild2.line_frames(np.diff(annotated.offsets))):
        arrays["frame"] = annotated.frame
    meta = {"format": LABELS_FORMAT, "crc32c": {k: array_crc(v) for k, v in arrays.items()}}
    np.savez(labels_path(data_dir, split), meta=np.asarray(json.dumps(meta)), **arrays)


def read_labels(data_dir: str | os.PathLike, split: Split) -> affwild2.Annotated:
    """Every annotation line of a labelled split (`write_labels`), each array checked against its
    CRC32C; a missing, unreadable or corrupt file is a `DataError` naming it. A subset: the
    lines of its videos, part after part."""
    if isinstance(split, Subset):
        return _subset_labels(data_dir, split)
    path = labels_path(data_dir, split)
    again = "write the records again with prepare"
    if not path.is_file():
        raise DataError(f"{path}: missing (records written before it was kept); {again}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        crcs = json.loads(str(arrays.pop("meta")))["crc32c"]
        bad = sorted(k for k in crcs.keys() | arrays.keys()
                     if k not in crcs or k not in arrays or array_crc(arrays[k]) != crcs[k])
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e}); {again}") from None
    if bad:
        raise DataError(f"{path}: corrupt ({', '.join(bad)}: CRC32C mismatch); {again}")
    offsets = arrays.pop("offsets")
    frame = arrays.pop("frame", None)
    labels = {t: v for t, v in arrays.items() if t in affwild2.ANNOTATED_DTYPES}
    return affwild2.Annotated(
        arrays["videos"].tolist(), offsets,
        affwild2.line_frames(np.diff(offsets)) if frame is None else frame, labels,
        {t: affwild2.valid_mask(t, v) for t, v in labels.items()})


def _subset_labels(data_dir: str | os.PathLike, subset: Subset) -> affwild2.Annotated:
    videos, rows, parts = [], [], []
    for split, wanted in subset.parts:
        annotated = read_labels(data_dir, split)
        kept = np.flatnonzero(_kept_videos(annotated.videos, wanted))
        videos += [annotated.videos[i] for i in kept]
        rows += [np.arange(annotated.offsets[i], annotated.offsets[i + 1]) for i in kept]
        parts.append((annotated, np.concatenate([np.zeros(0, np.int64)]
                                                + rows[len(rows) - len(kept):])))
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return affwild2.Annotated(
        videos, offsets, np.concatenate([a.frame[r] for a, r in parts]),
        {t: np.concatenate([a.labels[t][r] for a, r in parts]) for t in parts[0][0].labels},
        {t: np.concatenate([a.masks[t][r] for a, r in parts]) for t in parts[0][0].masks})
