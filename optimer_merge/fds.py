"""Point standard file descriptors elsewhere for a while, at the OS level."""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def redirect_fds(target: int, fds: tuple[int, ...] = (1, 2)):
    """Make ``fds`` (default stdout and stderr) write to file descriptor ``target`` until exit.

    Unlike swapping ``sys.stdout``/``sys.stderr``, this catches output from C code too, and a log
    handler created meanwhile keeps the real, still open Python stream."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    for fd in fds:
        os.dup2(target, fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip(fds, saved):
            os.dup2(copy, fd)
            os.close(copy)
