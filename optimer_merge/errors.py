"""The errors a user can meet: each says what was wrong and what to do, in one line.

The command line prints exactly these (and a full disk) as ``optimer-merge CMD: error: ...`` and
exits 2; every other exception is a bug (or an environment failure) and keeps its traceback.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """A problem with the user's input or run folder, reported as one line without a traceback."""

    def __str__(self) -> str:  # one line, whatever the message was built from
        return " ".join(line.strip() for line in super().__str__().splitlines() if line.strip())


class ConfigError(UserError, ValueError):
    """A setting, config file or command-line value is invalid."""


class InputNotFound(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or is the wrong kind of path)."""


class RunFolderError(UserError):
    """An output folder holds another run, is in use, or cannot be written."""


class DataError(UserError, ValueError):
    """A dataset cannot be read as text documents."""


class OnEveryRank(RunFolderError):
    """Raised by every rank of a distributed run together (a check they made collectively): the
    primary process prints it, the other ranks exit with it silently."""


class Stopped(KeyboardInterrupt):
    """A run stopped on a signal (a scheduler's SIGTERM) after saving its progress; rerunning the
    same command resumes it. Handled like Ctrl-C, with exit code 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def disk_full(error: BaseException) -> bool:
    """An environment failure reported like a user error: the disk filled up while writing."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
