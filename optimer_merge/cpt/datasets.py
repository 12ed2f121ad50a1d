"""Training data: read documents, tokenize once into a cached token file, pack blocks, mix datasets.

Documents are tokenized in file order into one stream, ``<bos> doc <eos>`` each, and cut into
blocks of ``seq_len`` tokens. Each epoch visits the blocks in a permutation drawn from
(seed, dataset, epoch), so the order is deterministic and a resumed run needs only the cursors.
Token files live in the run folder and are memory-mapped, so datasets larger than RAM work.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from optimer_merge import data as corpora
from optimer_merge.cpt.config import DatasetSpec
from optimer_merge.errors import ConfigError, DataError
from optimer_merge.io.files import written_whole

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".txt", ".parquet")


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary and rules: equal hashes tokenize identically."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_corpus(source: str) -> bool:
    """A bare domain name is always the shipped corpus; files of that name are written as a path (``./ja``)."""
    return source in corpora.ALL_DOMAINS


def check_source(source: str) -> str | None:
    """Raise unless ``source`` is a corpus domain or readable files; returns a warning where a
    domain name is also a path here (the corpus is used)."""
    if not is_corpus(source):
        source_files(source)
    elif Path(source).exists():
        return f"dataset source {source!r} is the shipped {source} corpus, not the local {source}/ here; write ./{source} to train on that"
    return None


def source_files(source: str) -> list[Path]:
    """The files behind a path source (a file, or the supported files in a folder, sorted)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(FILE_SUFFIXES))
        if not files:
            raise DataError(f"{path}: folder holds no {', '.join(FILE_SUFFIXES)} files")
        return files
    if path.is_file():
        if not path.name.endswith(FILE_SUFFIXES):
            raise DataError(f"{path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)}")
        return [path]
    raise ConfigError(
        f"unknown dataset source {source!r}: not a corpus domain "
        f"({', '.join(corpora.ALL_DOMAINS)}) and no such file or folder"
    )


def describe_source(source: str, split: str) -> str:
    """A fingerprint of a source's content (corpus checksum, or file paths, sizes and mtimes)."""
    if is_corpus(source):
        return f"corpus:{source}/{split}.jsonl.gz:{corpora.checksum(source, split)}"
    parts = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in source_files(source)]
    return "files:" + "|".join(parts)


def documents(source: str, split: str = "train", text_field: str = "text") -> Iterator[str]:
    """Texts of a source: a corpus domain's ``split``, or every document in the given files."""
    if is_corpus(source):
        yield from corpora.texts(source, split)
        return
    for path in source_files(source):
        yield from _file_documents(path, text_field)


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    """Texts of one file; anything that is not UTF-8 text is a DataError naming file and line."""
    name = path.name
    if name.endswith(".txt"):
        data = path.read_bytes()
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not UTF-8 text; convert the file to UTF-8") from None
    elif name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
        if text_field not in schema.names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}); set text_field")
        column_type = schema.field(text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise DataError(f"{path}: column {text_field!r} holds {column_type}, not text")
        for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if t)
    else:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{number}: not UTF-8 text; convert the file to UTF-8") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{path}:{number}: not a JSON object; expected one document per line, with a {text_field!r} field") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if text is None:
                    raise DataError(f"{path}:{number}: expected a JSON object with a {text_field!r} field (set text_field)")
                if not isinstance(text, str):
                    raise DataError(f"{path}:{number}: {text_field!r} is not a string but {type(text).__name__} {text!r:.40}")
                if text:
                    yield text


def tokenize_to_file(texts: Iterable[str], tokenizer, path: Path, batch_docs: int = 256) -> int:
    """Write ``<bos> doc <eos>`` token ids of all texts to ``path`` (uint32); returns the token count.

    Writes to a temporary name and renames, so an interrupted run never leaves a truncated cache.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token; packing needs one between documents")
    count = 0
    with written_whole(path) as partial:
        with open(partial, "wb") as out:
            batch: list[str] = []

            def flush() -> int:
                written = 0
                backend = getattr(tokenizer, "backend_tokenizer", None)
                if backend is not None:  # fast path, and no max-length warnings for long documents
                    encoded = [e.ids for e in backend.encode_batch(batch, add_special_tokens=False)]
                else:
                    encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
                for ids in encoded:
                    array = np.asarray(bos + ids + [eos], dtype=np.uint32)
                    out.write(array.tobytes())
                    written += len(array)
                batch.clear()
                return written

            for text in texts:
                batch.append(text)
                if len(batch) >= batch_docs:
                    count += flush()
            count += flush()
    return count


class TokenBlocks:
    """Fixed-length blocks over a memory-mapped token file."""

    def __init__(self, path: Path, seq_len: int, name: str):
        self.path, self.seq_len, self.name = path, seq_len, name
        tokens = np.memmap(path, dtype=np.uint32, mode="r") if path.stat().st_size else np.zeros(0, np.uint32)
        self.num_tokens = len(tokens)
        self.num_blocks = self.num_tokens // seq_len
        self._tokens = tokens

    def block(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return np.asarray(self._tokens[start : start + self.seq_len], dtype=np.int64)


def load_blocks(spec: DatasetSpec, split: str, tokenizer, seq_len: int, cache_dir: Path, source: str | None = None) -> TokenBlocks:
    """Tokenize a dataset (cached by content and tokenizer) and return its blocks.

    Raises DataError naming the dataset (and file and line) if it is unreadable or too small for one block.
    """
    source = source or spec.source
    key = hashlib.sha256(
        f"{describe_source(source, split)}|{spec.text_field}|{tokenizer_fingerprint(tokenizer)}".encode()
    ).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{spec.name}-{split}-{key}.u32"
    if not path.exists():
        tokenize_to_file(documents(source, split, spec.text_field), tokenizer, path)
    blocks = TokenBlocks(path, seq_len, spec.name)
    if blocks.num_blocks == 0:
        raise DataError(
            f"dataset {spec.name!r} ({source}, {split}) has {blocks.num_tokens} tokens, "
            f"fewer than seq_len={seq_len}: it is empty or too small to train on"
        )
    return blocks


def eval_source(spec: DatasetSpec) -> str | None:
    """Where a dataset's held-out loss comes from: ``eval_source``, else a corpus domain's dev split."""
    if spec.eval_source:
        return spec.eval_source
    return spec.source if is_corpus(spec.source) else None


class MixtureSampler:
    """Chooses which dataset each sequence comes from, keeping token shares close to the weights.

    Smooth weighted round robin: every slot adds each dataset's weight to its credit and takes the
    dataset with the most credit, which then pays 1. Over n slots each dataset's count stays within
    one block of weight * n, also when the weights change during training (Velocitune).
    """

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        self.sizes, self.seed = sizes, seed
        self.credits = [0.0] * len(sizes)
        self.epochs = [0] * len(sizes)
        self.positions = [0] * len(sizes)
        self.counts = [0] * len(sizes)
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self.set_weights(weights)

    def set_weights(self, weights: list[float]) -> None:
        total = float(sum(weights))
        if len(weights) != len(self.sizes) or total <= 0 or min(weights) < 0:
            raise ValueError(f"mixture weights must be {len(self.sizes)} non-negative numbers with a positive sum")
        self.weights = [w / total for w in weights]

    def _order(self, dataset: int, epoch: int) -> np.ndarray:
        key = (dataset, epoch)
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != dataset}
            rng = np.random.default_rng([self.seed, dataset, epoch])
            self._orders[key] = rng.permutation(self.sizes[dataset])
        return self._orders[key]

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next ``n`` (dataset index, block index) pairs."""
        out = []
        for _ in range(n):
            for i, w in enumerate(self.weights):
                self.credits[i] += w
            d = max(range(len(self.credits)), key=lambda i: (self.credits[i], -i))
            self.credits[d] -= 1.0
            out.append((d, int(self._order(d, self.epochs[d])[self.positions[d]])))
            self.positions[d] += 1
            self.counts[d] += 1
            if self.positions[d] == self.sizes[d]:
                self.epochs[d] += 1
                self.positions[d] = 0
        return out

    def state_dict(self) -> dict:
        return {
            "weights": list(self.weights),
            "credits": list(self.credits),
            "epochs": list(self.epochs),
            "positions": list(self.positions),
            "counts": list(self.counts),
        }

    def load_state_dict(self, state: dict) -> None:
        self.set_weights(state["weights"])
        for name in ("credits", "epochs", "positions", "counts"):
            setattr(self, name, list(state[name]))
