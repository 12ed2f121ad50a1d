"""Where the lm-eval task configs live, and task managers that index them offline."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import optimer_merge

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

    Without the defaults it is instant; with them lm-eval indexes its ~10k built-in configs (seconds).
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir()), include_defaults=include_defaults)


def needs_defaults(tasks: list[str]) -> bool:
    """True if any task is not one of ours, so lm-eval's built-in index is needed."""
    ours = set(task_manager(False).all_tasks)
    return any(t not in ours for t in tasks)


def resolve(tasks: list[str]):
    """A task manager that knows every task in ``tasks``; ValueError naming the unknown ones."""
    manager = task_manager(needs_defaults(tasks))
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s): {', '.join(unknown)}; ours are optimer_dev, optimer_test, "
            f"optimer_<ja|zh|math|code>_<dev|test>[_mc|_bpb|_gen|_humaneval_mc|_humaneval_exec] (see eval_tasks/README.md)"
        )
    return manager
