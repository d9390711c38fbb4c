"""Helpers shared by the tests (imported as `helpers`; no test file imports another)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from abaw_jax import checkpoint, config_lib, models, parallel
from abaw_jax import state as state_lib
from abaw_jax.data import features, records, schema


def tiny_config(records, task: str = "va", temporal: bool = False, **overrides
                ) -> ml_collections.ConfigDict:
    """A DDAMFN config of `task` on a records folder, 4 steps of batch 8, logging, evaluating and
    checkpointing every 2 steps; `overrides` by dotted key ("optim.lr": 0.1)."""
    c = config_lib.temporal(task) if temporal else config_lib.experiment(task)
    c.data.records = None if records is None else str(records)
    c.total_steps = 4
    c.batch_size = 8
    c.eval_batch_size = 16
    c.log_every_steps = 2
    c.eval_every_steps = 2
    c.checkpoint_every_steps = 2
    c.update_from_flattened_dict(overrides)
    return c


CONFIGS = Path(__file__).parents[1] / "configs"


def load_config(path: str | Path, arg: str = "") -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file (relative paths: under configs/)."""
    module = config_module(CONFIGS / path)
    return module.get_config(arg)


def config_module(path: Path):
    """A config file loaded as a module (they are files, not an importable package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_feature_cache(out: Path, splits: dict[str, Path], dim: int, seed: int) -> Path:
    """A feature cache (as `--mode=extract` writes it) of the records' frames of each split
    ({split: records folder}) with random embeddings of width `dim`."""
    rng = np.random.default_rng(seed)
    for name, data_dir in splits.items():
        index = records.read_frame_index(data_dir, name)
        source = records.RecordSource(data_dir, name)
        labels = {k: np.stack([source[i][k] for i in range(len(source))])
                  for k in schema.LABEL_KEYS}
        features.write_split(out, name, rng.normal(size=(len(index[1]), dim)), labels, *index,
                             shard_rows=50)
    features.write_meta(out, {"source": {}}, rng.normal(size=dim))
    return out


def parts(setup, params) -> tuple[dict, dict]:
    """(trained, frozen) parameters of a run as pure dicts."""
    trained, frozen = setup.split_params(params)
    return nnx.to_pure_dict(trained), nnx.to_pure_dict(frozen)


def optimizer_values(config, workdir: Path, setup) -> int:
    """How many values the optimizer state of a workdir's latest checkpoint holds."""
    ckpt = checkpoint.Checkpoints(Path(workdir) / "checkpoints", read_only=True)
    try:
        step = ckpt.resolve("latest")
        state = ckpt.restore(step, state_lib.abstract_state(config, setup))
    finally:
        ckpt.close()
    return sum(np.size(x) for x in jax.tree.leaves(state.opt_state))


def random_model(name: str, seed: int = 0, **kwargs) -> nnx.Module:
    """A concrete model of a registered family with random variables, built abstractly: no
    initialiser is compiled (an eager `models.build` of ddamfn_tiny compiles each of them,
    ~15 s on the busy 2-core machine). Kernels are normal with sd 1 / sqrt(fan-in) (the signal
    keeps its scale through the layers, so the outputs depend on the input), norm scales and
    BatchNorm variances uniform in [0.5, 1.5], everything else normal with sd 0.1 (random keys
    from `seed`, integer counters 0)."""
    model = nnx.eval_shape(lambda: models.build(name, **{"rngs": nnx.Rngs(0), **kwargs}))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        leaf = str(path[-1].key)
        if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):  # an nnx.RNN's keys, ...
            return jax.random.split(jax.random.key(seed), s.shape) if s.shape else \
                jax.random.key(seed)
        if not jnp.issubdtype(s.dtype, jnp.floating):  # ... and their counts
            return jnp.zeros(s.shape, s.dtype)
        if leaf == "kernel" and len(s.shape) > 1:
            values = rng.normal(0, 1 / np.sqrt(np.prod(s.shape[:-1])), s.shape)
        elif leaf in ("var", "scale"):
            values = rng.uniform(0.5, 1.5, s.shape)
        else:
            values = rng.normal(0, 0.1, s.shape)
        return jnp.asarray(values, s.dtype)

    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw,
                                                                     nnx.to_pure_dict(state)))
    nnx.update(model, state)
    return model


def on_one_device(patch) -> None:
    """Runs (train, evaluate, extract) build their mesh on the first device only, through
    `patch` (a pytest MonkeyPatch). For learning tests: with conftest's 8 fake devices on 2
    cores, each device's thread pays a loop's fixed costs (a CLIP+LSTM train step over 16 frames
    measured 20 ms on 1 device, 295 ms on 8; DDAMFN tiny 43 against 113 ms). The 8-device path
    is tested where sharding is the point."""
    make_mesh, first = parallel.make_mesh, jax.devices()[:1]
    patch.setattr(parallel, "make_mesh", lambda devices=None: make_mesh(
        first if devices is None else devices))
