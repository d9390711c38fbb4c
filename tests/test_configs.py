"""Every config loads, documents its command, and every field can be set from the command line."""

import importlib.util
from pathlib import Path

import ml_collections
import pytest

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.py"))


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fields(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem != "common"], ids=lambda p: p.stem)
def test_config_loads_with_its_command_and_overridable_fields(path):
    module = _load(path)
    assert f"--config=configs/{path.name}" in module.__doc__
    for arg in ("", "real"):
        config = module.get_config(arg)
        # ml_collections cannot override list fields from the command line: tuples instead.
        lists = [k for k, v in _fields(config) if isinstance(v, list)]
        assert not lists, f"{path.name}: list fields {lists} cannot be set with --config.x"
