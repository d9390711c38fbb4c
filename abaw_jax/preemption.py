"""SIGTERM -> a checkpoint at a step every process agrees on, then a clean exit.

SLURM (before a requeue or at the time limit with `--signal`) and preemptible TPU VMs send
SIGTERM. With several processes, JAX's preemption service (started by
`jax.distributed.initialize`) catches it in any process, agrees on a step ahead of all processes
and `reached` becomes true at that step everywhere. A single process has no such service: the
handler `Preemption` puts in place at the start of a run sets a flag. A SIGTERM during start-up
(building the data cache, restoring, compiling) stops the run before its first step (`check`
raises `Preempted`): the workdir gets PREEMPTED as after any preemption, and the process exits
0 for a requeue.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preempted(Exception):
    """SIGTERM arrived before the first train step: nothing new to save."""


class Preemption:
    """From its creation (the start of a run) until `close`, a single process catches SIGTERM
    (multi-process runs leave it to JAX's preemption service, whose handler a Python one would
    replace). `reached(step)` is true at the step where all processes should save and stop."""

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        logging.warning("SIGTERM: stopping at the next safe point (after a checkpoint once "
                        "training)")
        self._flag.set()

    def check(self, what: str) -> None:
        """Raises `Preempted` if SIGTERM arrived (before the first step: `what` says where)."""
        if self._flag.is_set():
            raise Preempted(what)

    def reached(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._flag.is_set()
        return multihost_utils.reached_preemption_sync_point(step)

    def close(self) -> None:
        """Gives SIGTERM back to whoever had it before."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
