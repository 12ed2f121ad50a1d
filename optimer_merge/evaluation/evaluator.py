"""One model loaded once and scored with lm-eval; one class per backend behind one small protocol.

The protocol (what the search and the CLI use, never branching on the backend)::

    evaluator = open_evaluator(backend, model, dtype=..., ...)
    evaluator.evaluate(tasks, limit)         # lm-eval's results dict
    evaluator.build_pool(spec)               # the vector pool, once, where the weights live
    evaluator.set_weights({"ja": 0.4, ...})  # a trial: base + sum_i w_i v_i into the live weights
    evaluator.load_state_dict(tensors)       # the explicit fallback: push whole merged tensors
    evaluator.close()

Backends (like lm-eval's ``LM`` subclasses, one each): ``hf`` (``HFEvaluator``: the model in this
process through lm-eval's HFLM), ``vllm`` (``VLLMEvaluator``: a vLLM engine whose workers hold
the pool), ``server`` (``ServerEvaluator``: an OpenAI-compatible completions endpoint; it serves
one fixed model and takes no weights). None of them changes process-wide state behind the
caller's back: environment variables an engine needs are set only while it starts, lm-eval's
hooks only while it evaluates.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
from pathlib import Path
from typing import Literal, Mapping

import torch

from optimer_merge.errors import ConfigError
from optimer_merge.evaluation import DEFAULT_BATCH_SIZE, check_settings
from optimer_merge.io import FLOAT_DTYPES
from optimer_merge.threads import default_threads

Backend = Literal["hf", "vllm", "server"]
# lm-eval warnings that do not apply to how this project calls it (a loaded model passed to HFLM,
# task metadata we never set).
HARMLESS_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "Custom kwargs can be passed to `--metadata`",
    "For example --metadata=",
)
# What lm-eval's add_env_info puts in a results dict (versions, torch's collect_env), once per process.
_ENV_INFO: dict = {}


def open_evaluator(backend: Backend, model: str | Path, **settings) -> "LMEvalEvaluator":
    """The evaluator of ``backend`` for ``model`` (see each class for its settings)."""
    check_settings(backend, settings.get("dtype"), settings.get("batch_size"), settings.get("threads", "auto"), settings.get("tensor_parallel_size", 1))
    if settings.get("batch_size") is None:
        settings["batch_size"] = DEFAULT_BATCH_SIZE[backend]
    if backend == "hf":
        from optimer_merge.evaluation.hf_backend import HFEvaluator

        settings.pop("tensor_parallel_size", None)
        return HFEvaluator(model, **settings)
    if backend == "vllm":
        from optimer_merge.evaluation.vllm_backend import VLLMEvaluator

        return VLLMEvaluator(model, **settings)
    from optimer_merge.evaluation.server_backend import ServerEvaluator

    return ServerEvaluator(model, **settings)


class LMEvalEvaluator:
    """What every backend shares: lm-eval scoring of ``self.lm``, thread and dtype defaults.

    Subclasses load the model into ``self.lm`` (an lm-eval ``LM``) and implement the weight
    methods they support."""

    backend: str = ""

    def __init__(self, model: str | Path, *, dtype: str | None, threads, log=print):
        self.model_path, self.log = Path(model), log
        self.dtype = dtype or self._saved_dtype()
        if threads == "auto":  # parameter count estimated from the checkpoint's size (2-4 bytes each)
            size = sum(f.stat().st_size for f in self.model_path.glob("*.safetensors"))
            threads = default_threads(size // 3)
        self.threads = int(threads)
        self.lm = None

    def _saved_dtype(self) -> str:
        from optimer_merge.io.checkpoints import saved_dtype

        if not (self.model_path / "config.json").exists():
            return "float32"
        name = saved_dtype(self.model_path)
        return name if name in FLOAT_DTYPES else "float32"

    # -- scoring ------------------------------------------------------------------------------
    def evaluate(
        self, tasks: list[str], limit: int | None = None, *, confirm_run_unsafe_code: bool = False, log_samples: bool = False, quiet: bool = False
    ) -> dict:
        """lm-eval ``simple_evaluate`` on the loaded model: the results dict lm-eval itself writes.

        ``quiet`` drops lm-eval's per-request progress bars (they take ``disable`` from lm-eval,
        not from TQDM_DISABLE), for callers that report progress themselves."""
        import lm_eval

        from optimer_merge.evaluation.tasks import resolve
        from optimer_merge.io.quiet import drop_messages

        manager = resolve(list(tasks))
        harmless = drop_messages(("lm_eval.models.huggingface", "lm_eval.api.task"), HARMLESS_WARNINGS)
        with _quiet_lm_eval() if quiet else contextlib.nullcontext(), harmless, self._environment_once():
            return lm_eval.simple_evaluate(
                model=self.lm,
                tasks=list(tasks),
                limit=limit,
                task_manager=manager,
                log_samples=log_samples,
                bootstrap_iters=0,
                verbosity="ERROR",
                confirm_run_unsafe_code=confirm_run_unsafe_code,
                random_seed=0,
                numpy_random_seed=0,
                torch_random_seed=0,
                fewshot_random_seed=0,
            )

    @contextlib.contextmanager
    def _environment_once(self):
        """lm-eval describes the environment in every results dict: a git lookup (which prints
        "not a git repository" outside one) and torch's collect_env, which runs `pip list` (about a
        second, as long as a tiny model's whole trial). Both are computed on this process's first
        evaluation and reused for the rest (a demo worker runs many evaluators), only while
        ``simple_evaluate`` runs."""
        import lm_eval.evaluator

        original_env, original_git = lm_eval.evaluator.add_env_info, lm_eval.evaluator.get_git_commit_hash

        def add_env_info(results: dict) -> None:
            if not _ENV_INFO:
                before = set(results)
                original_env(results)
                _ENV_INFO.update({k: results[k] for k in set(results) - before})
            results.update(_ENV_INFO)

        lm_eval.evaluator.add_env_info, lm_eval.evaluator.get_git_commit_hash = add_env_info, _git_commit_hash
        try:
            yield
        finally:
            lm_eval.evaluator.add_env_info, lm_eval.evaluator.get_git_commit_hash = original_env, original_git

    # -- weights ------------------------------------------------------------------------------
    def build_pool(self, spec) -> dict:
        """Hold the base and the vectors of ``spec`` where the weights live (once per search)."""
        raise ConfigError(f"the {self.backend} backend serves a fixed model; search with the hf or vllm backend")

    def set_weights(self, weights: Mapping[str, float]) -> dict:
        """A trial: base + sum_i w_i v_i into the live weights, from the pool."""
        raise ConfigError(f"the {self.backend} backend serves a fixed model; search with the hf or vllm backend")

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """The fallback: replace weights with whole tensors (checkpoint names)."""
        raise ConfigError(f"the {self.backend} backend serves a fixed model; restart it, or use the hf or vllm backend")

    def close(self) -> None:
        """Release the model (and any process or engine this evaluator started)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


@contextlib.contextmanager
def scoped_environment(values: Mapping[str, str]):
    """Set environment variables for the duration (a starting engine's children inherit them)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        restore_environment(saved)


def restore_environment(saved: Mapping[str, str | None]) -> None:
    """Put environment variables back to saved values (None: unset)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def _quiet_lm_eval():
    """No progress bars (stderr) and no per-task warnings from lm-eval for the duration."""
    from optimer_merge.io.quiet import redirect_fds

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        with redirect_fds(devnull, (2,)):
            yield
    finally:
        os.close(devnull)
        logger.setLevel(level)


@functools.lru_cache(maxsize=1)
def _git_commit_hash() -> str | None:
    """lm-eval's own lookup, once per process, without git's "not a git repository" on stderr."""
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True, timeout=30)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def max_positions(model_path: Path) -> int:
    import json

    config = json.loads((model_path / "config.json").read_text())
    config = config.get("text_config", config)
    return min(int(config.get("max_position_embeddings", 2048)), 4096)
