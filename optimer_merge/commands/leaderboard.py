"""Leaderboard from lm-eval results JSON files (ours or any lm-eval run): Markdown, CSV and a bar chart."""

from __future__ import annotations

import argparse
import sys

from optimer_merge.commands import path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", metavar="[NAME=]RESULTS", help="lm-eval results JSON, or a folder searched for results*.json; NAME= sets the row label")
    parser.add_argument("--output", type=path, default=".", help="folder for leaderboard.md, leaderboard.csv, leaderboard.png")
    parser.add_argument("--metrics", help="comma-separated metrics to keep, e.g. bits_per_byte,acc_norm")
    parser.add_argument("--tasks", help="comma-separated tasks to keep")


def run(args: argparse.Namespace) -> int:
    from optimer_merge.errors import ConfigError
    from optimer_merge.io.files import check_output_dir
    from optimer_merge.report.leaderboard import leaderboard, read_rows, to_markdown, write

    def names(flag: str, value: str | None) -> list[str] | None:
        if value is None:
            return None
        items = [v.strip() for v in value.split(",")]
        if not all(items):
            raise ConfigError(f"{flag} {value!r} names an empty entry; give comma-separated names")
        return items

    metrics, tasks = names("--metrics", args.metrics), names("--tasks", args.tasks)
    out = check_output_dir(args.output, "--output")
    board = leaderboard(read_rows(args.results), metrics, tasks)
    paths = write(board, out)
    print(to_markdown(board))
    for warning in board["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {paths['md']}, {paths['csv']}, {paths['png']}")
    return 0
