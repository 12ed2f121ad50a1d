"""CPU thread count: one default for training and evaluation."""

from __future__ import annotations

import os

PARAMS_PER_THREAD = 25_000_000


def too_many_threads(threads: int | str | None) -> str | None:
    """Why a thread count is refused here (more than this machine's CPUs: torch cannot even start
    that many threads, and more threads than cores only slow it down), or None."""
    cpus = os.cpu_count() or 1
    if isinstance(threads, int) and threads > cpus:
        return f"this machine has {cpus} CPUs; give at most {cpus} (got {threads})"
    return None


def default_threads(n_params: int | None = None) -> int:
    """1 thread for tiny models (several threads are 10-20x slower on small CPUs), one per 25 M
    parameters above that, at most the machine's cores."""
    if n_params is None:
        return 1
    return max(1, min(os.cpu_count() or 1, n_params // PARAMS_PER_THREAD))
