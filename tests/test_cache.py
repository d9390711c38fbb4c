"""Where a run's records come from: a records folder, a prepared root, or the synthetic default."""

import pytest

from abaw_jax.data import cache
from abaw_jax.data.affwild2 import DataError


def test_records_folder_is_used_as_is(tiny_records):
    assert cache.records_for({"records": str(tiny_records)}, "va") == tiny_records
    assert cache.records_for({"records": str(tiny_records.parent)}, "va") == tiny_records
    with pytest.raises(DataError, match="no records of task 'au'"):
        cache.records_for({"records": str(tiny_records)}, "au")


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


def test_synthetic_default(tmp_path, monkeypatch):
    monkeypatch.setenv("ABAW_JAX_CACHE", str(tmp_path))
    spec = {"num_videos": 4, "frames_per_video": 40, "seed": 5}
    out = cache.records_for({"synthetic": spec}, "va")
    assert (out / "dataset_info.json").is_file()
    assert cache.records_for({"synthetic": spec}, "va") == out
    assert not list(tmp_path.glob("*.tmp-*"))  # the private build folders were renamed away
