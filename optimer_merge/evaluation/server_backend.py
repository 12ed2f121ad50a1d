"""The ``server`` backend: an OpenAI-compatible completions endpoint through lm-eval's
``local-completions``: ``url`` of a running server, or a ``vllm serve`` started here on 127.0.0.1
with a random API key and always stopped (also on errors and Ctrl-C). It serves one fixed model."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import torch
from lm_eval.models.openai_completions import LocalCompletionsAPI

from optimer_merge.errors import ConfigError
from optimer_merge.evaluation.evaluator import LMEvalEvaluator, max_positions, scoped_environment

SERVED_NAME = "optimer-eval"


def server_root(url: str) -> str:
    """The root URL of an OpenAI-compatible server from what a user types, with or without the
    OpenAI clients' ``/v1`` suffix: ``http(s)://HOST[:PORT][/v1][/]``."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"server url {url!r}: expected http(s)://HOST:PORT of an OpenAI-compatible server (e.g. http://127.0.0.1:8000)")
    return url.rstrip("/").removesuffix("/v1")


class _KeyedCompletions(LocalCompletionsAPI):
    """lm-eval's local-completions with its API key given, not read from OPENAI_API_KEY."""

    def __init__(self, *args, api_key: str, **kwargs):
        self._optimer_key = api_key
        super().__init__(*args, **kwargs)

    @property
    def api_key(self) -> str:
        return self._optimer_key


class ServerEvaluator(LMEvalEvaluator):
    backend = "server"

    def __init__(
        self,
        model: str | Path,
        *,
        url: str | None = None,
        batch_size: int = 16,
        dtype: str | None = None,
        threads="auto",
        max_length: int | None = None,
        tensor_parallel_size: int = 1,
        server_args: tuple[str, ...] = (),
        server_timeout: float = 300.0,
        log=print,
    ):
        from optimer_merge.io.checkpoints import check_model_folder, check_tokenizer

        if url is None:
            check_model_folder(model, "model")
        super().__init__(model, dtype=dtype, threads=threads, log=log)
        self._server: subprocess.Popen | None = None
        self._server_log = None
        has_config = (self.model_path / "config.json").exists()
        if has_config:  # a local folder tokenizes the requests
            check_tokenizer(self.model_path, "model")
        key = os.environ.get("OPENAI_API_KEY") or ""
        name = SERVED_NAME
        if url is None:
            from optimer_merge.evaluation.vllm_backend import require_vllm

            require_vllm()
            key, url = self._start(max_length, tensor_parallel_size, server_args, server_timeout)
        else:
            url = server_root(url)
            try:
                name = _served_name(url, key)
            except OSError as error:
                hint = "; it wants an API key: set OPENAI_API_KEY" if getattr(error, "code", None) == 401 else ""
                raise ConfigError(f"cannot reach the server at {url}: {error}{hint}") from None
        self.url = url
        self.lm = _KeyedCompletions(
            api_key=key,
            base_url=url.rstrip("/") + "/v1/completions",
            model=name,
            tokenizer=str(self.model_path) if has_config else None,
            tokenizer_backend="huggingface",
            num_concurrent=4,
            max_retries=3,
            # Tokenize like lm-eval's hf and vllm models (BOS added, windows of the full length;
            # the API model keeps one position for its prefix token), so perplexities agree.
            add_bos_token=True,
            max_length=1 + (max_length or (max_positions(self.model_path) if has_config else 2048)),
        )

    def _start(self, max_length, tensor_parallel_size, server_args, timeout) -> tuple[str, str]:
        """Start ``vllm serve`` with a fresh API key; returns the key and the server's url."""
        key = secrets.token_hex(16)
        cpu = not torch.cuda.is_available()
        settings = [
            "--api-key", key, "--served-model-name", SERVED_NAME, "--dtype", self.dtype, "--seed", "0",
            "--max-model-len", str(max_length or max_positions(self.model_path)),
            "--tensor-parallel-size", str(tensor_parallel_size), *server_args,
            *(["--enforce-eager", "--kv-cache-memory-bytes", str(1 << 30)] if cpu else []),
        ]  # fmt: skip
        environment = {"TOKENIZERS_PARALLELISM": "false", **({"VLLM_CPU_OMP_THREADS_BIND": "nobind" if self.threads == 1 else "auto"} if cpu else {})}
        for attempt in range(1, 4):
            # The free port is only reserved until the server binds it: another process can take
            # it in between, and then the server starts again on another one.
            port = _free_port()
            cmd = [_vllm_executable(), "serve", str(self.model_path), "--host", "127.0.0.1", "--port", str(port), *settings]
            self.log(f"starting vllm serve on 127.0.0.1:{port}")
            # The server's log goes to a file: an unread pipe fills up and blocks the server.
            self._server_log = tempfile.NamedTemporaryFile("w+", prefix="vllm-serve-", suffix=".log", delete=False)
            with scoped_environment(environment):
                self._server = subprocess.Popen(cmd, stdout=self._server_log, stderr=subprocess.STDOUT, start_new_session=True)
            url = f"http://127.0.0.1:{port}"
            try:
                _wait_ready(url, key, self._server, timeout, Path(self._server_log.name))
                return key, url
            except _PortTaken:
                self.close()
                if attempt == 3:
                    raise
                Path(self._server_log.name).unlink(missing_ok=True)
                self.log(f"port {port} was taken before vllm serve could bind it; trying another")
            except BaseException:
                self.close()
                raise

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


class _PortTaken(RuntimeError):
    """The port picked for ``vllm serve`` was taken by another process before the server bound it."""


def _vllm_executable() -> str:
    candidate = Path(sys.executable).with_name("vllm")
    return str(candidate) if candidate.exists() else (shutil.which("vllm") or "vllm")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _served_name(url: str, key: str) -> str:
    request = urllib.request.Request(url.rstrip("/") + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)["data"][0]["id"]


def _wait_ready(url: str, key: str, server: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            output = log.read_text(errors="replace")
            refused = re.search(r"validation errors? for (\w+Config)\s+Value error, (.*?) \[type=", output)
            if refused:  # vLLM checked its settings against the model before starting: the user's error
                raise ConfigError(f"vllm serve refuses these settings for {refused.group(1)}: {refused.group(2)} (log: {log})")
            error = _PortTaken if "Address already in use" in output else RuntimeError
            raise error(f"vllm serve exited with code {server.returncode} (log: {log}):\n{output[-3000:]}")
        try:
            _served_name(url, key)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"vllm serve did not become ready within {timeout:.0f}s")
