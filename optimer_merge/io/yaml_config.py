"""YAML files with errors that name the file and line, and typed configs validated on load."""

from __future__ import annotations

import functools
import json
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from optimer_merge.errors import ConfigError
from optimer_merge.io import plain_name_problem
from optimer_merge.io.files import check_input_file

T = TypeVar("T")

Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # the range numpy, torch and SMAC all accept


def _local_path(path: str) -> str:
    if not path.strip():  # "" would be the working folder
        raise ValueError("path is empty: give a file or folder")
    return os.path.expanduser(path)


LocalPath = Annotated[str, AfterValidator(_local_path)]  # a path in a config file: ~ is the home folder, as in a shell


def _plain_name(name: str) -> str:
    if problem := plain_name_problem(name):
        raise ValueError(problem)
    return name


PlainName = Annotated[str, AfterValidator(_plain_name)]  # a vector's or a dataset's name


class ConfigModel(BaseModel):
    """Base of every typed config: unknown keys, NaN/Inf, and a YAML boolean where a number belongs
    are refused (pydantic alone reads `trials: true` as 1 and `lr: yes` as 1.0)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        kinds = _kinds(cls.model_fields[info.field_name].annotation)
        if kinds & {int, float} and not kinds & {bool, Any, BaseModel} and _has_bool(value):
            raise ValueError(boolean_problem(value))
        return value


def boolean_problem(value: Any) -> str:
    """The message for a YAML boolean (or a list or mapping holding one) where a number belongs."""
    got = f"got {_yaml_value(value)}" if isinstance(value, bool) else f"got a boolean in {_yaml_value(value)}"
    return f"expected a number, {got} (YAML reads true/false/yes/no/on/off as booleans)"


def not_boolean(value: Any) -> Any:
    """A pydantic before-validator for numbers: pydantic alone reads true as 1."""
    if isinstance(value, bool):
        raise ValueError(boolean_problem(value))
    return value


def _kinds(annotation: Any) -> set:
    """The plain types an annotation can hold (through unions, Annotated, containers); every model
    class counts as BaseModel (it checks its own fields)."""
    if annotation is Any:
        return {Any}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {BaseModel}
    args = typing.get_args(annotation)
    if args:
        return set().union(*(_kinds(a) for a in args))
    return {annotation} if isinstance(annotation, type) else set()


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_bool(v) for v in value)
    return isinstance(value, dict) and any(_has_bool(v) for v in value.values())


def _yaml_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (bool, list, tuple, dict)) else repr(value)


def load_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """Parse a YAML file; a missing file, a folder, bad UTF-8 or bad YAML is one clear error."""
    return parse_yaml(read_text(path, what), path)


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file's content, read once (so a pipe, e.g. ``<(envsubst < recipe.yml)``, works)."""
    path = check_input_file(path, what)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None


def parse_yaml(text: str, path: str | Path) -> Any:
    """Parse YAML read from ``path``; an error names the file, line and column."""
    import yaml

    try:
        return yaml.load(text, Loader=_unique_keys_loader())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None


@functools.cache
def _unique_keys_loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one
    silently: `trials: 10` followed by `trials: 100` would run 100). Built once, on first use."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML refuses it itself
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice in one mapping (first on line {first + 1})", key_node.start_mark
                    )
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


_SCHEMA_TAG = re.compile(r"^(constrained-\w+|(function-\w+|literal|lax-or-strict|json-or-python|nullable|tagged-union)\[.*\])$")


def validation_message(error, what: str, flags: dict[str, str] | None = None) -> str:
    """A pydantic ValidationError as one line: each problem names its field and the value given
    (a missing field: the command-line flag in ``flags`` that gives it)."""
    items = error.errors()
    # A value that fits one member of a union (`objective`: a file name or a spec) gets an error from
    # each member; the members whose type it does not even have say nothing useful.
    unions = [_union_field(item["loc"]) for item in items]
    fitting = {u for u, item in zip(unions, items) if u is not None and not item["type"].endswith("_type")}
    items = [item for u, item in zip(unions, items) if u not in fitting or not item["type"].endswith("_type")]
    problems: dict[str, list[str]] = {}  # where -> messages (a union's members: alternatives)
    got: dict[str, str] = {}
    for item in items:
        # union members appear in the location by type or class name (`objective.Objective.tasks.0`)
        where = ".".join(str(p) for p in item["loc"] if not (isinstance(p, str) and _is_union_tag(p)))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing" and where in (flags or {}):
            message = f"required: give {flags[where]} (or `{where}:` in --config)"
        problems.setdefault(where, []).append(message)
        value = item.get("input")
        if item["type"] != "missing" and "got " not in item["msg"] and not (isinstance(value, dict) and len(repr(value)) > 80):
            got[where] = " (got an empty value)" if value is None else f" (got {value!r})"  # a whole group of settings: too long to repeat
    lines = [(f"{where}: " if where else "") + ", or ".join(messages) + got.get(where, "") for where, messages in problems.items()]
    return f"invalid {what}: " + "; ".join(lines)


def _union_field(loc: tuple) -> tuple | None:
    """The location of the union an error's location passes through (None: it passes none)."""
    for i, part in enumerate(loc):
        if isinstance(part, str) and _is_union_tag(part):
            return loc[:i]
    return None


def _is_union_tag(part: str) -> bool:
    """``Objective``, ``str``, ``constrained-int``, ``literal['auto']``: a union member, not a field."""
    return part[:1].isupper() or part in ("str", "int", "float", "bool", "list", "dict", "tuple", "none") or bool(_SCHEMA_TAG.match(part))


def load_yaml_config(cls: type[T], path: str | Path | None, overrides: dict[str, Any] | None, what: str, flags: dict[str, str] | None = None) -> T:
    """Read a YAML config (optional), apply ``overrides`` (dotted keys allowed), validate as ``cls``.

    Paths inside stay relative to the working directory, as in mergekit recipes.
    """
    from pydantic import ValidationError

    raw: dict[str, Any] = {}
    if path is not None:
        loaded = load_yaml(path, what)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(loaded).__name__}")
        raw = loaded
    for key, value in (overrides or {}).items():
        target = raw
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                if isinstance(target, list):
                    raise ConfigError(f"cannot set {key}: {parent} is a list, not a group of settings; set it whole, e.g. --set '{parent}=[...]'")
                raise ConfigError(f"cannot set {key}: {parent} is not a group of settings")
        target[leaf] = value
    try:
        return cls.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(validation_message(error, what, flags)) from None
