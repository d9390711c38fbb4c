"""Trainers by objective, picked by `config.trainer`: each module gives the loop (`loop.py`)
its data stream, its jitted step and its evaluator. A new objective is a new module here."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import ml_collections

from abaw_jax import extract
from abaw_jax.errors import UnknownNameError
from abaw_jax.trainers import loop, mae_pretrain, supervised

TRAINERS: dict[str, ModuleType] = {"supervised": supervised, "mae_pretrain": mae_pretrain}


def get(name: str) -> ModuleType:
    if name not in TRAINERS:
        raise UnknownNameError(f"unknown trainer {name!r}; known: {sorted(TRAINERS)}")
    return TRAINERS[name]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains `config` with its trainer in `workdir` (resuming from its latest checkpoint) and
    returns the final validation metrics."""
    config = extract.resolve_features(config)  # data.features=auto (main resolves it too)
    return loop.run(config, workdir, get(config.get("trainer", "supervised")))
