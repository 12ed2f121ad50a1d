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

from optimer_merge.commands import folder, path

# Which actions read each option; given to another action, an option is refused rather than ignored.
APPLIES = {"sources": ("build", "check"), "domains": ("build", "check"), "tokenizer": ("sizes",), "out": ("base",), "work": ("base",)}
DEFAULTS = {"sources": Path(".cache/corpus-sources"), "domains": None, "tokenizer": None, "out": None, "work": Path(".cache/demo-base-build")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("action", choices=["build", "check", "sizes", "base"])
    parser.add_argument("--sources", type=folder, default=DEFAULTS["sources"], help="download cache")
    parser.add_argument("--domains", nargs="+", default=DEFAULTS["domains"], help="domains to build/check (default: all)")
    parser.add_argument("--tokenizer", type=path, default=DEFAULTS["tokenizer"], help="with `sizes`: also count tokens with this tokenizer folder")
    parser.add_argument("--out", type=folder, default=DEFAULTS["out"], help="with `base`: where the base goes (default: the package's demo/base)")
    parser.add_argument("--work", type=folder, default=DEFAULTS["work"], help="with `base`: training folder (a rerun resumes it)")


def run(args: argparse.Namespace) -> int:
    import json

    from optimer_merge import data
    from optimer_merge.errors import ConfigError
    from optimer_merge.io.files import check_output_dir

    for flag, actions in APPLIES.items():
        if args.action not in actions and getattr(args, flag) != DEFAULTS[flag]:
            raise ConfigError(f"--{flag} does not apply to `{args.action}` (only to {' and '.join(f'`{a}`' for a in actions)})")
    domains = data.check_domains(args.domains or data.ALL_DOMAINS)
    if args.action == "base":
        from optimer_merge.cpt.demo_base import BUILD_RECORD, SHIPPED, build_shipped

        out = check_output_dir(args.out or SHIPPED, "--out")
        if out.is_dir() and any(out.iterdir()) and not (out / BUILD_RECORD).is_file():
            # the finished build replaces --out as a whole: never a folder of other files
            raise ConfigError(f"--out {out} is not empty and holds no earlier base ({BUILD_RECORD}); choose a new or empty folder")
        work = check_output_dir(args.work, "--work")
        record = build_shipped(out, work)
        if record is None:  # another training process
            return 0
        print(f"demo base: {record['parameters']:,} parameters, {record['tokens']:,} tokens "
              f"({record['tokens_per_parameter']} per parameter) -> {out}")
        print(json.dumps(record["sha256"], indent=2))
        return 0
    if args.action == "sizes":
        tokenizer = None
        if args.tokenizer:
            from transformers import AutoTokenizer

            from optimer_merge.io.checkpoints import check_tokenizer

            tokenizer = AutoTokenizer.from_pretrained(check_tokenizer(Path(args.tokenizer).expanduser(), "--tokenizer"))
        print(json.dumps(data.sizes(tokenizer), indent=2))
        return 0
    from optimer_merge.data.build import run as build_run

    check_output_dir(args.sources, "--sources")
    return build_run(data.CORPORA_DIR, args.sources, domains, check=args.action == "check")
