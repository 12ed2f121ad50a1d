"""SIGTERM (a scheduler's stop, a preemption notice): one place that installs its handlers."""

from __future__ import annotations

import os
import signal
import threading


def on_sigterm(handler):
    """Install ``handler`` for SIGTERM (None: the default action); returns the handler it replaces.
    Only the main thread can install one: elsewhere nothing changes and None is returned, so
    restoring what this returned is always safe."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler if handler is not None else signal.SIG_DFL)


def in_import(frame) -> bool:
    """True if ``frame`` runs inside an import (importlib's own frames are below it)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def deliver_again(signum: int, delay: float = 0.05) -> None:
    """Send ``signum`` to this process again in ``delay`` seconds."""
    timer = threading.Timer(delay, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()
