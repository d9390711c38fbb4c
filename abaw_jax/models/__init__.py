"""Model registry: configs pick a model by name, `build(name, **kwargs)`."""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from abaw_jax.models import ddamfn, temporal

MODELS: dict[str, Callable[..., nnx.Module]] = {
    "ddamfn": ddamfn.ddamfn,
    "ddamfn_tiny": ddamfn.ddamfn_tiny,
    "ddamfn_lstm": temporal.ddamfn_lstm,  # per-frame outputs of clips (B, T, ...)
    "ddamfn_tiny_lstm": temporal.ddamfn_tiny_lstm,
}


def build(name: str, **kwargs) -> nnx.Module:
    """The model registered as `name`, built with `kwargs` (e.g. outputs=, rngs=)."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None
    return factory(**kwargs)
