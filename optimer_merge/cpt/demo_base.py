"""The demo's tiny base: a small Gemma 3 pre-trained on the general corpus with a little of each domain.

Built deterministically on first use (tokenizer trained on all corpora, seeded init, a short
Fabric pre-training run) and cached under ``$OPTIMER_MERGE_CACHE`` (default
``~/.cache/optimer-merge``), keyed by every setting and the corpora's checksums, so later
per-domain CPT starts from a model that already knows a bit of everything and moves measurably.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from optimer_merge import data

# About 1.5 M parameters: trains at ~5-6 k tokens/s on one CPU thread.
MODEL = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=1024,
    sliding_window=256,
)
VOCAB_SIZE = 4096
# General text first, with a small share of each CPT domain.
MIXTURE = {"en": 0.6, "ja": 0.1, "zh": 0.1, "math": 0.1, "code": 0.1}
TRAIN = dict(seq_len=256, micro_batch_size=8, lr=3e-3, warmup_fraction=0.05, schedule="cosine", eval_blocks=8)


def cache_root() -> Path:
    return Path(os.environ.get("OPTIMER_MERGE_CACHE", Path.home() / ".cache" / "optimer-merge"))


def base_settings(tokens: int, vocab_size: int, seed: int, model_overrides: dict) -> dict:
    """Everything the base depends on, corpus checksums included: its cache key."""
    return {
        "model": {**MODEL, **model_overrides},
        "vocab_size": vocab_size,
        "tokens": tokens,
        "seed": seed,
        "mixture": MIXTURE,
        "train": TRAIN,
        "corpora": json.loads((data.CORPORA_DIR / "MANIFEST.json").read_text())["sha256"],
    }


def demo_base(
    cache: str | Path | None = None,
    *,
    tokens: int = 500_000,
    vocab_size: int = VOCAB_SIZE,
    seed: int = 0,
    log: Callable[[str], None] = print,
    progress: bool = True,
    **model_overrides,
) -> Path:
    """Return the folder of the cached demo base model, building it first if needed."""
    from optimer_merge.cpt.config import TrainConfig
    from optimer_merge.cpt.trainer import train
    from optimer_merge.testing import tiny

    settings = base_settings(tokens, vocab_size, seed, model_overrides)
    model = settings["model"]
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache or cache_root()) / f"demo-base-{key}"
    final = folder / "pretrain" / "model"
    if (final / "model.safetensors").exists():
        return final
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same base
        if (final / "model.safetensors").exists():
            return final
        (folder / "settings.json").write_text(json.dumps(settings, indent=2))
        init = folder / "init"
        if not (init / "model.safetensors").exists():
            log(f"demo base: training a {vocab_size}-token byte-level BPE tokenizer on all corpora")
            texts = [t for domain in data.ALL_DOMAINS for t in data.texts(domain, "train")]
            tokenizer = tiny.train_tokenizer(texts, vocab_size=vocab_size)
            partial = folder / "init.partial"
            shutil.rmtree(partial, ignore_errors=True)
            tiny.build_model(partial, tokenizer, seed=seed, **model)
            os.replace(partial, init)
        log(f"demo base: pre-training on {tokens:,} tokens ({', '.join(f'{d} {r:.0%}' for d, r in MIXTURE.items())})")
        config = TrainConfig(
            base=str(init),
            output=str(folder / "pretrain"),
            datasets=[{"name": d, "source": d, "ratio": r} for d, r in MIXTURE.items()],
            max_tokens=tokens,
            seed=seed,
            progress=progress,
            eval_every=max(1, tokens // (TRAIN["seq_len"] * TRAIN["micro_batch_size"] * 8)),
            **TRAIN,
        )
        train(config, log=log)
    return final
