"""Session-wide settings and tiny models shared by the tests (built once, offline)."""

from __future__ import annotations

import os

# One thread is 10-20x faster than torch's default for tiny models on small CPUs.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import fcntl  # noqa: E402
import inspect  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("ja", "zh", "math", "code")

# The files that take longest, longest first: `make test` hands whole files to its two pytest-xdist
# workers in this order (--no-loadscope-reorder), so no long file starts last while the other worker idles.
SLOWEST_FIRST = (
    "test_demo.py", "test_train.py", "test_parallel.py", "test_pool.py", "test_search.py", "test_eval.py", "test_packaging.py", "test_merge_method.py",
)  # fmt: skip


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    import email.message
    import json

    from optimer_merge.testing import tiny

    texts = [inspect.getsource(json), inspect.getsource(email.message)]
    return tiny.train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory, tiny_tokenizer) -> Path:
    """A folder laid out like the tiny recipes expect: tiny-{text,multimodal,bf16}/{base,ja,...}."""
    from optimer_merge.testing import tiny

    root = tmp_path_factory.mktemp("zoo")
    for folder, kind, dtype in (
        ("tiny-text", "text", torch.float32),
        ("tiny-multimodal", "multimodal", torch.float32),
        ("tiny-bf16", "text", torch.bfloat16),
    ):
        base = tiny.build_model(root / folder / "base", tiny_tokenizer, kind=kind, dtype=dtype)
        for seed, domain in enumerate(DOMAINS, start=1):
            tiny.perturbed_copy(base, root / folder / domain, relative_scale=0.02, seed=seed)
    return root


# A scaled-down demo base (same recipe as `optimer_merge.cpt.demo_base`, smaller model and budget).
SMALL_BASE = dict(tokens=60_000, vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
CPT_SETTINGS = dict(seq_len=128, micro_batch_size=8, max_steps=40, lr=3e-3, eval_every=20, eval_blocks=8, progress=False)


def run_folder(tmp_path_factory) -> Path:
    """This test run's temporary folder, shared by its pytest-xdist workers (each has its own below)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="session")
def small_base(tmp_path_factory) -> Path:
    """Built by the first worker that needs it; demo_base's lock makes the others wait and reuse it."""
    from optimer_merge.cpt.demo_base import demo_base

    return demo_base(run_folder(tmp_path_factory) / "cache", progress=False, log=lambda _m: None, **SMALL_BASE)


@pytest.fixture(scope="session")
def cpt_runs(tmp_path_factory, small_base) -> dict[str, Path]:
    """One short CPT run per domain from the small base; each logs held-out loss on all four domains.
    Built once per test run (the workers share them, read only)."""
    from optimer_merge.cpt import TrainConfig, train

    root = run_folder(tmp_path_factory) / "cpt"
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".built").exists():
            shutil.rmtree(root, ignore_errors=True)
            for domain in DOMAINS:
                config = TrainConfig(
                    base=str(small_base),
                    output=str(root / domain),
                    datasets=[{"name": domain, "source": domain}],
                    eval_datasets=[{"name": d, "source": d} for d in DOMAINS if d != domain],
                    **CPT_SETTINGS,
                )
                train(config, log=lambda _m: None)
            (root / ".built").touch()
    return {domain: root / domain for domain in DOMAINS}
