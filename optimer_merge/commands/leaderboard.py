"""Leaderboard from lm-eval results JSON files (ours or any lm-eval run): Markdown, CSV and a bar chart."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", metavar="[NAME=]RESULTS", help="lm-eval results JSON, or a folder searched for results*.json; NAME= sets the row label")
    parser.add_argument("--output", default=".", help="folder for leaderboard.md, leaderboard.csv, leaderboard.png")
    parser.add_argument("--metrics", help="comma-separated metrics to keep, e.g. bits_per_byte,acc_norm")
    parser.add_argument("--tasks", help="comma-separated tasks to keep")


def run(args: argparse.Namespace) -> int:
    from optimer_merge.cli import UserError
    from optimer_merge.report.leaderboard import leaderboard, read_rows, to_markdown, write

    try:
        rows = read_rows(args.results)
        board = leaderboard(rows, args.metrics.split(",") if args.metrics else None, args.tasks.split(",") if args.tasks else None)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise UserError(str(error)) from None
    paths = write(board, args.output)
    print(to_markdown(board))
    print(f"wrote {paths['md']}, {paths['csv']}, {paths['png']}")
    return 0
