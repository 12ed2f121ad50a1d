"""The benchmarks' shared helpers: memory of a process tree read from /proc, and checkouts of an
earlier revision to measure against."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    found = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                found += tree(int(entry))
    return found


def memory(pid: int) -> dict[str, int]:
    """One process's resident set (RSS), proportional set (PSS: shared pages split between the
    processes that map them) and anonymous memory (not file pages the kernel can drop), in bytes."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {"rss": 0, "pss": 0, "anon": 0}
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in text.splitlines()[1:] if line.split()[-1] == "kB"}
    return {"rss": fields.get("Rss", 0), "pss": fields.get("Pss", 0), "anon": fields.get("Anonymous", 0)}


def pss(pid: int) -> int:
    """The PSS of ``pid``'s whole process tree."""
    return sum(memory(member)["pss"] for member in tree(pid))


class PeakSampler:
    """Samples a process tree every ``interval`` seconds until stopped: the peak PSS and anonymous
    memory of the tree, and each process's own peak RSS and PSS."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval = pid, interval
        self.tree_pss = self.tree_anon = 0
        self.per_process: dict[int, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = anon = 0
            for member in tree(self.pid):
                now = memory(member)
                total, anon = total + now["pss"], anon + now["anon"]
                peak = self.per_process.setdefault(member, {"rss": 0, "pss": 0})
                peak["rss"], peak["pss"] = max(peak["rss"], now["rss"]), max(peak["pss"], now["pss"])
            self.tree_pss, self.tree_anon = max(self.tree_pss, total), max(self.tree_anon, anon)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def worktree(revision: str, root: Path) -> Iterator[Path]:
    """This repository at ``revision``, checked out under ``root`` (a git worktree), removed on exit."""
    target = root / f"code-{revision}"
    if not target.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(target), revision], check=True, capture_output=True, timeout=120)
    try:
        yield target
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(target)], capture_output=True, timeout=120)
