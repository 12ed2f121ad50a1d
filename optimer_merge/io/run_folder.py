"""Run folders: one process at a time (a lock), the identity of the run they hold, and a clean
refusal: a folder this process created is removed again if the run is refused before any work."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from optimer_merge.errors import RunFolderError, UserError, disk_full
from optimer_merge.io.files import check_output_dir, make_dirs, write_json

LOCK = ".lock"


# Where launchers put a process's rank: torchrun and Lightning (RANK, LOCAL_RANK; NODE_RANK on the
# other nodes of a multi-node run, GROUP_RANK under torchrun), SLURM's srun, LSF's jsrun, MPI.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def is_primary_process() -> bool:
    """False in the extra ranks a distributed launcher starts, on this node or another (they share
    the primary's folder and leave its bookkeeping, and what is said to the user, to it)."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def lock_or_warn(fd, path: Path, what: str) -> bool:
    """Lock ``fd`` (a file object or descriptor) for this process without waiting; False if another
    process holds it. On a file system without locks (Lustre or NFS mounted without them) say so
    and go on unlocked."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:
        print(f"warning: {path}: cannot lock ({os.strerror(error.errno) if error.errno else error}): "
              f"nothing stops a second {what} from writing there at the same time", file=sys.stderr)  # fmt: skip
    return True


class RunFolder:
    """``with RunFolder(path, "search") as folder:`` creates and locks ``path``.

    ``folder.check(record, identity)`` refuses a folder that holds another run; ``folder.keep()``
    marks the start of real work. A UserError, a full disk or a stop (Ctrl-C, SIGTERM) before
    ``keep()`` removes the folders this call created (in a folder that was there: the lock file it
    created), so a rerun starts clean."""

    def __init__(self, path: str | Path, what: str, *, fix: str = "choose another output folder or delete this one"):
        self.path, self.what, self.fix = Path(path), what, fix
        self.created: Path | None = None
        self.kept = False
        self._lock = None
        self._made_lock = False

    def __enter__(self) -> "RunFolder":
        check_output_dir(self.path, f"{self.what} folder")
        self.created = make_dirs(self.path, f"{self.what} folder")
        self._made_lock = not (self.path / LOCK).exists()
        lock = open(self.path / LOCK, "a+")
        if not lock_or_warn(lock, self.path, self.what):
            lock.seek(0)
            pid, _, what = lock.read().strip().partition(" ")  # "PID WHAT" (older locks: "PID")
            lock.close()
            raise RunFolderError(
                f"{self.path} is in use by another {what or self.what}{f' (process {pid})' if pid else ''}; "
                "wait for it to finish or choose another output folder"
            )
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()} {self.what}")
        lock.flush()
        self._lock = lock
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # refused, or stopped (Ctrl-C, SIGTERM) before real work: nothing worth keeping was written
        refused = exc is not None and (isinstance(exc, (UserError, KeyboardInterrupt)) or disk_full(exc)) and not self.kept
        if self._lock is not None:
            if refused and self.created is None and self._made_lock:
                (self.path / LOCK).unlink(missing_ok=True)  # still locked: no other process is using it
            self._lock.close()  # releases the lock
            self._lock = None
        if refused and self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)

    def clear(self, record: str) -> None:
        """Delete the run this folder holds (``--overwrite``), under the lock, so never a run in
        progress; a folder of other files (no ``record``) is refused, never deleted."""
        others = [p for p in self.path.iterdir() if p.name != LOCK]
        if others and not (self.path / record).is_file():
            raise RunFolderError(f"{self.path} is not empty and holds no {self.what} ({record}); --overwrite deletes only a {self.what}: choose another output folder")
        for entry in others:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    def keep(self) -> None:
        """Real work starts: from here on the folder stays, whatever happens."""
        self.kept = True

    def check(self, record: str, identity: dict, ignore: tuple[str, ...] = (), added: dict | None = None,
              normalize: Callable[[dict], dict] | None = None) -> bool:  # fmt: skip
        """Refuse a folder that holds another run, or files but no run; True if it holds this one.

        Keys in ``ignore`` (settings that may change between runs) are left out of the comparison;
        ``added`` maps settings that joined the identity later to the value a run recorded without
        them had, so such a run resumes when that value is asked for again; ``normalize`` is
        applied to the recorded identity first (one written by an earlier version, say)."""
        path = self.path / record
        if path.exists():
            stored = json.loads(path.read_text())
            stored = {**(added or {}), **stored.get("identity", stored)}
            stored = normalize(stored) if normalize else stored
            stored = {k: v for k, v in stored.items() if k not in ignore}
            identity = {k: v for k, v in identity.items() if k not in ignore}
            if stored != identity:
                changed = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
                raise RunFolderError(f"{self.path} holds a different {self.what} (settings differ: {', '.join(changed)}); {self.fix}")
            return True
        if any(p.name != LOCK for p in self.path.iterdir()):
            raise RunFolderError(f"{self.path} is not empty and holds no {self.what}; choose another output folder")
        return False

    def record(self, record: str, identity: dict, **extra) -> None:
        write_json(self.path / record, {"identity": identity, **extra})
