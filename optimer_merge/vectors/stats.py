"""Statistics of distribution vectors: L2 norms and pairwise cosines, overall, per layer and per
kind of tensor, and each vector's size relative to the base (the regime the method assumes: small
updates, ||v_i|| / ||theta_base|| of a few percent, mildly positive cosines)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Mapping

import torch

from optimer_merge.io.checkpoints import Checkpoint
from optimer_merge.io.files import check_output_dir, make_dirs, write_json
from optimer_merge.io.progress import BytesProgress
from optimer_merge.vectors.checks import VectorError, check_distinct, check_finite

_LAYER = re.compile(r"layers\.(\d+)\.")


def layer_of(name: str) -> str:
    """``layer 12`` for decoder-layer tensors, ``embed``/``other`` for the rest."""
    match = _LAYER.search(name)
    if match and "vision" not in name:
        return f"layer {int(match.group(1))}"
    return "embed" if "embed" in name else "other"


KINDS = ("embeddings", "attention", "mlp", "norms", "other")


def kind_of(name: str) -> str:
    """The kind of tensor a checkpoint name holds: embeddings (and an untied output head),
    attention, MLP, normalization, or other (vision tower, projector)."""
    if "vision" in name or "multi_modal_projector" in name:
        return "other"
    if "embed" in name or "lm_head" in name:
        return "embeddings"
    if "norm" in name:
        return "norms"
    if "attn" in name or "attention" in name:
        return "attention"
    if "mlp" in name:
        return "mlp"
    return "other"


def open_vector(name: str, path: str | Path) -> Checkpoint:
    """A vector file written by `vectors extract` (not a model folder, not another safetensors)."""
    path = Path(path)
    if path.is_dir():
        hint = " (a model folder: extract its vector with `optimer-merge vectors extract`)" if (path / "config.json").exists() else ""
        raise VectorError(f"vector {name}: {path} is a folder{hint}; expected a .safetensors vector file")
    ckpt = Checkpoint.open(path)
    if "base_fingerprint" not in ckpt.metadata:
        raise VectorError(f"vector {name}: {path} is not a vector written by `optimer-merge vectors extract` (no base fingerprint)")
    return ckpt


def stats(vectors: Mapping[str, str | Path], out_dir: str | Path | None = None, base: str | Path | None = None,
          log: Callable[[str], None] = print) -> dict:
    """L2 norms and pairwise cosine similarities of vector files, overall, per layer and per kind
    of tensor; with the ``base`` they were extracted from, each norm relative to the base's.

    Streams a piece of a tensor at a time (long reads log progress with an ETA); with ``out_dir``
    writes stats.json and cosine.png there.
    """
    from optimer_merge.io.checkpoints import check_model_folder, fingerprint

    if out_dir is not None:
        check_output_dir(out_dir, "stats folder")
    check_distinct(vectors, "vector")
    ckpts = {name: open_vector(name, path) for name, path in vectors.items()}
    names = list(ckpts)
    first = ckpts[names[0]]
    for name in names[1:]:
        if ckpts[name].metadata.get("base_fingerprint") != first.metadata.get("base_fingerprint"):
            raise VectorError(f"vectors {names[0]} and {name} were extracted from different bases")
    base_ckpt = None
    if base is not None:
        base_ckpt = Checkpoint.open(check_model_folder(base, "base", config=False))
        if fingerprint(base) != first.metadata.get("base_fingerprint"):
            raise VectorError(f"base {base} is not the base these vectors were extracted from; give that base, or leave --base out")
    keys = sorted(set().union(*(c.meta for c in ckpts.values())))
    in_vectors = set(keys)
    k = len(names)
    grams: dict[str, torch.Tensor] = {}
    kinds: dict[str, torch.Tensor] = {}
    base_sq: dict[str, float] = dict.fromkeys(KINDS, 0.0)
    numel: dict[str, int] = dict.fromkeys(KINDS, 0)  # parameters per kind: the vectors' tensors, and the base's unchanged ones
    base_keys = [key for key in base_ckpt.names() if base_ckpt.is_float(key)] if base_ckpt is not None else []
    total_bytes = sum(c.nbytes(key) for c in ckpts.values() for key in c.meta) + sum(base_ckpt.nbytes(key) for key in base_keys)
    progress = BytesProgress(total_bytes, log, what="read ")
    for key in keys:  # each tensor a piece at a time: memory for k pieces, whatever the model's size
        shape = next(c.meta[key][1] for c in ckpts.values() if key in c.meta)
        group, kind = layer_of(key), kind_of(key)
        present = [i for i, name in enumerate(names) if key in ckpts[name].meta]  # a vector without it is 0 there
        at = torch.tensor(present)
        gram = torch.zeros(k, k, dtype=torch.float64)
        for piece in zip(*(ckpts[names[i]].pieces(key) for i in present)):
            stack = torch.stack([p.double() for p in piece])
            for i, row in zip(present, stack):
                check_finite(row, f"vector {names[i]}", key)
            gram[at[:, None], at[None, :]] += stack @ stack.T
            progress.advance(sum(ckpts[names[i]].nbytes(key) for i in present) * stack.shape[1] / math.prod(shape))
        grams[group] = grams.get(group, torch.zeros(k, k, dtype=torch.float64)) + gram
        kinds[kind] = kinds.get(kind, torch.zeros(k, k, dtype=torch.float64)) + gram
        numel[kind] += math.prod(shape)
    for key in base_keys:  # tensors no model changed (left out of the vectors) count in the base's norm
        kind = kind_of(key)
        base_sq[kind] += sum(float(piece.double().pow(2).sum()) for piece in base_ckpt.pieces(key))
        if key not in in_vectors:
            numel[kind] += math.prod(base_ckpt.meta[key][1])
        progress.advance(base_ckpt.nbytes(key))
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
        "per_kind": {
            g: {
                "l2_norm": dict(zip(names, kinds[g].diagonal().sqrt().tolist())),
                "cosine": cosine(kinds[g]),
                # where each vector's length sits: a kind holding most of ||v||^2 sets the overall cosines
                "share_of_norm_sq": dict(zip(names, (kinds[g].diagonal() / total.diagonal().clamp_min(1e-300)).tolist())),
                "share_of_parameters": numel[g] / sum(numel.values()),
            }
            for g in KINDS
            if g in kinds
        },
    }
    if base_ckpt is not None:
        base_norm = math.sqrt(sum(base_sq.values()))
        result["base_l2_norm"] = base_norm
        result["relative_norm"] = {n: v / base_norm for n, v in result["l2_norm"].items()}
        for g, entry in result["per_kind"].items():
            if base_sq[g] > 0:
                entry["relative_norm"] = {n: v / math.sqrt(base_sq[g]) for n, v in entry["l2_norm"].items()}
    off = [result["cosine"][i][j] for i in range(k) for j in range(i + 1, k)]
    result["off_diagonal_cosine"] = {"min": min(off), "max": max(off), "mean": sum(off) / len(off)} if off else None
    if out_dir is not None:
        out_dir = Path(out_dir)
        make_dirs(out_dir, "stats folder")
        write_json(out_dir / "stats.json", result)
        plot_cosines(result, out_dir / "cosine.png")
    return result


def kind_summary(result: dict) -> dict[str, dict]:
    """Per kind of tensor in a ``stats`` result: the range of the pairwise cosines, the share of the
    parameters, and the share of ||v||^2 (mean over the vectors)."""
    k = len(result["vectors"])
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    return {
        kind: {
            "cosine_range": [min(e["cosine"][i][j] for i, j in pairs), max(e["cosine"][i][j] for i, j in pairs)] if pairs else None,
            "parameters": e["share_of_parameters"],
            "norm_sq": sum(e["share_of_norm_sq"].values()) / k,
        }
        for kind, e in result["per_kind"].items()
    }


def plot_cosines(result: dict, path: Path) -> None:
    """Heatmap of the overall cosine matrix, and each pair's cosine per layer."""
    from optimer_merge.report.plots import pyplot, save

    plt = pyplot()
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
    save(fig, path)
