"""CLI subcommands: each module has a docstring, `add_arguments(parser)` and `run(args)`.

Shared here: argument types that refuse bad values while parsing, and NAME=VALUE pairs."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def auto_or_positive_int(text: str) -> int | str:
    """An argparse type: 'auto' or an integer >= 1 (threads of workers that may run elsewhere, a batch size)."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(str(error).replace("expected a", "expected 'auto' or a")) from None


def local_threads(text: str) -> int | str:
    """An argparse type: ``threads`` of this process, so at most the machine's CPUs."""
    return _on_this_machine(auto_or_positive_int(text))


def cpu_threads(text: str) -> int:
    """An argparse type: an integer from 1 to the machine's CPUs."""
    return _on_this_machine(positive_int(text))


def _on_this_machine(value):
    from optimer_merge.threads import too_many_threads

    if problem := too_many_threads(value):
        raise argparse.ArgumentTypeError(problem)
    return value


def path(text: str) -> str:
    """An argparse type: a file or folder path, not empty (which would mean the working folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a file or folder path, got {text!r}")
    return text


def folder(text: str) -> Path:
    """An argparse type: ``path`` as a Path."""
    return Path(path(text))


def pairs(items: list[str], flag: str) -> dict[str, str]:
    """``NAME=VALUE`` items as a dict; a missing ``=``, an empty side or a repeated NAME is an error."""
    from optimer_merge.errors import ConfigError

    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{flag} expects NAME=PATH, got {item!r}")
        if name in out:
            raise ConfigError(f"{flag}: name {name!r} is given twice; each name must be unique")
        out[name] = value
    return out


def set_overrides(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items as config overrides, each value parsed as YAML."""
    import yaml

    from optimer_merge.errors import ConfigError

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {key}: the value {value!r} is not valid YAML ({getattr(error, 'problem', error)})") from None
    return overrides


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with a pointer to --help), like every other error."""

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        match = re.match(r"argument (--[\w-]+): expected one argument", message)
        argv = getattr(self, "_argv", [])
        if match and match.group(1) in argv[:-1]:
            value = argv[argv.index(match.group(1)) + 1]
            if re.fullmatch(r"-[\d.]+(e[-+]?\d+)?", value, re.IGNORECASE):  # argparse takes -1e-3 for an option
                message += f"; write a negative value as {match.group(1)}={value}"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
