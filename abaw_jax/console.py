"""What the command lines (`main`, `video`) share on the console: libraries' INFO chatter kept
off it, and the one `error: ...` line of a user error."""

from __future__ import annotations

import logging as pylogging
import os
import sys

from absl import logging

_CHATTY = ("/orbax/", "/grain/", "/jax/_src/")


class _LibraryInfoFilter(pylogging.Filter):
    """Orbax logs a dozen INFO lines per checkpoint; keep the console for progress."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or not any(
            s in record.pathname for s in _CHATTY)


def quiet_libraries() -> None:
    """Keeps Orbax's, grain's and JAX's INFO lines off absl's console handler."""
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())


def exit_with(line: str) -> None:
    """Prints `line` as the last word on stderr and exits 1 at once (the CLIs' way out on a
    user error).

    A failed Orbax restore leaves TensorStore reads in flight whose callbacks, on other
    threads, print "Event loop is closed" tracebacks for a while (~55 of them, ~390 lines, after
    a corrupt checkpoint): stderr goes to /dev/null first, the line is written in one call,
    and no interpreter teardown runs (nothing is left to save on this path).
    """
    logging.flush()
    sys.stdout.flush()
    stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.write(stderr, f"{line}\n".encode())
    os._exit(1)
