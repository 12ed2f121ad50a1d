"""Extraction of distribution vectors v_i = theta_i - theta_base into safetensors files.

Checkpoints are read a piece of a tensor at a time (``Checkpoint.pieces``: a few million values),
so extraction needs memory for a few pieces per model, whatever the model's size.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Mapping

import torch

from optimer_merge.io import FLOAT_DTYPES
from optimer_merge.io.checkpoints import DTYPE_NAMES, Checkpoint, check_model_folder, fingerprint
from optimer_merge.io.files import check_free_space, check_output_dir, write_json
from optimer_merge.io.progress import BytesProgress
from optimer_merge.io.run_folder import LOCK, RunFolder
from optimer_merge.vectors.checks import MANIFEST, VectorError, check_compatible, check_distinct, check_finite, check_name, check_trained_from, read_manifest, source_model

LEFTOVERS = (LOCK, ".partial")  # what a killed extraction leaves behind


def extract(
    base: str | Path,
    models: Mapping[str, str | Path],
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Write ``out_dir/<name>.safetensors`` = model - base for each model, and ``vectors.json``
    (vectors of the same base already in ``out_dir`` stay listed; another base is refused). A NAME
    whose vector in ``out_dir`` came from the same model folder (or the same model moved with the
    vectors), unchanged since (its fingerprint), is kept without reading anything: rerunning a
    command, or adding a model to it, extracts only what is new.

    ``dtype`` is the vectors' stored dtype (default: the base's; a bf16 delta keeps 2^-9 of its
    own size, whatever the weights' size). Everything is checked first (names, folders, tensors,
    shapes, the base each model records);
    files appear under their names only when complete. Tensors equal in the base and every model
    (e.g. a frozen vision tower) and non-float tensors are left out of every vector and listed in
    the manifest. Returns the manifest.
    """
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise VectorError(f"unknown vector dtype {dtype!r}; choose {', '.join(FLOAT_DTYPES)}")
    if not models:
        raise VectorError("no models given: name at least one NAME=MODEL_FOLDER")
    for name in models:
        check_name(name)
    check_distinct(models, "model")
    check_output_dir(out_dir, "vector extraction folder")
    base_ckpt = Checkpoint.open(check_model_folder(base, "base", config=False))
    base_fp = fingerprint(base)
    ckpts = {}
    for name, path in models.items():
        ckpt = Checkpoint.open(check_model_folder(path, f"model {name}", config=False))
        check_compatible(base_ckpt, ckpt, f"model {name} ({path})")
        check_trained_from(base_fp, path, f"model {name}")
        if Path(path).resolve() == Path(base).resolve():
            log(f"warning: model {name} is the base itself ({path}); its vector is all zeros")
        ckpts[name] = ckpt
    if dtype is None:
        dtype = base_ckpt.float_dtype() if base_ckpt.float_dtype() in FLOAT_DTYPES else "float32"
    earlier = _earlier_vectors(out_dir, base_fp, dtype)
    model_fps = {name: fingerprint(path) for name, path in models.items()}
    held = earlier.get("vectors", {})
    staying = {Path(_model_of(out_dir, entry)).resolve(): name for name, entry in held.items() if name not in models}
    for name, path in models.items():
        if other := staying.get(Path(path).resolve()):
            raise VectorError(f"model {name} ({path}) is already in {out_dir} as vector {other}: the pool would hold one model twice; "
                              f"remove {Path(out_dir) / (other + '.safetensors')} first to store it under another name")  # fmt: skip
    kept = [name for name, path in models.items() if _up_to_date(out_dir, held.get(name), path, model_fps[name])]
    held = {name: {**entry, "model": str(Path(models[name]).resolve())} if name in kept else entry for name, entry in held.items()}  # where they are now
    earlier = {**earlier, "base": str(Path(base).resolve()), "vectors": held} if earlier else earlier
    if held:
        groups = {"kept": [n for n in held if n not in models], "up to date (same model, unchanged since)": kept,
                  "replaced (another model, or changed since)": [n for n in held if n in models and n not in kept]}  # fmt: skip
        log(f"{out_dir} already holds {', '.join(held)}: " + "; ".join(f"{', '.join(names)} {what}" for what, names in groups.items() if names))
    ckpts = {name: ckpt for name, ckpt in ckpts.items() if name not in kept}
    if not ckpts:
        with RunFolder(out_dir, "vector extraction"):
            write_json(Path(out_dir) / MANIFEST, earlier)  # files that vanished are no longer listed
        return earlier
    store = getattr(torch, dtype)
    largest_stored = torch.finfo(store).max  # float16's 65504: a delta can overflow to inf
    narrow = largest_stored < torch.finfo(torch.float32).max
    names = [n for n in base_ckpt.names() if base_ckpt.is_float(n)]
    skipped_non_float = [n for n in base_ckpt.names() if n not in names]
    check_free_space(out_dir, len(ckpts) * base_ckpt.size_as(store, names), f"extracting {len(ckpts)} vector(s)")
    log(f"extracting {len(ckpts)} vector{'s' if len(ckpts) > 1 else ''} from {base} -> {out_dir}")
    with RunFolder(out_dir, "vector extraction"):  # a fresh folder is removed again if refused midway
        out_dir = Path(out_dir)
        candidates = [(n, base_ckpt.meta[n][1]) for n in names]
        writers = {
            name: _StreamingSafetensors(out_dir / f"{name}.safetensors", store, candidates, _metadata(base_fp, models[name], model_fps[name], out_dir))
            for name in ckpts
        }
        equal, norms = [], {name: 0.0 for name in ckpts}
        readers = [base_ckpt, *ckpts.values()]
        progress = BytesProgress(sum(c.nbytes(n) for c in readers for n in names), log, what="read ")
        try:
            for tensor_name in names:  # a piece at a time: memory for a few pieces, whatever the model's size
                shape = base_ckpt.meta[tensor_name][1]
                changed, held = False, 0  # values equal in every model so far: written (zeros) once a later piece differs
                for pieces in zip(*(c.pieces(tensor_name) for c in readers)):
                    b = pieces[0].to(torch.float32)
                    deltas = {name: piece.to(b.dtype) - b for name, piece in zip(ckpts, pieces[1:])}
                    if not changed and all(not bool(d.any()) for d in deltas.values()):
                        held += b.numel()
                    else:
                        for name, delta in deltas.items():
                            if not changed:
                                writers[name].start(held)
                            check_finite(delta, f"model {name}", tensor_name)
                            if narrow and (largest := _largest_magnitude(delta)) > largest_stored:
                                raise VectorError(f"model {name}: tensor {tensor_name} differs from the base by up to {largest:g}, beyond {dtype}'s "
                                                  f"largest value {largest_stored:g}; extract with --dtype float32 or bfloat16")  # fmt: skip
                            norms[name] += float(delta.double().square().sum())
                            writers[name].append(delta.to(store))
                        changed = True
                    progress.advance(sum(c.nbytes(tensor_name) for c in readers) * b.numel() / math.prod(shape))
                if changed:
                    for writer in writers.values():
                        writer.finish(tensor_name, shape)
                else:
                    equal.append(tensor_name)  # left out of every vector
            for writer in writers.values():
                writer.close()
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        for name, norm in norms.items():
            if norm == 0.0 and Path(models[name]).resolve() != Path(base).resolve():
                log(f"warning: model {name} equals the base in every tensor; its vector is all zeros")
        vectors = {name: entry for name, entry in earlier.get("vectors", {}).items() if name not in ckpts}
        vectors.update({name: {"file": f"{name}.safetensors", "model": str(Path(models[name]).resolve()), "model_fingerprint": model_fps[name],
                               "l2_norm": math.sqrt(norms[name])} for name in ckpts})  # fmt: skip
        if earlier:  # a tensor is left out of every file only where every extraction left it out
            equal = [n for n in equal if n in set(earlier["skipped"]["equal_in_all_models"])]
        manifest = {
            "base": str(Path(base).resolve()),
            "base_fingerprint": base_fp,
            "dtype": dtype,
            "vectors": vectors,
            "skipped": {"equal_in_all_models": equal, "not_floating_point": skipped_non_float},
        }
        write_json(out_dir / MANIFEST, manifest)
    return manifest


def _metadata(base_fp: str, model: str | Path, model_fp: str, out_dir: Path) -> dict[str, str]:
    """What a vector file records: its base, and its model where it was and relative to the vector
    (where the two moved together, see ``checks.source_model``)."""
    source = Path(model).resolve()
    return {"base_fingerprint": base_fp, "source": str(source), "source_fingerprint": model_fp, "source_relative": os.path.relpath(source, out_dir.resolve())}


def _up_to_date(out_dir: str | Path, entry: dict | None, model: str | Path, model_fp: str) -> bool:
    """An earlier extraction's manifest entry came from this model folder (where it was then, or
    moved together with the vectors), unchanged since."""
    return bool(entry) and entry.get("model_fingerprint") == model_fp and _model_of(out_dir, entry) == str(Path(model).resolve())


def _model_of(out_dir: str | Path, entry: dict) -> str:
    """The model folder a manifest entry's vector came from, found again where the project moved
    (``checks.source_model``); the manifest's record for files that name none."""
    return source_model(Path(out_dir) / entry["file"]) or entry["model"]


def _earlier_vectors(out_dir: str | Path, base_fp: str, dtype: str) -> dict:
    """The manifest of vectors an earlier extraction left in ``out_dir`` (they stay, listed beside
    the new ones), after checking they share this base and dtype; {} for a new or empty folder.
    Any other folder (a model's, above all: a vector file there would join its weights) is refused."""
    if not (Path(out_dir) / MANIFEST).is_file():
        if Path(out_dir).is_dir() and any(not p.name.endswith(LEFTOVERS) for p in Path(out_dir).iterdir()):
            raise VectorError(f"--out {out_dir} is not empty and holds no vectors ({MANIFEST}); choose a new or empty folder")
        return {}
    earlier = read_manifest(out_dir)
    if earlier.get("base_fingerprint") != base_fp:
        raise VectorError(f"{out_dir} holds vectors of another base ({earlier.get('base')}); choose another --out")
    if earlier.get("dtype") != dtype:
        raise VectorError(f"{out_dir} holds {earlier.get('dtype')} vectors; extract with --dtype {earlier.get('dtype')} or choose another --out")
    present = {name: entry for name, entry in earlier.get("vectors", {}).items() if (Path(out_dir) / entry["file"]).is_file()}
    return {**earlier, "vectors": present}


class _StreamingSafetensors:
    """Write a safetensors file one tensor at a time with a header reserved up front.

    Which tensors end up in the file is known only at the end (equal tensors are skipped), so the
    header slot is sized for all candidates, then filled in and padded with spaces, as the format
    allows. A tensor is written in pieces (``start``, ``append``..., ``finish``). The file appears
    under its name only when complete, with ``metadata``.
    """

    def __init__(self, path: Path, dtype: torch.dtype, candidates: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str]):
        self.path, self.partial, self.dtype = path, path.with_name(path.name + ".partial"), dtype
        self.metadata = {**metadata, "format": "pt"}
        total = sum(math.prod(shape) for _, shape in candidates) * torch.empty((), dtype=dtype).element_size()
        worst = {n: {"dtype": DTYPE_NAMES[dtype], "shape": list(s), "data_offsets": [total, total]} for n, s in candidates}
        worst["__metadata__"] = self.metadata
        self.slot = (len(json.dumps(worst).encode()) + 7) // 8 * 8
        self.file = open(self.partial, "wb")
        self.file.seek(8 + self.slot)
        self.entries, self.offset, self.begin = {}, 0, 0

    def start(self, zeros: int) -> None:
        """A tensor begins, with ``zeros`` values equal to the base's (written as zeros)."""
        self.begin = self.offset
        item = torch.empty((), dtype=self.dtype).element_size()
        left = zeros * item
        while left:
            chunk = min(left, 2**24)
            self.file.write(bytes(chunk))
            left -= chunk
        self.offset += zeros * item

    def append(self, piece: torch.Tensor) -> None:
        data = piece.contiguous().view(torch.uint8).numpy().tobytes() if piece.numel() else b""
        self.file.write(data)
        self.offset += len(data)

    def finish(self, name: str, shape: tuple[int, ...]) -> None:
        self.entries[name] = {"dtype": DTYPE_NAMES[self.dtype], "shape": list(shape), "data_offsets": [self.begin, self.offset]}

    def close(self) -> None:
        header = {"__metadata__": self.metadata, **self.entries}
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


def _largest_magnitude(tensor: torch.Tensor) -> float:
    """max |x| in one pass without a copy of the tensor (``abs()`` would allocate one as large)."""
    low, high = torch.aminmax(tensor)
    return max(-float(low), float(high))
