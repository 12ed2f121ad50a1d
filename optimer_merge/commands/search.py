"""Search merge weights with Bayesian optimisation (SMAC3; or TPE, random) over distribution vectors.

Settings come from --config FILE.yaml (see recipes/search/); flags override it and `--set
key=value` reaches any field. Each trial merges in memory into the loaded model and is scored on the
objective; trials.jsonl records every one. Rerun the same command to resume after an interruption,
or with a larger --trials to extend a finished search.
"""

from __future__ import annotations

import argparse

from optimer_merge.commands import auto_or_positive_int, path, positive_int

FLAG_FIELDS = ("base", "objective", "trials", "limit", "finalists", "finalist_limit", "seed", "optimizer", "backend", "output", "threads", "parallel")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", type=path, help="YAML search config")
    parser.add_argument("--base", type=path, help="base model folder")
    parser.add_argument("--vector", action="append", metavar="NAME=PATH", help="pool entry: a CPT model folder or a vector .safetensors (replaces the config's)")
    parser.add_argument("--objective", type=path, help="objective spec YAML (recipes/objectives/)")
    parser.add_argument("--trials", type=positive_int, help="number of trials (default 100)")
    parser.add_argument("--limit", type=positive_int, help="items per task in each trial (default 100)")
    parser.add_argument("--finalists", type=int, help="top trials re-scored at --finalist-limit (default 3)")
    parser.add_argument("--finalist-limit", type=positive_int, help="items per task for finalists (default 300)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--optimizer", choices=["smac", "tpe", "random"])
    parser.add_argument("--backend", choices=["hf", "vllm"])
    parser.add_argument("--output", type=path, help="run folder")
    parser.add_argument("--threads", type=auto_or_positive_int, help="CPU threads (of each worker): a number or 'auto'")
    parser.add_argument("--parallel", type=positive_int, help="trials side by side on Ray workers (default 1: in this process)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field")
    parser.add_argument("--export", action="store_true", help="also merge the best weights to OUTPUT/best-model with mergekit")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from optimer_merge.commands import pairs, set_overrides
    from optimer_merge.search import load_search_config, search

    overrides = {f: getattr(args, f) for f in FLAG_FIELDS if getattr(args, f) is not None}
    if args.vector:
        overrides["vectors"] = [
            {"name": name, ("vector" if Path(path).suffix == ".safetensors" else "model"): path}
            for name, path in pairs(args.vector, "--vector").items()
        ]
    overrides.update(set_overrides(args.set))
    config = load_search_config(args.config, overrides)
    summary = search(config, export=args.export)
    best = summary["best"]
    print("best weights: " + " ".join(f"{n}={w:.4f}" for n, w in best["weights"].items()))
    if best["mixture_ratios"]:
        print("as mixture ratios: " + " ".join(f"{n}={r:.3f}" for n, r in best["mixture_ratios"].items()))
    else:
        print("as mixture ratios: none (a data mixture needs weights >= 0 with a positive sum)")
    # the finalists keep their trial scores where re-scoring would see the same items (said above)
    final = f", {best['final_score']:.5f} at limit {config.finalist_limit}" if best["rescored"] else ""
    print(f"score {best['score']:.5f} at limit {config.limit}{final} (trial {best['trial']})")
    print(f"recipe: {Path(config.output) / 'best.yaml'}  summary: {Path(config.output) / 'summary.json'}")
    return 0
