"""Errors that are the user's to fix (config, data, checkpoint, environment): `main` prints
their message as one `error: ...` line and exits 1; `--traceback` shows where they came from.
Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import errno


class UserError(Exception):
    """A mistake in the user's config, data, checkpoints or environment."""


class ConfigError(UserError, ValueError):
    """A config value (or config argument) that cannot work; the message names the key."""


class UnknownNameError(UserError, KeyError):
    """A name looked up in a registry (model, optimizer, task, ...) that it does not hold."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


# The environment's faults a user fixes: permissions, a read-only or full disk.
_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, UserError) or (
        isinstance(error, OSError) and error.errno in _USER_ERRNOS)


class NotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named (workdir, converted weights) is not there."""


class WeightsError(UserError, KeyError, ValueError):
    """Converted or reference weights that do not fit the model (names or shapes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

