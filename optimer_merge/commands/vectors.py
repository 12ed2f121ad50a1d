"""Distribution vectors: `extract` (v_i = model_i - base, streamed) and `stats` (norms, cosines, heatmap)."""

from __future__ import annotations

import argparse

from optimer_merge.commands import path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from optimer_merge.io import FLOAT_DTYPES

    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    extract = sub.add_parser("extract", help="write NAME.safetensors = model - base for each model, plus vectors.json")
    extract.add_argument("--base", type=path, required=True, help="base model folder")
    extract.add_argument("--model", action="append", required=True, metavar="NAME=DIR", help="a model trained from the base; repeatable (NAME becomes the file name)")
    extract.add_argument("--out", type=path, required=True, help="output folder")
    extract.add_argument("--dtype", default=None, choices=FLOAT_DTYPES, help="stored dtype (default: the base's)")
    stats = sub.add_parser("stats", help="L2 norms and pairwise cosine similarities, overall and per layer (JSON + PNG)")
    stats.add_argument("vectors", type=path, nargs="+", help="a folder from `vectors extract`, or NAME=FILE.safetensors entries")
    stats.add_argument("--out", type=path, help="folder for stats.json and cosine.png (default: the vectors folder; for NAME=FILE entries, the current folder)")
    stats.add_argument("--base", type=path, help="the base the vectors came from, for ||v|| / ||base|| (default: the one vectors.json records)")
    parser.commands = {"extract": extract, "stats": stats}  # the CLI reports an unknown flag by the action's own parser


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from optimer_merge.commands import pairs
    from optimer_merge.errors import ConfigError
    from optimer_merge.vectors import extract, read_manifest, stats
    from optimer_merge.vectors.stats import kind_summary

    if args.action == "extract":
        models = pairs(args.model, "--model")
        manifest = extract(args.base, models, args.out, dtype=args.dtype, log=lambda m: print(m, flush=True))
        for name, entry in manifest["vectors"].items():
            print(f"  {name}: ||v|| = {entry['l2_norm']:.4g}  ({Path(args.out) / entry['file']})")
        skipped = manifest["skipped"]["equal_in_all_models"]
        print(f"  {len(skipped)} tensors equal in all models were skipped (listed in vectors.json)")
        return 0
    if len(args.vectors) == 1 and "=" not in args.vectors[0]:
        folder = Path(args.vectors[0])
        if folder.is_file():
            raise ConfigError(f"{folder} is a file: give a folder from `vectors extract`, or NAME=FILE.safetensors entries")
        manifest = read_manifest(folder)
        files = {name: str(folder / e["file"]) for name, e in manifest["vectors"].items()}
        out = args.out or folder
        base = args.base or (manifest["base"] if Path(manifest["base"]).is_dir() else None)
    else:
        folders = [v for v in args.vectors if "=" not in v]
        if folders:
            raise ConfigError(f"{folders[0]!r}: give one folder from `vectors extract`, or only NAME=FILE.safetensors entries")
        files = pairs(args.vectors, "stats")
        out = args.out or "."
        base = args.base
    result = stats(files, out, base=base)
    names = result["vectors"]
    width = max(len(n) for n in names) + 2
    print("cosine similarity".ljust(width) + "".join(n.rjust(8) for n in names))
    for name, row in zip(names, result["cosine"]):
        print(name.ljust(width) + "".join(f"{v:8.3f}" for v in row))
    print("L2 norm".ljust(width) + "".join(f"{result['l2_norm'][n]:8.3g}" for n in names))
    if "relative_norm" in result:
        print("/ ||base||".ljust(width) + "".join(f"{result['relative_norm'][n]:8.3f}" for n in names))
    if len(names) > 1:
        for kind, e in kind_summary(result).items():
            lo, hi = e["cosine_range"]
            print(f"  {kind}: {e['parameters']:.0%} of parameters, {e['norm_sq']:.0%} of ||v||^2 (mean), cosines {lo:+.3f} .. {hi:+.3f}")
    print(f"wrote {Path(out) / 'stats.json'} and {Path(out) / 'cosine.png'}")
    return 0
