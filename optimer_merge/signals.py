"""SIGTERM (a scheduler's stop, a preemption notice): one place that installs its handlers."""

from __future__ import annotations

import signal
import threading


def on_sigterm(handler):
    """Install ``handler`` for SIGTERM (None: the default action); returns the handler it replaces.
    Only the main thread can install one: elsewhere nothing changes and None is returned, so
    restoring what this returned is always safe."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler if handler is not None else signal.SIG_DFL)
