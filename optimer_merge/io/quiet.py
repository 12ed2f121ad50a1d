"""Library noise kept out of the way: standard file descriptors pointed elsewhere for a while, and
known-harmless log messages dropped while a call runs."""

from __future__ import annotations

import contextlib
import logging
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


class _Drop(logging.Filter):
    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


@contextlib.contextmanager
def drop_messages(loggers: tuple[str, ...], texts: tuple[str, ...]):
    """Drop log records containing any of ``texts`` from the named loggers, only for the duration."""
    drop = _Drop(texts)
    targets = [logging.getLogger(name) for name in loggers]
    for logger in targets:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in targets:
            logger.removeFilter(drop)
