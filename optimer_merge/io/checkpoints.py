"""Reading safetensors checkpoints lazily (headers via ``safe_open``), and cheap fingerprints."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from optimer_merge.errors import InputNotFound, UserError

FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in FLOAT_DTYPES.items()}
PIECE_ELEMENTS = 2**22  # values read at once from a large tensor (32 MiB in float64)
_ITEM_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, unreadable, or does not match what it is used with."""


def shards(path: str | Path) -> list[Path]:
    """The safetensors files of a model folder, or the file itself."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise InputNotFound(f"{path} does not exist")
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{path}: no *.safetensors files (expected a model folder or a .safetensors file)")
    return found


def _open(shard: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(shard), "pt")
    except Exception as error:  # SafetensorError: truncated, not safetensors at all
        raise CheckpointError(f"{shard} is not a readable safetensors file ({error}); re-create or re-download it") from None


@dataclass
class Checkpoint:
    """The tensors of a safetensors model folder (single file or sharded) or a vector file, read lazily."""

    path: Path
    files: dict[str, Path] = field(default_factory=dict)  # tensor name -> shard
    meta: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # name -> (dtype, shape)
    metadata: dict[str, str] = field(default_factory=dict)  # the first shard's __metadata__

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        path = Path(path)
        ckpt = cls(path)
        for i, shard in enumerate(shards(path)):
            with _open(shard) as reader:
                if i == 0:
                    ckpt.metadata = dict(reader.metadata() or {})
                for name in reader.keys():
                    view = reader.get_slice(name)
                    ckpt.files[name], ckpt.meta[name] = shard, (view.get_dtype(), tuple(view.get_shape()))
        return ckpt

    def names(self) -> list[str]:
        return list(self.meta)

    def is_float(self, name: str) -> bool:
        return self.meta[name][0] in FLOAT_DTYPES

    def nbytes(self, name: str) -> int:
        """Bytes of one tensor in the file."""
        dtype, shape = self.meta[name]
        return math.prod(shape) * _ITEM_BYTES.get(dtype, 1 if dtype.startswith("F8") else 4)

    def size_as(self, dtype: str | torch.dtype | None = None, names: list[str] | None = None) -> int:
        """Bytes of the tensors (all, or ``names``) with the floating-point ones stored as ``dtype``
        (default: as they are): what a merge or a vector file written from them takes on disk."""
        item = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        size = 0
        for name in self.names() if names is None else names:
            if item is not None and self.is_float(name):
                size += math.prod(self.meta[name][1]) * torch.empty((), dtype=item).element_size()
            else:
                size += self.nbytes(name)
        return size

    def float_dtype(self) -> str:
        """The tensors' floating-point dtype (float32 where float32 mixes with others)."""
        names = {str(FLOAT_DTYPES[dtype]).removeprefix("torch.") for dtype, _ in self.meta.values() if dtype in FLOAT_DTYPES}
        return "float32" if "float32" in names or not names else sorted(names)[0]

    def get(self, name: str) -> torch.Tensor:
        with _open(self.files[name]) as reader:
            return reader.get_tensor(name)

    def pieces(self, name: str, elements: int | None = None) -> Iterator[torch.Tensor]:
        """The tensor flattened, in consecutive pieces of whole rows, about ``elements`` values each:
        a 27B model's embedding (1.4 G values) is read a piece at a time, never whole. Tensors of
        one shape are cut at the same places."""
        shape, elements = self.meta[name][1], elements or PIECE_ELEMENTS
        if len(shape) == 0 or math.prod(shape) <= elements:
            yield self.get(name).reshape(-1)
            return
        rows = max(1, elements // (math.prod(shape[1:]) or 1))
        with _open(self.files[name]) as reader:
            view = reader.get_slice(name)
            for start in range(0, shape[0], rows):
                yield view[start : start + rows].reshape(-1)


# Files that hold a tokenizer's vocabulary (transformers builds an empty tokenizer, without an
# error, from a folder that has none of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def check_model_folder(path: str | Path, what: str = "model", *, config: bool = True, tokenizer: bool = False) -> Path:
    """A model folder with readable safetensors (and config.json unless ``config`` is false, for
    uses that need only the tensors; a tokenizer's files with ``tokenizer``); returns the path."""
    path = Path(path)
    if not path.exists():
        raise InputNotFound(f"{what} {path} does not exist")
    if not path.is_dir():
        raise InputNotFound(f"{what} {path} is a file; expected a Hugging Face model folder (config.json, *.safetensors)")
    if config and not (path / "config.json").is_file():
        raise InputNotFound(f"{what} {path} has no config.json; expected a Hugging Face model folder")
    Checkpoint.open(path)  # every shard's header must parse
    if tokenizer:
        check_tokenizer(path, what)
    return path


def check_tokenizer(path: str | Path, what: str = "tokenizer") -> Path:
    """A folder holding a tokenizer's vocabulary; returns the path."""
    path = Path(path)
    if not path.exists():
        raise InputNotFound(f"{what} {path} does not exist; give a local folder (nothing is downloaded)")
    if not path.is_dir():
        raise InputNotFound(f"{what} {path} is a file; give the folder holding tokenizer.json")
    if not any((path / name).is_file() for name in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise InputNotFound(f"{what} {path} holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...); "
                            "save one there (tokenizer.save_pretrained) or copy the base's tokenizer files")  # fmt: skip
    return path


def fingerprint(model: str | Path) -> str:
    """A cheap identity of a checkpoint's weights: its headers, sizes and the first and last MiB of
    each shard (enough to tell two trainings apart without hashing tens of GB)."""
    digest = hashlib.sha256()
    for shard in shards(model):
        size = shard.stat().st_size
        digest.update(f"{shard.name}:{size}".encode())
        with open(shard, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read())
    return digest.hexdigest()[:16]


def saved_dtype(model_dir: str | Path) -> str:
    """The dtype a Hugging Face model folder declares in config.json (float32 when it says none)."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("dtype") or "float32"
    return str(name).replace("torch.", "")
