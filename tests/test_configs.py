"""Every config (subfolders included) loads, documents its command, builds its model, and
every field can be set from the command line; config arguments parse big_vision style."""

import ml_collections
import pytest
from flax import nnx
from helpers import CONFIGS, config_module

from abaw_jax import config_lib
from abaw_jax import state as state_lib

PATHS = sorted(CONFIGS.rglob("*.py"))


def _fields(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("path", PATHS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_loads_with_its_command_and_overridable_fields(path):
    module = config_module(path)
    assert f"--config=configs/{path.relative_to(CONFIGS)}" in module.__doc__
    for arg in ("", "real"):
        config = module.get_config(arg)
        # ml_collections cannot override list fields from the command line: tuples instead.
        lists = [k for k, v in _fields(config) if isinstance(v, list)]
        assert not lists, f"{path.name}: list fields {lists} cannot be set with --config.x"
        # The model family exists and builds with the config's arguments (shapes only).
        if not config.data.features:
            nnx.eval_shape(lambda c=config: state_lib.build_model(
                c, state_lib.tasks.get(c.task), 0))


def test_arguments_parse_typed_and_unknown_keys_are_named():
    args = config_lib.parse_arg("real,task=au,seed=3", real=False, task="va", seed=0)
    assert (args.real, args.task, args.seed) == (True, "au", 3)
    assert config_lib.parse_arg("", real=False).real is False
    with pytest.raises(ValueError, match="unknown config argument 'size'.*known"):
        config_lib.parse_arg("size=3", real=False)
    with pytest.raises(ValueError, match="seed='x': expected int"):
        config_lib.parse_arg("seed=x", seed=0)
    config = config_lib.experiment("va", "task=au")
    assert config.task == "au" and config.total_steps == 600  # the AU settings follow the task
    assert config_lib.experiment("va", "real").model.name == "ddamfn"
