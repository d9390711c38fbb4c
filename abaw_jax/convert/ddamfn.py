"""Reference PyTorch DDAMFN checkpoints -> the NNX `DDAMFN` state.

  python -m abaw_jax.convert ddamfn --checkpoint=FILE.pth --out=DIR [--keep_fc] [--num_head=2]
      [--model=ddamfn] [--overwrite]

Writes DIR/state, an Orbax StandardCheckpointer pytree: the pure dict of `nnx.state(model)`
(parameters and BatchNorm statistics, numpy arrays; the trunk under `features`, the attention heads
under `heads`, GDConv under `gdconv`, and the reference `fc` under `tasks.logits` with --keep_fc),
and DIR/meta.json (family, model, model_kwargs, outputs, source, unused_keys), the form every
converter writes (`abaw_jax.convert`); `convert.load_into` restores it into a built model, e.g.
one with new task layers for ABAW.

The NNX module tree mirrors the reference names, so a parameter's reference key is its NNX path
with three prefixes renamed (`heads.i.` <- `cat_head{i}.CoordAtt.`, `gdconv.` <- `Linear.`,
`tasks.logits.` <- `fc.`) and the leaf renamed (`_TORCH_LEAF`).
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from abaw_jax import convert, models
from abaw_jax.errors import WeightsError

FAMILY = "ddamfn"

# NNX leaf name -> reference leaf name (conv/linear kernel, BatchNorm, PReLU slope).
_TORCH_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
               "var": "running_var", "slope": "weight"}
_TORCH_PREFIX = ((re.compile(r"^heads\.(\d+)\."), r"cat_head\1.CoordAtt."),
                 (re.compile(r"^gdconv\."), "Linear."),
                 (re.compile(r"^tasks\.logits\."), "fc."))
# Reference parts that are built but never applied in its forward, and BatchNorm's step counter.
_NEVER_APPLIED = re.compile(r"(^|\.)conv_dw\.(bn|prelu)\.|^cat_head\d+\.CoordAtt\.Linear\.|^bn\."
                            r"|\.num_batches_tracked$")


def torch_key(path: str) -> str:
    """The reference state_dict key of an NNX state path such as 'heads.0.conv1.kernel'."""
    for pattern, replacement in _TORCH_PREFIX:
        path = pattern.sub(replacement, path)
    head, _, leaf = path.rpartition(".")
    return f"{head}.{_TORCH_LEAF[leaf]}"


def _to_nnx_layout(array: np.ndarray) -> np.ndarray:
    """OIHW -> HWIO (depthwise (C, 1, kh, kw) -> (kh, kw, 1, C)); Linear [out, in] -> [in, out]."""
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array.T if array.ndim == 2 else array


def _torch_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape[::-1] if len(shape) == 2 else shape


@functools.lru_cache(maxsize=4)
def _trunk_target(model: str, num_head: int) -> dict:
    """Pure-dict state of the model without task layers, ShapeDtypeStruct leaves (built with
    nnx.eval_shape: nothing is initialised, but tracing the full model still takes seconds)."""
    abstract = nnx.eval_shape(lambda: models.build(model, outputs={}, num_head=num_head))
    return nnx.to_pure_dict(nnx.state(abstract))


def _target(model: str, num_head: int, outputs: Mapping[str, int]) -> dict:
    target = dict(_trunk_target(model, num_head))
    width = target["gdconv"]["bn"]["scale"].shape[0]
    target["tasks"] = {name: nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda size=size: nnx.Linear(width, size, rngs=nnx.Rngs(0)))))
        for name, size in outputs.items()}
    return target


def _strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Keys without DataParallel's 'module.' prefix, values as numpy."""
    return {k.removeprefix("module."): np.asarray(v) for k, v in state_dict.items()}


def convert_state_dict(state_dict: Mapping[str, Any], num_head: int = 2, keep_fc: bool = False,
                       model: str = "ddamfn") -> tuple[dict, list[str]]:
    """Reference `DDAMNet` state_dict (arrays or CPU tensors) -> (NNX pure-dict state, unused keys).

    The state covers every parameter and BatchNorm statistic of `models.build(model,
    num_head=num_head, outputs=...)`, with outputs {"logits": fc size} if keep_fc else {}.
    Raises KeyError for a missing key and ValueError for a mis-shaped one (naming the key and both
    shapes) or for keys that belong to no part of the reference (e.g. a third attention head).
    Unused keys are the never-applied parts, the BatchNorm counters, and `fc` unless keep_fc.
    """
    source = _strip_module_prefix(state_dict)
    outputs = {}
    if keep_fc:
        if "fc.weight" not in source:
            raise WeightsError("--keep_fc: the checkpoint has no 'fc.weight'")
        outputs = {"logits": source["fc.weight"].shape[0]}
    target = _target(model, num_head, outputs)
    used = set()

    def one(keypath, spec):
        path = convert.dotted(keypath)
        key = torch_key(path)
        if key not in source:
            raise WeightsError(f"missing key {key!r} (model path {path}, shape "
                               f"{_torch_layout(spec.shape)})")
        value = source[key]
        if value.shape != _torch_layout(spec.shape):
            raise WeightsError(f"key {key!r} has shape {value.shape}, expected "
                               f"{_torch_layout(spec.shape)} (model path {path})")
        used.add(key)
        return _to_nnx_layout(value).astype(spec.dtype)

    state = jax.tree_util.tree_map_with_path(one, target)
    unused = [k for k in source if k not in used]
    unexpected = [k for k in unused if not (_NEVER_APPLIED.search(k) or k.startswith("fc."))]
    if unexpected:
        raise WeightsError(f"keys that {model}(num_head={num_head}) has no place for (another "
                           f"num_head or model?): {unexpected}")
    return state, unused


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """The state_dict of a reference checkpoint file: {'model_state_dict': ...} or a bare one.

    Loaded with weights_only=True, so a file that would run pickled code is refused.
    """
    import torch  # only conversion needs torch, not load_into

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state_dict or a dict with 'model_state_dict', got "
                           f"{type(obj).__name__}")
    not_tensors = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise WeightsError(f"{path}: entries that are not tensors: {not_tensors}")
    return {k: v.detach().cpu().numpy() for k, v in obj.items()}


def main(argv: Sequence[str]) -> int:
    """CLI: convert --checkpoint into --out; prints the unused keys. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m abaw_jax.convert ddamfn",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="reference .pth file")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--keep_fc", action="store_true", help="keep `fc` as task 'logits'")
    parser.add_argument("--num_head", type=int, default=2, help="attention heads")
    parser.add_argument("--model", default="ddamfn", choices=("ddamfn", "ddamfn_tiny"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    state, unused = convert_state_dict(read_checkpoint(args.checkpoint), args.num_head,
                                       args.keep_fc, args.model)
    meta = {"family": FAMILY, "model": args.model,
            "model_kwargs": {"num_head": args.num_head}, "outputs": _task_sizes(state),
            "source": str(args.checkpoint),
            "unused_keys": unused}
    out = convert.save(args.out, state, meta, overwrite=args.overwrite)
    count = sum(np.size(v) for v in jax.tree.leaves(state))
    print(f"converted {len(jax.tree.leaves(state))} arrays ({count} values) into {out}")
    print(f"unused keys: {convert.grouped(unused)} (listed in {out / convert.META_FILE})")
    return 0


def _task_sizes(state: dict) -> dict[str, int]:
    return {name: int(layer["bias"].shape[0]) for name, layer in state.get("tasks", {}).items()}
