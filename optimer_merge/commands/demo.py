"""The paper's experiment in miniature on CPU: CPT per domain, OptiMer search, baselines, report.

From the shipped tiny base (optimer_merge/demo/base), four per-domain CPT runs (ja, zh, math,
code) give the vector pool, SMAC searches the merge weights on dev tasks, the same pool is
re-optimised for two other objectives, and data-mixture CPT baselines (uniform, Velocitune,
OptiMer's weights as ratios) are trained at the same total budget. Every candidate is scored on
test tasks no search saw; RUN_DIR/report.md has the leaderboard, plots, costs and a verdict per
paper claim; with --seeds N, every claim gets a 95% interval over seeds and a verdict from it.
Rerun the same command to resume an interrupted run.
"""

from __future__ import annotations

import argparse

from optimer_merge.commands import path, positive_int

SIZES = {
    "cpt_tokens": "tokens of each per-domain CPT run (each mixture run gets 4x)",
    "trials": "trials of the all-domain search",
    "reopt_trials": "trials of each re-optimisation",
    "limit": "dev items per task in a trial",
    "finalists": "top trials re-scored at --finalist-limit",
    "finalist_limit": "dev items per task for the finalists",
    "test_limit": "test items per task",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from optimer_merge.demo.pipeline import DemoSettings

    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--run-dir", type=path, default="runs/demo", help="run folder (a rerun resumes it)")
    parser.add_argument("--seed", type=int, default=0, help="seed (the first seed with --seeds)")
    parser.add_argument("--seeds", type=positive_int, default=1, help="repeat the demo for this many seeds (RUN_DIR/seed-<s>/) and report "
                        "every claim as a mean with a 95%% interval and a verdict (default 1)")
    parser.add_argument("--report-dir", type=path, help="with --seeds N >= 2: also copy the report and its plots here")
    parser.add_argument("--workers", type=positive_int, help="worker processes, one CPU thread each (default: min(2, cores))")
    parser.add_argument("--search-workers", type=positive_int, help="Ray workers of each search (default: 2 where the cores allow "
                        "2 per demo worker, else 1; a resumed run keeps its own)")  # fmt: skip
    parser.add_argument("--optimizer", choices=["smac", "tpe", "random"], help="search optimizer (default smac)")
    parser.add_argument("--lr", type=float, help="peak learning rate of the CPT and mixture runs (default 3e-4)")
    sizes = parser.add_argument_group("sizes (defaults fit a 2-core CPU in 5-7 minutes)")
    for field, text in SIZES.items():
        sizes.add_argument("--" + field.replace("_", "-"), type=int, help=f"{text} (default {DemoSettings.model_fields[field].default})")


def _recorded(run_dir, field: str):
    """A setting recorded by the demo in ``run_dir`` (a resumed run keeps its own), or None."""
    import json

    from optimer_merge.demo.pipeline import SETTINGS_RECORD, DemoSettings

    try:
        identity = json.loads((run_dir / SETTINGS_RECORD).read_text()).get("identity", {})
    except (OSError, ValueError):  # no run there yet (a damaged record is refused by the run itself)
        return None
    return identity.get(field, DemoSettings.ADDED.get(field))


def run(args: argparse.Namespace) -> int:
    import importlib.util
    import os
    from pathlib import Path

    from pydantic import ValidationError

    from optimer_merge.demo import DemoSettings, run_demo
    from optimer_merge.demo.report import write_report
    from optimer_merge.demo.seeds import check_layout
    from optimer_merge.errors import ConfigError
    from optimer_merge.io.files import check_output_dir

    values = {f: getattr(args, f) for f in (*SIZES, "optimizer", "lr") if getattr(args, f) is not None}
    values["workers"] = args.workers if args.workers is not None else min(2, os.cpu_count() or 1)
    recorded_in = Path(args.run_dir) / (f"seed-{args.seed}" if args.seeds > 1 else "")  # a multi-seed run records per seed
    values["search_workers"] = args.search_workers or _recorded(recorded_in, "search_workers") or (
        2 if (os.cpu_count() or 1) >= 2 * values["workers"] and importlib.util.find_spec("ray") else 1
    )
    try:
        settings = DemoSettings(seed=args.seed, **values)
    except ValidationError as error:
        raise ConfigError("; ".join(f"--{str(e['loc'][0]).replace('_', '-')} {e['input']!r}: {e['msg'].removeprefix('Value error, ')}" for e in error.errors())) from None
    if settings.search_workers > 1 and not importlib.util.find_spec("ray"):
        raise ConfigError(f"--search-workers {settings.search_workers} needs Ray: pip install 'optimer-merge[ray]', or give --search-workers 1")
    if settings.search_workers > (os.cpu_count() or 1):
        raise ConfigError(f"--search-workers {settings.search_workers}: this machine has {os.cpu_count()} CPUs, one per search worker; give fewer")
    if args.seed + args.seeds - 1 > 2**32 - 1:
        raise ConfigError(f"--seed {args.seed} with --seeds {args.seeds} would run seeds above 4294967295; give a smaller --seed")
    run_dir = check_output_dir(args.run_dir, "--run-dir")
    if args.report_dir is not None and args.seeds < 2:
        raise ConfigError(f"--report-dir {args.report_dir!r} needs --seeds 2 or more (a one-seed report lives in its run folder)")
    report_dir = check_output_dir(args.report_dir, "--report-dir") if args.report_dir is not None else None
    check_layout(run_dir, args.seeds)
    if args.seeds > 1:
        return _run_seeds(run_dir, settings, args.seeds, report_dir)
    states = run_demo(run_dir, settings, log=lambda m: print(m, flush=True))
    numbers = write_report(run_dir, settings, states)
    mean = numbers["test_mean_bits_per_byte"]
    print("\ntest mean bits/byte (lower is better):")
    for name in sorted(mean, key=mean.get):
        print(f"  {mean[name]:.4f}  {numbers['labels'][name]}")
    print(f"search cost vs a data-mixture search: {numbers['cost_ratio_with_training']:.1f}x lower "
          f"({numbers['cost_ratio_search_only']:.1f}x for the search alone)")
    print(f"report: {run_dir / 'report.md'}  best recipe: {run_dir / 'best.yaml'}")
    return 0


def _run_seeds(run_dir, settings, seeds: int, report_dir) -> int:
    from optimer_merge.demo.seeds import copy_report, run_seeds

    agg = run_seeds(run_dir, settings, seeds, log=lambda m: print(m, flush=True))
    mean = agg["test_mean_bits_per_byte"]
    print(f"\ntest mean bits/byte over {seeds} seeds (mean [95% interval], lower is better):")
    for name in sorted(mean, key=lambda c: mean[c]["mean"]):
        m = mean[name]
        print(f"  {m['mean']:.4f} [{m['low']:.4f}, {m['high']:.4f}]  {agg['labels'][name]}")
    print("claims:")
    for claim in agg["claims"].values():
        print(f"  {claim['verdict']:>15}: {claim['claim']} ({claim['mean']:+.4g} [{claim['low']:+.4g}, {claim['high']:+.4g}])")
    if report_dir is not None:
        copy_report(run_dir, report_dir)
    print(f"report: {run_dir / 'report.md'}" + (f" (copied to {report_dir})" if report_dir is not None else ""))
    return 0
