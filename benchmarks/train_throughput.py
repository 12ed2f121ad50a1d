"""Tokens/s of `optimer-merge train` (Lightning Fabric) against a bare PyTorch loop.

Same model (the demo base architecture, seeded init), same packed blocks in the same order, same
optimizer, schedule and clipping, same thread count. The trainer's figure is its own
``tokens_per_s`` column, which covers the training steps between metric rows (held-out
evaluation excluded; it is the same work in both). Runs alternate and the best of each is kept.

    python benchmarks/train_throughput.py [--steps 60] [--threads 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from optimer_merge import data
    from optimer_merge.testing import tiny
    from optimer_merge.cpt import TrainConfig, train
    from optimer_merge.cpt import datasets as ds
    from optimer_merge.cpt.demo_base import MODEL, TRAIN
    from optimer_merge.cpt.trainer import lr_at, open_base

    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    texts = [t for d in data.ALL_DOMAINS for t in data.texts(d, "train")][::20]
    tokenizer = tiny.train_tokenizer(texts, vocab_size=4096)
    base = tiny.build_model(work / "base", tokenizer, **MODEL)
    settings = {k: v for k, v in TRAIN.items() if k != "eval_blocks"}
    config = TrainConfig(
        base=str(base), output=str(work / "run"), datasets=[{"name": "code", "source": "code"}],
        max_steps=args.steps, eval_every=args.steps, eval_blocks=1, checkpoint_every=10 * args.steps,
        threads=args.threads, progress=False, **settings,
    )  # fmt: skip
    def load_model() -> torch.nn.Module:
        return open_base(base)[3].from_pretrained(base, dtype=torch.float32)

    n_params = sum(p.numel() for p in load_model().parameters())
    blocks = ds.load_blocks(config.datasets[0], "train", tokenizer, config.seq_len, work / "tokens")

    def trainer_run() -> float:
        shutil.rmtree(work / "run", ignore_errors=True)
        train(config, log=lambda _m: None)
        with open(work / "run" / "metrics.csv", newline="") as handle:
            return float(list(csv.DictReader(handle))[-1]["tokens_per_s"])

    def bare_run() -> float:
        model = load_model()
        model.train()
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=config.betas,
        )  # fmt: skip
        sampler = ds.MixtureSampler([blocks.num_blocks], [1.0], config.seed)
        start = time.perf_counter()
        for step in range(args.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.steps, config)
            x = torch.from_numpy(np.stack([blocks.block(b) for _, b in sampler.take(config.micro_batch_size)]))
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return args.steps * config.micro_batch_size * config.seq_len / (time.perf_counter() - start)

    bare, fabric = [], []
    for _ in range(args.repeats):
        bare.append(bare_run())
        fabric.append(trainer_run())
    shutil.rmtree(work, ignore_errors=True)
    print(f"model: demo base architecture, seq_len {config.seq_len}, micro batch {config.micro_batch_size}, "
          f"{args.steps} steps, {args.threads} thread(s), {n_params:,} parameters")  # fmt: skip
    print(f"bare PyTorch loop : {max(bare):8,.0f} tokens/s   (runs: {', '.join(f'{v:,.0f}' for v in bare)})")
    print(f"optimer-merge train: {max(fabric):8,.0f} tokens/s   (runs: {', '.join(f'{v:,.0f}' for v in fabric)})")
    print(f"ratio trainer / bare: {max(fabric) / max(bare):.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
