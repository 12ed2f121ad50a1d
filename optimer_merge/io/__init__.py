"""Shared plumbing: checkpoints and fingerprints, hub-layout names, atomic writes, jsonl logs, YAML
configs, run folders (identity, lock, clean refusal) and output checks."""

import re

FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # of stored models and vectors, and of evaluated models
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # a file name with room for a suffix


def plain_name_problem(name: str, what: str = "") -> str | None:
    """Why ``name`` (of a vector or a dataset, which doubles as a file name) is refused, or None."""
    if PLAIN_NAME.fullmatch(name):
        return None
    shown = repr(name) if len(name) <= 60 else f"{name[:40]!r}... ({len(name)} characters)"
    return f"{what} name".lstrip() + f" must be a plain file name (letters, digits, _ . -; not starting with a dot; at most 128 characters), got {shown}"
