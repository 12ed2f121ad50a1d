"""Merge models with a mergekit YAML recipe (same result as `mergekit-yaml RECIPE OUT`)."""

from __future__ import annotations

import argparse

from optimer_merge.commands import cpu_threads, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=path, help="mergekit YAML recipe (any method, including `optimer`)")
    parser.add_argument("out", type=path, help="output model folder (new, empty, or an earlier merge's, which is replaced)")
    parser.add_argument("--device", default="cpu", help="device for the merge math (default: cpu)")
    parser.add_argument("--threads", type=cpu_threads, default=None, help="torch threads for the merge")
    parser.add_argument("--no-copy-tokenizer", action="store_true", help="do not copy the base tokenizer")
    parser.add_argument("--no-model-card", action="store_true", help="do not write README.md")
    parser.add_argument("--out-shard-size", default="5B", help="max shard size, e.g. 2B or 500M")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def check_device(name: str) -> None:
    import torch

    from optimer_merge.errors import ConfigError

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False); use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available here; use --device cpu")


def run(args: argparse.Namespace) -> int:
    from optimer_merge.errors import ConfigError
    from optimer_merge.merge.recipes import check_merge_target, load_recipe, run_recipe

    loaded = load_recipe(args.recipe)  # read once: the recipe may come through a pipe
    config = loaded[0]
    from mergekit.common import parse_kmb

    try:
        shard_size = parse_kmb(args.out_shard_size)
        if shard_size <= 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--out-shard-size {args.out_shard_size!r} is not a size such as 2B, 500M or 1000000") from None
    check_device(args.device)
    check_merge_target(args.out)
    if not args.quiet:
        names = ", ".join(str(m.model.path) for m in config.referenced_models())
        print(f"merging [{config.merge_method}] {names} -> {args.out}", flush=True)
    summary = run_recipe(
        args.recipe,
        args.out,
        device=args.device,
        threads=args.threads,
        copy_tokenizer=not args.no_copy_tokenizer,
        write_model_card=not args.no_model_card,
        out_shard_size=shard_size,
        quiet=args.quiet,
        loaded=loaded,
    )
    if not args.quiet:
        print(f"done in {summary['seconds']:.1f}s: {args.out}", flush=True)
    return 0
