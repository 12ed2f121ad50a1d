"""Append-only JSON-lines logs: one fsynced line per record, a torn last line repaired on read."""

from __future__ import annotations

import json
import os
from pathlib import Path

from optimer_merge.errors import UserError


class CorruptLog(UserError):
    """A jsonl log has a line that is not JSON before its last line."""


def append_jsonl(path: str | Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path, *, holes: bool = False) -> list[dict | None]:
    """The records of a log. A bad last line is a write cut short (a killed process): it is cut
    off the file, and a complete last record gets its missing newline back.

    A bad line before the last one is no torn write, and the records after it are kept: with
    ``holes`` it comes back as ``None`` (for the caller to re-create), else CorruptLog names it.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records: list[dict | None] = []
    offset = 0
    for i, line in enumerate(lines):
        if line.strip():
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                if i == last:
                    with open(path, "r+b") as f:
                        f.truncate(offset)
                    return records
                if not holes:
                    raise CorruptLog(
                        f"{path}:{i + 1}: not a JSON record (the lines after it are intact); fix or delete that line"
                    ) from None
                records.append(None)
        offset += len(line) + 1
    if data and not data.endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")
    return records
