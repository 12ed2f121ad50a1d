"""Host memory per rank of a 2-rank CPT run on CPU: DDP (every rank loads the whole model in
float32 with ``from_pretrained`` and keeps a full replica with its gradients and optimizer state)
against the sharded path (``strategy: fsdp``: the model created on the meta device, rank 0 reads
the memory-mapped bf16 checkpoint and scatters it, every rank keeps half of each weight, gradient
and optimizer state).

A random Gemma 3 of about 0.25 B parameters (bf16 on disk, as released checkpoints are) trains
for 2 steps with `optimer-merge train --devices 2 --accelerator cpu` in a subprocess while each
process's resident set (RSS) and proportional set (PSS: pages shared through the page cache
counted once) are sampled. The same run over a tiny model measures what a rank takes without
weights (Python, torch, transformers, gloo); the peak less that is the model's share.
Goal: the sharded path's per-rank peak at least 1.6x lower than DDP's.

    python benchmarks/cpt_memory.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procs import PeakSampler

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=8,
             num_key_value_heads=4, head_dim=128, max_position_embeddings=1024, sliding_window=512)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32)


def build(root: Path, **model) -> tuple[Path, int]:
    import inspect

    import torch

    from optimer_merge.testing import tiny

    if not (root / "model.safetensors").exists():
        tokenizer = tiny.train_tokenizer([inspect.getsource(json), inspect.getsource(argparse)], vocab_size=2048)
        tiny.build_model(root, tokenizer, dtype=torch.bfloat16, **model)
    import math

    from safetensors import safe_open

    with safe_open(str(root / "model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return root, params


def train(base: Path, strategy: str, out: Path) -> dict:
    """One 2-step, 2-rank run; the peaks of its two ranks (the two largest processes)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "optimer_merge.cli", "train", "--base", str(base), "--output", str(out),
           "--dataset", "ja", "--max-steps", "2", "--seq-len", "64", "--micro-batch-size", "1",
           "--accelerator", "cpu", "--strategy", strategy, "--devices", "2", "--threads", "1", "--no-progress",
           "--set", "eval_blocks=1", "--set", "checkpoint_every=1000"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log = out.with_name(out.name + ".log")
    start = time.perf_counter()
    with open(log, "w") as sink:
        process = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        with PeakSampler(process.pid) as sampler:
            code = process.wait(timeout=3600)
    if code != 0:
        raise RuntimeError(f"training failed ({code}); see {log}")
    ranks = sorted(sampler.per_process.values(), key=lambda p: p["pss"], reverse=True)[:2]
    return {"ranks": ranks, "tree_pss_bytes": sampler.tree_pss, "wall_seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="keep models and runs here (default: a temp folder)")
    args = parser.parse_args()
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="optimer-cpt-memory-"))
    root.mkdir(parents=True, exist_ok=True)
    base, params = build(root / "base", **MODEL)
    tiny_base, _ = build(root / "tiny", **TINY)
    gib = 2**30
    report = {"parameters": params, "bf16_copy_bytes": 2 * params, "strategies": {}}
    print(f"{params / 1e9:.2f} B parameters; one bf16 copy {2 * params / gib:.2f} GiB, one float32 copy {4 * params / gib:.2f} GiB")
    for strategy in ("ddp", "fsdp"):
        overhead = max(r["pss"] for r in train(tiny_base, strategy, root / f"{strategy}-tiny")["ranks"])
        run = train(base, strategy, root / strategy)
        run["overhead_pss_bytes"] = overhead
        run["peak_pss_per_rank_bytes"] = peak = max(r["pss"] for r in run["ranks"])
        run["peak_rss_per_rank_bytes"] = max(r["rss"] for r in run["ranks"])
        run["net_pss_per_rank_bytes"] = peak - overhead
        report["strategies"][strategy] = run
        print(f"{strategy:5s} per rank: peak PSS {peak / gib:5.2f} GiB (RSS {run['peak_rss_per_rank_bytes'] / gib:5.2f} GiB), "
              f"{(peak - overhead) / gib:5.2f} GiB net of {overhead / gib:.2f} GiB without weights "
              f"= {(peak - overhead) / (2 * params):.1f} bf16 copies; {run['wall_seconds']:.0f} s")  # fmt: skip
    ddp, fsdp = report["strategies"]["ddp"], report["strategies"]["fsdp"]
    report["ratio_per_rank"] = ddp["peak_pss_per_rank_bytes"] / fsdp["peak_pss_per_rank_bytes"]
    report["ratio_per_rank_net"] = ddp["net_pss_per_rank_bytes"] / fsdp["net_pss_per_rank_bytes"]
    print(f"sharded path per rank: {report['ratio_per_rank']:.2f}x lower than DDP ({report['ratio_per_rank_net']:.2f}x net of the "
          f"process overhead; goal >= 1.6x)")  # fmt: skip
    (root / "cpt-memory.json").write_text(json.dumps(report, indent=2))
    print(f"results: {root / 'cpt-memory.json'}")


if __name__ == "__main__":
    main()
