"""The search's resident vector pool: the base and K vectors in memory, merged again every trial.

``merged(weights)`` yields base + sum_i w_i v_i tensor by tensor through the one merge rule
(``optimer_merge.merge.rule.combine``, one GEMV per tensor: a single read of the vectors);
``write_into(model, weights)`` writes it straight into a live model's parameters.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from optimer_merge.io.checkpoints import Checkpoint, check_model_folder, fingerprint
from optimer_merge.io.hub_layout import live_name
from optimer_merge.merge.rule import coefficients, combine
from optimer_merge.vectors.checks import VectorError, check_compatible, check_finite, check_trained_from
from optimer_merge.vectors.stats import open_vector


class VectorPool:
    """The base and K vectors, one [K, n] float32 block per tensor that any vector changes.

    Memory: (K + 1) x changed parameters x 4 bytes."""

    def __init__(self, names: list[str], base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], skipped: list[str]):
        self.names, self.base, self.deltas, self.skipped = names, base, deltas, skipped

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.base, self.deltas) for t in d.values())

    def _coeffs(self, weights) -> torch.Tensor:
        w = torch.as_tensor([float(weights[n]) for n in self.names] if isinstance(weights, Mapping) else list(weights), dtype=torch.float32)
        if w.numel() != len(self.names):
            raise ValueError(f"expected {len(self.names)} weights ({', '.join(self.names)}), got {w.numel()}")
        return coefficients(w)

    def merge_one(self, key: str, coeffs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        base = self.base[key]
        flat = combine(base.view(-1), self.deltas[key], coeffs, out=None if out is None else out.view(-1))
        return flat.view(base.shape)

    def merged(self, weights) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, base + sum_i w_i v_i) in float32 for every tensor a vector changes, in checkpoint names."""
        coeffs = self._coeffs(weights)
        for key in self.deltas:
            yield key, self.merge_one(key, coeffs)

    def write_into(self, model: torch.nn.Module, weights) -> None:
        """Write the merge into a live model's parameters in place (float32 CPU ones directly)."""
        coeffs = self._coeffs(weights)
        live = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for key in self.deltas:
                target = live.get(key)
                if target is None:
                    target = live.get(live_name(key))
                if target is None:
                    raise KeyError(f"{key} is not a parameter of the evaluated model")
                if target.dtype == torch.float32 and target.is_contiguous() and target.device.type == "cpu":
                    self.merge_one(key, coeffs, out=target.data)
                else:
                    target.data.copy_(self.merge_one(key, coeffs))


def relative_norm(pool: VectorPool, index: int) -> float:
    """||v_i|| / ||theta_base|| over the tensors the pool holds."""
    num = sum(float(d[index].double().square().sum()) for d in pool.deltas.values())
    den = sum(float(b.double().square().sum()) for b in pool.base.values())
    return math.sqrt(num / max(den, 1e-30))


def open_sources(base: str | Path, sources: Mapping[str, dict]) -> tuple[Checkpoint, dict[str, tuple[str, Checkpoint]]]:
    """Check the pool's inputs from headers only: every source has the base's tensors and shapes;
    vector files, and models whose train_meta.json records their base, come from this base."""
    base_ckpt = Checkpoint.open(check_model_folder(base, "base"))
    base_fp = fingerprint(base)
    ckpts: dict[str, tuple[str, Checkpoint]] = {}
    for name, source in sources.items():
        kind = "vector" if source.get("vector") else "model"
        path = Path(source[kind])
        if kind == "model":
            ckpt = Checkpoint.open(check_model_folder(path, f"model {name}", config=False))
            check_compatible(base_ckpt, ckpt, f"model {name} ({path})")
            check_trained_from(base_fp, path, f"model {name}")
        else:
            if not path.exists():
                raise VectorError(f"vector {name}: {path} does not exist")
            ckpt = open_vector(name, path)
            recorded = ckpt.metadata.get("base_fingerprint")
            if recorded != base_fp:
                raise VectorError(f"vector {name} ({path}) was extracted from a different base ({recorded}; this base is {base_fp})")
            unknown = sorted(set(ckpt.meta) - set(base_ckpt.meta))
            if unknown:
                raise VectorError(f"vector {name} ({path}) has tensors the base lacks: {', '.join(unknown[:3])}")
            for key, (_, shape) in ckpt.meta.items():
                if shape != base_ckpt.meta[key][1]:
                    raise VectorError(f"vector {name} ({path}): tensor {key} has shape {list(shape)}, the base has {list(base_ckpt.meta[key][1])}")
        ckpts[name] = (kind, ckpt)
    return base_ckpt, ckpts


def load_pool(base: str | Path, sources: Mapping[str, dict], *, log: Callable[[str], None] = print) -> VectorPool:
    """Build the resident pool from ``{name: {"model": dir} | {"vector": file}}``.

    Checks first (``open_sources``), then loads tensor by tensor, rejecting NaN/Inf. The log shows
    each ||v|| / ||base|| (a model trained from another base stands out there when nothing
    records its base).
    """
    base_ckpt, ckpts = open_sources(base, sources)
    names = list(ckpts)
    base_sd, deltas, skipped = {}, {}, []
    for key in base_ckpt.names():
        if not base_ckpt.is_float(key):
            skipped.append(key)
            continue
        b = None
        rows = []
        for name, (kind, ckpt) in ckpts.items():
            if kind == "model":
                b = base_ckpt.get(key).float() if b is None else b
                row = ckpt.get(key).float() - b
            elif key in ckpt.meta:
                row = ckpt.get(key).float()
            else:
                row = None
            if row is not None:
                check_finite(row, f"{kind} {name}", key)
            rows.append(row)
        if all(r is None or not bool(r.any()) for r in rows):
            skipped.append(key)
            continue
        b = base_ckpt.get(key).float() if b is None else b
        block = torch.zeros(len(names), b.numel(), dtype=torch.float32)
        for i, row in enumerate(rows):
            if row is not None:
                block[i] = row.reshape(-1)
        base_sd[key], deltas[key] = b, block
    pool = VectorPool(names, base_sd, deltas, skipped)
    norms = ", ".join(f"{n} {relative_norm(pool, i):.3g}" for i, n in enumerate(names))
    log(
        f"vector pool: {len(names)} vectors over {len(deltas)} tensors ({pool.nbytes / 2**20:.1f} MiB resident), "
        f"{len(skipped)} tensors equal in all; ||v|| / ||base||: {norms}"
    )
    return pool
