"""Build, check or measure the offline corpora (ja, zh, math, code, en), or build the demo base.

`build` downloads the pinned sources into --sources and rewrites the corpus files of the chosen
domains inside the installed package (optimer_merge/data/corpora/<domain>/*.jsonl.gz) and their
checksums in MANIFEST.json; `check` rebuilds into a temporary folder and only compares.
`base` pre-trains the demo's base from the corpora (seeded, 2 CPU processes, about 16 minutes;
resumable in --work) and writes it with its BUILD.json record into --out (default: the package's
optimer_merge/demo/base).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("action", choices=["build", "check", "sizes", "base"])
    parser.add_argument("--sources", type=Path, default=Path(".cache/corpus-sources"), help="download cache")
    parser.add_argument("--domains", nargs="+", default=None, help="domains to build/check (default: all)")
    parser.add_argument("--tokenizer", default=None, help="with `sizes`: also count tokens with this tokenizer folder")
    parser.add_argument("--out", type=Path, default=None, help="with `base`: where the base goes (default: the package's demo/base)")
    parser.add_argument("--work", type=Path, default=Path(".cache/demo-base-build"), help="with `base`: training folder (a rerun resumes it)")


def run(args: argparse.Namespace) -> int:
    import json

    from optimer_merge import data
    from optimer_merge.errors import ConfigError
    from optimer_merge.io.files import check_output_dir

    domains = data.check_domains(args.domains or data.ALL_DOMAINS)
    if args.action == "base":
        from optimer_merge.cpt.demo_base import SHIPPED, build_shipped

        if args.domains or args.tokenizer:
            raise ConfigError("--domains and --tokenizer do not apply to `base`; it always pre-trains on its recorded mixture")
        out = check_output_dir(args.out or SHIPPED, "--out")
        work = check_output_dir(args.work, "--work")
        record = build_shipped(out, work)
        if record is None:  # another training process
            return 0
        print(f"demo base: {record['parameters']:,} parameters, {record['tokens']:,} tokens "
              f"({record['tokens_per_parameter']} per parameter) -> {out}")
        print(json.dumps(record["sha256"], indent=2))
        return 0
    if args.action == "sizes":
        if args.domains:
            raise ConfigError("--domains applies to build and check; `sizes` measures every domain")
        tokenizer = None
        if args.tokenizer:
            from transformers import AutoTokenizer

            from optimer_merge.errors import InputNotFound

            folder = Path(args.tokenizer).expanduser()
            if not folder.exists():
                raise InputNotFound(f"--tokenizer {folder} does not exist; give a local tokenizer folder (nothing is downloaded)")
            if not folder.is_dir():
                raise ConfigError(f"--tokenizer {folder} is a file; give the folder holding tokenizer.json")
            tokenizer = AutoTokenizer.from_pretrained(folder)
        print(json.dumps(data.sizes(tokenizer), indent=2))
        return 0
    from optimer_merge.data.build import run as build_run

    check_output_dir(args.sources, "--sources")
    return build_run(data.CORPORA_DIR, args.sources, domains, check=args.action == "check")
