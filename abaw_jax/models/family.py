"""Model families: the `Family` record and the registry that configs pick from by `model.name`.

Model files register their families here at import (`abaw_jax.models` imports them all).

A `Family` record is everything the trainers, evaluators, extraction and inference know of a
model; they call through it and nothing else:
- `build(outputs=..., rngs=..., feature_dim=..., **config.model)` -> an `nnx.Module` that takes a
  dict of named inputs (`model.inputs`: "image" uint8-normalised floats (N, S, S, 3) or clips
  (B, T, S, S, 3), "features" cached per-frame vectors (N, D) or (B, T, D), ...) and an optional
  `rngs` (dropout, masking), and returns a dict: one entry per requested output (task heads) and,
  when it has any, `"losses": {name: scalar}`: its own extra losses, which the trainer adds with
  `loss.<name>_weight` from `loss.<name>_start_step`. A model may also name `optional_inputs`
  it reads when given (MAE's masking "noise"); inference passes them on from the caller. A
  model of several branches (GCSA's audio-visual one) may return `"branches": {branch:
  {output: ...}}` in place of (or beside) its outputs: `tasks.Task` trains each branch with the
  head's loss and predicts `<head>.<branch>`, and evaluation fuses them (`postprocess.Post`).
- `preprocess`: the image size and the mean / std (as fractions of 255) of its "image" input;
  or, for a family whose image size depends on the model built (CLIP's config), a function of
  the model giving it.
- `embed(model, inputs)`: a frame's embedding (N, D) for the feature cache (`--mode=extract`).
- `backbone`: regexes over parameter paths of the part that cached embeddings replace (frozen by
  construction when a run trains on them, and copied from the extracting model).
- `frozen`: regexes over parameter paths the family never trains (e.g. CLIP's towers); or a
  function of the model giving them (CLIP trains a random tower, which has nothing to keep).
- `load_weights(model, path)`: loads a `python -m abaw_jax.convert` output (`init_from`).
- `load_run(model, source, variables, where)`: `init_from` a training workdir: loads the
  variables of that run's model ({dotted path: array}, of family `source`) that this family
  takes (MAE fine-tuning: the encoder of a pretraining run). None: only converted folders.
- `labels`: False for a label-free model (MAE pretraining): built without task outputs, trained
  by its own trainer (`config.trainer`), never by the supervised one.
- `clips`: the model takes clips (B, T, ...) and gives per-frame outputs (B, T, ...).
- `returns`: model outputs that inference gives beside the task heads (CLIP's `image_embeds`).
- A frame family (one with `embed`) whose models other families wrap (a temporal head's
  `model.backbone`) also gives its models an `embed_dim` attribute and an "embedding" output
  (N, embed_dim) from {"image": ...}.
- `frame(model)`: for a family that wraps a frame model (a temporal head over a registered
  backbone): (that family, that sub-module), which then gives the preprocessing, the
  embedding, the converted weights and the backbone to copy. None: the model is its own frame
  model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from abaw_jax import convert
from abaw_jax.errors import ConfigError, UnknownNameError

Inputs = Mapping[str, jax.Array]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """The "image" input: resized to `size` (host side), normalised on the device."""

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def normalize(self, images: jax.Array, dtype=jnp.float32) -> jax.Array:
        """uint8 RGB -> normalised floats (inside the jitted step). numpy constants: a jax array
        at import time would start the backend before jax.distributed.initialize. Scaled to
        0-255 in float32, as DDAMFN's training always did (bit-identical constants)."""
        mean = np.asarray(self.mean, np.float32) * 255
        std = np.asarray(self.std, np.float32) * 255
        return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    build: Callable[..., nnx.Module]
    preprocess: Preprocess | Callable[[nnx.Module], Preprocess] | None = None
    embed: Callable[[nnx.Module, Inputs], jax.Array] | None = None
    backbone: tuple[str, ...] = ()
    frozen: tuple[str, ...] | Callable[[nnx.Module], tuple[str, ...]] = ()
    load_weights: Callable[[nnx.Module, str | Path], Any] = convert.load_into
    clips: bool = False
    returns: tuple[str, ...] = ()
    frame: Callable[[nnx.Module], tuple[Family, nnx.Module] | None] | None = None
    load_run: Callable[[nnx.Module, str, Mapping[str, np.ndarray], str], Any] | None = None
    labels: bool = True

    def frame_model(self, model: nnx.Module) -> tuple[Family, nnx.Module] | None:
        """(family, module) of the frame model inside `model` (None: a head on cached
        features only)."""
        return self.frame(model) if self.frame else (self, model)

    def image_preprocess(self, model: nnx.Module) -> Preprocess | None:
        frame = self.frame_model(model)
        if frame is None or frame[0].preprocess is None:
            return None
        preprocess = frame[0].preprocess
        return preprocess if isinstance(preprocess, Preprocess) else preprocess(frame[1])

    def frozen_patterns(self, model: nnx.Module) -> tuple[str, ...]:
        return self.frozen if isinstance(self.frozen, tuple) else self.frozen(model)

    def load_into(self, model: nnx.Module, path: str | Path) -> Any:
        """init_from: converted weights into the frame model."""
        frame = self.frame_model(model)
        if frame is None:
            raise ConfigError(f"init_from: model {self.name!r} has no frame model to load into")
        return frame[0].load_weights(frame[1], path)

    def load_run_into(self, model: nnx.Module, source: str,
                      variables: Mapping[str, np.ndarray], where: str) -> Any:
        """init_from a training workdir: the variables of its model (family `source`) into
        the frame model."""
        frame = self.frame_model(model)
        if frame is None or frame[0].load_run is None:
            raise ConfigError(f"init_from={where}: model {self.name!r} cannot start from a "
                              f"training run (only from a converted folder)")
        return frame[0].load_run(frame[1], source, variables, where)

    def embed_frames(self, model: nnx.Module, inputs: Inputs) -> jax.Array:
        """The feature cache's per-frame embedding of images (N, S, S, 3)."""
        frame = self.frame_model(model)
        if frame is None or frame[0].embed is None:
            raise ConfigError(f"model {self.name!r} has no frame embedding")
        return frame[0].embed(frame[1], inputs)

    @property
    def embeds(self) -> bool:
        """Whether the family can embed frames (statically: a wrapping family can)."""
        return self.embed is not None or self.frame is not None


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Adds (or replaces) a family under its name; returns it."""
    FAMILIES[family.name] = family
    return family


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownNameError(f"unknown model {name!r}; known: {sorted(FAMILIES)}") from None


def build(name: str, **kwargs) -> nnx.Module:
    """The model of family `name`, built with `kwargs` (e.g. outputs=, rngs=)."""
    return get(name).build(**kwargs)


def prepare_inputs(preprocess: Preprocess | None, batch: Mapping[str, Any],
                   names: tuple[str, ...], dtype=jnp.float32) -> dict[str, jax.Array]:
    """The named inputs of a batch as the model takes them: images normalised by the family's
    preprocessing, "frame_mask" from the clip's record indices (-1: padding), everything else
    cast to the compute dtype."""
    out = {}
    for name in names:
        if name == "image":
            out[name] = preprocess.normalize(batch[name], dtype)
        elif name == "frame_mask":
            out[name] = batch["index"] >= 0
        else:
            out[name] = jnp.asarray(batch[name]).astype(dtype)
    return out
