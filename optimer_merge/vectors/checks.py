"""What makes checkpoints usable as distribution vectors of one base: tensors, shapes, provenance."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import torch

from optimer_merge.errors import UserError
from optimer_merge.io import plain_name_problem
from optimer_merge.io.checkpoints import Checkpoint, fingerprint

MANIFEST = "vectors.json"


class VectorError(UserError, ValueError):
    """Inputs that cannot form distribution vectors of one base (shapes, bases, non-finite values)."""


def check_name(name: str, what: str = "vector") -> str:
    """A vector name doubles as a file name: letters, digits, ``_ . -``, not starting with a dot,
    at most 128 characters."""
    if problem := plain_name_problem(name, what):
        raise VectorError(problem)
    return name


def same_path(paths: Mapping[str, str | Path]) -> tuple[str, str] | None:
    """The first name whose file or folder an earlier name already gave, and that earlier name."""
    seen: dict[Path, str] = {}
    for name, path in paths.items():
        other = seen.setdefault(Path(path).resolve(), name)
        if other != name:
            return name, other
    return None


def check_distinct(paths: Mapping[str, str | Path], kind: str, why: str = "") -> None:
    """Refuse one file or folder given under two names (``why`` says what that would mean)."""
    if repeated := same_path(paths):
        name, other = repeated
        raise VectorError(f"{kind} {name} ({paths[name]}) is the same as {kind} {other}{': ' + why if why else ''}; give each once")


def check_compatible(base: Checkpoint, other: Checkpoint, what: str) -> None:
    """``other`` has exactly the base's tensors, in the base's shapes."""
    missing = sorted(set(base.meta) - set(other.meta))
    extra = sorted(set(other.meta) - set(base.meta))
    if missing or extra:
        raise VectorError(
            f"{what} does not have the base's tensors: "
            + (f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} " if missing else "")
            + (f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}" if extra else "")
        )
    for name, (_, shape) in base.meta.items():
        if other.meta[name][1] != shape:
            raise VectorError(f"{what}: tensor {name} has shape {list(other.meta[name][1])}, the base has {list(shape)}")


def recorded_base(model: str | Path) -> str | None:
    """The base fingerprint a CPT model's train_meta.json records (None when nothing records it)."""
    path = Path(model) / "train_meta.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("base_fingerprint")


def check_trained_from(base_fp: str, model: str | Path, what: str) -> None:
    """Refuse a CPT model whose train_meta.json says it was trained from another base."""
    recorded = recorded_base(model)
    if recorded and recorded != base_fp:
        raise VectorError(f"{what} ({model}) was trained from a different base (its train_meta.json records {recorded}, this base is {base_fp})")


def source_model(vector: str | Path) -> str | None:
    """The model folder a vector file was extracted from (None where the file records none): where
    it was then, or, where nothing is left there (the project moved to another disk, say), the same
    model at the same place relative to the vector file, checked by its fingerprint."""
    metadata = Checkpoint.open(vector).metadata
    source = metadata.get("source")
    if not source or (Path(source) / "config.json").exists() or not metadata.get("source_relative"):
        return source
    moved = (Path(vector).parent / metadata["source_relative"]).resolve()
    if (moved / "config.json").exists() and fingerprint(moved) == metadata.get("source_fingerprint"):
        return str(moved)
    return source


def sum_of_squares(tensor: torch.Tensor, minus: torch.Tensor | None = None, buffer: torch.Tensor | None = None) -> float:
    """sum((tensor - minus)^2) in float64, piece by piece through one reused buffer: no temporary
    the size of the tensor (on CPUs such temporaries, freed one after another, were seen to grow
    the process by gigabytes). NaN or Inf anywhere makes it non-finite."""
    from optimer_merge.merge.rule import CHUNK, pieces

    step = CHUNK.get(tensor.device.type, CHUNK["cuda"])
    if buffer is None or buffer.numel() < 2 * min(tensor.numel(), step):
        buffer = torch.empty(2 * min(tensor.numel(), step), dtype=torch.float64, device=tensor.device)
    total = 0.0
    others = pieces(minus) if minus is not None else None
    for piece in pieces(tensor):
        n = piece.numel()
        view = buffer[:n]
        view.copy_(piece)  # the cast happens in the copy: no temporary
        if others is not None:
            other = buffer[step : step + n]
            other.copy_(next(others))
            view.sub_(other)
        total += float(torch.dot(view, view))
    return total


def is_finite(tensor: torch.Tensor, buffer: torch.Tensor | None = None) -> bool:
    """No NaN or Inf anywhere."""
    return math.isfinite(sum_of_squares(tensor, buffer=buffer))


def check_finite(tensor: torch.Tensor, what: str, key: str, buffer: torch.Tensor | None = None) -> None:
    if not is_finite(tensor, buffer):
        raise VectorError(f"{what}: tensor {key} has NaN/Inf values")


def read_manifest(vector_dir: str | Path) -> dict:
    path = Path(vector_dir) / MANIFEST
    if not path.is_file():
        raise VectorError(f"{vector_dir}: no {MANIFEST} (extract vectors with `optimer-merge vectors extract`)")
    return json.loads(path.read_text())

