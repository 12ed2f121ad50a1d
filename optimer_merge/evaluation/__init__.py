"""Scoring models with lm-evaluation-harness: the project's tasks, one evaluator, objectives.

``tasks`` locates eval_tasks/, builds lm-eval task managers offline and lists a task's metrics;
``evaluator`` loads a model once on the hf, vllm or server backend, scores tasks and swaps its
weights in place; ``objective`` turns lm-eval results into the one number a search maximises.
"""

from optimer_merge.errors import ConfigError
from optimer_merge.io import FLOAT_DTYPES

BACKENDS = ("hf", "vllm", "server")
# vllm: every request to the engine at once (it batches them itself); "auto" on hf would make lm-eval
# probe batches at the model's full context length
DEFAULT_BATCH_SIZE = {"hf": 16, "vllm": "auto", "server": 16}


def check_settings(backend: str, dtype: str | None, batch_size: int | str | None, threads, tensor_parallel_size: int, limit: int | None = None) -> None:
    """Refuse evaluation settings that cannot work, before any model is loaded (``batch_size``
    None: the backend's default)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose from {', '.join(FLOAT_DTYPES)}")
    if batch_size == "auto" and backend != "vllm":
        raise ConfigError(f"batch size 'auto' is for the vllm backend (its engine batches every request itself); give {backend} a number (default {DEFAULT_BATCH_SIZE[backend]})")
    if batch_size not in (None, "auto") and (type(batch_size) is not int or batch_size < 1):
        raise ConfigError(f"batch size must be a whole number >= 1 or 'auto', got {batch_size!r}")
    if threads != "auto" and (not str(threads).isdigit() or int(threads) < 1):
        raise ConfigError(f"threads must be a positive number or 'auto', got {threads!r}")
    if tensor_parallel_size < 1:
        raise ConfigError(f"tensor parallel size must be at least 1, got {tensor_parallel_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1 item per task, got {limit}")
