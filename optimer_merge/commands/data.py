"""Build, check or measure the offline corpora (ja, zh, math, code, en)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["build", "check", "sizes"])
    parser.add_argument("--sources", type=Path, default=Path(".cache/corpus-sources"), help="download cache")
    parser.add_argument("--domains", nargs="*", default=None, help="domains to build/check (default: all)")
    parser.add_argument("--tokenizer", default=None, help="with `sizes`: also count tokens with this tokenizer dir")


def run(args: argparse.Namespace) -> int:
    import json

    from optimer_merge import data

    if args.action == "sizes":
        tokenizer = None
        if args.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        print(json.dumps(data.sizes(tokenizer), indent=2))
        return 0
    from optimer_merge.data.build import run as build_run

    domains = tuple(args.domains or data.ALL_DOMAINS)
    return build_run(data.CORPORA_DIR, args.sources, domains, check=args.action == "check")
