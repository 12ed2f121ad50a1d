"""Memory and time of a search's trials, the resident pool against the earlier float32 host pool.

A random Gemma 3 of about 0.4 B parameters in bf16 and four bf16 "CPT" models (seeded noise) make
the pool. For each backend (hf, vllm) and each code version (this checkout, and ``--baseline``, a
git revision with the float32 host pool and whole-state-dict pushes), a 2-trial
`optimer-merge search` runs as a subprocess while its process tree's proportional set size (PSS:
shared pages counted once) is sampled; the peak is reported as a multiple of one bf16 model
copy, with the seconds per trial spent merging and evaluating and the bytes a trial sends. The
same search over a tiny model (a few MB of weights) measures what the processes take without any
weights (Python, torch, lm-eval, vLLM's processes and KV cache); the peak less that is the weights'
and the pool's share. Goal: at most K + 2.5 copies; merge well under the evaluation.

    python benchmarks/pool_memory.py                     # both backends, both versions
    python benchmarks/pool_memory.py --backends hf --baseline ""   # this checkout only
    python benchmarks/pool_memory.py --baseline "" --limit 100     # the merge's share of a trial of the paper's size
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procs import REPO, PeakSampler, worktree

from optimer_merge.commands import positive_int

K = 4
MODEL = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=8,
             num_key_value_heads=4, head_dim=128, max_position_embeddings=1024, sliding_window=512)  # fmt: skip


def build(root: Path, **model) -> tuple[Path, list[Path], int]:
    import inspect
    import json as json_module

    import torch

    from optimer_merge.testing import tiny

    base = root / "base"
    if not (base / "model.safetensors").exists():
        tokenizer = tiny.train_tokenizer([inspect.getsource(json_module), inspect.getsource(argparse)], vocab_size=2048)
        tiny.build_model(base, tokenizer, dtype=torch.bfloat16, **model)
    models = []
    for i in range(K):
        model = root / f"cpt-{i}"
        if not (model / "model.safetensors").exists():
            tiny.perturbed_copy(base, model, relative_scale=0.02, seed=i + 1)
        models.append(model)
    return base, models, (base / "model.safetensors").stat().st_size


def run_search(code: Path, backend: str, base: Path, models: list[Path], out: Path, limit: int = 1) -> dict:
    """One 2-trial search in a subprocess; returns its peak PSS and per-trial seconds."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    objective = out.parent / "objective.yaml"
    objective.write_text("tasks:\n- {task: optimer_code_dev_bpb, metric: bits_per_byte}\n")
    cmd = [sys.executable, "-m", "optimer_merge.cli", "search", "--base", str(base), "--objective", str(objective),
           "--output", str(out), "--trials", "2", "--limit", str(limit), "--finalists", "0", "--optimizer", "random",
           "--threads", "2", "--backend", backend]  # fmt: skip
    for i, model in enumerate(models):
        cmd += ["--vector", f"v{i}={model}"]
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "2"}
    log = open(out.parent / f"{out.name}.log", "w")
    process = subprocess.Popen(cmd, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT)
    start = time.perf_counter()
    with PeakSampler(process.pid) as sampler:
        code_ = process.wait(timeout=3600)
    if code_ != 0:
        raise RuntimeError(f"search failed ({code_}); see {log.name}")
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    last = trials[-1]  # the second trial: no warm-up
    return {
        "peak_pss_bytes": sampler.tree_pss,
        "wall_seconds": time.perf_counter() - start,
        "merge_seconds": last["seconds"]["merge"],
        "eval_seconds": last["seconds"]["eval"],
        "bytes_sent": last.get("bytes_sent"),
        "scores": [t["score"] for t in trials],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--baseline", default="5ad1b45", help="git revision with the float32 host pool ('' to skip)")
    parser.add_argument("--workdir", default=None, help="keep models and runs here (default: a temp folder)")
    parser.add_argument("--limit", type=positive_int, default=1, help="items per trial: the merge's share of a trial falls as it grows")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="optimer-pool-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    base, models, copy_bytes = build(root / "models", **MODEL)
    tiny_base, tiny_models, _ = build(root / "tiny")  # the tiny factory's defaults: a few MB
    versions = {"new": REPO}
    results = {"bf16_copy_bytes": copy_bytes, "K": K, "limit": args.limit, "runs": {}}
    with contextlib.ExitStack() as stack:
        if args.baseline:
            versions["baseline"] = stack.enter_context(worktree(args.baseline, root))
        for backend in args.backends.split(","):
            for name, code in versions.items():
                overhead = run_search(code, backend, tiny_base, tiny_models, root / f"{name}-{backend}-tiny")["peak_pss_bytes"]
                run = run_search(code, backend, base, models, root / f"{name}-{backend}", args.limit)
                run["overhead_pss_bytes"] = overhead
                run["peak_copies"] = run["peak_pss_bytes"] / copy_bytes
                run["net_copies"] = (run["peak_pss_bytes"] - overhead) / copy_bytes
                results["runs"][f"{name}/{backend}"] = run
                sent = f"{run['bytes_sent']:,} B" if run["bytes_sent"] is not None else "n/a"
                print(f"{name:8s} {backend:5s} peak {run['peak_pss_bytes'] / 2**30:5.2f} GiB = {run['peak_copies']:4.1f} bf16 copies; "
                      f"less the processes' own {overhead / 2**30:.2f} GiB: {run['net_copies']:4.1f} (goal <= {K + 2.5}); "
                      f"trial: merge {run['merge_seconds']:.2f}s, eval {run['eval_seconds']:.2f}s "
                      f"({run['merge_seconds'] / max(run['eval_seconds'], 1e-9):.1%}); sent per trial {sent}", flush=True)  # fmt: skip
    for backend in args.backends.split(","):
        if f"baseline/{backend}" in results["runs"]:
            new, old = results["runs"][f"new/{backend}"], results["runs"][f"baseline/{backend}"]
            print(f"{backend}: peak memory {old['peak_copies']:.1f} -> {new['peak_copies']:.1f} bf16 copies ({old['peak_pss_bytes'] / new['peak_pss_bytes']:.1f}x lower); "
                  f"weights and pool {old['net_copies']:.1f} -> {new['net_copies']:.1f}")
    (root / "pool-benchmark.json").write_text(json.dumps(results, indent=2))
    print(f"results: {root / 'pool-benchmark.json'}")


if __name__ == "__main__":
    main()
