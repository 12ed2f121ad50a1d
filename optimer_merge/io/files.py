"""Atomic writes (a partial file renamed into place) and checks of paths the user names."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from optimer_merge.errors import InputNotFound, RunFolderError, disk_full
from optimer_merge.io.progress import human_bytes


@contextlib.contextmanager
def written_whole(path: str | Path) -> Iterator[Path]:
    """``with written_whole(path) as partial:`` write ``partial``; it becomes ``path`` when the block
    ends and is removed if it raises (a full disk, Ctrl-C): readers never see half a file."""
    path = Path(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # only there if the block failed


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all."""
    with written_whole(path) as partial:
        partial.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_yaml(path: str | Path, data: dict, header: str | None = None) -> None:
    """YAML (keys in insertion order), with an optional ``# comment`` header, written atomically."""
    import yaml

    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    atomic_write_text(path, text)


def check_input_file(path: str | Path, what: str) -> Path:
    """An existing file (not a folder)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputNotFound(f"{what} {path} does not exist")
    if path.is_dir():
        raise InputNotFound(f"{what} {path} is a folder; expected a file")
    return path


# Names a user gives an output folder meaning a file (`eval --output results.json`); refused rather
# than made into a folder of that name.
FILE_SUFFIXES = {".json", ".jsonl", ".md", ".csv", ".png", ".yaml", ".yml", ".txt", ".safetensors"}


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """A folder that exists or can be created and written: refused if it, or a parent, is a file,
    if it is not writable, or if the system refuses to create it. Nothing is left created."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{what} {path} is a file; give a folder")
    if not path.exists() and path.suffix.lower() in FILE_SUFFIXES:
        raise RunFolderError(f"{what} {path} names a file; give a folder (the command writes its files into it)")
    probe = _existing_ancestor(path)
    if not probe.is_dir():
        raise RunFolderError(f"{what} {path} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunFolderError(f"{what} {path} cannot be written: no write permission on {probe}")
    made = make_dirs(path, what)  # the system may still refuse it (a special file system such as /proc)
    if made is not None:  # the probe leaves nothing: its folders go again, innermost first, while empty
        for folder in (path.absolute(), *path.absolute().parents):
            with contextlib.suppress(OSError):
                folder.rmdir()
            if folder == made.absolute():
                break
    return path


def make_dirs(path: str | Path, what: str = "output folder") -> Path | None:
    """``path`` and its missing parents, created; returns the first folder this call made (None if
    ``path`` existed). A folder the system refuses to create (a special file system such as /proc,
    a name too long) is a one-line error naming it, and the parents this call made are removed."""
    path = Path(path)
    first_made = None
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        first_made, probe = probe, probe.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if first_made is not None:
            shutil.rmtree(first_made, ignore_errors=True)
        if disk_full(e):
            raise
        raise RunFolderError(f"{what} {path} cannot be created: {e.strerror or e}") from e
    return first_made


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """A file path whose folder can be created and written, and that is not itself a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise RunFolderError(f"{what} {path} is a folder; give a file name")
    check_output_dir(path.parent, f"folder of {what}")
    return path


def check_free_space(path: str | Path, need: int, what: str) -> None:
    """Refuse, before any work, a job that will write about ``need`` bytes under ``path`` (a folder
    that may not exist yet) to a disk with less free space than that."""
    free = shutil.disk_usage(_existing_ancestor(Path(path).expanduser())).free
    if need > free:
        raise RunFolderError(f"{what} needs about {human_bytes(need)} free under {path}, and its disk has {human_bytes(free)}; "
                             "free some space or choose a folder on another disk")  # fmt: skip


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest ancestor that does."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe
