"""`optimer-merge` command line: one subcommand per job; each parses, loads its config and calls."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from typing import Sequence

from optimer_merge import __version__
from optimer_merge.commands import OneLineParser
from optimer_merge.errors import OnEveryRank, Stopped, UserError, disk_full
from optimer_merge.io.run_folder import is_primary_process
from optimer_merge.signals import deliver_again, in_import, on_sigterm

# name -> module with `add_arguments(parser)`, `run(args) -> int` and a one-line docstring.
# Modules are imported lazily so `--help` stays fast.
COMMANDS = {
    "merge": "optimer_merge.commands.merge",
    "data": "optimer_merge.commands.data",
    "train": "optimer_merge.commands.train",
    "eval": "optimer_merge.commands.eval",
    "vectors": "optimer_merge.commands.vectors",
    "search": "optimer_merge.commands.search",
    "leaderboard": "optimer_merge.commands.leaderboard",
    "demo": "optimer_merge.commands.demo",
}
RESUMABLE = ("train", "search", "demo")
RESUMES = "; the same command resumes where this run stopped"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="optimer-merge",
        description=(
            "OptiMer: train one continual-pre-training model per dataset, then search the "
            "weights of their merge instead of the data-mixture ratio."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.commands = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or "").strip().splitlines()[0]
        command = parser.commands[name] = sub.add_parser(name, help=summary, description=summary)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's own parser (`vectors extract`'s for its flags), with its --help
        command = parser.commands[args.command]
        command = getattr(command, "commands", {}).get(getattr(args, "action", None), command)
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    previous = on_sigterm(_terminated)
    try:
        return _run(args)
    finally:
        on_sigterm(previous)


def _terminated(signum: int, frame) -> None:
    """SIGTERM unwinds like Ctrl-C: files being written are removed, workers stopped, a resumable
    run says so (training saves a checkpoint first: it handles the signal itself). Inside an import
    it waits for the import to finish: an exception raised there can be swallowed by the extension
    importing (torch's C code drops a failed numpy import, and the run would go on) or leave a
    module half-initialised that a later import trips over."""
    if in_import(frame):
        deliver_again(signum)
        return
    raise Stopped(f"stopped by {signal.Signals(signum).name}", signum)


def _run(args: argparse.Namespace) -> int:
    resumes = RESUMES if args.command in RESUMABLE else ""
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # a reader gone early (`| head`) shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # a socket's, not ours: a crash like any other
        return 141  # 128 + SIGPIPE, as a Unix tool whose reader went away
    except KeyboardInterrupt as stop:
        stopped = isinstance(stop, Stopped)
        if is_primary_process():  # the other ranks of a distributed run stop with it, silently
            print(f"{stop if stopped else 'interrupted'}{resumes}", file=sys.stderr)
        return 128 + stop.signum if stopped else 130
    except UserError as error:  # only these (and a full disk): any other exception keeps its traceback (exit 1)
        if isinstance(error, OnEveryRank) and not is_primary_process():
            return 2  # the primary process says it
        return _error(args, str(error))
    except OSError as error:
        if not disk_full(error):
            raise
        where = f" writing {error.filename}" if error.filename else ""
        return _error(args, f"the disk is full{where}: free some space or choose an output folder on another disk{resumes}")


def _error(args: argparse.Namespace, message: str) -> int:
    command = " ".join(filter(None, (args.command, getattr(args, "action", None))))  # `vectors extract`, `data build`
    print(f"optimer-merge {command}: error: {message}", file=sys.stderr)
    return 2


def _stdout_closed() -> bool:
    """True if stdout is a pipe whose reader has gone (poll reports an error on the write end);
    stdout then points at /dev/null, so output still buffered is dropped at exit, not raised."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        closed = any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # stdout replaced by an object without a file descriptor
        return False
    if closed:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return closed


if __name__ == "__main__":
    sys.exit(main())
