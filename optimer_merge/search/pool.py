"""The search's vector pool: the base and one row per vector, resident where the live weights are,
merged again at every trial through the one rule (``optimer_merge.merge.rule.combine``).

A row is a CPT model's own tensor theta_i (kept in its checkpoint dtype, so a bf16 model is exact;
the merge gives the base the coefficient 1 - sum_i c_i) or a distribution vector v_i. With a
``pool_dtype`` other than a model's own, its row is stored as v_i = theta_i - base in that dtype.
The base keeps its checkpoint dtype. A trial computes base + sum_i c_i d_i in float32 per
tensor and casts it once into the live parameter.

Where the pool lives depends on the backend: ``build_module_pool`` fills it next to a
Hugging Face module's parameters (each on its own device, also across GPUs), and vLLM's workers
build it per tensor-parallel rank in the engine's layout (``optimer_merge.evaluation.vllm_worker``).
``PoolSpec`` says what to load and how, checked from checkpoint headers before any work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping

import torch

from optimer_merge.io.checkpoints import Checkpoint, check_model_folder, fingerprint
from optimer_merge.io.progress import BytesProgress, human_bytes
from optimer_merge.merge.rule import CHUNK, coefficients, combine, pieces
from optimer_merge.vectors.checks import VectorError, check_compatible, check_distinct, check_trained_from, sum_of_squares
from optimer_merge.vectors.stats import open_vector

Placement = Literal["auto", "device", "host"]


@dataclass(frozen=True)
class PoolSource:
    name: str
    kind: Literal["model", "vector"]
    path: str
    dtype: str  # the checkpoint's own floating-point dtype


@dataclass(frozen=True)
class PoolSpec:
    """What a pool holds (base and sources, checked) and how (row dtype, placement)."""

    base: str
    base_dtype: str
    sources: tuple[PoolSource, ...]
    pool_dtype: str | None = None  # None: each source's own dtype
    placement: Placement = "auto"
    params: int = 0  # floating-point parameters of the base checkpoint

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def row_dtype(self, source: PoolSource) -> str:
        return self.pool_dtype or source.dtype

    def relative(self) -> list[bool]:
        """Which rows are models' own tensors theta_i (not v_i)."""
        return [s.kind == "model" and self.row_dtype(s) == s.dtype for s in self.sources]

    def bytes_per_param(self) -> int:
        """Bytes the pool holds per changed parameter: the base and one row per source."""
        size = lambda name: torch.empty((), dtype=getattr(torch, name)).element_size()  # noqa: E731
        return size(self.base_dtype) + sum(size(self.row_dtype(s)) for s in self.sources)

    def to_rpc(self) -> dict:
        """The spec as plain data, for vLLM's workers (paths only: each worker reads the files)."""
        return {
            "base": self.base,
            "base_dtype": self.base_dtype,
            "sources": [{"name": s.name, "kind": s.kind, "path": s.path, "dtype": self.row_dtype(s), "relative": r}
                        for s, r in zip(self.sources, self.relative())],  # fmt: skip
            "placement": self.placement,
        }


def check_sources(
    base: str | Path, sources: Mapping[str, dict], *, pool_dtype: str | None = None, placement: Placement = "auto"
) -> PoolSpec:
    """A PoolSpec from ``{name: {"model": dir} | {"vector": file}}``, checked from headers only: every
    source has the base's tensors and shapes; vector files, and models whose train_meta.json records
    their base, come from this base."""
    base_ckpt = Checkpoint.open(check_model_folder(base, "base", config=False))
    base_fp = fingerprint(base)
    kinds = {name: "vector" if source.get("vector") else "model" for name, source in sources.items()}
    paths = {name: Path(source[kinds[name]]) for name, source in sources.items()}
    for name, path in paths.items():
        if path.resolve() == Path(base).resolve():
            raise VectorError(f"{kinds[name]} {name} ({path}) is the base itself: its vector is all zeros and its weight would change nothing; leave it out")
    for kind in ("model", "vector"):
        check_distinct({n: p for n, p in paths.items() if kinds[n] == kind}, kind, why="only the sum of their weights would matter")
    checked = []
    for name, kind in kinds.items():
        path = paths[name]
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
        checked.append(PoolSource(name, kind, str(path.resolve()), ckpt.float_dtype()))
    params = sum(math.prod(shape) for name, (_, shape) in base_ckpt.meta.items() if base_ckpt.is_float(name))
    return PoolSpec(str(Path(base).resolve()), base_ckpt.float_dtype(), tuple(checked), pool_dtype, placement, params)


@dataclass
class PoolEntry:
    """One tensor of the pool: the base, one row per source, and where the merge goes."""

    name: str
    base: torch.Tensor
    rows: list[torch.Tensor]
    target: torch.Tensor | None = None  # the live tensor written in place
    holders: list = field(default_factory=list)  # (module, attribute) pairs that hold the live tensor


class ResidentPool:
    """The base and K rows of every tensor any source changes; ``apply`` merges them into the live
    weights, ``merged`` yields the merge tensor by tensor (the push fallback, tests)."""

    def __init__(self, names: list[str], relative: list[bool], entries: list[PoolEntry], placement: str, skipped: list[str] | None = None):
        self.names, self.relative, self.entries, self.placement = names, relative, entries, placement
        self.skipped = skipped or []
        self.relative_norms: dict[str, float] = {}  # ||v_i|| / ||base|| over the pool's tensors, where measured

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self.entries for t in (e.base, *e.rows))

    def coefficients(self, weights: Mapping[str, float] | list[float]) -> torch.Tensor:
        values = [float(weights[n]) for n in self.names] if isinstance(weights, Mapping) else [float(w) for w in weights]
        if len(values) != len(self.names):
            raise ValueError(f"expected {len(self.names)} weights ({', '.join(self.names)}), got {len(values)}")
        return coefficients(torch.tensor(values, dtype=torch.float64))

    def merge(self, entry: PoolEntry, coeffs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return combine(entry.base, entry.rows, coeffs, relative=self.relative, out=out)

    def apply(self, weights) -> None:
        """Merge into every entry's live tensor, in place."""
        coeffs = self.coefficients(weights)
        with torch.no_grad():
            for entry in self.entries:
                self.merge(entry, coeffs, out=entry.target.data)

    def merged(self, weights) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, base + sum_i c_i d_i in float32) for every entry."""
        coeffs = self.coefficients(weights)
        for entry in self.entries:
            yield entry.name, self.merge(entry, coeffs)


def stream_rows(spec: PoolSpec, log: Callable[[str], None] | None = None) -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor], list[float]]]:
    """(checkpoint name, base tensor, rows, squared norm of base and of each delta) per
    floating-point base tensor some source changes, read one tensor at a time, each row in its pool
    dtype (vectors that lack a tensor: zeros). Checks and sums go through one reused buffer, so
    building the pool allocates nothing but the pool. With ``log``, progress with an ETA."""
    base_ckpt = Checkpoint.open(spec.base)
    ckpts = [Checkpoint.open(s.path) for s in spec.sources]
    relative = spec.relative()
    buffer = torch.empty(2 * CHUNK["cpu"], dtype=torch.float64)
    keys = [key for key in base_ckpt.names() if base_ckpt.is_float(key)]
    read = lambda key: sum(c.nbytes(key) for c in (base_ckpt, *ckpts) if key in c.meta)  # noqa: E731
    progress = BytesProgress(sum(read(key) for key in keys), log, what="pool: read ") if log else None
    for key in keys:
        b, rows = base_ckpt.get(key), []
        squares = [sum_of_squares(b, buffer=buffer)]
        for source, ckpt, rel in zip(spec.sources, ckpts, relative):
            dtype = getattr(torch, spec.row_dtype(source))
            if key not in ckpt.meta:
                rows.append(torch.zeros(b.shape, dtype=dtype))
                squares.append(0.0)
                continue
            tensor = ckpt.get(key)
            square = sum_of_squares(tensor, minus=b if source.kind == "model" else None, buffer=buffer)
            if not math.isfinite(square):
                raise VectorError(f"{source.kind} {source.name}: tensor {key} has NaN/Inf values")
            rows.append(tensor.to(dtype) if source.kind == "vector" or rel else _delta(tensor, b, dtype))
            squares.append(square)
        if any(s > 0 for s in squares[1:]):
            yield key, b, rows, squares
        if progress is not None:
            progress.advance(read(key))


def _delta(tensor: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """theta - base in float32, stored in ``dtype``, through two reused buffers."""
    out = torch.empty(base.shape, dtype=dtype)
    step = min(base.numel(), CHUNK["cpu"])
    a, b = torch.empty(step), torch.empty(step)
    for target, t, s in zip(pieces(out), pieces(tensor), pieces(base)):
        n = target.numel()
        a[:n].copy_(t)
        b[:n].copy_(s)
        target.copy_(a[:n].sub_(b[:n]))
    return out


def skipped_names(spec: PoolSpec, kept: set[str]) -> list[str]:
    return [n for n in Checkpoint.open(spec.base).names() if n not in kept]


def build_module_pool(model: torch.nn.Module, spec: PoolSpec, *, log: Callable[[str], None] = print) -> ResidentPool:
    """The pool of a Hugging Face module: each entry next to its live parameter (its device; or
    host memory, pinned on CUDA, with ``placement="host"``). Memory: the base and K rows per changed
    parameter, one checkpoint tensor at a time besides."""
    from optimer_merge.io.hub_layout import live_names

    keys = [k for k in Checkpoint.open(spec.base).names()]
    names = live_names(model, keys)
    live = dict(model.named_parameters(remove_duplicate=False))
    host = spec.placement == "host" and any(p.device.type == "cuda" for p in live.values())
    entries, kept, squares = [], set(), [0.0] * (len(spec.sources) + 1)
    for key, base, rows, sq in stream_rows(spec, log):
        squares = [a + b for a, b in zip(squares, sq)]
        if key not in names:
            raise VectorError(f"tensor {key} of the base has no parameter in the loaded {type(model).__name__}; this model cannot be merged in place")
        param = live[names[key]]
        place = (lambda t: t.pin_memory()) if host else (lambda t, device=param.device: t.to(device))
        entries.append(PoolEntry(key, place(base), [place(r) for r in rows], target=param))
        kept.add(key)
    pool = ResidentPool(spec.names, spec.relative(), entries, "host" if host else _devices(entries), skipped_names(spec, kept))
    pool.relative_norms = {n: math.sqrt(s / max(squares[0], 1e-30)) for n, s in zip(spec.names, squares[1:])}
    log(_describe(pool, spec))
    return pool


def build_host_pool(spec: PoolSpec, *, log: Callable[[str], None] = print) -> ResidentPool:
    """The pool in this process's memory, by checkpoint name (the push fallback, stock comparisons)."""
    entries, squares = [], [0.0] * (len(spec.sources) + 1)
    for key, base, rows, sq in stream_rows(spec, log):
        entries.append(PoolEntry(key, base, rows))
        squares = [a + b for a, b in zip(squares, sq)]
    pool = ResidentPool(spec.names, spec.relative(), entries, "host", skipped_names(spec, {e.name for e in entries}))
    pool.relative_norms = {n: math.sqrt(s / max(squares[0], 1e-30)) for n, s in zip(spec.names, squares[1:])}
    log(_describe(pool, spec))
    return pool


def _devices(entries: list[PoolEntry]) -> str:
    return ",".join(sorted({str(e.base.device) for e in entries})) or "cpu"


def _describe(pool: ResidentPool, spec: PoolSpec) -> str:
    return (
        f"vector pool: {len(pool.names)} rows over {len(pool.entries)} tensors ({human_bytes(pool.nbytes)} on {pool.placement}; "
        f"base {spec.base_dtype}, rows {', '.join(sorted({spec.row_dtype(s) for s in spec.sources}))}), "
        f"{len(pool.skipped)} tensors unchanged by every source"
    )
