"""Sharded CPT (FSDP2 through Lightning's ModelParallelStrategy): a model built on the meta device,
sharded by decoder (and vision encoder) layer, loaded once from memory-mapped safetensors by rank
0 and broadcast a layer at a time, saved as distributed checkpoints, exported tensor by tensor.

Why FSDP2 (``torch.distributed.fsdp.fully_shard`` on a DeviceMesh) for 27B: every parameter is a
DTensor sharded across all ranks, so no rank ever holds a whole layer's float32 weights, gradients
or optimizer state outside its forward/backward; creation on the meta device means no rank
materializes the model; distributed checkpoints save and load each rank's shard in parallel; and
it runs on CPU with gloo, so the whole path is tested without a GPU. Lightning's FSDPStrategy
(FSDP1) needs CUDA and flat parameters; DeepSpeed needs its own package and clips and saves its own
way (ZeRO-3 exports are gathered parameter by parameter by DeepSpeed, not here).
"""

from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Callable

import torch

def wrap_classes(model: torch.nn.Module) -> set[str]:
    """The layer classes each made one FSDP unit: transformers' own ``_no_split_modules`` (Gemma 3:
    its decoder layer, and the SigLIP encoder layer of the vision tower)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def parallelize(model: torch.nn.Module, mesh, *, device: torch.device, activation_checkpointing: bool, param_dtype: torch.dtype | None) -> torch.nn.Module:
    """Shard ``model`` (on the meta device) by layer over the data-parallel mesh, then materialize
    only this rank's shards on ``device`` and tie the embeddings again."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dp = mesh["data_parallel"]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    if activation_checkpointing:
        model.config.use_cache = False  # no KV cache in training (transformers warns otherwise)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    classes = wrap_classes(model)
    for module in list(model.modules()):
        if type(module).__name__ in classes and next(module.parameters(), None) is not None:
            fully_shard(module, mesh=dp, mp_policy=policy)
    fully_shard(model, mesh=dp, mp_policy=policy)
    model.to_empty(device=device)  # each rank allocates its shards only
    if getattr(model.config, "tie_word_embeddings", False) or getattr(getattr(model.config, "text_config", None), "tie_word_embeddings", False):
        model.tie_weights()  # materializing gave the tied modules separate tensors
    return model


def strategy(devices: int, num_nodes: int, *, activation_checkpointing: bool, param_dtype: torch.dtype | None, device_type: str):
    """Lightning's ModelParallelStrategy doing pure FSDP over every rank."""
    from lightning.fabric.strategies import ModelParallelStrategy

    fn = partial(_parallelize_on_rank, activation_checkpointing=activation_checkpointing, param_dtype=param_dtype, device_type=device_type)
    return ModelParallelStrategy(parallelize_fn=fn, data_parallel_size=devices * num_nodes, tensor_parallel_size=1)


def _parallelize_on_rank(model, mesh, *, activation_checkpointing, param_dtype, device_type):
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    return parallelize(model, mesh, device=device, activation_checkpointing=activation_checkpointing, param_dtype=param_dtype)


def build(fabric, base: Path, model_class, config, freeze: Callable[[torch.nn.Module], None]):
    """The model created on the meta device (computed buffers kept), sharded by ``fabric.setup``,
    then loaded a layer at a time: rank 0 reads one decoder layer's tensors (or the embeddings, or
    the rest) from the memory-mapped checkpoint and each tensor is broadcast into the ranks' shards
    (host memory of rank 0: the page cache and one layer). Returns the model and the base
    checkpoint's name of each live parameter (what the export writes them under)."""
    from accelerate import init_empty_weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from optimer_merge.io.checkpoints import Checkpoint
    from optimer_merge.io.hub_layout import live_names
    from optimer_merge.vectors.stats import layer_of

    with init_empty_weights():  # parameters on meta; buffers (rotary frequencies, scales) computed
        model = model_class.from_config(config, dtype=torch.float32)
    freeze(model)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    ckpt = Checkpoint.open(base)
    names = live_names(model, ckpt.names())  # before wrapping: transformers' renaming rules see the model's own class
    model = fabric.setup_module(model)
    for name, buffer in buffers.items():  # to_empty left them uninitialized
        owner, _, attribute = name.rpartition(".")
        model.module.get_submodule(owner)._buffers[attribute] = buffer.to(fabric.device)
    groups: dict[str, list[str]] = {}  # every rank reads the same header, so all make the same calls
    for key in ckpt.names():
        if key in names:
            groups.setdefault(layer_of(key), []).append(key)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    for keys in groups.values():
        state = {names[key]: ckpt.get(key) for key in keys} if fabric.global_rank == 0 else {}
        set_model_state_dict(model.module, state, options=options)
        del state
    return model, {live: key for key, live in names.items()}


def checkpoint_names(model: torch.nn.Module, base: Path) -> dict[str, str]:
    """The base checkpoint's name of each live parameter of ``model`` (unwrapped)."""
    from optimer_merge.io.checkpoints import Checkpoint
    from optimer_merge.io.hub_layout import live_names

    return {live: key for key, live in live_names(model, Checkpoint.open(base).names()).items()}


def export(fabric, hf_model: torch.nn.Module, tokenizer, target: Path, dtype: torch.dtype, meta: dict, shard_bytes: int, names: dict[str, str]) -> None:
    """The final Hugging Face folder, written tensor by tensor: each sharded tensor is gathered
    alone (every rank takes part), cast, and written by rank 0 into safetensors files of at most
    ``shard_bytes`` with ``model.safetensors.index.json`` (one file: ``model.safetensors``), under
    the base checkpoint's names (``names``: live name -> checkpoint name; others as
    ``save_pretrained`` names them); renamed into place when complete. Peak host memory: one gathered tensor and one file's worth of tensors."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor
    from transformers.core_model_loading import revert_weight_conversion

    from optimer_merge.io.hub_layout import to_hub_layout

    partial_dir = target.with_name(target.name + ".partial")
    primary = fabric.is_global_zero
    if primary:
        shutil.rmtree(partial_dir, ignore_errors=True)
        partial_dir.mkdir(parents=True)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    size, total, count = 0, 0, 0

    def flush() -> None:
        nonlocal shard, size, count
        if shard and primary:
            count += 1
            name = f"model-{count:05d}.safetensors"
            rest = {k: v for k, v in shard.items() if k not in names}
            shard = {names[k]: v for k, v in shard.items() if k in names}
            shard.update(revert_weight_conversion(hf_model, rest) if rest else {})
            save_file(shard, str(partial_dir / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
        shard, size = {}, 0

    config = hf_model.config
    tied = set(getattr(hf_model, "all_tied_weights_keys", {}) or {}) if (
        getattr(config, "tie_word_embeddings", False) or getattr(getattr(config, "text_config", None), "tie_word_embeddings", False)
    ) else set()  # fmt: skip
    for key, tensor in hf_model.state_dict().items():
        if key in tied:  # saved once, under its source's name, as save_pretrained does
            continue
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if primary:
            value = full.detach().to("cpu", dtype if full.is_floating_point() else full.dtype).contiguous()
            shard[key] = value
            size += value.numel() * value.element_size()
            total += value.numel() * value.element_size()
        del full
        if size >= shard_bytes:
            flush()
    flush()
    if primary:
        if count == 1:  # one file: model.safetensors, as save_pretrained writes it
            os.replace(partial_dir / "model-00001.safetensors", partial_dir / "model.safetensors")
        else:  # the hub's names, model-00001-of-00003.safetensors, and the index
            renamed = {}
            for i in range(1, count + 1):
                old, new = f"model-{i:05d}.safetensors", f"model-{i:05d}-of-{count:05d}.safetensors"
                os.replace(partial_dir / old, partial_dir / new)
                renamed[old] = new
            index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
            (partial_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf_model.config.dtype = dtype
        hf_model.config.save_pretrained(partial_dir)
        if getattr(hf_model, "generation_config", None) is not None:
            hf_model.generation_config.save_pretrained(partial_dir)
        tokenizer.save_pretrained(partial_dir)
        to_hub_layout(partial_dir)
        (partial_dir / "train_meta.json").write_text(json.dumps(meta, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial_dir, target)
    fabric.barrier()
