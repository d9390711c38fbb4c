"""Public checkpoints -> abaw_jax states: `python -m abaw_jax.convert <family> [flags]`.

Each family is a module here with `main(argv) -> exit status` and a Python API for the trainer
(for ddamfn: `convert_state_dict`, `save`, `load_into`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

FAMILIES = {"ddamfn": "abaw_jax.convert.ddamfn"}

USAGE = f"usage: python -m abaw_jax.convert {{{','.join(FAMILIES)}}} [flags] (--help per family)"


def main(argv: Sequence[str]) -> int:
    """Dispatch to the family named by argv[0]; returns the exit status."""
    if not argv or argv[0] not in FAMILIES:
        given = f"unknown family {argv[0]!r}; " if argv and not argv[0].startswith("-") else ""
        print(f"{given}{USAGE}")
        return 2
    return importlib.import_module(FAMILIES[argv[0]]).main(argv[1:])
