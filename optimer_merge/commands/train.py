"""Continual pre-training on Lightning Fabric: one dataset, a static mixture, or Velocitune.

Settings come from --config FILE.yaml; the flags below override it, and `--set key=value` reaches
any other field (dotted keys, values parsed as YAML), e.g. `--set velocitune.update_every=10`.
Rerunning the same command resumes from the last checkpoint; a finished run is reused.
"""

from __future__ import annotations

import argparse

from optimer_merge.commands import auto_or_positive_int, path, positive_int

# flag -> config field; flags left unset do not override the YAML.
FLAG_FIELDS = {
    "base": "base",
    "output": "output",
    "mixture": "mixture",
    "max_tokens": "max_tokens",
    "max_steps": "max_steps",
    "seq_len": "seq_len",
    "micro_batch_size": "micro_batch_size",
    "grad_accum": "grad_accum",
    "lr": "lr",
    "schedule": "schedule",
    "accelerator": "accelerator",
    "strategy": "strategy",
    "devices": "devices",
    "num_nodes": "num_nodes",
    "precision": "precision",
    "threads": "threads",
    "seed": "seed",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", type=path, help="YAML file with the run's settings (see recipes/train/)")
    parser.add_argument("--base", type=path, help="base Hugging Face model folder")
    parser.add_argument("--output", type=path, help="run folder (checkpoints, metrics, final model in OUTPUT/model)")
    parser.add_argument(
        "--dataset",
        action="append",
        metavar="SOURCE[:RATIO]",
        help="training data: a corpus domain (ja, zh, math, code, en) or a jsonl/txt/parquet file or "
        "folder, with an optional mixture ratio; repeat for a mixture (replaces the config's datasets)",
    )
    parser.add_argument(
        "--eval-dataset", action="append", metavar="SOURCE", help="extra held-out data to log loss on; repeatable"
    )
    parser.add_argument("--mixture", choices=["static", "velocitune"])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max-tokens", type=positive_int)
    budget.add_argument("--max-steps", type=positive_int)
    parser.add_argument("--seq-len", type=positive_int)
    parser.add_argument("--micro-batch-size", type=positive_int)
    parser.add_argument("--grad-accum", type=positive_int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--schedule", choices=["cosine", "constant", "wsd"])
    parser.add_argument("--accelerator", help="auto, cpu, cuda, ... (Lightning Fabric)")
    parser.add_argument("--strategy", help="auto, ddp, fsdp, deepspeed, ... (Lightning Fabric)")
    parser.add_argument("--devices", help="devices per node (Lightning Fabric)")
    parser.add_argument("--num-nodes", type=positive_int)
    parser.add_argument("--precision", help="32-true, bf16-mixed, bf16-true, ... (Lightning Fabric)")
    parser.add_argument("--threads", type=auto_or_positive_int, help="CPU threads: a number, or 'auto' (1 for small models)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field")
    parser.add_argument("--overwrite", action="store_true", help="delete the run folder and start over")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def overrides_from_args(args: argparse.Namespace) -> dict:
    """Config overrides from the flags that were given."""
    from optimer_merge.commands import set_overrides

    overrides = {field: getattr(args, flag) for flag, field in FLAG_FIELDS.items() if getattr(args, flag) is not None}
    if "devices" in overrides and str(overrides["devices"]).isdigit():
        overrides["devices"] = int(overrides["devices"])
    if args.max_tokens is not None:
        overrides["max_steps"] = None
    if args.max_steps is not None:
        overrides["max_tokens"] = None
    if args.dataset:  # SOURCE[:RATIO], named by the config (as in its `datasets: [ja, x.jsonl:2]`)
        overrides["datasets"] = list(args.dataset)
    if args.eval_dataset:
        overrides["eval_datasets"] = list(args.eval_dataset)
    if args.no_progress:
        overrides["progress"] = False
    overrides.update(set_overrides(args.set))
    return overrides


def run(args: argparse.Namespace) -> int:
    from optimer_merge.cpt.config import load_config
    from optimer_merge.cpt.trainer import train

    config = load_config(args.config, overrides_from_args(args))
    train(config, overwrite=args.overwrite)
    return 0
