"""Distribution vectors v_i = theta_i - theta_base: extraction to safetensors, statistics, and the
resident pool a search merges from.

Everything here reads checkpoints one tensor at a time (safetensors are memory-mapped), so
extraction and statistics need memory for a few tensors, whatever the model size. Only the search
pool keeps the base and the vectors resident, because every trial merges them again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

MANIFEST = "vectors.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class VectorError(ValueError):
    """Inputs that cannot form distribution vectors of one base (shapes, bases, non-finite values)."""


# -- reading checkpoints ----------------------------------------------------------------------
@dataclass
class Checkpoint:
    """The tensors of a safetensors model folder (single file or sharded), read lazily."""

    path: Path
    files: dict[str, Path] = field(default_factory=dict)  # tensor name -> shard
    meta: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # name -> (dtype, shape)

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        path = Path(path)
        shards = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
        if not shards:
            raise VectorError(f"{path}: no *.safetensors files (expected a model folder or a vector file)")
        ckpt = cls(path)
        for shard in shards:
            for name, (dtype, shape) in _header(shard).items():
                ckpt.files[name], ckpt.meta[name] = shard, (dtype, shape)
        return ckpt

    def names(self) -> list[str]:
        return list(self.meta)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), "pt") as reader:
            return reader.get_tensor(name)

    def metadata(self) -> dict:
        shards = sorted(set(self.files.values()))
        with open(shards[0], "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(size)).get("__metadata__", {}) or {}


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return {name: (entry["dtype"], tuple(entry["shape"])) for name, entry in header.items()}


def fingerprint(model: str | Path) -> str:
    """A cheap identity of a checkpoint's weights: its headers, sizes and the first and last MiB of
    each shard (enough to tell two trainings apart without hashing tens of GB)."""
    digest = hashlib.sha256()
    path = Path(model)
    for shard in [path] if path.is_file() else sorted(path.glob("*.safetensors")):
        size = shard.stat().st_size
        digest.update(f"{shard.name}:{size}".encode())
        with open(shard, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _check_compatible(base: Checkpoint, other: Checkpoint, what: str) -> None:
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


def _is_float(dtype: str) -> bool:
    return dtype in _DTYPES


# -- extraction -------------------------------------------------------------------------------
def extract(
    base: str | Path,
    models: Mapping[str, str | Path],
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    log: Callable[[str], None] = print,
) -> dict:
    """Write ``out_dir/<name>.safetensors`` = model - base for each model, and ``vectors.json``.

    Tensors equal in the base and every model (e.g. a frozen vision tower) and non-float tensors
    are left out of every vector and listed in the manifest. Returns the manifest.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = getattr(torch, dtype)
    base_ckpt = Checkpoint.open(base)
    ckpts = {name: Checkpoint.open(path) for name, path in models.items()}
    for name, ckpt in ckpts.items():
        _check_compatible(base_ckpt, ckpt, f"model {name} ({ckpt.path})")
    names = [n for n in base_ckpt.names() if _is_float(base_ckpt.meta[n][0])]
    skipped_non_float = [n for n in base_ckpt.names() if n not in names]
    writers = {
        name: _StreamingSafetensors(out_dir / f"{name}.safetensors", [(n, store, base_ckpt.meta[n][1]) for n in names])
        for name in ckpts
    }
    equal, norms = [], {name: 0.0 for name in ckpts}
    try:
        for i, tensor_name in enumerate(names):
            b = base_ckpt.get(tensor_name).to(torch.float32 if store != torch.float64 else torch.float64)
            deltas = {name: ckpt.get(tensor_name).to(b.dtype) - b for name, ckpt in ckpts.items()}
            if all(not bool(d.any()) for d in deltas.values()):
                equal.append(tensor_name)
                continue
            for name, delta in deltas.items():
                if not bool(torch.isfinite(delta).all()):
                    raise VectorError(f"model {name}: tensor {tensor_name} has NaN/Inf values")
                norms[name] += float(delta.double().square().sum())
                writers[name].write(tensor_name, delta.to(store))
            if (i + 1) % 50 == 0 or i + 1 == len(names):
                log(f"  {i + 1}/{len(names)} tensors")
        base_fp = fingerprint(base)
        for name, writer in writers.items():
            writer.close({"base_fingerprint": base_fp, "source": str(Path(models[name]).resolve())})
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    manifest = {
        "base": str(Path(base).resolve()),
        "base_fingerprint": base_fp,
        "dtype": dtype,
        "vectors": {
            name: {"file": f"{name}.safetensors", "model": str(Path(path).resolve()), "l2_norm": math.sqrt(norms[name])}
            for name, path in models.items()
        },
        "skipped": {"equal_in_all_models": equal, "not_floating_point": skipped_non_float},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


class _StreamingSafetensors:
    """Write a safetensors file one tensor at a time with a header reserved up front.

    Which tensors end up in the file is known only at the end (equal tensors are skipped), so the
    header slot is sized for all candidates, then filled in and padded with spaces, as the format
    allows. The file appears under its name only when complete.
    """

    def __init__(self, path: Path, candidates: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self.path, self.partial = path, path.with_name(path.name + ".partial")
        total = sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() for _, dt, shape in candidates)
        worst = {n: {"dtype": _DTYPE_NAMES[dt], "shape": list(s), "data_offsets": [total, total]} for n, dt, s in candidates}
        worst["__metadata__"] = {"base_fingerprint": "0" * 64, "source": "x" * 4096, "format": "pt"}
        self.slot = (len(json.dumps(worst).encode()) + 7) // 8 * 8
        self.file = open(self.partial, "wb")
        self.file.seek(8 + self.slot)
        self.entries, self.offset = {}, 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        self.file.write(data)
        self.entries[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [self.offset, self.offset + len(data)]}
        self.offset += len(data)

    def close(self, metadata: dict[str, str]) -> None:
        header = {"__metadata__": {**metadata, "format": "pt"}, **self.entries}
        raw = json.dumps(header).encode()
        if len(raw) > self.slot:
            raise RuntimeError("safetensors header larger than its reserved slot")
        self.file.seek(0)
        self.file.write(self.slot.to_bytes(8, "little") + raw + b" " * (self.slot - len(raw)))
        self.file.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.partial.unlink(missing_ok=True)


# -- statistics -------------------------------------------------------------------------------
_LAYER = re.compile(r"layers\.(\d+)\.")


def layer_of(name: str) -> str:
    """``layer 12`` for decoder-layer tensors, ``embed``/``other`` for the rest."""
    match = _LAYER.search(name)
    if match and "vision" not in name:
        return f"layer {int(match.group(1))}"
    return "embed" if "embed" in name else "other"


def stats(vectors: Mapping[str, str | Path], out_dir: str | Path | None = None) -> dict:
    """L2 norms and pairwise cosine similarities of vector files, overall and per layer.

    Streams tensor by tensor; with ``out_dir`` writes stats.json and cosine.png there.
    """
    ckpts = {name: Checkpoint.open(path) for name, path in vectors.items()}
    names = list(ckpts)
    first = ckpts[names[0]]
    for name in names[1:]:
        if ckpts[name].metadata().get("base_fingerprint") != first.metadata().get("base_fingerprint"):
            raise VectorError(f"vectors {names[0]} and {name} were extracted from different bases")
    keys = sorted(set().union(*(c.meta for c in ckpts.values())))
    k = len(names)
    grams: dict[str, torch.Tensor] = {}
    for key in keys:
        rows = []
        for name in names:
            shape = next(c.meta[key][1] for c in ckpts.values() if key in c.meta)
            rows.append(ckpts[name].get(key).double().reshape(-1) if key in ckpts[name].meta else torch.zeros(math.prod(shape), dtype=torch.float64))
        stack = torch.stack(rows)
        gram = stack @ stack.T
        group = layer_of(key)
        grams[group] = grams.get(group, torch.zeros(k, k, dtype=torch.float64)) + gram
    total = sum(grams.values(), torch.zeros(k, k, dtype=torch.float64))

    def cosine(g: torch.Tensor) -> list[list[float]]:
        d = g.diagonal().sqrt().clamp_min(1e-30)
        return (g / d[:, None] / d[None, :]).tolist()

    order = sorted(grams, key=lambda g: (g != "embed", int(g.split()[1]) if g.startswith("layer") else 10**9, g))
    result = {
        "vectors": names,
        "l2_norm": dict(zip(names, total.diagonal().sqrt().tolist())),
        "cosine": cosine(total),
        "per_layer": {g: {"l2_norm": dict(zip(names, grams[g].diagonal().sqrt().tolist())), "cosine": cosine(grams[g])} for g in order},
    }
    off = [result["cosine"][i][j] for i in range(k) for j in range(i + 1, k)]
    result["off_diagonal_cosine"] = {"min": min(off), "max": max(off), "mean": sum(off) / len(off)} if off else None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "stats.json").write_text(json.dumps(result, indent=2))
        plot_cosines(result, out_dir / "cosine.png")
    return result


def plot_cosines(result: dict, path: Path) -> None:
    """Heatmap of the overall cosine matrix, and each pair's cosine per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, k = result["vectors"], len(result["vectors"])
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    fig, axes = plt.subplots(1, 2 if pairs else 1, figsize=(11 if pairs else 5, 4.2), squeeze=False)
    ax = axes[0][0]
    image = ax.imshow(result["cosine"], vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(k), names, rotation=45)
    ax.set_yticks(range(k), names)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{result['cosine'][i][j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title("cosine similarity of distribution vectors")
    fig.colorbar(image, ax=ax, fraction=0.046)
    if pairs:
        layers = list(result["per_layer"])
        grid = [[result["per_layer"][g]["cosine"][i][j] for g in layers] for i, j in pairs]
        ax = axes[0][1]
        ax.imshow(grid, vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto")
        ax.set_yticks(range(len(pairs)), [f"{names[i]}/{names[j]}" for i, j in pairs])
        ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=7)
        ax.set_title("per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_manifest(vector_dir: str | Path) -> dict:
    path = Path(vector_dir) / MANIFEST
    if not path.exists():
        raise VectorError(f"{vector_dir}: no {MANIFEST} (extract vectors with `optimer-merge vectors extract`)")
    return json.loads(path.read_text())


# -- the resident pool a search merges from ---------------------------------------------------
class VectorPool:
    """The base and K vectors held in memory, one [K, n] block per tensor that any vector changes.

    ``merged(weights)`` yields base + sum_i w_i v_i tensor by tensor (one GEMV per tensor, memory
    bound: a single read of the vectors); ``write_into(model, weights)`` writes it straight into a
    live model's parameters. Memory: (K + 1) x changed parameters x 4 bytes (float32).
    """

    def __init__(self, names: list[str], base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], skipped: list[str]):
        self.names, self.base, self.deltas, self.skipped = names, base, deltas, skipped

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.base, self.deltas) for t in d.values())

    def _weights(self, weights) -> torch.Tensor:
        w = torch.as_tensor([float(weights[n]) for n in self.names] if isinstance(weights, Mapping) else list(weights), dtype=torch.float32)
        if w.numel() != len(self.names):
            raise ValueError(f"expected {len(self.names)} weights ({', '.join(self.names)}), got {w.numel()}")
        return w

    def merge_one(self, key: str, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        base, deltas = self.base[key], self.deltas[key]
        flat = out.view(-1) if out is not None else torch.empty_like(base.view(-1))
        torch.addmv(base.view(-1), deltas.T, w.to(deltas.dtype), out=flat)
        return flat.view(base.shape)

    def merged(self, weights) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, base + sum_i w_i v_i) in float32 for every tensor a vector changes, in checkpoint names."""
        w = self._weights(weights)
        for key in self.deltas:
            yield key, self.merge_one(key, w)

    def write_into(self, model: torch.nn.Module, weights) -> None:
        """Write the merge into a live model's parameters in place (float32 ones directly)."""
        w = self._weights(weights)
        live = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for key in self.deltas:
                target = live.get(key)
                if target is None:
                    target = live.get(_live_name(key))
                if target is None:
                    raise KeyError(f"{key} is not a parameter of the evaluated model")
                if target.dtype == torch.float32 and target.is_contiguous() and target.device.type == "cpu":
                    self.merge_one(key, w, out=target.data)
                else:
                    target.data.copy_(self.merge_one(key, w))


def _live_name(key: str) -> str:
    from optimer_merge.tiny import HUB_VISION_PREFIX, VISION_PREFIX

    return VISION_PREFIX + key[len(HUB_VISION_PREFIX):] if key.startswith(HUB_VISION_PREFIX) else key


def relative_norm(pool: VectorPool, index: int) -> float:
    """||v_i|| / ||theta_base|| over the tensors the pool holds."""
    num = sum(float(d[index].double().square().sum()) for d in pool.deltas.values())
    den = sum(float(b.double().square().sum()) for b in pool.base.values())
    return math.sqrt(num / max(den, 1e-30))


def load_pool(
    base: str | Path,
    sources: Mapping[str, dict],
    *,
    log: Callable[[str], None] = print,
) -> VectorPool:
    """Build the resident pool from ``{name: {"model": dir} | {"vector": file}}``.

    Checks first (headers only): every source has the base's tensors and shapes; vector files, and
    models whose train_meta.json records their base, come from this base. Then loads tensor by
    tensor, rejecting NaN/Inf. The log shows each ||v|| / ||base|| (a model trained from another
    base stands out there when nothing records its base).
    """
    base_ckpt = Checkpoint.open(base)
    base_fp = fingerprint(base)
    ckpts: dict[str, tuple[str, Checkpoint]] = {}
    for name, source in sources.items():
        kind = "vector" if source.get("vector") else "model"
        path = Path(source[kind])
        if not path.exists():
            raise VectorError(f"{kind} {name}: {path} does not exist")
        ckpt = Checkpoint.open(path)
        if kind == "model":
            _check_compatible(base_ckpt, ckpt, f"model {name} ({path})")
            meta_file = path / "train_meta.json"
            recorded = json.loads(meta_file.read_text()).get("base_fingerprint") if meta_file.exists() else None
            if recorded and recorded != base_fp:
                raise VectorError(f"model {name} ({path}) was trained from a different base (its train_meta.json records {recorded}, this base is {base_fp})")
        else:
            recorded = ckpt.metadata().get("base_fingerprint")
            if recorded != base_fp:
                raise VectorError(f"vector {name} ({path}) was extracted from a different base ({recorded}; this base is {base_fp})")
            unknown = sorted(set(ckpt.meta) - set(base_ckpt.meta))
            if unknown:
                raise VectorError(f"vector {name} ({path}) has tensors the base lacks: {', '.join(unknown[:3])}")
            for key, (_, shape) in ckpt.meta.items():
                if shape != base_ckpt.meta[key][1]:
                    raise VectorError(f"vector {name} ({path}): tensor {key} has shape {list(shape)}, the base has {list(base_ckpt.meta[key][1])}")
        ckpts[name] = (kind, ckpt)

    names = list(ckpts)
    base_sd, deltas, skipped = {}, {}, []
    for key in base_ckpt.names():
        if not _is_float(base_ckpt.meta[key][0]):
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
            if row is not None and not bool(torch.isfinite(row).all()):
                raise VectorError(f"{kind} {name}: tensor {key} has NaN/Inf values")
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
