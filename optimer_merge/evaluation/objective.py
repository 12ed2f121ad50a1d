"""Objective spec: lm-eval results -> one score to maximise, with a per-task breakdown.

YAML::

    tasks:
      - {task: optimer_ja_dev_mc, metric: acc_norm, weight: 1}
      - {task: optimer_ja_dev_bpb, metric: bits_per_byte, weight: 1}
    reference: runs/base-eval/results.json   # optional

Each metric's direction comes from lm-eval's ``higher_is_better`` in the results, so lower-is-better
metrics (bits_per_byte, perplexity) count negatively without any sign in the spec. With a
``reference`` (lm-eval results of e.g. the base model), each metric becomes its relative
improvement over the reference, (v - r) / |r| signed by direction, so metrics on different scales
weigh alike. The score is the weighted mean of the per-task terms.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator


class ObjectiveTerm(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    metric: str
    weight: float = Field(1.0, gt=0)
    filter: str | None = None  # lm-eval filter name, e.g. strict-match; found automatically if unique


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[ObjectiveTerm]
    reference: dict | str | None = None

    @field_validator("tasks")
    @classmethod
    def _not_empty(cls, value: list[ObjectiveTerm]) -> list[ObjectiveTerm]:
        if not value:
            raise ValueError("an objective needs at least one task")
        return value

    @classmethod
    def load(cls, path: str | Path) -> "Objective":
        path = Path(path)
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        reference = spec.get("reference") if isinstance(spec, dict) else None
        if isinstance(reference, str) and not Path(reference).is_absolute():
            spec["reference"] = str((path.parent / reference).resolve())
        return cls.model_validate(spec)

    def task_names(self) -> list[str]:
        return list(dict.fromkeys(t.task for t in self.tasks))

    def reference_results(self) -> dict | None:
        if isinstance(self.reference, str):
            return json.loads(Path(self.reference).read_text())
        return self.reference

    def score(self, results: dict) -> tuple[float, dict]:
        """(score, breakdown) from an lm-eval results dict (``simple_evaluate`` output or results JSON).

        Raises ValueError if a task or metric is missing; the score is NaN if any value is not finite.
        """
        reference = self.reference_results()
        breakdown, total, weights = {}, 0.0, 0.0
        for term in self.tasks:
            value, key = metric_value(results, term.task, term.metric, term.filter)
            higher = results.get("higher_is_better", {}).get(term.task, {}).get(term.metric, True)
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
            total += term.weight * contribution
            weights += term.weight
        score = total / weights
        return (score if math.isfinite(score) else float("nan")), breakdown


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
        return float(row[key]), key
    keys = [k for k in row if k.split(",")[0] == metric and not k.endswith("_stderr") and "_stderr," not in k]
    if len(keys) != 1:
        found = sorted(k for k in row if "," in k and "stderr" not in k)
        raise ValueError(
            f"{task}: metric {metric!r} {'is ambiguous' if keys else 'not found'}; "
            f"available: {', '.join(found)} (set filter: to pick one)"
        )
    return float(row[keys[0]]), keys[0]
