"""Where a run's records come from: a records folder, a prepared root, or the synthetic default."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from abaw_jax.data import cache, records
from abaw_jax.data.affwild2 import DataError

ROOT = Path(__file__).parents[1]


def test_records_folder_is_used_as_is(tiny_records):
    assert cache.records_for({"records": str(tiny_records)}, "va") == tiny_records
    assert cache.records_for({"records": str(tiny_records.parent)}, "va") == tiny_records
    with pytest.raises(DataError, match="no records of task 'au'"):
        cache.records_for({"records": str(tiny_records)}, "au")


def test_records_of_another_task_are_refused_without_stats(tiny_records, tmp_path):
    copy = tmp_path / "va"
    shutil.copytree(tiny_records, copy)
    (copy / "stats.json").unlink()  # the task is still in metadata.json
    with pytest.raises(DataError, match=r"no records of task 'au' \(it holds records of task 'va'"):
        cache.records_for({"records": str(copy)}, "au")
    (copy / records.METADATA_FILE).unlink()  # a folder written before metadata.json: the data
    with pytest.raises(DataError, match=r"no records of task 'au' \(it holds records of task 'va'"):
        cache.records_for({"records": str(copy)}, "au")
    assert cache.records_for({"records": str(copy)}, "va") == copy


def test_root_is_prepared_once_into_the_cache(tiny_tree, tmp_path, monkeypatch):
    monkeypatch.setenv("ABAW_JAX_CACHE", str(tmp_path / "cache"))
    root, manifest = tiny_tree
    first = cache.records_for({"root": str(root)}, "expr")
    assert first.parent.parent == tmp_path / "cache" and (first / "dataset_info.json").is_file()
    stamp = (first / "stats.json").stat().st_mtime_ns
    assert cache.records_for({"root": str(root)}, "expr") == first
    assert (first / "stats.json").stat().st_mtime_ns == stamp  # not rebuilt
    strict = cache.records_for({"root": str(root), "strict": True}, "mtl")
    assert strict.parent != first.parent  # different options, different cache entry


def _record(data_dir: Path, video: str, frame: int) -> dict:
    videos, video_of, frames = records.read_frame_index(data_dir, "train")
    source = records.RecordSource(data_dir, "train")
    return next(source[i] for i in range(len(source))
                if videos[video_of[i]] == video and frames[i] == frame)


def test_a_fixed_annotation_or_crop_is_prepared_again(tiny_tree, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ABAW_JAX_CACHE", str(tmp_path / "cache"))
    tree, manifest = tmp_path / "tree", tiny_tree[1]
    shutil.copytree(tiny_tree[0], tree)
    first = cache.records_for({"root": str(tree)}, "va")
    former = first.parent / "va"  # the records where the cache put them before content keys
    shutil.copytree(first, former)
    (former / cache.SOURCE_FILE).unlink()
    example = records.RecordSource(first, "train")[0]
    video, frame = example["video"], int(example["frame"])
    annotation = f"annotations/VA_Estimation_Challenge/Train_Set/{video}.txt"
    lines = (tree / annotation).read_bytes().split(b"\n")  # data line i is frame i
    lines[frame] = b"0.125,-0.5" + (b"\r" if lines[frame].endswith(b"\r") else b"")
    (tree / annotation).write_bytes(b"\n".join(lines))
    with caplog.at_level("INFO"):
        second = cache.records_for({"root": str(tree)}, "va")
    assert second != first and list(_record(second, video, frame)["va"]) == [0.125, -0.5]
    assert f"because the data changed since {first.name} was prepared (1 changed: " \
           f"{annotation})" in caplog.text

    crops = manifest["videos"][video]["image_root"] + "/" + video
    crop, other = tree / crops / f"{frame:05d}.jpg", tree / crops / f"{frame + 1:05d}.jpg"
    fixed = other.read_bytes()
    with open(crop, "wb") as f:  # rewritten in place: the folder's own mtime does not change
        f.write(fixed)
    with caplog.at_level("INFO"):
        third = cache.records_for({"root": str(tree)}, "va")
    assert third not in (first, second) and _record(third, video, frame)["image"] == fixed
    assert f"(1 changed: {crops}/)" in caplog.text
    assert cache.records_for({"root": str(tree)}, "va") == third  # unchanged: reused
    assert sorted(third.parent.glob("va*")) == sorted([second, third])  # the oldest removed


def test_synthetic_default_says_what_it_does(tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv("ABAW_JAX_CACHE", str(tmp_path))
    spec = {"num_videos": 4, "frames_per_video": 40, "seed": 5}
    with caplog.at_level("INFO"):
        out = cache.records_for({"synthetic": spec}, "va")
    assert (out / "dataset_info.json").is_file()
    assert "generating the synthetic Aff-Wild2 (4 videos) in" in caplog.text
    assert f"preparing the train/validation records of task va from {tmp_path}" in caplog.text
    assert "train records: 100%" in capfd.readouterr().err  # the progress bar
    assert cache.records_for({"synthetic": spec}, "va") == out
    assert not list(tmp_path.glob("**/*.tmp-*"))  # the private build folders were renamed away


_SLOW_BUILD = """
import os, sys, time
from abaw_jax.data import cache, prepare
os.cpu_count = lambda: 2  # prepare's writer pool, even on a 1-core machine
write_split, calls = prepare.write_split, []

def slow_write_split(*args, **kwargs):  # the train shards are written; hold before validation
    calls.append(args)
    if len(calls) == 2:
        time.sleep(600)
    return write_split(*args, **kwargs)

prepare.write_split = slow_write_split
cache.records_for({"root": sys.argv[1]}, "va")
"""


def test_sigterm_while_the_cache_is_built_leaves_nothing_behind(tiny_tree, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("ABAW_JAX_CACHE", str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, str(tiny_tree[0])], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300  # a busy machine: wait for the state, not a time
        while not list(tmp_path.glob("records-*/va*.tmp-*/frames-train.npz")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.2)
        tmp = next(tmp_path.glob("records-*/va*.tmp-*"))
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2  # the writer pool is up
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "SIGTERM while building" in output
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive and not tmp.exists()

    tmp.mkdir()  # as a build killed with SIGKILL would leave it (its process is gone)
    done = cache.records_for({"root": str(tiny_tree[0])}, "va")
    assert not tmp.exists() and list(tmp_path.glob("records-*/*")) == [done]
