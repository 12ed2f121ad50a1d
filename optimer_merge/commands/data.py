"""Build, check or measure the offline corpora (ja, zh, math, code, en).

`build` downloads the pinned sources into --sources and rewrites the corpus files of the chosen
domains inside the installed package (optimer_merge/data/corpora/<domain>/*.jsonl.gz) and their
checksums in MANIFEST.json; `check` rebuilds into a temporary folder and only compares.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("action", choices=["build", "check", "sizes"])
    parser.add_argument("--sources", type=Path, default=Path(".cache/corpus-sources"), help="download cache")
    parser.add_argument("--domains", nargs="+", default=None, help="domains to build/check (default: all)")
    parser.add_argument("--tokenizer", default=None, help="with `sizes`: also count tokens with this tokenizer folder")


def run(args: argparse.Namespace) -> int:
    import json

    from optimer_merge import data
    from optimer_merge.errors import ConfigError
    from optimer_merge.io.files import check_output_dir

    domains = data.check_domains(args.domains or data.ALL_DOMAINS)
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
