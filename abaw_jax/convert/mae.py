"""Reference MAE checkpoints (facebookresearch/mae) -> a converted MAE folder.

  python -m abaw_jax.convert mae --checkpoint=FILE.pth --out=DIR [--model=mae_pretrain|mae]
      [--heads=N] [--decoder_heads=N] [--norm_pix_loss] [--mask_ratio=R] [--keep_head]
      [--overwrite]

FILE is `{'model': state_dict, ...}` as the reference saves it (or a bare state_dict): a
pretraining checkpoint (encoder, `norm` and decoder), an encoder-only release (no decoder), or a
fine-tuned one (`fc_norm` and `head` instead of `norm`). Training checkpoints also hold `args`,
an argparse Namespace, which `torch.load(weights_only=True)` refuses: it is read with that
class, and nothing else, added to the weights-only unpickler's allowed globals, so nothing
pickled is executed. Reading .pth files needs PyTorch (imported only here).

--model: `mae_pretrain` (the reference MAE; needs the decoder) or `mae` (the fine-tuning encoder:
global pooling, fc_norm, task layers); default mae_pretrain when the file has a decoder. The
sizes come from the tensors' shapes; the attention heads, which shapes do not give, from
--heads / --decoder_heads, else the reference's (12 for width 768, 16 for 1024 and 1280; 16
in every reference decoder). norm_pix_loss and mask_ratio come from the file's `args` unless
given.

Expected differences are listed (printed, and in meta.json): for `mae`, the pretraining `norm`,
the decoder and `mask_token` are unused, `head` is unused unless --keep_head (then it is the
task output `logits`), and a missing `fc_norm` starts as a fresh LayerNorm (1, 0), as MAE's
fine-tuning starts it. Any other missing, unexpected or mis-shaped key stops the conversion,
naming it. DIR has the form of every converter (`abaw_jax.convert`): `state` and meta.json
(family "mae", model, model_kwargs: every size of `models.mae.Spec`, outputs, source,
unused_keys, initialised_keys, args).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from abaw_jax import convert
from abaw_jax.errors import NotFoundError, WeightsError
from abaw_jax.models import mae

FAMILY = mae.FAMILY
# The reference's model functions: heads by encoder width (mae_vit_base_patch16: 768 wide,
# 12 heads; large: 1024, 16; huge: 1280, 16); every decoder has 16 heads.
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16}
DECODER_HEADS = 16

# NNX module path -> reference key, in order (vit's transformers-style names -> timm's).
_RENAMES = ((re.compile(r"^encoder\.layers\.(\d+)\."), r"blocks.\1."),
            (re.compile(r"^decoder\.layers\.(\d+)\."), r"decoder_blocks.\1."),
            (re.compile(r"\.layer_norm([12])\."), r".norm\1."),
            (re.compile(r"\.self_attn\.out_proj\."), ".attn.proj."),
            (re.compile(r"\.self_attn\.[qkv]_proj\."), ".attn.qkv."),
            (re.compile(r"^patch_embed\."), "patch_embed.proj."),
            (re.compile(r"^tasks\.logits\."), "head."))
_QKV = re.compile(r"\.self_attn\.([qkv])_proj\.")
_LEAVES = {"kernel": "weight", "scale": "weight"}
# Keys of a pretraining (or fine-tuned) checkpoint that the fine-tuning encoder has no use for.
_ENCODER_UNUSED = re.compile(r"^(norm\.|decoder_|mask_token$|head\.)")
_FRESH = re.compile(r"^fc_norm\.")  # fine-tuning's norm, new when fine-tuning starts


def torch_key(path: str) -> tuple[str, int | None]:
    """The reference key of an NNX state path and, for q/k/v, which third of `attn.qkv`
    ('encoder.layers.0.self_attn.k_proj.kernel' -> ('blocks.0.attn.qkv.weight', 1))."""
    qkv = _QKV.search(path)
    for pattern, replacement in _RENAMES:
        path = pattern.sub(replacement, path)
    head, _, leaf = path.rpartition(".")
    key = f"{head}.{_LEAVES.get(leaf, leaf)}" if head else leaf
    return key, "qkv".index(qkv.group(1)) if qkv else None


def _torch_shape(leaf: str, shape: tuple[int, ...], third: int | None) -> tuple[int, ...]:
    if leaf == "kernel":  # HWIO -> OIHW, (in, out) -> (out, in)
        shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    return (3 * shape[0], *shape[1:]) if third is not None else shape


def _to_nnx(leaf: str, array: np.ndarray, third: int | None) -> np.ndarray:
    if third is not None:  # q, k, v: consecutive thirds of qkv's output rows
        array = np.split(array, 3, axis=0)[third]
    if leaf != "kernel":
        return array
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T


def read_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state_dict as numpy, the `args` Namespace as a dict or {}) of a reference checkpoint.

    Read with torch.load(weights_only=True) allowing argparse.Namespace too: anything else a
    pickle names (code to run, other classes) is refused with a WeightsError naming it.
    """
    import torch  # only reading .pth files needs torch

    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"--checkpoint: no file {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        lines = [ln.strip() for ln in str(e).splitlines()]
        reason = next((ln for ln in lines if "GLOBAL" in ln or ln.startswith("Unsupported")),
                      lines[-1] if lines else type(e).__name__)
        raise WeightsError(f"{path}: refused as a weights-only PyTorch file ({reason}); only "
                           f"tensors, plain containers and argparse.Namespace are read, nothing "
                           f"pickled is executed") from None
    args = obj.get("args") if isinstance(obj, Mapping) else None
    if isinstance(obj, Mapping) and "model" in obj:
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected {{'model': state_dict}} or a state_dict, got "
                           f"{type(obj).__name__}")
    not_tensors = sorted(k for k, v in obj.items() if not torch.is_tensor(v))
    if not_tensors:
        raise WeightsError(f"{path}: entries that are not tensors: {not_tensors}")
    tensors = {k.removeprefix("module."): v.detach().cpu().float().numpy()
               for k, v in obj.items()}
    return tensors, dict(vars(args)) if isinstance(args, argparse.Namespace) else {}


def _count(tensors: Mapping[str, Any], prefix: str) -> int:
    found = {int(m.group(1)) for k in tensors if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _need(tensors: Mapping[str, np.ndarray], key: str, source: str) -> np.ndarray:
    if key not in tensors:
        raise WeightsError(f"{source}: not an MAE checkpoint (no {key!r})")
    return tensors[key]


def infer_spec(tensors: Mapping[str, np.ndarray], args: Mapping[str, Any] | None = None, *,
               heads: int | None = None, decoder_heads: int | None = None,
               norm_pix_loss: bool | None = None, mask_ratio: float | None = None,
               source: str = "checkpoint") -> mae.Spec:
    """The Spec of a reference state_dict: sizes from the shapes, heads as given or the
    reference's, norm_pix_loss and mask_ratio as given or from `args`."""
    args = args or {}
    width, _, patch, _ = _need(tensors, "patch_embed.proj.weight", source).shape
    tokens = _need(tensors, "pos_embed", source).shape[1]
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise WeightsError(f"{source}: pos_embed has {tokens} rows, not 1 + a square grid")
    hidden = _need(tensors, "blocks.0.mlp.fc1.weight", source).shape[0]
    heads = heads or HEADS_BY_WIDTH.get(width)
    if heads is None:
        raise WeightsError(f"{source}: width {width} is none of the reference's "
                           f"{sorted(HEADS_BY_WIDTH)}: pass --heads")
    fields = dict(image_size=grid * patch, patch=patch, width=width,
                  depth=_count(tensors, "blocks"), heads=heads, mlp_ratio=hidden / width,
                  norm_pix_loss=bool(args.get("norm_pix_loss", False) if norm_pix_loss is None
                                     else norm_pix_loss),
                  mask_ratio=float(args.get("mask_ratio", 0.75) if mask_ratio is None
                                   else mask_ratio))
    if "decoder_embed.weight" in tensors:
        fields.update(decoder_width=tensors["decoder_embed.weight"].shape[0],
                      decoder_depth=_count(tensors, "decoder_blocks"),
                      decoder_heads=decoder_heads or DECODER_HEADS)
    return mae.make_spec(**fields)


def target(model: str, spec: mae.Spec, outputs: Mapping[str, int]) -> dict:
    """The pure-dict state (ShapeDtypeStruct leaves) of `model` ("mae_pretrain" or "mae")."""
    def build():
        if model == mae.PRETRAIN:
            return mae.MAE(rngs=nnx.Rngs(0), **dataclasses.asdict(spec))
        return mae.MAEViT(outputs=outputs, rngs=nnx.Rngs(0), **dataclasses.asdict(spec))
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(build)))


def expected_shapes(model: str, spec: mae.Spec, outputs: Mapping[str, int]
                    ) -> dict[str, tuple[int, ...]]:
    """The reference state_dict's {key: shape} that `model` of `spec` takes."""
    shapes = {}
    for path, leaf in convert.flatten(target(model, spec, outputs)).items():
        key, third = torch_key(path)
        shapes[key] = _torch_shape(path.rpartition(".")[2], leaf.shape, third)
    return shapes


def convert_state(tensors: Mapping[str, np.ndarray], spec: mae.Spec, model: str,
                  keep_head: bool = False, source: str = "checkpoint"
                  ) -> tuple[dict, list[str], list[str]]:
    """A reference state_dict -> (pure-dict state of `model`, unused keys, initialised keys).

    Unused and initialised keys are the expected differences (module doc); WeightsError names
    every other missing, unexpected or mis-shaped key.
    """
    outputs = {}
    if keep_head:
        if model != FAMILY or "head.weight" not in tensors:
            raise WeightsError(f"{source}: --keep_head needs --model={FAMILY} and a 'head' "
                               f"(a fine-tuned checkpoint)")
        outputs = {"logits": tensors["head.weight"].shape[0]}
    spec_tree = target(model, spec, outputs)
    expected = expected_shapes(model, spec, outputs)
    absent = sorted(k for k in expected if k not in tensors)
    fresh = [k for k in absent if model == FAMILY and _FRESH.match(k)]
    missing = [f"{k} {expected[k]}" for k in absent if k not in fresh]
    wrong = [f"{k} {tensors[k].shape}, expected {shape}" for k, shape in expected.items()
             if k in tensors and tensors[k].shape != shape]
    rest = sorted(k for k in tensors if k not in expected)
    unused = [k for k in rest if model == FAMILY and _ENCODER_UNUSED.match(k)]
    unexpected = [k for k in rest if k not in unused]
    problems = [f"missing keys {missing}"] * bool(missing) + \
        [f"unexpected keys {unexpected}"] * bool(unexpected) + [f"mis-shaped {wrong}"] * bool(wrong)
    if problems:
        raise WeightsError(f"{source}: not the {model} model of its shapes ({_describe(spec)}): "
                           f"{'; '.join(problems)}")

    def one(keypath, leaf_spec):
        path = convert.dotted(keypath)
        leaf = path.rpartition(".")[2]
        key, third = torch_key(path)
        if key in fresh:  # a new LayerNorm: scale 1, bias 0
            return np.full(leaf_spec.shape, leaf == "scale", np.float32)
        return _to_nnx(leaf, tensors[key], third).astype(leaf_spec.dtype)

    return jax.tree_util.tree_map_with_path(one, spec_tree), unused, fresh


def _describe(spec: mae.Spec) -> str:
    return (f"{spec.image_size}px, patch {spec.patch}, width {spec.width}, depth {spec.depth}, "
            f"heads {spec.heads}")


def convert_checkpoint(checkpoint: str | Path, out: str | Path, model: str | None = None, *,
                       heads: int | None = None, decoder_heads: int | None = None,
                       norm_pix_loss: bool | None = None, mask_ratio: float | None = None,
                       keep_head: bool = False, overwrite: bool = False) -> Path:
    """Convert a reference checkpoint into `out` (see the module doc); returns out."""
    source = str(checkpoint)
    tensors, args = read_checkpoint(checkpoint)
    has_decoder = "decoder_embed.weight" in tensors
    model = model or (mae.PRETRAIN if has_decoder else FAMILY)
    if model == mae.PRETRAIN and not has_decoder:
        raise WeightsError(f"{source}: no decoder (an encoder-only file): it converts as "
                           f"--model={FAMILY}, the fine-tuning encoder")
    spec = infer_spec(tensors, args, heads=heads, decoder_heads=decoder_heads,
                      norm_pix_loss=norm_pix_loss, mask_ratio=mask_ratio, source=source)
    state, unused, fresh = convert_state(tensors, spec, model, keep_head, source)
    outputs = {"logits": int(state["tasks"]["logits"]["bias"].shape[0])} if keep_head else {}
    meta = {"family": FAMILY, "model": model, "model_kwargs": dataclasses.asdict(spec),
            "outputs": outputs, "source": source, "unused_keys": unused, "initialised_keys": fresh,
            "args": {k: v for k, v in args.items()
                     if isinstance(v, str | int | float | bool | type(None))}}
    return convert.save(out, state, meta, overwrite=overwrite)


def main(argv: Sequence[str]) -> int:
    """CLI: convert --checkpoint into --out; prints the expected differences. Exit status."""
    parser = argparse.ArgumentParser(prog="python -m abaw_jax.convert mae",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="reference .pth file")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", choices=(mae.PRETRAIN, FAMILY),
                        help="default: mae_pretrain when the file has a decoder, else mae")
    parser.add_argument("--heads", type=int, help="encoder attention heads")
    parser.add_argument("--decoder_heads", type=int, help="decoder attention heads")
    parser.add_argument("--norm_pix_loss", action="store_true", default=None,
                        help="per-patch normalised targets (default: the file's args, else off)")
    parser.add_argument("--mask_ratio", type=float, help="default: the file's args, else 0.75")
    parser.add_argument("--keep_head", action="store_true",
                        help="keep a fine-tuned `head` as the task output `logits` (--model=mae)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    out = convert_checkpoint(args.checkpoint, args.out, args.model, heads=args.heads,
                             decoder_heads=args.decoder_heads,
                             norm_pix_loss=args.norm_pix_loss, mask_ratio=args.mask_ratio,
                             keep_head=args.keep_head, overwrite=args.overwrite)
    meta = convert.read_meta(out)
    print(f"converted {args.checkpoint} into {out} as {meta['model']} "
          f"({_describe(mae.make_spec(**meta['model_kwargs']))})")
    print(f"unused keys: {convert.grouped(meta['unused_keys'])}; initialised keys: "
          f"{meta['initialised_keys'] or 'none'} (listed in {out / convert.META_FILE})")
    return 0
