"""The project's offline corpora: list domains, open splits, measure sizes.

Five corpora ship gzipped with the package (see corpora/README.md for sources and licenses):
``ja``, ``zh``, ``math``, ``code`` (the four CPT domains) and ``en`` (general text for the base),
each with disjoint ``train``, ``dev`` and ``test`` splits. Each CPT domain also has a ``pretrain``
split, documents of the domain disjoint from the other three, which only the demo base sees.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Iterator

CORPORA_DIR = Path(__file__).with_name("corpora")
DOMAINS = ("ja", "zh", "math", "code")
ALL_DOMAINS = DOMAINS + ("en",)
SPLITS = ("train", "dev", "test")
PRETRAIN = "pretrain"  # of the CPT domains only


def normalise_line(line: str) -> str:
    """Collapse runs of whitespace and strip: the key for cross-split deduplication."""
    return re.sub(r"\s+", " ", line).strip()


def checksum(domain: str, split: str, root: Path | None = None) -> str:
    """The sha256 of one split's file as MANIFEST.json records it ("" when it records none)."""
    manifest = json.loads(((root or CORPORA_DIR) / "MANIFEST.json").read_text())
    return manifest.get("sha256", {}).get(f"{domain}/{split}.jsonl.gz", "")


def domains() -> tuple[str, ...]:
    """All corpus domains: the four CPT domains and the general English corpus."""
    return ALL_DOMAINS


def check_domains(domains) -> tuple[str, ...]:
    """The given domain names, each one of the corpora's; ConfigError naming any other."""
    from optimer_merge.errors import ConfigError

    unknown = [d for d in domains if d not in ALL_DOMAINS]
    if unknown:
        raise ConfigError(f"unknown domain(s) {', '.join(map(repr, unknown))}; choose from {', '.join(ALL_DOMAINS)}")
    return tuple(domains)


def split_path(domain: str, split: str, root: Path = CORPORA_DIR) -> Path:
    if domain not in ALL_DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose from {', '.join(ALL_DOMAINS)}")
    if split not in SPLITS and not (split == PRETRAIN and domain in DOMAINS):
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS + ((PRETRAIN,) if domain in DOMAINS else ()))}")
    path = root / domain / f"{split}.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; rebuild with `optimer-merge data build`")
    return path


def open_split(domain: str, split: str, root: Path = CORPORA_DIR) -> Iterator[dict]:
    """Documents of one split as dicts with ``id``, ``source`` and ``text``, in a fixed order."""
    with gzip.open(split_path(domain, split, root), "rt", encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


def texts(domain: str, split: str, root: Path = CORPORA_DIR) -> Iterator[str]:
    """Just the document texts of one split."""
    return (doc["text"] for doc in open_split(domain, split, root))


def sizes(tokenizer=None, root: Path = CORPORA_DIR) -> dict[str, dict[str, dict[str, int]]]:
    """{domain: {split: {"docs", "chars"[, "tokens"]}}}; tokens counted with ``tokenizer`` if given."""
    out: dict = {}
    for domain in ALL_DOMAINS:
        for split in SPLITS + ((PRETRAIN,) if domain in DOMAINS else ()):
            docs = list(texts(domain, split, root))
            entry = {"docs": len(docs), "chars": sum(map(len, docs))}
            if tokenizer is not None:
                entry["tokens"] = sum(len(ids) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"])
            out.setdefault(domain, {})[split] = entry
    return out
