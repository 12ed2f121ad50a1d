"""The demo's tiny base: a small Gemma 3 pre-trained on general English with a little of each domain.

The demo starts from the base shipped in ``optimer_merge/demo/base/`` (model, tokenizer and
``BUILD.json``: settings, sha256 of every file, tokens per parameter, epochs per source), built by
``optimer-merge data base``. Its pre-training data is the ``en`` corpus plus each CPT domain's
``pretrain`` split, never the train splits that CPT later trains on, so per-domain CPT adapts a
model that already knows a little of every domain, as the paper's Gemma 3 does.

``demo_base`` builds smaller variants of the same recipe on demand (tests, benchmarks), cached
under ``$OPTIMER_MERGE_CACHE`` (default ``~/.cache/optimer-merge``) and keyed by every setting and
the corpora's checksums.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from optimer_merge import data
from optimer_merge.io.files import make_dirs

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
# General English, with a small share of each CPT domain from its `pretrain` split.
MIXTURE = {"en": 0.88, "ja": 0.03, "zh": 0.03, "math": 0.03, "code": 0.03}
TRAIN = dict(seq_len=256, micro_batch_size=8, lr=3e-3, warmup_fraction=0.02, schedule="cosine", eval_blocks=8)
# The shipped base: pre-training tokens (about 7 per parameter), seed, and CPU processes (DDP).
SHIPPED_TOKENS = 10_000_000
SHIPPED_SEED = 0
SHIPPED_DEVICES = 2
SHIPPED = Path(__file__).resolve().parents[1] / "demo" / "base"
BUILD_RECORD = "BUILD.json"
BUILD_COMMAND = "optimer-merge data base"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_root() -> Path:
    return Path(os.environ.get("OPTIMER_MERGE_CACHE", Path.home() / ".cache" / "optimer-merge"))


def _source(domain: str) -> str:
    return domain if domain == "en" else str(data.split_path(domain, data.PRETRAIN))


def base_texts() -> list[str]:
    """The base's pre-training text (its tokenizer is trained on exactly this)."""
    from optimer_merge.cpt.datasets import documents

    return [t for domain in MIXTURE for t in documents(_source(domain))]


def base_settings(tokens: int, vocab_size: int, seed: int, model_overrides: dict, devices: int = 1) -> dict:
    """Everything the base depends on, corpus checksums included: its cache key."""
    return {
        **({"devices": devices} if devices > 1 else {}),
        "model": {**MODEL, **model_overrides},
        "vocab_size": vocab_size,
        "tokens": tokens,
        "seed": seed,
        "mixture": MIXTURE,
        "train": TRAIN,
        "corpora": json.loads((data.CORPORA_DIR / "MANIFEST.json").read_text())["sha256"],
    }


def build_base(folder: Path, settings: dict, log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Build (or resume building) the base described by ``settings`` in ``folder``; its model folder."""
    from optimer_merge.cpt.config import TrainConfig
    from optimer_merge.cpt.trainer import train
    from optimer_merge.testing import tiny

    make_dirs(folder, "--work")
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    init = folder / "init"
    if not (init / "model.safetensors").exists():
        log(f"demo base: training a {settings['vocab_size']}-token byte-level BPE tokenizer on the pre-training text")
        tokenizer = tiny.train_tokenizer(base_texts(), vocab_size=settings["vocab_size"])
        partial = folder / "init.partial"
        shutil.rmtree(partial, ignore_errors=True)
        tiny.build_model(partial, tokenizer, seed=settings["seed"], **settings["model"])
        os.replace(partial, init)
    tokens = settings["tokens"]
    log(f"demo base: pre-training on {tokens:,} tokens ({', '.join(f'{d} {r:.0%}' for d, r in MIXTURE.items())})")
    config = TrainConfig(
        base=str(init),
        output=str(folder / "pretrain"),
        datasets=[{"name": d, "source": _source(d), "ratio": r, "eval_source": d} for d, r in MIXTURE.items()],
        max_tokens=tokens,
        seed=settings["seed"],
        progress=progress,
        eval_every=max(1, tokens // (TRAIN["seq_len"] * TRAIN["micro_batch_size"] * 8)),
        checkpoint_every=max(1, tokens // (TRAIN["seq_len"] * TRAIN["micro_batch_size"] * 10)),
        **({"devices": settings["devices"], "accelerator": "cpu", "strategy": "ddp"} if settings.get("devices", 1) > 1 else {}),
        **TRAIN,
    )
    train(config, log=log)
    return folder / "pretrain" / "model"


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
    """Return the folder of a cached base of the demo's recipe, building it first if needed."""
    settings = base_settings(tokens, vocab_size, seed, model_overrides)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache or cache_root()) / f"demo-base-{key}"
    final = folder / "pretrain" / "model"
    if (final / "model.safetensors").exists():
        return final
    make_dirs(folder, "demo base cache folder")
    with open(folder / ".lock", "w") as lock:
        with contextlib.suppress(OSError):  # a file system without locks: built unlocked
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same base
        if (final / "model.safetensors").exists():
            return final
        return build_base(folder, settings, log=log, progress=progress)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def build_shipped(out: Path, work: Path, log: Callable[[str], None] = print) -> dict | None:
    """Build the shipped base into ``out`` (the model files and BUILD.json), training in ``work``
    (resumable); returns the build record (None on the other training processes)."""
    import math

    from transformers import AutoTokenizer

    from optimer_merge.cpt.datasets import documents
    from optimer_merge.io.checkpoints import Checkpoint

    settings = base_settings(SHIPPED_TOKENS, VOCAB_SIZE, SHIPPED_SEED, {}, SHIPPED_DEVICES)
    start = time.time()
    model = build_base(work, settings, log=log)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:  # the launcher's other training process
        return None
    meta = json.loads((model.parent / "train_meta.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model)
    source_tokens = {
        d: sum(len(ids) for ids in tokenizer(list(documents(_source(d))), add_special_tokens=False)["input_ids"])
        for d in MIXTURE
    }
    parameters = sum(math.prod(shape) for _, shape in Checkpoint.open(model).meta.values())
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in MODEL_FILES:
        shutil.copyfile(model / name, partial / name)
    record = {
        "command": BUILD_COMMAND,
        "settings": settings,
        "parameters": parameters,
        "tokens": meta["tokens"],
        "tokens_per_parameter": round(meta["tokens"] / parameters, 2),
        "tokens_per_source": meta["tokens_per_dataset"],
        "source_tokens": source_tokens,
        "epochs_per_source": {d: round(meta["tokens_per_dataset"][d] / source_tokens[d], 2) for d in MIXTURE},
        "initial_eval_loss": meta["initial_eval_loss"],
        "final_eval_loss": meta["final_eval_loss"],
        "wall_seconds": round(meta["wall_seconds"], 1),
        "build_seconds": round(time.time() - start, 1),
        "versions": meta.get("versions", {}),
        "sha256": {name: _sha256(partial / name) for name in sorted(os.listdir(partial))},
    }
    (partial / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return record


def shipped_record() -> dict:
    """The shipped base's BUILD.json (a ConfigError when it is missing)."""
    from optimer_merge.errors import ConfigError

    path = SHIPPED / BUILD_RECORD
    if not path.exists():
        raise ConfigError(f"the demo base is missing ({path}); rebuild it with `{BUILD_COMMAND}`")
    return json.loads(path.read_text())


def shipped_base() -> Path:
    """The shipped base's folder, its files checked against BUILD.json (a ConfigError names a mismatch)."""
    from optimer_merge.errors import ConfigError

    for name, digest in shipped_record()["sha256"].items():
        if not (SHIPPED / name).exists() or _sha256(SHIPPED / name) != digest:
            raise ConfigError(f"the demo base's {SHIPPED / name} does not match BUILD.json; rebuild it with `{BUILD_COMMAND}`")
    return SHIPPED
