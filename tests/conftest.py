"""Shared fixtures: a tiny synthetic Aff-Wild2 and its records, built once per test session."""

import os

# Before jax is imported anywhere: 8 fake CPU devices for sharding tests, and a persistent
# compilation cache so repeated test runs skip most XLA compiles.
# XLA:CPU aborts a collective whose 8 device threads have not all arrived within 40 s: on the
# shared 2-core machine under load (~5) a train step's all-reduce once waited longer (the CLIP+LSTM
# test, twice in full runs, never alone). Slow there is not wrong: wait up to 10 minutes.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=600 "
                      "--xla_cpu_collective_timeout_seconds=600")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(__file__), "..", ".cache", "jax"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
from helpers import on_one_device  # noqa: E402

from abaw_jax.data import affwild2, prepare, synthetic  # noqa: E402

TINY = synthetic.SyntheticSpec(num_videos=8, frames_per_video=60, seed=3, audio=False,
                               pair_fraction=0.3, second_root_fraction=0.3)


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory):
    """(root, manifest) of a tiny synthetic Aff-Wild2 with every kind of planted dirt."""
    root = tmp_path_factory.mktemp("affwild2")
    manifest = synthetic.generate(root, TINY)
    return root, manifest


@pytest.fixture(scope="session")
def tiny_records(tiny_tree, tmp_path_factory):
    """Records folder of the tiny tree's VA task: 3 train shards, 2 validation shards."""
    root, _ = tiny_tree
    out = tmp_path_factory.mktemp("records") / "va"
    layout = affwild2.Layout.discover(root)
    prepare.prepare(layout, "va", out, num_shards=3, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_task_records(tiny_tree, tiny_records, tmp_path_factory):
    """task -> records folder of the tiny tree for that task, each prepared once when first
    asked for (VA: `tiny_records`)."""
    root, _ = tiny_tree
    made = {"va": tiny_records}

    def get(task: str):
        if task not in made:
            out = tmp_path_factory.mktemp("records") / task
            prepare.prepare(affwild2.Layout.discover(root), task, out, num_shards=2, workers=1,
                            progress=False)
            made[task] = out
        return made[task]

    return get


@pytest.fixture
def one_device(monkeypatch):
    """This test's runs on the first device only (helpers.on_one_device says why)."""
    on_one_device(monkeypatch)


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory):
    """A data cache folder (for ABAW_JAX_CACHE) shared by the tests that run the default configs
    on their synthetic Aff-Wild2: each tree and its records are generated once per session, on
    first use (the default tree: ~10 s generated and prepared on the quiet machine)."""
    return tmp_path_factory.mktemp("cache")
