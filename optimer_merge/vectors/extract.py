"""Extraction of distribution vectors v_i = theta_i - theta_base into safetensors files.

Checkpoints are read one tensor at a time (safetensors are memory-mapped), so extraction needs
memory for a few tensors whatever the model size.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Mapping

import torch

from optimer_merge.io.checkpoints import DTYPE_NAMES, Checkpoint, check_model_folder, fingerprint
from optimer_merge.io.files import check_free_space, write_json
from optimer_merge.io.progress import BytesProgress
from optimer_merge.io.run_folder import LOCK, RunFolder
from optimer_merge.vectors.checks import MANIFEST, VectorError, check_compatible, check_distinct, check_finite, check_name, check_trained_from, read_manifest

STORE_DTYPES = ("float32", "bfloat16", "float16")
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
    (vectors of the same base already in ``out_dir`` stay listed; another base is refused).

    ``dtype`` is the vectors' stored dtype (default: the base's; a bf16 delta keeps 2^-9 of its
    own size, whatever the weights' size). Everything is checked first (names, folders, tensors,
    shapes, the base each model records);
    files appear under their names only when complete. Tensors equal in the base and every model
    (e.g. a frozen vision tower) and non-float tensors are left out of every vector and listed in
    the manifest. Returns the manifest.
    """
    if dtype is not None and dtype not in STORE_DTYPES:
        raise VectorError(f"unknown vector dtype {dtype!r}; choose {', '.join(STORE_DTYPES)}")
    if not models:
        raise VectorError("no models given: name at least one NAME=MODEL_FOLDER")
    for name in models:
        check_name(name)
    check_distinct(models, "model")
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
        dtype = base_ckpt.float_dtype() if base_ckpt.float_dtype() in STORE_DTYPES else "float32"
    earlier = _earlier_vectors(out_dir, base_fp, dtype, log)
    store = getattr(torch, dtype)
    names = [n for n in base_ckpt.names() if base_ckpt.is_float(n)]
    skipped_non_float = [n for n in base_ckpt.names() if n not in names]
    check_free_space(out_dir, len(ckpts) * base_ckpt.size_as(store, names), f"extracting {len(ckpts)} vector(s)")
    with RunFolder(out_dir, "vector extraction"):  # a fresh folder is removed again if refused midway
        out_dir = Path(out_dir)
        writers = {
            name: _StreamingSafetensors(out_dir / f"{name}.safetensors", [(n, store, base_ckpt.meta[n][1]) for n in names])
            for name in ckpts
        }
        equal, norms = [], {name: 0.0 for name in ckpts}
        readers = [base_ckpt, *ckpts.values()]
        progress = BytesProgress(sum(c.nbytes(n) for c in readers for n in names), log, what="read ")
        try:
            for tensor_name in names:
                b = base_ckpt.get(tensor_name).to(torch.float32)
                deltas = {name: ckpt.get(tensor_name).to(b.dtype) - b for name, ckpt in ckpts.items()}
                if all(not bool(d.any()) for d in deltas.values()):
                    equal.append(tensor_name)
                else:
                    for name, delta in deltas.items():
                        check_finite(delta, f"model {name}", tensor_name)
                        norms[name] += float(delta.double().square().sum())
                        writers[name].write(tensor_name, delta.to(store))
                progress.advance(sum(c.nbytes(tensor_name) for c in readers))
            for name, writer in writers.items():
                writer.close({"base_fingerprint": base_fp, "source": str(Path(models[name]).resolve())})
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        for name, norm in norms.items():
            if norm == 0.0 and Path(models[name]).resolve() != Path(base).resolve():
                log(f"warning: model {name} equals the base in every tensor; its vector is all zeros")
        vectors = {name: entry for name, entry in earlier.get("vectors", {}).items() if name not in models}
        vectors.update({name: {"file": f"{name}.safetensors", "model": str(Path(path).resolve()), "l2_norm": math.sqrt(norms[name])}
                        for name, path in models.items()})  # fmt: skip
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


def _earlier_vectors(out_dir: str | Path, base_fp: str, dtype: str, log: Callable[[str], None]) -> dict:
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
    if present:
        log(f"{out_dir} already holds {', '.join(present)}: kept (a name given again is replaced)")
    return {**earlier, "vectors": present}


class _StreamingSafetensors:
    """Write a safetensors file one tensor at a time with a header reserved up front.

    Which tensors end up in the file is known only at the end (equal tensors are skipped), so the
    header slot is sized for all candidates, then filled in and padded with spaces, as the format
    allows. The file appears under its name only when complete.
    """

    def __init__(self, path: Path, candidates: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self.path, self.partial = path, path.with_name(path.name + ".partial")
        total = sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() for _, dt, shape in candidates)
        worst = {n: {"dtype": DTYPE_NAMES[dt], "shape": list(s), "data_offsets": [total, total]} for n, dt, s in candidates}
        worst["__metadata__"] = {"base_fingerprint": "0" * 64, "source": "x" * 4096, "format": "pt"}
        self.slot = (len(json.dumps(worst).encode()) + 7) // 8 * 8
        self.file = open(self.partial, "wb")
        self.file.seek(8 + self.slot)
        self.entries, self.offset = {}, 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        self.file.write(data)
        self.entries[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [self.offset, self.offset + len(data)]}
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
