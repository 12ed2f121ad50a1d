"""Where the lm-eval task configs live, and task managers that index them offline."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import optimer_merge
from optimer_merge.errors import ConfigError

# A source checkout has eval_tasks/ beside the package; a wheel carries it inside the package.
_CANDIDATES = (
    Path(optimer_merge.__file__).resolve().parents[1] / "eval_tasks",
    Path(optimer_merge.__file__).resolve().parent / "eval_tasks",
)


def tasks_dir() -> Path:
    """The eval_tasks/ folder to pass to ``lm_eval --include_path``."""
    for candidate in _CANDIDATES:
        if (candidate / "optimer").is_dir():
            return candidate
    raise FileNotFoundError("eval_tasks/ not found next to or inside the optimer_merge package")


@lru_cache(maxsize=2)
def task_manager(include_defaults: bool = False):
    """An lm-eval TaskManager over eval_tasks/ (and lm-eval's own tasks when ``include_defaults``).

    Without the defaults it is instant; with them lm-eval indexes its ~14k built-in configs (15-20 s).
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir()), include_defaults=include_defaults)


# Files in lm-eval's task tree that are not task configs (the configs are *.yaml, and the templates
# they include have any name, often none)
_NOT_CONFIGS = {".py", ".pyc", ".md", ".json", ".jsonl", ".txt", ".tsv", ".csv", ".sh", ".lark", ".jpg", ".png"}


@lru_cache(maxsize=1)
def _lm_eval_config_words() -> frozenset[str]:
    """Every word of lm-eval's built-in task configs and the templates they include (about 8 MB,
    read in about a second): each task, group and tag is named in one of them."""
    import re

    import lm_eval.tasks

    words = set()
    for path in Path(lm_eval.tasks.__file__).parent.rglob("*"):
        if path.suffix not in _NOT_CONFIGS and path.is_file():
            words.update(re.findall(r"[^\s,\[\]{}\"'#]+", path.read_text(errors="replace")))
    return frozenset(words | {w.rstrip(":") for w in words})


def resolve(tasks: list[str]):
    """A task manager that knows every task in ``tasks``; ConfigError naming the unknown ones.

    lm-eval's own tasks need its index of some 14k configs (15-20 s to build). A name that is not
    ours is looked up there only if some config names it, so a misspelt name is refused in about a
    second."""
    manager = task_manager(False)
    ours = set(manager.all_tasks)
    others = [t for t in tasks if t not in ours]
    unknown = [t for t in others if t.startswith("optimer_") or t not in _lm_eval_config_words()]
    if others and not unknown:
        manager = task_manager(True)
        known = set(manager.all_tasks)
        unknown = [t for t in others if t not in known]
    if unknown:
        raise ConfigError(
            f"unknown lm-eval task(s): {', '.join(unknown)}; ours are optimer_dev, optimer_test, "
            f"optimer_<ja|zh|math|code>_<dev|test>[_mc|_bpb|_gen|_humaneval_mc|_humaneval_exec] (see eval_tasks/README.md)"
        )
    return manager


def check_distinct(tasks: list[str]) -> None:
    """Refuse tasks that overlap (a group and one of its own tasks): lm-eval runs each task once and
    would stop with a traceback. Checked once, where the user's task list is read."""
    manager = resolve(tasks)
    runs = {t: _leaves(manager, t) for t in tasks}
    for i, first in enumerate(tasks):
        for second in tasks[i + 1 :]:
            if common := sorted(runs[first] & runs[second]):
                raise ConfigError(f"tasks {first} and {second} both run {common[0]}" + (f" (and {len(common) - 1} more)" if len(common) > 1 else "")
                                  + "; lm-eval runs each task once: leave one of them out")  # fmt: skip


def _leaves(manager, name: str, seen: frozenset = frozenset()) -> set[str]:
    """The tasks a task, group or tag runs."""
    entry = manager.task_index.get(name)
    kind = getattr(getattr(entry, "kind", None), "name", "")
    if kind == "GROUP" and isinstance(entry.cfg, dict) and name not in seen:
        members = entry.cfg.get("task") or []
        names = [m if isinstance(m, str) else str(m.get("task", m)) for m in (members if isinstance(members, list) else [members])]
    elif kind == "TAG" and name not in seen:
        names = [other for other, e in manager.task_index.items() if name in (getattr(e, "tags", None) or [])]
    else:
        return {name}
    return set().union(*(_leaves(manager, n, seen | {name}) for n in names)) if names else {name}


def _task_config(task: str) -> dict | None:
    """A single task's YAML config as lm-eval indexed it; None for groups, tags and Python tasks."""
    entry = resolve([task]).task_index.get(task)
    if entry is None or entry.cfg is None or getattr(entry.kind, "name", "") != "TASK":
        return None
    return entry.cfg


def task_metrics(task: str) -> dict[str, bool | None] | None:
    """A task's metrics and whether higher is better (None where lm-eval does not say).

    None when the task's metrics cannot be known before running it (groups, tags, Python tasks)."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY, HIGHER_IS_BETTER_REGISTRY

    cfg = _task_config(task)
    if cfg is None:
        return None
    listed = cfg.get("metric_list")
    if listed:
        if not all(isinstance(m, dict) and isinstance(m.get("metric"), str) for m in listed):
            return None
        return {m["metric"]: m.get("higher_is_better", HIGHER_IS_BETTER_REGISTRY.get(m["metric"])) for m in listed}
    defaults = DEFAULT_METRIC_REGISTRY.get(cfg.get("output_type") or "")
    return {m: HIGHER_IS_BETTER_REGISTRY.get(m) for m in defaults} if defaults else None


def task_filters(task: str) -> list[str] | None:
    """The names of a task's filters (lm-eval's ``none`` where it lists none); None where they
    cannot be known before running it (groups, tags, Python tasks)."""
    cfg = _task_config(task)
    if cfg is None:
        return None
    listed = cfg.get("filter_list")
    if not listed:
        return ["none"]
    names = [f.get("name") if isinstance(f, dict) else None for f in listed]
    return names if all(isinstance(n, str) for n in names) else None


def group_without_metrics(task: str) -> list[str] | None:
    """The member tasks of a group for which lm-eval reports no metric of its own (a group without
    ``aggregate_metric_list``: its results row is empty); None for a task or an aggregating group."""
    manager = resolve([task])
    entry = manager.task_index.get(task)
    if entry is None or getattr(entry.kind, "name", "") != "GROUP" or not isinstance(entry.cfg, dict):
        return None
    if entry.cfg.get("aggregate_metric_list"):
        return None
    members = entry.cfg.get("task") or []
    leaves = []
    for member in members if isinstance(members, list) else [members]:
        name = member if isinstance(member, str) else str(member.get("task", member))
        leaves += group_without_metrics(name) or [name]
    return leaves
