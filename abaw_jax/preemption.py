"""SIGTERM -> a checkpoint at a step every process agrees on, then a clean exit.

SLURM (before a requeue or at the time limit with `--signal`) and preemptible TPU VMs send
SIGTERM. With several processes, JAX's preemption service catches it (in any process), agrees
on a step ahead of all processes and `reached` becomes true at that step everywhere. A single
process has no such service: a Python handler sets a flag.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preemption:
    """`reached(step)` is true at the step where all processes should save and stop."""

    def __init__(self):
        self._flag = False
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        logging.warning("SIGTERM: saving a checkpoint after this step, then exiting")
        self._flag = True

    def reached(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._flag
        return multihost_utils.reached_preemption_sync_point(step)

    def close(self) -> None:
        """Gives SIGTERM back to whoever had it before."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
