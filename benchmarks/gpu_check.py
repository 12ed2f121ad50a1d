"""GPU paths on one CUDA GPU, in a few minutes, with a JSON summary (`make gpu-check`).

A random Gemma 3 of about 1 B parameters in bf16 and four bf16 "CPT" models make the pool.
- hf: the pool next to the live parameters on the GPU; merge milliseconds per trial (median of
  10), GPU memory against one model copy, and every merged tensor against the rule computed on
  the CPU (float32, cast to bf16 once).
- vllm (where vLLM is installed): the search's own path (`open_evaluator("vllm", pool=...)`: the
  pool's placement planned from the GPU's memory, the pool built in the engine's worker); merge
  milliseconds, bytes per trial, GPU memory in model copies, and prompt log-probabilities after a
  trial against a fresh engine loaded from the same merge written to disk (the test suite checks
  that merge against stock mergekit-yaml's).
- cpt: `optimer-merge train` with the recommended strategy (fsdp: meta-device creation, sharding
  by layer, activation checkpointing, bf16-mixed) on the same base for 30 steps of 4 x 1024 tokens;
  tokens/s of the last steps and peak GPU memory, against the float32 master weights + AdamW state
  (16 bytes per parameter) that the strategy shards.
A check that fails is recorded in the summary with its error (traceback on stderr), the others
still run, and the script exits 1; the summary is written after each check. Without a GPU it
says so and exits 0. `--device cpu --tiny` runs every check on the CPU with a small model (vllm
on vLLM's CPU build), so the test suite keeps this script working where no GPU is.

The GPU's Python needs torch, transformers, lightning, accelerate, safetensors, tokenizers, pyyaml
and pydantic (vLLM and mergekit are optional). A CUDA image that lacks some and cannot reach a
package index gets them from wheels made elsewhere: `make gpu-wheels` downloads them into wheels/,
and `make gpu-check` installs them from there.

    python benchmarks/gpu_check.py --out runs/gpu-check.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
K = 4
MODEL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=8,
             num_key_value_heads=4, head_dim=256, max_position_embeddings=2048, sliding_window=512)  # fmt: skip
TINY = dict(MODEL, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32)  # fmt: skip
# modules the checks import (by import name), each with the distribution that provides it
NEEDS = {"torch": "torch", "transformers": "transformers", "lightning": "lightning", "accelerate": "accelerate",
         "safetensors": "safetensors", "tokenizers": "tokenizers", "yaml": "pyyaml", "pydantic": "pydantic"}  # fmt: skip
WEIGHTS = {f"v{i}": w for i, w in enumerate((0.7, -0.4, 0.25, 1.1))}


def missing() -> list[str]:
    """Distributions the checks need that this Python cannot import."""
    import importlib.util

    return [dist for module, dist in NEEDS.items() if importlib.util.find_spec(module) is None]


def build(root: Path, model: dict):
    import inspect

    import torch

    from optimer_merge.testing import tiny

    base = root / "base"
    if not (base / "model.safetensors").exists():
        tokenizer = tiny.train_tokenizer([inspect.getsource(json), inspect.getsource(argparse)], vocab_size=4096)
        tiny.build_model(base, tokenizer, dtype=torch.bfloat16, **model)
    models = {}
    for i in range(K):
        models[f"v{i}"] = root / f"cpt-{i}"
        if not (models[f"v{i}"] / "model.safetensors").exists():
            tiny.perturbed_copy(base, models[f"v{i}"], relative_scale=0.02, seed=i + 1)
    return base, models


def check_hf(base: Path, models: dict[str, Path], device: str = "cuda") -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from optimer_merge.search.pool import build_host_pool, build_module_pool, check_sources

    spec = check_sources(base, {n: {"model": str(p)} for n, p in models.items()})
    cuda = device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(device).eval()
    if cuda:
        copy = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    pool = build_module_pool(model, spec, log=lambda _m: None)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        pool.apply(WEIGHTS)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    host = build_host_pool(spec, log=lambda _m: None)
    live = dict(zip([e.name for e in pool.entries], [e.target for e in pool.entries]))
    worst = 0.0
    for name, merged in host.merged(WEIGHTS):  # the rule on the CPU, float32, cast as the GPU casts
        worst = max(worst, (live[name].float().cpu() - merged.to(torch.bfloat16).float()).abs().max().item())
    return {
        "params": spec.params,
        "merge_ms_median": 1000 * statistics.median(times),
        "gpu_memory_model_copies": torch.cuda.max_memory_allocated() / copy if cuda else None,
        "pool_bytes": pool.nbytes,
        "max_abs_diff_vs_cpu_rule_bf16": worst,
    }


def check_vllm(base: Path, models: dict[str, Path], root: Path, device: str = "cuda") -> dict:
    """The search's own vllm path (open_evaluator: placement planned from the GPU's memory, the
    pool built in the engine's worker, K numbers per trial) against a fresh engine on the merge."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed here"}
    import torch
    from vllm import SamplingParams

    from optimer_merge.evaluation.evaluator import open_evaluator
    from optimer_merge.search.pool import build_host_pool, check_sources

    cuda = device == "cuda"
    spec = check_sources(base, {n: {"model": str(p)} for n, p in models.items()})  # placement auto
    prompts = [{"prompt_token_ids": list(range(10, 400))}]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)

    def logprobs(evaluator) -> list[float]:
        out = evaluator.engine.generate(prompts, params, use_tqdm=False)[0]
        return [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]

    def gpu_used() -> int | None:
        if not cuda:
            return None
        free, total = torch.cuda.mem_get_info()
        return total - free

    lines: list[str] = []
    settings = {"dtype": "bfloat16", "threads": "auto" if cuda else 1, "log": lines.append}
    idle = gpu_used()
    with open_evaluator("vllm", base, pool=spec, **settings) as engine:
        started = gpu_used()
        base_logprobs = logprobs(engine)
        info = engine.build_pool(spec)
        pooled = gpu_used()
        trials = [engine.set_weights(WEIGHTS) for _ in range(10)]
        in_engine = logprobs(engine)
    merged_dir = root / "merged"
    _write_merged(base, build_host_pool(spec, log=lambda _m: None), merged_dir)
    with open_evaluator("vllm", merged_dir, **settings) as fresh:
        reference = logprobs(fresh)
    copy = 2 * spec.params  # one bf16 model
    return {
        "placement": info["placement"],
        "engine_log": [line for line in lines if "pool" in line],
        "pool_build_seconds": info["seconds"],
        "pool_bytes": info["bytes"],
        "merge_ms_median": 1000 * statistics.median(t["worker_seconds"] for t in trials),
        "trial_update_ms_median": 1000 * statistics.median(t["seconds"] for t in trials),
        "bytes_sent_per_trial": trials[-1]["bytes_sent"],
        "gpu_used_model_copies": None if idle is None else {"engine": (started - idle) / copy, "with_pool": (pooled - idle) / copy},
        "max_abs_logprob_diff_vs_fresh_load": max(abs(a - b) for a, b in zip(in_engine, reference)),
        "max_abs_logprob_change_by_the_merge": max(abs(a - b) for a, b in zip(in_engine, base_logprobs)),
    }


def check_cpt(base: Path, root: Path, accelerator: str = "cuda", steps: int = 30) -> dict:
    import csv
    import os
    import subprocess

    import yaml

    out = root / "cpt"
    config = root / "cpt.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(base), "output": str(out), "datasets": [{"name": "code", "source": "code"}],
        "max_steps": steps, "seq_len": 1024, "micro_batch_size": 4, "lr": 1e-5, "accelerator": accelerator, "devices": 1,
        "strategy": {"name": "fsdp", "activation_checkpointing": True}, "precision": "bf16-mixed",
        "eval_every": steps // 3, "eval_blocks": 4, "checkpoint_every": steps, "progress": False,
    }))  # fmt: skip
    cmd = [sys.executable, "-m", "optimer_merge.cli", "train", "--config", str(config), "--overwrite"]
    start = time.perf_counter()
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keeps packages installed with --target
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": path}, timeout=1200)
    meta = json.loads((out / "train_meta.json").read_text())
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        "strategy": meta["strategy"], "precision": meta["precision"], "parameters": meta["parameters"],
        "tokens_per_step": meta["tokens"] // meta["steps"],
        "tokens_per_s_last_rows": [round(float(r["tokens_per_s"])) for r in rows[-2:]],
        "peak_memory_bytes": meta["peak_memory_bytes"],
        "sharded_state_bytes": 16 * meta["parameters"],
        "loss_first_last": [float(rows[1]["train_loss"]), float(rows[-1]["train_loss"])],
        "seconds": time.perf_counter() - start,
    }  # fmt: skip


def _write_merged(base: Path, pool, out: Path) -> None:
    """The merge as a bf16 checkpoint (what stock mergekit-yaml writes with out_dtype bfloat16)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out, dirs_exist_ok=True)
    tensors = load_file(str(base / "model.safetensors"))
    tensors.update({name: merged.to(torch.bfloat16) for name, merged in pool.merged(WEIGHTS)})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu-check.json")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: every check on the CPU (vllm on its CPU build)")
    parser.add_argument("--tiny", action="store_true", help="a model of about 0.1 M parameters instead of 1 B, and 6 CPT steps instead of 30")
    args = parser.parse_args()
    if lacking := missing():
        sys.exit(f"gpu-check: this Python ({sys.executable}) lacks {', '.join(lacking)}: pip install them, or where no package "
                 "index is reachable run `make gpu-wheels` on a machine that has one and copy wheels/ along")  # fmt: skip
    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here; skipped")
        return
    root = Path(args.workdir or tempfile.mkdtemp(prefix="optimer-gpu-check-"))
    start = time.perf_counter()
    base, models = build(root, TINY if args.tiny else MODEL)
    summary = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
    checks = {
        "hf": lambda: check_hf(base, models, args.device),
        "vllm": lambda: check_vllm(base, models, root, args.device),
        "cpt": lambda: check_cpt(base, root, args.device, steps=6 if args.tiny else 30),
    }
    failed = []
    for name, check in checks.items():
        # one check's failure is recorded (its traceback on stderr) and the others still run; the
        # summary is written after each, so a run cut short keeps what it measured
        try:
            summary[name] = check()
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            summary[name] = {"error": f"{type(error).__name__}: {error}"[:2000]}
            failed.append(name)
        if cuda:
            torch.cuda.empty_cache()
        summary.pop("seconds", None)  # last, after the checks so far
        summary["seconds"] = time.perf_counter() - start
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    if failed:
        sys.exit(f"gpu-check: {', '.join(failed)} failed (tracebacks above); the summary is in {args.out}")


if __name__ == "__main__":
    main()
