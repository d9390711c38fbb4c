"""Public checkpoints -> abaw_jax weights: `python -m abaw_jax.convert <family> [flags]`.

Each family's converter is a module here with `main(argv) -> exit status` that maps the public
checkpoint's keys onto the family's NNX state and writes it with `save`. Every converted folder
has the same form, so one `load_into` restores any of them (a family's `load_weights`):

  DIR/state       an Orbax StandardCheckpointer pytree: the pure dict of `nnx.state(model)`
  DIR/meta.json   family, model (registry name), model_kwargs, outputs, source, unused_keys
"""

from __future__ import annotations

import collections
import importlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from abaw_jax.errors import NotFoundError, UserError, WeightsError

FAMILIES = {"ddamfn": "abaw_jax.convert.ddamfn", "clip": "abaw_jax.convert.clip",
            "mae": "abaw_jax.convert.mae"}

USAGE = f"usage: python -m abaw_jax.convert {{{','.join(FAMILIES)}}} [flags] (--help per family)"

STATE_DIR = "state"
META_FILE = "meta.json"
TASKS = "tasks."  # path prefix of the task layers, which load_into may leave initialised


def main(argv: Sequence[str]) -> int:
    """Dispatch to the family named by argv[0]; returns the exit status (1 and one `error:`
    line for a bad file, a missing key or an existing output)."""
    if not argv or argv[0] not in FAMILIES:
        given = f"unknown family {argv[0]!r}; " if argv and not argv[0].startswith("-") else ""
        print(f"{given}{USAGE}")
        return 2
    try:
        return importlib.import_module(FAMILIES[argv[0]]).main(argv[1:])
    except (KeyError, ValueError, FileExistsError, FileNotFoundError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def dotted(keypath) -> str:
    """A pytree key path as 'a.0.b'."""
    return ".".join(str(k.key) for k in keypath)


def grouped(keys: Sequence[str]) -> str:
    """'335: features (330), fc (2), ...': a count per first name, not a line per key."""
    if not keys:
        return "none"
    groups = collections.Counter(k.split(".")[0] for k in keys)
    return f"{len(keys)}: " + ", ".join(f"{g} ({n})" for g, n in groups.most_common())


def flatten(tree) -> dict[str, Any]:
    return {dotted(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def save(out_dir: str | Path, state: dict, meta: Mapping[str, Any], *,
         overwrite: bool = False) -> Path:
    """Write `state` (Orbax, out_dir/state) and `meta` (out_dir/meta.json); returns out_dir."""
    out = Path(out_dir).resolve()
    if (out / STATE_DIR).exists() and not overwrite:
        raise FileExistsError(f"{out / STATE_DIR} exists (--overwrite replaces it)")
    out.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out / STATE_DIR, jax.tree.map(np.asarray, state), force=overwrite)
    checkpointer.wait_until_finished()
    checkpointer.close()
    (out / META_FILE).write_text(json.dumps(dict(meta), indent=2) + "\n")
    return out


def read_meta(directory: str | Path, family: str | None = None) -> dict:
    """meta.json of a converted folder (of `family`, when given)."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise NotFoundError(f"{directory}: not a converted folder (no {META_FILE})")
    meta = json.loads(path.read_text())
    if family is not None and meta.get("family") != family:
        raise WeightsError(f"{directory}: a {meta.get('family')!r} conversion, not {family!r}")
    return meta


def _restore(path: Path) -> dict:
    """The saved pytree as numpy arrays (list indices come back as string keys)."""
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(path)
    finally:
        checkpointer.close()


def load_into(model: nnx.Module, directory: str | Path, absent: Sequence[str] = ()
              ) -> list[str]:
    """Restore a converted folder into a built model; returns the task layers it restored.

    Every non-task variable must be in the folder with the same shape and vice versa, except
    the model's layers under the path prefixes `absent` (layers the public model has not, such
    as DDAMFN's optional GCSA: left as initialised). A task layer is restored when both have
    it; the model's other task layers stay as initialised. KeyError / ValueError name the path.
    """
    directory = Path(directory).resolve()
    return load_state(model, read_state(directory), str(directory), absent)


def read_state(directory: str | Path) -> dict[str, Any]:
    """A converted folder's variables, {dotted path: numpy array}."""
    read_meta(directory)
    return flatten(_restore(Path(directory).resolve() / STATE_DIR))


def load_state(model: nnx.Module, restored: Mapping[str, Any], source: str,
               absent: Sequence[str] = ()) -> list[str]:
    """`load_into` of variables already read ({dotted path: array}, from `source`): a
    converted folder's, or those a family took from a training run (`Family.load_run`)."""
    state = nnx.state(model)
    current = nnx.to_pure_dict(state)
    model_paths = flatten(current)
    extra = [p for p in restored if not p.startswith(TASKS) and p not in model_paths]
    if extra:
        raise WeightsError(f"{source}: variables the model does not have: {extra}")
    loaded_tasks = set()

    def pick(keypath, value):
        path = dotted(keypath)
        if path not in restored:
            if path.startswith((TASKS, *absent)):
                return value
            raise WeightsError(f"{source} has no {path!r}")
        new = restored[path]
        if new.shape != value.shape:
            raise WeightsError(f"{path!r}: shape {new.shape} in {source}, {value.shape} in "
                               f"the model")
        if path.startswith(TASKS):
            loaded_tasks.add(path.split(".")[1])
        if isinstance(value, jax.Array):  # keep the model's placement (e.g. replicated on a mesh)
            return jax.device_put(np.asarray(new, value.dtype), value.sharding)
        return jnp.asarray(new, value.dtype)  # an abstract model (nnx.eval_shape)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(pick, current))
    nnx.update(model, state)
    return sorted(loaded_tasks)
