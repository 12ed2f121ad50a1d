"""Search benchmarks, each a ratio measured in one run on the same inputs.

1. merge: an in-memory trial merge (resident vectors written into the live model) against
   `mergekit-yaml` to disk plus reloading the model (goal: >= 5x faster), on a ~50 M-parameter
   Gemma 3 with four vectors.
2. kernel: the merge kernel's time against a plain tensor copy of the bytes it reads and writes
   (goal: within 2x).
3. optimizer: median seconds per trial spent in ask + tell over 100 trials at 4 and 6 weights
   (after the initial design), for SMAC with this project's acquisition settings (goal: < 0.1 s),
   SMAC with its own defaults, TPE and random.
4. efficiency: on the demo pool (the demo base and four per-domain CPT runs, real data, the dev
   objective), trials each optimizer needs to close 99 % of the gap from uniform averaging to the
   best score any run found (also 90% and 95%); median over seeds. Also scores uniform averaging and each
   single-domain model, which the best merge should beat.
5. parallel: on the same pool, trials per minute with 2 Ray workers against 1 (goal >= 1.7x) and
   the share of the trial loop's wall time that is not evaluation (goal <= 5%).

    python benchmarks/search.py [--parts merge,kernel,optimizer,efficiency,parallel] [--seeds 5] [--trials 25]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
DOMAINS = ("ja", "zh", "math", "code")
REPO = Path(__file__).resolve().parents[1]


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def merge_pool(root: Path):
    """A ~50 M-parameter Gemma 3 base and four perturbed copies (stand-ins of CPT models)."""
    from optimer_merge.testing import tiny

    base = root / "base"
    if not (base / "config.json").exists():
        tokenizer = tiny.train_tokenizer(["a b c d e f g h"] * 50, vocab_size=300)
        tiny.build_model(base, tokenizer, hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=12, head_dim=64)
        for i, d in enumerate(DOMAINS, start=1):
            tiny.perturbed_copy(base, root / d, relative_scale=0.02, seed=i)
    return base, {d: str(root / d) for d in DOMAINS}


def bench_merge(root: Path, threads: int) -> dict:
    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    from optimer_merge.io.hub_layout import live_names
    from optimer_merge.search.pool import build_host_pool, build_module_pool, check_sources

    torch.set_num_threads(threads)
    base, models = merge_pool(root)
    spec = check_sources(base, {d: {"model": p} for d, p in models.items()})
    weights = {"ja": 0.4, "zh": 0.3, "math": 0.2, "code": 0.5}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pool = build_module_pool(model, spec, log=lambda _m: None)
    params = sum(e.base.numel() for e in pool.entries)
    in_memory = best_of(lambda: pool.apply(weights))

    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "optimer", "base_model": str(base), "dtype": "float32",
        "models": [{"model": models[d], "parameters": {"weight": w}} for d, w in weights.items()],
    }))  # fmt: skip
    mergekit_yaml = str(Path(sys.executable).with_name("mergekit-yaml"))

    def disk_round_trip():
        subprocess.run([mergekit_yaml, str(recipe), str(root / "merged"), "--lazy-unpickle"], check=True, capture_output=True, timeout=600)
        AutoModelForCausalLM.from_pretrained(root / "merged", dtype=torch.float32)

    on_disk = best_of(disk_round_trip, repeats=2)
    merged = dict(build_host_pool(spec, log=lambda _m: None).merged(weights))
    names, live = live_names(model, list(merged)), dict(model.named_parameters())
    error = max((live[names[k]] - merged[k]).abs().max().item() for k in merged)

    # kernel vs a plain copy of the same bytes: the kernel reads base + K rows, writes one tensor
    outs = [torch.empty_like(e.base) for e in pool.entries]
    coeffs = pool.coefficients(weights)
    kernel = best_of(lambda: [pool.merge(e, coeffs, out=o) for e, o in zip(pool.entries, outs)], repeats=5)
    n_bytes = sum((2 + len(DOMAINS)) * e.base.numel() * 4 for e in pool.entries)
    src, dst = torch.empty(n_bytes // 4), torch.empty(n_bytes // 4)
    src.uniform_()
    copy = best_of(lambda: dst.copy_(src), repeats=5)
    return {
        "parameters": params,
        "in_memory_merge_s": in_memory,
        "mergekit_to_disk_and_reload_s": on_disk,
        "speedup": on_disk / in_memory,
        "max_abs_diff_in_memory_vs_rule": error,
        "kernel_s": kernel,
        "plain_copy_same_bytes_s": copy,
        "kernel_over_copy": kernel / copy,
        "kernel_GBps": n_bytes / kernel / 1e9,
    }


def optimizers() -> dict[str, tuple[str, dict | None]]:
    """Variant name -> (optimizer, SMAC acquisition settings)."""
    from optimer_merge.search.optimizers import SMAC_DEFAULTS

    return {"smac": ("smac", None), "smac-own-defaults": ("smac", SMAC_DEFAULTS), "tpe": ("tpe", None), "random": ("random", None)}


def bench_optimizer(root: Path, trials: int = 100) -> dict:
    from optimer_merge.search.optimizers import make_optimizer

    out = {}
    for name, (kind, acquisition) in optimizers().items():
        for k in (4, 6):
            bounds = {f"w{i}": (0.0, 1.0) for i in range(k)}
            optimizer = make_optimizer(kind, bounds, 0, root / f"opt-{name}-{k}", acquisition=acquisition)
            times = []
            for _ in range(trials):
                start = time.perf_counter()
                w = optimizer.ask()
                optimizer.tell(w, -sum((v - 0.4) ** 2 for v in w.values()))
                times.append(time.perf_counter() - start)
            out[f"{name}/K={k}"] = statistics.median(times[2 * k + 1 :])
    return {"median_seconds_per_trial": out, "trials": trials}


def demo_pool(root: Path, tokens: int) -> tuple[Path, dict[str, str]]:
    from optimer_merge.cpt import TrainConfig, train
    from optimer_merge.cpt.demo_base import shipped_base
    from optimer_merge.demo.pipeline import DemoSettings

    base = shipped_base()  # the demo's base, CPT at the demo's learning rate
    lr = DemoSettings.model_fields["lr"].default
    models = {}
    for d in DOMAINS:
        config = TrainConfig(
            base=str(base), output=str(root / f"cpt-{d}"), datasets=[{"name": d, "source": d}],
            max_tokens=tokens, seq_len=256, micro_batch_size=8, lr=lr, eval_every=50, progress=False,
        )  # fmt: skip
        train(config, log=lambda _m: None)
        models[d] = str(root / f"cpt-{d}" / "model")
    return base, models


def bench_efficiency(root: Path, seeds: int, trials: int, limit: int, tokens: int, objective: str) -> dict:
    from optimer_merge.evaluation.evaluator import open_evaluator
    from optimer_merge.evaluation.objective import Objective
    from optimer_merge.search import SearchConfig, search

    base, models = demo_pool(root, tokens)
    runs = {}
    variants = optimizers()
    for seed in range(seeds):
        for kind, (optimizer, acquisition) in variants.items():
            config = SearchConfig(
                base=str(base), vectors=[{"name": d, "model": m} for d, m in models.items()], objective=objective,
                limit=limit, trials=trials, finalists=0, seed=seed, optimizer=optimizer, threads=1,
                output=str(root / f"search-{kind}-{seed}"), **({"acquisition": acquisition} if acquisition else {}),
            )  # fmt: skip
            search(config, log=lambda _m: None)
            records = [json.loads(line) for line in (Path(config.output) / "trials.jsonl").read_text().splitlines()]
            runs[(kind, seed)] = records
            print(f"  {kind} seed {seed}: best {max(r['score'] for r in records if r['status'] == 'ok'):.5f}", flush=True)

    # single-domain models (w = one-hot) and the base, scored the same way
    spec = Objective.load(objective)
    from optimer_merge.search.pool import check_sources

    singles = {}
    with open_evaluator("hf", base, threads=1, log=lambda _m: None) as ev:
        singles["base"] = spec.score(ev.evaluate(spec.task_names(), limit, quiet=True))[0]
        ev.build_pool(check_sources(base, {d: {"model": m} for d, m in models.items()}))
        for d in DOMAINS:
            ev.set_weights({n: float(n == d) for n in DOMAINS})
            singles[d] = spec.score(ev.evaluate(spec.task_names(), limit, quiet=True))[0]

    uniform = next(r["score"] for r in runs[("smac", 0)] if all(abs(v - 0.25) < 1e-12 for v in r["weights"].values()))
    best = max(r["score"] for records in runs.values() for r in records if r["status"] == "ok")
    shares = (0.9, 0.95, 0.99)  # of the gap between uniform averaging and the best any run found
    targets = {share: uniform + share * (best - uniform) for share in shares}
    result = {"uniform_average": uniform, "best_found": best, "targets": {f"{s:.0%}": t for s, t in targets.items()}, "single_models": singles, "optimizers": {}}
    for kind in variants:
        entry = {}
        for share, target in targets.items():
            reached = []
            for seed in range(seeds):
                records = [r for r in runs[(kind, seed)] if r["status"] == "ok"]
                hit = next((r["trial"] for r in records if r["score"] >= target), None)
                reached.append(hit if hit is not None else trials + 1)  # not reached within the budget
            entry[f"trials_to_{share:.0%}"] = reached
            entry[f"median_trials_to_{share:.0%}"] = statistics.median(reached)
        bests = [max(r["score"] for r in runs[(kind, seed)] if r["status"] == "ok") for seed in range(seeds)]
        result["optimizers"][kind] = {**entry, "best_scores": bests, "median_best": statistics.median(bests)}
    best_run = max(runs.items(), key=lambda kv: max(r["score"] for r in kv[1] if r["status"] == "ok"))
    top = max((r for r in best_run[1] if r["status"] == "ok"), key=lambda r: r["score"])
    result["best_weights"] = top["weights"]
    result["best_beats_uniform"] = best > uniform
    result["best_beats_every_single_model"] = all(best > singles[d] for d in DOMAINS)
    return result


def bench_parallel(root: Path, trials: int, limit: int, tokens: int, objective: str) -> dict:
    """Trials per minute with 2 Ray workers against 1 (in process), and the share of the trial
    loop's wall time that is not evaluation (optimizer, merge, dispatch, result handling)."""
    from optimer_merge.search import SearchConfig, search

    base, models = demo_pool(root, tokens)
    out = {}
    for parallel in (1, 2):
        config = SearchConfig(
            base=str(base), vectors=[{"name": d, "model": m} for d, m in models.items()], objective=objective,
            limit=limit, trials=trials, finalists=0, seed=0, threads=1, parallel=parallel, output=str(root / f"parallel-{parallel}"),
        )  # fmt: skip
        import shutil

        shutil.rmtree(config.output, ignore_errors=True)
        search(config, log=lambda _m: None)
        records = [json.loads(line) for line in (Path(config.output) / "trials.jsonl").read_text().splitlines()]
        first = records[0]
        loop = records[-1]["finished_at"] - first["finished_at"] + sum(first["seconds"].values())
        evaluating = sum(r["seconds"]["eval"] for r in records)
        merging = sum(r["seconds"]["merge"] for r in records)
        out[parallel] = {
            "trials": len(records),
            "loop_seconds": loop,
            "trials_per_minute": 60 * len(records) / loop,
            "not_evaluation_share": 1 - evaluating / (parallel * loop),
            "merge_share": merging / (parallel * loop),
            # a worker neither merging nor evaluating: dispatch, results, waiting for a proposal (with
            # one worker: the optimizer), and the run's last trial while the other worker has none left
            "idle_share": 1 - (evaluating + merging) / (parallel * loop),
            "optimizer_seconds_median": statistics.median(r["seconds"]["optimizer"] for r in records),
            "eval_seconds": [min(r["seconds"]["eval"] for r in records), max(r["seconds"]["eval"] for r in records)],
        }
    out["speedup"] = out[2]["trials_per_minute"] / out[1]["trials_per_minute"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="merge,kernel,optimizer,efficiency,parallel")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=25)
    parser.add_argument("--limit", type=int, default=20, help="items per dev task in the efficiency study")
    parser.add_argument("--cpt-tokens", type=int, default=150_000, help="tokens of each per-domain CPT run")
    parser.add_argument("--objective", default=str(REPO / "recipes/objectives/dev-bpb.yaml"))
    parser.add_argument("--workdir", default=None, help="keep models and runs here (default: a temp folder)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="optimer-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    out = root / "search-benchmark.json"
    report = json.loads(out.read_text()) if out.is_file() else {}  # parts run separately add up
    if parts & {"merge", "kernel"}:
        report["merge"] = m = bench_merge(root / "merge", args.threads)
        print(f"merge ({m['parameters'] / 1e6:.1f} M params, 4 vectors): in memory {m['in_memory_merge_s']:.3f}s, "
              f"mergekit-yaml to disk + reload {m['mergekit_to_disk_and_reload_s']:.2f}s -> {m['speedup']:.1f}x (goal >= 5x); "
              f"max |diff| {m['max_abs_diff_in_memory_vs_rule']:.1e}")  # fmt: skip
        print(f"kernel: {m['kernel_s']:.3f}s vs plain copy of the same bytes {m['plain_copy_same_bytes_s']:.3f}s "
              f"-> {m['kernel_over_copy']:.2f}x (goal <= 2x), {m['kernel_GBps']:.1f} GB/s")  # fmt: skip
    if "optimizer" in parts:
        report["optimizer"] = o = bench_optimizer(root)
        print("optimizer overhead, median ask + tell over 100 trials (goal for smac < 100 ms): "
              + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in o["median_seconds_per_trial"].items()))  # fmt: skip
    if "efficiency" in parts:
        report["efficiency"] = e = bench_efficiency(root, args.seeds, args.trials, args.limit, args.cpt_tokens, args.objective)
        print(f"efficiency on the demo pool ({args.trials} trials, limit {args.limit}, {args.seeds} seeds): "
              f"uniform {e['uniform_average']:.5f}, best {e['best_found']:.5f}")  # fmt: skip
        print("  single-domain models: " + ", ".join(f"{k} {v:.5f}" for k, v in e["single_models"].items()))
        for kind, r in e["optimizers"].items():
            print(f"  {kind}: median trials to 90/95/99% of the gap " + "/".join(str(r[f"median_trials_to_{p}%"]) for p in (90, 95, 99))
                  + f" (99%: {r['trials_to_99%']}; {args.trials + 1} = not reached), median best {r['median_best']:.5f}")  # fmt: skip
        print(f"  best weights {e['best_weights']}; beats uniform: {e['best_beats_uniform']}, beats every single model: {e['best_beats_every_single_model']}")
    if "parallel" in parts:
        trials = 2 * -(-max(args.trials, 20) // 2)  # an even count: both workers run the same number
        report["parallel"] = p = bench_parallel(root, trials, args.limit, args.cpt_tokens, args.objective)
        for n in (1, 2):
            r = p[n]
            print(f"parallel={n}: {r['trials_per_minute']:.1f} trials/min, {r['not_evaluation_share']:.1%} of the trial loop not evaluating "
                  f"(goal <= 5%): {r['merge_share']:.1%} merging, {r['idle_share']:.1%} idle (dispatch, results, the run's last trial); "
                  f"optimizer median {r['optimizer_seconds_median'] * 1000:.0f} ms ({'asked while trials run' if n > 1 else 'between trials'}); "
                  f"one evaluation {r['eval_seconds'][0]:.1f}-{r['eval_seconds'][1]:.1f} s")  # fmt: skip
        print(f"2 workers vs 1: {p['speedup']:.2f}x trials per minute (goal >= 1.7x)")
    out.write_text(json.dumps(report, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
