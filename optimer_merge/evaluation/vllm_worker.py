"""The search's vector pool inside vLLM's workers: each tensor-parallel rank keeps its own shard of
the base and the K rows in the engine's loaded layout, and a trial sends only K numbers.

``OptimerWorkerExtension`` is mixed into every worker by vLLM (``worker_extension_cls``) and is
reached with ``collective_rpc``. Building the pool streams each checkpoint through the model's
own ``load_weights`` (vLLM's loaders shard, fuse and pad every tensor for this rank) into fresh
tensors of the layout the model had when it was loaded, so the live weights are untouched and
only file paths cross a process boundary. A trial writes base + sum_i c_i d_i into the live
parameters in place; where the platform repacks weights after loading (vLLM's CPU GEMMs), the
touched layers are processed again, as vLLM does after a load. Only affine loading works this
way: quantized engines are refused before the pool is built.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import torch

from optimer_merge.search.pool import PoolEntry, ResidentPool


class OptimerWorkerExtension:
    """Methods vLLM adds to each worker; every name is prefixed to stay clear of the worker's own."""

    def optimer_build_pool(self, spec: dict) -> dict:
        """Build this rank's pool from ``PoolSpec.to_rpc()``; returns its size and placement."""
        start = time.perf_counter()
        self.optimer_release_pool()
        model = self.model_runner.get_model()
        self._optimer_pool = _build(model, self.device, spec)
        pool = self._optimer_pool
        from optimer_merge.vectors.checks import is_finite

        buffer = torch.empty(1 << 20, dtype=torch.float64, device=pool.entries[0].base.device) if pool.entries else None
        nonfinite = [e.name for e in pool.entries if not all(is_finite(t, buffer) for t in (e.base, *e.rows))]
        return {"rank": self.rank, "tensors": len(pool.entries), "bytes": pool.nbytes, "placement": pool.placement,
                "nonfinite": nonfinite, "seconds": time.perf_counter() - start}  # fmt: skip

    def optimer_set_weights(self, coeffs: list[float]) -> dict:
        """Write base + sum_i c_i d_i into this rank's live parameters; returns the seconds it took."""
        start = time.perf_counter()
        processed = _apply(self._optimer_pool, torch.tensor(coeffs, dtype=torch.float64), _repacks_after_loading())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        else:
            _give_back_free_heap()
        return {"rank": self.rank, "seconds": time.perf_counter() - start, "reprocessed": processed}

    def optimer_release_pool(self) -> None:
        self._optimer_pool = None

    def optimer_repack(self) -> int:
        """Process every layer again (after a weight push on a platform that packs weights)."""
        if not _repacks_after_loading():
            return 0
        model = self.model_runner.get_model()
        modules = [m for m in model.modules() if getattr(m, "quant_method", None) is not None and _has_weight(m)]
        for module in modules:
            module.quant_method.process_weights_after_loading(module)
        return len(modules)


def _give_back_free_heap() -> None:
    """Return the heap's free pages to the system (glibc). Streaming checkpoints through the loaders,
    and on CPUs repacking the weights every trial, frees many tensors of a few MB that glibc keeps
    in its heap: measured on a 0.4 B model with 4 vectors, 1.0 GiB (1.4 model copies) of a worker's
    memory that no tensor used."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once (None elsewhere): it runs after every trial on CPUs."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _has_weight(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.numel() > 0


def _repacks_after_loading() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# -- building ------------------------------------------------------------------------------------
def _float_tensors(path: str):
    """(name, tensor) of a safetensors model folder or vector file, one tensor at a time (mmapped)."""
    from safetensors import safe_open

    folder = Path(path)
    files = [folder] if folder.is_file() else sorted(folder.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), "pt") as reader:
            for name in reader.keys():
                tensor = reader.get_tensor(name)
                if tensor.is_floating_point():
                    yield name, tensor


def _live_parameters(model: torch.nn.Module):
    """(module, attribute, parameter) for every floating-point parameter; a tied one once per module."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.dtype.is_floating_point:
                yield module, name, param


def _capture(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, tensors) -> dict[int, torch.Tensor]:
    """Load checkpoint tensors through the model's own ``load_weights`` into zero tensors of the
    layout it was loaded in (recorded by vLLM at model creation), leaving the live parameters as
    they were; returns {id(live parameter): tensor}."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
    from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

    shadows: dict[int, torch.Tensor] = {}
    swapped = []
    for module, name, param in _live_parameters(model):
        if id(param) not in shadows:
            info = LAYERWISE_INFO.get(module)
            template = info.restore_metadata[0].get(name) if info is not None else None
            template = param if template is None else template
            shadow = torch.zeros(tuple(template.shape), dtype=dtype, device=device)
            shadow.__class__ = template.__class__  # the parameter class and its loader attributes
            shadow.__dict__ = template.__dict__.copy()
            shadows[id(param)] = restore_layer_refs(shadow, module)
        swapped.append((module, name, param))
        module._parameters[name] = shadows[id(param)]
    try:
        with torch.no_grad():
            model.load_weights(tensors)
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
    return {key: shadow.data.as_subclass(torch.Tensor) for key, shadow in shadows.items()}


def _build(model: torch.nn.Module, device: torch.device, spec: dict) -> ResidentPool:
    host = spec["placement"] == "host" and device.type == "cuda"
    store = torch.device("cpu") if host else device
    holders: dict[int, list] = defaultdict(list)
    for module, name, param in _live_parameters(model):
        holders[id(param)].append((module, name))
    base = _capture(model, store, getattr(torch, spec["base_dtype"]), _float_tensors(spec["base"]))
    rows: dict[int, list[torch.Tensor]] = defaultdict(list)
    changed: set[int] = set()
    for source in spec["sources"]:
        dtype = getattr(torch, source["dtype"])
        as_delta = source["kind"] == "model" and not source["relative"]  # a model stored as v_i in the pool dtype
        captured = _capture(model, store, torch.float32 if as_delta else dtype, _float_tensors(source["path"]))
        for key, tensor in captured.items():
            if source["kind"] == "model":
                if not torch.equal(tensor.to(base[key].dtype), base[key]):
                    changed.add(key)
                if as_delta:
                    tensor = tensor.sub_(base[key]).to(dtype)
            elif bool(tensor.any()):
                changed.add(key)
            rows[key].append(tensor)
        del captured
        _give_back_free_heap()  # the loaders' temporaries, before the next source adds its own
    entries = []
    for key in holders:  # model order
        if key in changed:
            pin = (lambda t: t.pin_memory()) if host else (lambda t: t)
            module, name = holders[key][0]
            entries.append(PoolEntry(f"{type(module).__name__}.{name}", pin(base[key]), [pin(r) for r in rows[key]],
                                     target=getattr(module, name), holders=holders[key]))  # fmt: skip
    relative = [s["relative"] for s in spec["sources"]]
    return ResidentPool([s["name"] for s in spec["sources"]], relative, entries, "host" if host else store.type)


# -- a trial -------------------------------------------------------------------------------------
def _apply(pool: ResidentPool, coeffs: torch.Tensor, repack: bool) -> int:
    """Merge into the live parameters; with ``repack``, process each touched module again as soon
    as its last tensor is written (entries come in model order), so that unpacked weights beside
    packed ones never take more than a module's worth of memory. Returns the modules processed."""
    from optimer_merge.merge.rule import coefficients

    coeffs = coefficients(coeffs)
    pending: dict[int, torch.nn.Module] = {}  # written to, not yet processed
    processed = 0

    def process(keep: Iterable[int] = ()) -> None:
        nonlocal processed
        for key in [k for k in pending if k not in keep]:
            module = pending.pop(key)
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)
            processed += 1

    with torch.no_grad():
        for entry in pool.entries:
            holders = {id(holder): holder for holder, _ in entry.holders}
            if repack:
                process(keep=holders)
            module, name = entry.holders[0]
            live = getattr(module, name)
            if live.shape == entry.base.shape:
                pool.merge(entry, coeffs, out=live.data)
            else:  # the platform replaced the loaded tensor by a packed form: load the merge, then process
                staged = torch.empty(entry.base.shape, dtype=live.dtype, device=live.device)
                pool.merge(entry, coeffs, out=staged)
                for holder, attribute in entry.holders:
                    setattr(holder, attribute, torch.nn.Parameter(staged, requires_grad=False))
            if repack:
                pending.update(holders)
        process()
    return processed
