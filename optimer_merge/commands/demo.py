"""Run the end-to-end demo on CPU into a run folder (currently: the merge path on tiny models)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DOMAINS = ("ja", "zh", "math", "code")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default="runs/demo", help="run folder (reused if present)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import itertools

    import torch
    import yaml

    from optimer_merge import data, tiny
    from optimer_merge.merge_rule import merge_tensor
    from optimer_merge.recipes import run_recipe

    run_dir = Path(args.run_dir).resolve()
    models = run_dir / "models"
    models.mkdir(parents=True, exist_ok=True)

    base = models / "base"
    if not (base / "model.safetensors").exists():
        print("[1/3] training a byte-level BPE tokenizer on the corpora and building a tiny Gemma 3 base", flush=True)
        sample = [t for d in data.ALL_DOMAINS for t in itertools.islice(data.texts(d, "train"), 200)]
        tokenizer = tiny.train_tokenizer(sample, vocab_size=2048)
        tiny.build_model(base, tokenizer, seed=args.seed)
    else:
        print("[1/3] tiny base exists, reused", flush=True)
    for i, domain in enumerate(DOMAINS, start=1):
        if not (models / domain / "model.safetensors").exists():
            tiny.perturbed_copy(base, models / domain, relative_scale=0.02, seed=args.seed + i)
    print(f"[2/3] {len(DOMAINS)} per-domain stand-in models ready (seeded deltas of the base)", flush=True)

    weights = {"ja": 0.6, "zh": 0.35, "math": -0.25, "code": 0.9}
    recipe = {
        "merge_method": "optimer",
        "base_model": str(base),
        "models": [{"model": str(models / d), "parameters": {"weight": w}} for d, w in weights.items()],
        "parameters": {"scale": 1.0},
        "dtype": "float32",
    }
    recipe_path = run_dir / "recipe.yml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    print(f"[3/3] merging with mergekit's runner and the optimer method: {recipe_path}", flush=True)
    summary = run_recipe(recipe_path, run_dir / "merged", quiet=True)

    from safetensors.torch import load_file

    load = lambda d: load_file(str(d / "model.safetensors"))  # noqa: E731
    base_sd, merged = load(base), load(run_dir / "merged")
    inputs = [load(models / d) for d in weights]
    coeffs = torch.tensor(list(weights.values()))
    error = max(
        (merged[k] - merge_tensor(base_sd[k], [m[k] for m in inputs], coeffs)).abs().max().item()
        for k in base_sd
    )
    summary["max_abs_error_vs_merge_rule"] = error
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"merged in {summary['seconds']:.2f}s, max |mergekit - merge rule| = {error:.2e}")
    print(f"outputs: {run_dir}/merged, {run_dir}/summary.json")
    return 0 if error < 1e-6 else 1
