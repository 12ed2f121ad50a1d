"""Progress lines with an ETA for long work measured in bytes (reading checkpoints), and durations."""

from __future__ import annotations

import time
from typing import Callable


def duration(seconds: float) -> str:
    """``12 s``, ``3.5 min`` or ``1.2 h``."""
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def human_bytes(nbytes: float) -> str:
    """``512 B``, ``12 KiB``, ``3.4 MiB`` or ``1.23 GiB``."""
    for unit, scale, digits in (("GiB", 2**30, 2), ("MiB", 2**20, 1), ("KiB", 2**10, 0)):
        if nbytes >= scale:
            return f"{nbytes / scale:.{digits}f} {unit}"
    return f"{nbytes:.0f} B"


class BytesProgress:
    """Logs ``done of total (pct), ETA`` at most every ``every`` seconds, and the total time at the
    end of work that took that long (quick work logs nothing)."""

    def __init__(self, total: float, log: Callable[[str], None], *, what: str = "", every: float = 10.0):
        self.total, self.log, self.what, self.every = total, log, what, every
        self.done = 0.0
        self.start = self.last = time.monotonic()

    def advance(self, amount: float) -> None:
        self.done += amount
        now = time.monotonic()
        finished = self.done >= self.total
        if now - self.last < self.every and not (finished and self.last > self.start):
            return
        self.last = now
        share = self.done / self.total if self.total else 1.0
        elapsed = now - self.start
        tail = f"in {duration(elapsed)}" if finished else f"ETA {duration(elapsed * (1 - share) / max(share, 1e-9))}"
        self.log(f"  {self.what}{human_bytes(self.done)} of {human_bytes(self.total)} ({share:.0%}), {tail}")
