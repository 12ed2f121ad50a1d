"""Objective spec: lm-eval results -> one score to maximise, with a per-task breakdown.

YAML::

    tasks:
      - {task: optimer_ja_dev_mc, metric: acc_norm, weight: 1}
      - {task: optimer_ja_dev_bpb, metric: bits_per_byte, weight: 1}
      - {task: my_task, metric: my_loss, direction: minimize}   # where lm-eval gives no direction
    reference: runs/base-eval/results.json   # optional

Each metric's direction comes from lm-eval's ``higher_is_better`` (in the task config and the
results), so lower-is-better metrics (bits_per_byte, perplexity) count negatively without any sign
in the spec; a metric lm-eval gives no direction needs ``direction:``. With a ``reference`` (lm-eval
results of e.g. the base model), each metric becomes its relative improvement over the reference,
(v - r) / |r| signed by direction, so metrics on different scales weigh alike. The score is the
weighted mean of the per-task terms.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from optimer_merge.errors import ConfigError
from optimer_merge.io.yaml_config import ConfigModel


class ObjectiveTerm(ConfigModel):
    task: str
    metric: str
    weight: float = Field(1.0, gt=0, allow_inf_nan=False)
    filter: str | None = None  # lm-eval filter name, e.g. strict-match; found automatically if unique
    direction: Literal["maximize", "minimize"] | None = None  # only where lm-eval gives none


class Objective(ConfigModel):
    tasks: list[ObjectiveTerm]
    reference: dict | str | None = None

    @field_validator("tasks")
    @classmethod
    def _not_empty(cls, value: list[ObjectiveTerm]) -> list[ObjectiveTerm]:
        if not value:
            raise ValueError("an objective needs at least one task")
        terms = [(t.task, t.metric, t.filter) for t in value]
        for term in terms:
            if terms.count(term) > 1:
                raise ValueError(f"{term[0]}/{term[1]} is listed twice; list it once (its weight: counts it more)")
        return value

    @classmethod
    def load(cls, path: str | Path) -> "Objective":
        """Read and validate a spec; a relative ``reference`` resolves against the spec's folder."""
        from optimer_merge.io.files import check_input_file
        from optimer_merge.io.yaml_config import load_yaml, validation_message

        path = Path(path)
        spec = load_yaml(path, "objective")
        if not isinstance(spec, dict):
            got = "an empty file" if spec is None else type(spec).__name__
            raise ConfigError(f"{path}: expected an objective (a mapping with tasks:, see recipes/objectives/) at the top level, got {got}")
        reference = spec.get("reference")
        if isinstance(reference, str):
            reference = spec["reference"] = os.path.expanduser(reference)
            if not Path(reference).is_absolute():
                spec["reference"] = str((path.parent / reference).resolve())
            check_input_file(spec["reference"], f"objective {path}: reference")
        try:
            return cls.model_validate(spec)
        except ValidationError as error:
            raise ConfigError(f"{path}: " + validation_message(error, "objective")) from None

    def task_names(self) -> list[str]:
        return list(dict.fromkeys(t.task for t in self.tasks))

    def reference_results(self) -> dict | None:
        if isinstance(self.reference, str):
            try:
                return json.loads(Path(self.reference).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ConfigError(f"objective: reference {self.reference} is not a JSON file ({error})") from None
        return self.reference

    def resolved(self) -> "Objective":
        """This objective with its reference results read now and held inline: every later score
        uses these results, whatever happens to the file meanwhile."""
        if isinstance(self.reference, str):
            return self.model_copy(update={"reference": self.reference_results()})
        return self

    def check(self) -> None:
        """Before any evaluation: each metric exists in its task and has a direction, and the
        reference (if any) has a value for each term."""
        from optimer_merge.evaluation.tasks import check_distinct, group_without_metrics, task_filters, task_metrics

        check_distinct(self.task_names())
        reference = self.reference_results()
        for term in self.tasks if reference is not None else ():
            where = f"reference {self.reference}" if isinstance(self.reference, str) else "the inline reference"
            if not isinstance(reference, dict) or not isinstance(reference.get("results"), dict):
                raise ConfigError(f"objective: {where} is not lm-eval results (no 'results' table)")
            try:
                value, _ = metric_value(reference, term.task, term.metric, term.filter)
            except ValueError as error:
                raise ConfigError(f"objective: {where}: {error}; evaluate the reference on every task of the objective") from None
            if not math.isfinite(value):  # every score would be NaN, every trial a failure
                raise ConfigError(f"objective: {where}: {term.task}/{term.metric} is {value}; re-evaluate the reference")
        for term in self.tasks:
            members = group_without_metrics(term.task)
            if members is not None:
                raise ConfigError(f"objective: {term.task} is a group that lm-eval reports no metrics for (no aggregate_metric_list); "
                                  f"score its tasks instead: {', '.join(members[:4])}{' ...' if len(members) > 4 else ''}")  # fmt: skip
            metrics = task_metrics(term.task)
            if metrics is None:
                continue  # a group or Python task: checked on its first results
            if term.metric not in metrics:
                raise ConfigError(f"objective: task {term.task} has no metric {term.metric!r}; it has {', '.join(metrics)}")
            filters = task_filters(term.task)
            if term.filter is not None and filters is not None and term.filter not in filters:
                raise ConfigError(f"objective: task {term.task} has no filter {term.filter!r}; its filters are {', '.join(filters)}")
            if (problem := _contradiction(term, metrics[term.metric])) is not None:
                raise ConfigError(f"objective: {problem}")
            if metrics[term.metric] is None and term.direction is None:
                raise ConfigError(
                    f"objective: lm-eval does not say whether higher is better for {term.task}/{term.metric}; "
                    "add `direction: maximize` or `direction: minimize` to that term"
                )

    def score(self, results: dict) -> tuple[float, dict]:
        """(score, breakdown) from an lm-eval results dict (``simple_evaluate`` output or results JSON).

        Raises ValueError if a task, metric or direction is missing; the score is NaN if any value is
        not finite.
        """
        reference = self.reference_results()
        breakdown, total, weights = {}, 0.0, 0.0
        largest = max(term.weight for term in self.tasks)  # weights relative to it: their sum cannot overflow
        for term in self.tasks:
            value, key = metric_value(results, term.task, term.metric, term.filter)
            higher = results.get("higher_is_better", {}).get(term.task, {}).get(term.metric)
            if (problem := _contradiction(term, higher)) is not None:
                raise ValueError(problem)
            if term.direction is not None:
                higher = term.direction == "maximize"
            if higher is None:
                raise ValueError(
                    f"{term.task}/{term.metric}: the results do not say whether higher is better; "
                    "add `direction: maximize` or `direction: minimize` to that objective term"
                )
            sign = 1.0 if higher else -1.0
            entry = {"metric": key, "value": value, "higher_is_better": higher, "weight": term.weight}
            if reference is not None:
                ref, _ = metric_value(reference, term.task, term.metric, term.filter)
                entry["reference"] = ref
                contribution = sign * (value - ref) / (abs(ref) or 1.0)
            else:
                contribution = sign * value
            entry["term"] = contribution
            breakdown[f"{term.task}/{term.metric}"] = entry
            total += term.weight / largest * contribution
            weights += term.weight / largest
        score = total / weights
        return (score if math.isfinite(score) else float("nan")), breakdown


def _contradiction(term: ObjectiveTerm, higher_is_better: bool | None) -> str | None:
    """What is wrong with a term whose ``direction`` contradicts the one lm-eval gives (None: nothing)."""
    if term.direction is None or higher_is_better is None or (term.direction == "maximize") == higher_is_better:
        return None
    return (f"{term.task}/{term.metric}: direction: {term.direction} contradicts lm-eval, for which "
            f"{'higher' if higher_is_better else 'lower'} is better; drop direction: (it is for metrics lm-eval gives no direction)")  # fmt: skip


def metric_value(results: dict, task: str, metric: str, filter_name: str | None = None) -> tuple[float, str]:
    """The value of ``metric`` for ``task`` in lm-eval results, and the key it was found under."""
    table = results.get("results", {})
    if task not in table:
        raise ValueError(f"task {task!r} is not in the results (have: {', '.join(sorted(table)) or 'none'})")
    row = table[task]
    if filter_name is not None:
        key = f"{metric},{filter_name}"
        if key not in row:
            raise ValueError(f"{task}: no {key!r} in the results")
        return _number(row[key], task, key), key
    keys = [k for k in row if k.split(",")[0] == metric and not k.endswith("_stderr") and "_stderr," not in k]
    if len(keys) != 1:
        found = sorted(k for k in row if "," in k and "stderr" not in k)
        raise ValueError(
            f"{task}: metric {metric!r} {'is ambiguous' if keys else 'not found'}; "
            f"available: {', '.join(found)} (set filter: to pick one)"
        )
    return _number(row[keys[0]], task, keys[0]), keys[0]


def _number(value, task: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{task}: {key} is {value!r:.40}, not a number")
    try:
        return float(value)
    except ValueError:  # lm-eval writes "N/A" where it has no value
        raise ValueError(f"{task}: {key} is {value!r:.40}, not a number") from None
