"""The CPT loop, written directly on Lightning Fabric: one code path from a 2-core CPU to multi-node FSDP.

Run folder layout (``config.output``)::

    run_config.json      the resolved config; a rerun with a different one is refused
    tokens/              tokenized datasets (memory-mapped, reused on resume)
    checkpoints/         step-XXXXXXXX.ckpt (model, optimizer, data cursors, Velocitune state)
    metrics.csv          step, tokens, lr, train loss, held-out loss per dataset, mixture weights
    velocitune.json      targets and weight trajectory (Velocitune runs)
    model/               the final Hugging Face model (written to model.partial/, then renamed)
    train_meta.json      tokens per dataset, steps, wall/CPU seconds, FLOPs estimate, versions
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from optimer_merge.cpt import datasets as ds
from optimer_merge.cpt import velocitune as vt
from optimer_merge.cpt.config import TrainConfig
from optimer_merge.errors import ConfigError, OnEveryRank, RunFolderError, Stopped, UserError
from optimer_merge.io.checkpoints import check_model_folder, fingerprint, saved_dtype
from optimer_merge.io.files import atomic_write_text, check_free_space, check_output_dir, write_json
from optimer_merge.io.progress import duration, human_bytes
from optimer_merge.io.quiet import drop_messages
from optimer_merge.io.run_folder import RunFolder, is_primary_process
from optimer_merge.signals import on_sigterm
from optimer_merge.threads import default_threads

# Fields that may change between a run and its resumption without changing the result.
RESUMABLE_FIELDS = {"progress", "threads", "checkpoint_every", "keep_checkpoints", "export_shard_bytes", "token_cache"}
CHECKPOINTS_DIR, MODEL_DIR, RUN_RECORD = "checkpoints", "model", "run_config.json"


def _decay_start(total_steps: int, decay_fraction: float) -> int:
    """The first step of a warmup-stable-decay schedule's decay."""
    return total_steps - round(decay_fraction * total_steps)


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then the chosen schedule."""
    warmup = config.warmup_steps or round(config.warmup_fraction * total_steps)
    floor = config.lr * config.min_lr_ratio
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = _decay_start(total_steps, config.decay_fraction)  # warmup-stable-decay
    if step < decay_start:
        return config.lr
    progress = (step - decay_start + 1) / max(1, total_steps - decay_start)
    return config.lr + (floor - config.lr) * min(progress, 1.0)


def open_base(base: str | Path):
    """A base HF model's config, tokenizer and class (the folder checked by ``prepare``):
    Gemma3ForCausalLM-like, or an image-text model whose language model alone trains.
    Returns (config, tokenizer, text_config, model class)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if getattr(config, "vision_config", None) is not None:
        return config, tokenizer, config.text_config, AutoModelForImageTextToText
    return config, tokenizer, config, AutoModelForCausalLM


def freeze_vision(model: torch.nn.Module) -> None:
    """Only the language model of an image-text model trains; the vision tower and projector stay."""
    if getattr(model.config, "vision_config", None) is None:
        return
    for name, param in model.named_parameters():
        param.requires_grad_(".language_model." in f".{name}" or name.startswith("lm_head"))


def _flops_per_token(model, text_config, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (trainable, non-embedding) + 12 L s d_attn (PaLM's estimate)."""
    n = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and "embed_tokens" not in name)
    attn = 12 * text_config.num_hidden_layers * seq_len * text_config.num_attention_heads * text_config.head_dim
    return 6.0 * n + attn


class MetricsLog:
    """metrics.csv (append-only, truncated to the resumed step on resume) plus TensorBoard if installed."""

    def __init__(self, path: Path, columns: list[str], resume_step: int | None, enabled: bool):
        self.path, self.columns, self.enabled = path, columns, enabled
        self.tb = None
        if not enabled:
            return
        rows = []
        if resume_step is not None and path.exists():
            with open(path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= resume_step]
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, table.getvalue())  # a kill while resuming loses no row
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            pass

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and value == value:
                    self.tb.add_scalar(key, value, row["step"])
            self.tb.flush()


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("step-*.ckpt"))


def held_out_losses(model, sets: dict[str, ds.TokenBlocks], blocks: int, batch: int, *, rank: int = 0, world: int = 1,
                    device: torch.device | str = "cpu", reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, float]:
    """Mean loss per dataset over its first ``blocks`` blocks in batches of ``batch``; with ranks,
    each takes every ``world``-th block and ``reduce`` sums the ranks' totals."""
    losses = {}
    with torch.no_grad():
        for name, data in sets.items():
            count = min(blocks, data.num_blocks)
            indices = list(range(count))[rank::world]
            chunks = [indices[start : start + batch] for start in range(0, len(indices), batch)]
            # every rank runs as many forward passes (a sharded model gathers its layers in each):
            # a rank with fewer blocks runs block 0 more times and does not count it
            per_rank = -(-count // world)
            passes = -(-per_rank // batch)
            total = torch.zeros(2, dtype=torch.float64, device=device)
            for chunk in chunks + [[]] * (passes - len(chunks)):
                x = torch.from_numpy(np.stack([data.block(i) for i in chunk or [0]])).to(device)
                loss = model(input_ids=x, labels=x).loss
                if chunk:
                    total += torch.tensor([loss.item() * len(chunk), len(chunk)], dtype=torch.float64, device=device)
            total = reduce(total)
            losses[name] = float(total[0] / total[1])
    return losses


def _evaluate(fabric, model, sets: dict[str, ds.TokenBlocks], blocks: int, batch: int) -> dict[str, float]:
    """Mean held-out loss per dataset over its first ``blocks`` blocks, sharded over ranks."""
    model.eval()
    losses = held_out_losses(model, sets, blocks, batch, rank=fabric.global_rank, world=fabric.world_size, device=fabric.device,
                             reduce=lambda total: fabric.all_reduce(total, reduce_op="sum"))  # fmt: skip
    model.train()
    return losses


def _peak_memory(device: torch.device) -> dict:
    """Rank 0's peak memory in this process (a resumed run: since the resume): host RSS, and the
    GPU's allocated bytes on CUDA."""
    import resource

    peak = {"host_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        peak["gpu_allocated"] = torch.cuda.max_memory_allocated(device)
    return peak


def _versions() -> dict:
    import lightning
    import transformers

    from optimer_merge import __version__

    return {"optimer_merge": __version__, "torch": torch.__version__, "transformers": transformers.__version__, "lightning": lightning.__version__}


def velocitune_targets(config: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Target loss per dataset: user-given, else fitted on a short proxy run (cached in the run folder)."""
    out = Path(config.output)
    path = out / "velocitune_targets.json"
    if path.exists():
        return json.loads(path.read_text())
    names = [d.name for d in config.datasets]
    missing = [n for n in names if n not in config.velocitune.targets]
    result = {"targets": dict(config.velocitune.targets), "fits": {}, "proxy": None}
    if missing:
        settings = config.velocitune
        proxy_steps = max(settings.proxy_evals, math.ceil(settings.proxy_fraction * _total_steps(config)))
        decays = config.schedule != "constant" and config.min_lr_ratio < 1
        every = max(1, proxy_steps // settings.proxy_evals)
        if decays:  # enough evaluations in the constant phase for the fit, and one at the end of the decay
            every = max(1, _decay_start(proxy_steps, settings.proxy_decay_fraction) // settings.proxy_evals)
        proxy = config.model_copy(
            update={
                "output": str(out / "velocitune-proxy"),
                "token_cache": str(config.token_dir()),  # the same data: tokenized once
                "mixture": "static",
                # the loss-vs-data curve at constant lr, then (where the run decays) the decay's gain
                "schedule": "wsd" if decays else "constant",
                "decay_fraction": settings.proxy_decay_fraction,
                "max_tokens": None,
                "max_steps": proxy_steps,
                "eval_datasets": [],
                "eval_every": every,
                "checkpoint_every": proxy_steps,
            }
        )
        warmup = proxy.warmup_steps or round(proxy.warmup_fraction * proxy_steps)
        decay_start = _decay_start(proxy_steps, settings.proxy_decay_fraction) if decays else proxy_steps
        fitted = [step for step in range(every, proxy_steps + 1, every) if warmup < step <= decay_start]
        if len(fitted) < 3:
            raise ConfigError(
                f"velocitune: the proxy run would have {len(fitted)} evaluations in its constant-lr phase, 3 are needed; "
                "raise velocitune.proxy_fraction or velocitune.proxy_evals"
            )
        log(f"velocitune: proxy run of {proxy_steps} steps to fit per-dataset scaling laws")
        meta = train(proxy, log=log, export=False)
        with open(Path(proxy.output) / "metrics.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        stable = [r for r in rows if warmup < int(r["step"]) <= decay_start]
        last = rows[-1]
        full_tokens = _total_steps(config) * _tokens_per_step(config, meta["world_size"])
        for spec in config.datasets:
            if spec.name not in missing:
                continue
            column = f"eval_loss/{spec.name}"
            law = vt.fit_scaling_law([float(r[f"tokens/{spec.name}"]) for r in stable], [float(r[column]) for r in stable])
            # what the decay gained over the constant-lr curve at the proxy's end
            gain = max(0.0, law(float(last[f"tokens/{spec.name}"])) - float(last[column])) if decays else 0.0
            planned = config.ratios()[spec.name] * full_tokens
            result["targets"][spec.name] = law(planned) - gain
            result["fits"][spec.name] = {"E": law.E, "B": law.B, "beta": law.beta, "tokens": planned, "decay_gain": gain}
        result["proxy"] = {k: meta[k] for k in ("steps", "tokens", "wall_seconds", "cpu_seconds", "flops_estimate")}
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return result


def _tokens_per_step(config: TrainConfig, world_size: int) -> int:
    return config.seq_len * config.micro_batch_size * config.grad_accum * world_size


def _total_steps(config: TrainConfig, world_size: int = 1) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.max_tokens / _tokens_per_step(config, world_size)))


def identity(config: TrainConfig) -> dict:
    """What must match for a run folder to be resumed, with local paths resolved (``resolved``)."""
    return resolved({k: v for k, v in config.model_dump(mode="json").items() if k not in RESUMABLE_FIELDS})


def resolved(identity: dict) -> dict:
    """An identity with the base and the file sources of its datasets as absolute paths (corpus
    domains stay names), so one run started from another folder, or with its paths spelt another
    way, is the same run. Idempotent: records written with relative paths resolve against the
    current folder, as they were resolved when the run started there."""
    path = lambda value: str(Path(value).expanduser().resolve())  # noqa: E731
    files = lambda spec: {k: path(spec[k]) for k in ("source", "eval_source") if spec.get(k) and not ds.is_corpus(spec[k])}  # noqa: E731
    out = {**identity, "base": path(identity["base"])}
    for key in ("datasets", "eval_datasets"):
        if isinstance(identity.get(key), list):
            out[key] = [{**spec, **files(spec)} for spec in identity[key]]
    return out


def train(
    config: TrainConfig,
    *,
    overwrite: bool = False,
    export: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train (or resume, or skip if finished) the run described by ``config``; returns train_meta.

    Every input is checked before the first step (``prepare``); a run refused then leaves no
    folder behind. The final model appears at ``output/model`` only once it is completely written.
    """
    out = Path(config.output)
    primary = is_primary_process()
    folder = RunFolder(out, "training run", fix="choose another output folder or pass --overwrite") if primary else None
    with folder or contextlib.nullcontext():
        if folder is not None:
            if overwrite:
                folder.clear(RUN_RECORD)
            # a static mixture does not use the velocitune settings: they may differ (or gain fields)
            # the output is the folder itself, however it is spelt
            ignored = (*RESUMABLE_FIELDS, "output") + (("velocitune",) if config.mixture != "velocitune" else ())
            folder.check(RUN_RECORD, identity(config), ignore=ignored, normalize=resolved)
        meta_path = out / "train_meta.json"
        if meta_path.exists() and (not export or (out / MODEL_DIR).exists()):
            log(f"{out}: already trained, reused (pass --overwrite to retrain)")
            return json.loads(meta_path.read_text())
        if folder is not None:
            folder.record(RUN_RECORD, identity(config), config=config.model_dump(mode="json"))
        run = prepare(config, log)
        if folder is not None:
            folder.keep()
        state = fit(run)
        return finalize(run, state, export)


@dataclass
class Run:
    """A prepared run: the launched Fabric, the model and optimizer set up, the data tokenized."""

    config: TrainConfig
    out: Path
    fabric: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: object
    text_config: object
    train_sets: list
    eval_sets: dict
    sampler: ds.MixtureSampler
    ratios: dict[str, float]
    targets: dict | None
    total_steps: int
    tokens_per_step: int
    n_params: int
    n_trainable: int
    say: Callable[[str], None]
    sharded: bool = False
    checkpoint_names: dict[str, str] = field(default_factory=dict)  # live parameter -> the base checkpoint's name

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.config.datasets]


def prepare(config: TrainConfig, log: Callable[[str], None] = print) -> Run:
    """Check every input, launch Fabric, load the base, tokenize the data, set up the optimizer."""
    out = Path(config.output)
    base = check_model_folder(config.base, "base model", tokenizer=True)  # the cheap checks first: no library loaded yet
    token_dir = config.token_dir()
    if config.token_cache:
        check_output_dir(token_dir, "token_cache folder")
    for spec in config.datasets + config.eval_datasets:
        for source in filter(None, (spec.source, spec.eval_source)):
            warning = ds.check_source(source)
            if warning and is_primary_process():
                log(f"warning: {warning}")
    if config.mixture == "velocitune":
        lacking = [d.name for d in config.datasets if ds.eval_source(d) is None]
        if lacking:
            raise ConfigError(f"velocitune needs held-out data for every dataset; set eval_source for: {', '.join(lacking)}")
    nodes = _nodes(config)
    strategy_settings = _strategy_settings(config)
    if (crowded := _crowded_cpus(config)) and is_primary_process():
        log(f"warning: {crowded}")
    hf_config, tokenizer, text_config, model_class = open_base(base)
    max_len = getattr(text_config, "max_position_embeddings", None)
    if max_len is not None and config.seq_len > max_len:
        raise ConfigError(f"seq_len={config.seq_len} is above the model's maximum of {max_len} positions")
    sharded = config.strategy_config.name == "fsdp"
    if is_primary_process():  # a bad line in the data is one error before any other rank starts (then: cached)
        _load_data(config, tokenizer, token_dir)
    from lightning.fabric import Fabric  # Lightning takes seconds to import: only once the inputs are checked

    try:
        fabric = Fabric(
            accelerator=config.accelerator,
            strategy=_strategy(config, strategy_settings),
            devices=config.devices,
            num_nodes=config.num_nodes,
            precision=config.precision,
        )
    except UserError:
        raise
    except (ValueError, TypeError, RuntimeError, ImportError) as error:  # Lightning's checks of these settings
        raise ConfigError(
            f"accelerator={config.accelerator!r}, strategy={config.strategy_config.name!r}, devices={config.devices!r}, "
            f"precision={config.precision!r}: {error}"
        ) from None
    # Lightning's per-rank connection banner says nothing a user acts on; errors still reach stderr
    # (its rank-zero messages go to the logger of whichever Lightning package was imported last)
    loggers = tuple(f"lightning.{p}.utilities.{m}" for p in ("fabric", "pytorch") for m in ("distributed", "rank_zero"))
    if nodes and (is_primary_process() or os.environ.get("LOCAL_RANK") is None and "NODE_RANK" in os.environ):
        log(f"waiting for all {config.num_nodes} nodes to join ({nodes})")  # each node's first process
    with drop_messages(loggers, ("Initializing distributed:", "All distributed processes registered")):
        fabric.launch()
    say = log if fabric.is_global_zero else (lambda _msg: None)
    if sharded:  # created on the meta device, sharded by layer, loaded once from rank 0's memory map
        from optimer_merge.cpt import sharding

        model, saved_names = sharding.build(fabric, base, model_class, hf_config, freeze_vision)
    else:
        from optimer_merge.cpt.sharding import checkpoint_names

        model = model_class.from_pretrained(base, dtype=torch.float32)
        freeze_vision(model)
        saved_names = checkpoint_names(model, base)
    n_params = sum(p.numel() for p in model.parameters())  # a DTensor's numel is its global size
    if config.threads == "auto":
        if fabric.device.type == "cpu":
            torch.set_num_threads(default_threads(n_params))
    elif config.threads is not None:
        torch.set_num_threads(config.threads)

    with fabric.rank_zero_first(local=False):
        train_sets, eval_sets = _load_data(config, tokenizer, token_dir)
    world = fabric.world_size
    total = _total_steps(config, world)
    if config.mixture == "velocitune" and total <= config.velocitune.update_every:
        say(f"warning: velocitune reweights every {config.velocitune.update_every} steps and this run has {total}: "
            "its weights never change from the initial ratios; lower velocitune.update_every or raise the budget")  # fmt: skip
    targets = velocitune_targets(config, log=say) if config.mixture == "velocitune" else None
    fabric.seed_everything(config.seed, verbose=False)

    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=config.betas,
    )
    if sharded:
        optimizer = fabric.setup_optimizers(optimizer)
    else:
        model, optimizer = fabric.setup(model, optimizer)
    model.train()
    ratios = config.ratios()
    names = [d.name for d in config.datasets]
    if config.precision in ("bf16-true", "16-true"):
        say(f"warning: precision {config.precision} keeps the weights in 16 bits: an update below "
            f"{'2^-8 (0.4%)' if config.precision == 'bf16-true' else '2^-11 (0.05%)'} of a weight rounds away, and at lr {config.lr:g} "
            "most CPT updates are that small; bf16-mixed keeps float32 master weights")  # fmt: skip
    _check_disk(config, out, model, trainable, fabric)
    if config.max_tokens is not None and config.max_tokens < _tokens_per_step(config, world):
        say(f"warning: max_tokens {config.max_tokens} is less than one step's {_tokens_per_step(config, world)} tokens "
            f"(seq_len x micro_batch_size x grad_accum x {world} devices): training one step")  # fmt: skip
    if idle := [d.name for d in config.datasets if d.ratio == 0]:
        them = "them" if len(idle) > 1 else "it"
        say(f"warning: ratio 0 for {', '.join(idle)}: the run trains on no tokens of {them} (Velocitune too keeps a weight of 0 at 0; "
            f"held-out loss is still measured); give {them} a ratio above 0, or leave {them} out")  # fmt: skip
    if len(ratios) > 1:  # ratios are normalised, and a dataset without one has 1: say what they came to
        shares = ", ".join(f"{n} {r:.1%}" for n, r in ratios.items())
        say(f"static mixture: {shares} of the training tokens" if config.mixture == "static" else
            f"velocitune mixture, starting from {shares} of the training tokens")  # fmt: skip
    if config.warmup_steps >= total:
        say(f"warning: warmup_steps {config.warmup_steps} is not less than the run's {total} step{'s' if total > 1 else ''}: the learning rate "
            f"peaks at {lr_at(total - 1, total, config):.3g}, not lr {config.lr:g}")  # fmt: skip
    return Run(
        config=config, out=out, fabric=fabric, model=model, optimizer=optimizer, tokenizer=tokenizer, text_config=text_config,
        train_sets=train_sets, eval_sets=eval_sets,
        sampler=ds.MixtureSampler([d.num_blocks for d in train_sets], [ratios[n] for n in names], config.seed),
        ratios=ratios, targets=targets, total_steps=total, tokens_per_step=_tokens_per_step(config, world),
        n_params=n_params, n_trainable=sum(p.numel() for p in trainable), say=say, sharded=sharded, checkpoint_names=saved_names,
    )  # fmt: skip


def _device_type(config: TrainConfig) -> str:
    """The kind of device the run trains on: cuda, cpu, or the accelerator named (``auto``: cuda where there is one)."""
    if config.accelerator in ("cuda", "gpu") or (config.accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu" if config.accelerator == "auto" else config.accelerator


def _crowded_cpus(config: TrainConfig) -> str | None:
    """Why a CPU run's processes would share cores (more devices per node than CPUs), or None."""
    cpus = os.cpu_count() or 1
    if not (_device_type(config) == "cpu" and isinstance(config.devices, int) and config.devices > cpus):
        return None
    return f"devices {config.devices} starts {config.devices} training processes on this machine's {cpus} CPUs: they share cores and each runs slower; give devices <= {cpus}"


def _nodes(config: TrainConfig) -> str | None:
    """For a multi-node run, how the nodes find each other (for the log); refused when they cannot:
    without a cluster launcher Lightning listens on 127.0.0.1 at a random port, which no other node reaches."""
    if config.num_nodes == 1:
        return None
    from lightning.fabric.plugins.environments import LSFEnvironment, MPIEnvironment, SLURMEnvironment, TorchElasticEnvironment

    for environment, name in ((TorchElasticEnvironment, "torchrun"), (SLURMEnvironment, "SLURM"), (LSFEnvironment, "LSF"), (MPIEnvironment, "MPI")):
        if environment.detect():
            return f"launched by {name}"
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if name not in os.environ]
    if missing:
        raise ConfigError(
            f"num_nodes={config.num_nodes} without a cluster launcher (SLURM, torchrun, LSF, MPI) needs {', '.join(missing)} set: "
            f"run the same command on every node with MASTER_ADDR and MASTER_PORT naming node 0's address and a free port, "
            f"and NODE_RANK 0..{config.num_nodes - 1}"
        )
    return f"this is node {os.environ['NODE_RANK']}; node 0 at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"


def _load_data(config: TrainConfig, tokenizer, token_dir: Path) -> tuple[list, dict]:
    """The training sets and the held-out sets by name, tokenized into ``token_dir`` on first use."""
    train_sets = [ds.load_blocks(s, "train", tokenizer, config.seq_len, token_dir) for s in config.datasets]
    eval_sets = {}
    for spec in config.datasets + config.eval_datasets:
        source = ds.eval_source(spec) if spec in config.datasets else (spec.eval_source or spec.source)
        if source is not None:
            eval_sets[spec.name] = ds.load_blocks(spec, "dev", tokenizer, config.seq_len, token_dir, source)
    return train_sets, eval_sets


def _check_disk(config: TrainConfig, out: Path, model: torch.nn.Module, trainable: list[torch.nn.Parameter], fabric) -> None:
    """Refuse a run whose checkpoints and model will not fit on the disk, before its first step: the
    weights and AdamW's two moments per checkpoint, ``keep_checkpoints`` kept plus the one being
    written, and the exported model (checkpoints already there count as written). Every rank
    checks its own disk, and all stop together if one is short (a rank left waiting would hang)."""
    params = list(model.parameters())
    checkpoint = sum(p.numel() * p.element_size() for p in params) + 2 * sum(p.numel() * p.element_size() for p in trainable)
    files = [f for c in _checkpoints(out / CHECKPOINTS_DIR) for f in ([c] if c.is_file() else c.rglob("*"))]  # sharded: folders
    held = sum(f.stat().st_size for f in files if f.is_file())
    dtype = getattr(torch, saved_dtype(config.base) if config.save_dtype == "auto" else config.save_dtype)
    export = sum(p.numel() for p in params) * torch.empty((), dtype=dtype).element_size()
    kept = config.keep_checkpoints + 1
    need, what = kept * checkpoint - held + export, f"training ({kept} checkpoints of {human_bytes(checkpoint)} at once, then the model)"
    if fabric.world_size == 1:
        check_free_space(out, need, what)
        return
    try:
        check_free_space(out, need, what)
        short = None
    except RunFolderError as error:
        short = str(error)
    problems = [None] * fabric.world_size
    torch.distributed.all_gather_object(problems, short)
    if any(problems):
        raise OnEveryRank(problems[0] or next(f"rank {rank}: {p}" for rank, p in enumerate(problems) if p))


def _strategy(config: TrainConfig, settings: dict | None):
    """Lightning's strategy object for the config (fsdp: this project's FSDP2 path; a bare name:
    Lightning picks the accelerator's variant), from ``_strategy_settings``."""
    chosen = config.strategy_config
    if chosen.name == "fsdp":
        from optimer_merge.cpt import sharding

        if not isinstance(config.devices, int):
            raise ConfigError(f"strategy fsdp needs devices as a number (per node), got {config.devices!r}")
        param_dtype = torch.bfloat16 if config.precision.startswith("bf16") else torch.float16 if config.precision.startswith("16") else None
        device_type = "cuda" if _device_type(config) == "cuda" else "cpu"
        return sharding.strategy(config.devices, config.num_nodes, activation_checkpointing=chosen.activation_checkpointing,
                                 param_dtype=param_dtype, device_type=device_type)  # fmt: skip
    if settings is None:
        return chosen.name
    from lightning.fabric.strategies import STRATEGY_REGISTRY

    strategy = STRATEGY_REGISTRY[chosen.name]["strategy"](**settings)
    if chosen.name.startswith("deepspeed") and config.grad_clip is not None:
        strategy.config["gradient_clipping"] = config.grad_clip  # DeepSpeed clips itself; Fabric's clipping raises under it
    return strategy


# Arguments of a Lightning strategy that Fabric fills from the run's own settings.
FILLED_BY_FABRIC = {"self", "args", "kwargs", "accelerator", "parallel_devices", "cluster_environment", "checkpoint_io", "precision", "device"}


def _strategy_settings(config: TrainConfig) -> dict | None:
    """The keyword arguments of the chosen Lightning strategy, checked before any work (None: the
    fsdp path, or a bare name): an unknown strategy or option is refused, ``timeout`` is seconds."""
    chosen = config.strategy_config
    if chosen.name in ("auto", "fsdp"):  # neither takes options (StrategyConfig)
        return None
    from lightning.fabric.strategies import STRATEGY_REGISTRY

    if chosen.name not in STRATEGY_REGISTRY:
        raise ConfigError(f"unknown strategy {chosen.name!r}; choose fsdp, auto or one of Lightning's: {', '.join(sorted(STRATEGY_REGISTRY))}")
    if not chosen.options and not chosen.name.startswith("deepspeed"):
        return None
    entry = STRATEGY_REGISTRY[chosen.name]
    accepted = _accepted_options(entry["strategy"])
    unknown = sorted(set(chosen.options) - accepted) if accepted is not None else []
    if unknown:
        raise ConfigError(f"strategy {chosen.name!r} has no option {', '.join(map(repr, unknown))}; its options are {', '.join(sorted(accepted))}")
    settings = {**entry["init_params"], **chosen.options}
    if "timeout" in chosen.options:
        seconds = chosen.options["timeout"]
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < float("inf"):
            raise ConfigError(f"strategy option timeout: give seconds as a positive number, got {seconds!r}")
        settings["timeout"] = datetime.timedelta(seconds=seconds)
    if chosen.name.startswith("deepspeed") and settings.get("stage") == 3:
        raise ConfigError(
            f"strategy {chosen.name!r} (ZeRO stage 3) is not supported: its partitioned parameters would export "
            "empty; use strategy fsdp, which shards the same state and exports it"
        )
    return settings


def _accepted_options(strategy_class: type) -> set[str] | None:
    """The keyword arguments a Lightning strategy class takes from a user, including those it
    passes on to the wrapper it builds (DDP, FSDP); None where that cannot be known."""
    import inspect

    def keywords(function) -> tuple[set[str], bool]:
        parameters = inspect.signature(function).parameters.values()
        named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        return named, any(p.kind == p.VAR_KEYWORD for p in parameters)

    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    accepted, open_ended = keywords(strategy_class.__init__)
    if open_ended:
        wrapper = {"DDPStrategy": DistributedDataParallel, "FSDPStrategy": FullyShardedDataParallel}.get(strategy_class.__name__)
        if wrapper is None:
            return None
        passed_on, _ = keywords(wrapper.__init__)
        accepted |= passed_on - {"module", "device_ids", "process_group"}
    return accepted - FILLED_BY_FABRIC


def fit(run: Run) -> dict:
    """The training loop, from the last checkpoint if there is one; returns the final loop state."""
    config, fabric, model, optimizer, sampler = run.config, run.fabric, run.model, run.optimizer, run.sampler
    names, say = run.names, run.say
    ckpt_dir = run.out / CHECKPOINTS_DIR
    if fabric.is_global_zero:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    existing = _checkpoints(ckpt_dir)
    token_fp = ds.tokenizer_fingerprint(run.tokenizer)
    data = [blocks.path.name for blocks in run.train_sets]  # each named by its content's fingerprint
    state = {
        "model": model,
        "optimizer": optimizer,
        "step": 0,
        "sampler": sampler.state_dict(),
        "tokenizer": token_fp,
        "elapsed": {"wall": 0.0, "cpu": 0.0},
        "initial_eval": None,
        "trajectory": [],
        "window": {"loss": 0.0, "steps": 0, "seconds": 0.0},  # train loss and time since the last metrics row
    }
    resume_step = None
    if existing:
        remainder = fabric.load(existing[-1], state)
        state.update(remainder or {})
        if state["tokenizer"] != token_fp:
            raise ConfigError(
                f"tokenizer mismatch: checkpoint {existing[-1]} was trained with a different tokenizer "
                f"than the base {config.base}; use the same base or a new output folder"
            )
        changed = [n for n, cache in zip(names, state.get("data", data)) if cache not in data]  # checkpoints from before: no record
        if changed:
            raise ConfigError(
                f"training data changed since checkpoint {existing[-1].name}: {', '.join(changed)} (its files or corpus changed); "
                "resuming would continue on other data: restore the files, or pass --overwrite to start over"
            )
        sampler.load_state_dict(state["sampler"])
        resume_step = state["step"]
        say(f"resuming {run.out} from step {resume_step} of {run.total_steps}")
    state["data"] = data  # saved with every checkpoint, and back as a remainder (older checkpoints lack it)

    columns = (
        ["step", "tokens", "lr", "train_loss", "tokens_per_s"]
        + [f"tokens/{n}" for n in names]
        + [f"weight/{n}" for n in names]
        + [f"eval_loss/{n}" for n in run.eval_sets]
    )
    metrics = MetricsLog(run.out / "metrics.csv", columns, resume_step, fabric.is_global_zero)

    def row(step: int, lr: float, train_loss: float, tps: float, losses: dict[str, float]) -> dict:
        r = {"step": step, "tokens": step * run.tokens_per_step, "lr": lr, "train_loss": train_loss, "tokens_per_s": tps}
        r.update({f"tokens/{n}": c * config.seq_len for n, c in zip(names, sampler.counts)})
        r.update({f"weight/{n}": w for n, w in zip(names, sampler.weights)})
        r.update({f"eval_loss/{n}": v for n, v in losses.items()})
        return r

    def evaluate() -> dict[str, float]:
        return _evaluate(fabric, model, run.eval_sets, config.eval_blocks, config.micro_batch_size)

    if config.mixture == "velocitune" and not state["trajectory"]:
        state["trajectory"].append({"step": 0, "weights": dict(run.ratios)})
    if state["initial_eval"] is None:
        state["initial_eval"] = evaluate()
        metrics.write(row(0, 0.0, float("nan"), 0.0, state["initial_eval"]))

    def save_checkpoint(step: int) -> None:
        state["step"], state["sampler"] = step, sampler.state_dict()
        final = ckpt_dir / f"step-{step:08d}.ckpt"
        partial = ckpt_dir / f"step-{step:08d}.partial"
        fabric.save(partial, state)
        fabric.barrier()
        if fabric.is_global_zero:
            os.replace(partial, final)
            for old in _checkpoints(ckpt_dir)[: -config.keep_checkpoints]:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        fabric.barrier()

    start = state["step"]
    bar = _StepProgress(run.total_steps, start, config.progress and fabric.is_global_zero, run.say)
    slots = config.micro_batch_size * fabric.world_size
    wall0, cpu0 = time.perf_counter(), time.process_time()
    # the metrics window: its loss and steps, and its seconds before this process (a resumed run)
    window = dict(state["window"])
    window_t = time.perf_counter()
    with _stop_on_sigterm() as stop:
        for step in range(start, run.total_steps):
            lr = lr_at(step, run.total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = 0.0
            for micro in range(config.grad_accum):
                picks = sampler.take(slots)[fabric.global_rank * config.micro_batch_size : (fabric.global_rank + 1) * config.micro_batch_size]
                x = torch.from_numpy(np.stack([run.train_sets[d].block(b) for d, b in picks])).to(fabric.device)
                # FSDP would keep whole unsharded gradients across the skipped syncs: it syncs every micro-step
                with fabric.no_backward_sync(model, enabled=micro < config.grad_accum - 1 and not run.sharded):
                    loss = model(input_ids=x, labels=x).loss
                    fabric.backward(loss / config.grad_accum)
                step_loss += loss.item() / config.grad_accum
            norm = None
            if not config.strategy_config.name.startswith("deepspeed"):  # without clipping: the norm alone (x1)
                norm = fabric.clip_gradients(model, optimizer, max_norm=config.grad_clip or math.inf, error_if_nonfinite=False)
            finite, norm = _finite(step_loss, norm, config)
            # one collective a step: every rank stops on a non-finite step, and at the same step on SIGTERM
            diverged, stopping = _on_any_rank(fabric, not finite, bool(stop))
            if diverged:
                raise _diverged(step + 1, run.total_steps, step_loss, norm, config, state["step"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            window["loss"] += step_loss
            window["steps"] += 1
            bar.step(done)

            update_due = config.mixture == "velocitune" and done % config.velocitune.update_every == 0
            if done % config.eval_every == 0 or done == run.total_steps or update_due:
                seconds = window["seconds"] + time.perf_counter() - window_t
                tps = window["steps"] * run.tokens_per_step / max(seconds, 1e-9)
                losses = evaluate()
                if update_due and done < run.total_steps:
                    current = {n: losses[n] for n in names}
                    seen = {n: c * config.seq_len for n, c in zip(names, sampler.counts)}
                    weights = dict(zip(names, sampler.weights))
                    targets = run.targets["targets"]
                    if config.velocitune.refit:
                        remaining = (run.total_steps - done) * run.tokens_per_step
                        targets = vt.refit_targets(state["trajectory"][1:], current, seen, weights, remaining, targets, run.targets["fits"])
                    velocity = vt.velocities(current, state["initial_eval"], targets)
                    new = vt.update_weights(weights, velocity)
                    sampler.set_weights([new[n] for n in names])
                    state["trajectory"].append({"step": done, "losses": current, "tokens": seen, "targets": targets, "velocity": velocity, "weights": new})
                train_loss = window["loss"] / window["steps"]
                metrics.write(row(done, lr, train_loss, tps, losses))
                bar.metrics(train_loss, tps)
                window, window_t = {"loss": 0.0, "steps": 0, "seconds": 0.0}, time.perf_counter()
            if done % config.checkpoint_every == 0 or done == run.total_steps or stopping:
                now = time.perf_counter()
                state["elapsed"] = {
                    "wall": state["elapsed"]["wall"] + now - wall0,
                    "cpu": state["elapsed"]["cpu"] + time.process_time() - cpu0,
                }
                wall0, cpu0 = now, time.process_time()
                state["window"] = {**window, "seconds": window["seconds"] + now - window_t}
                save_checkpoint(done)
            if stopping and done < run.total_steps:
                bar.close()
                raise Stopped(f"stopped by SIGTERM at step {done} of {run.total_steps}, after saving a checkpoint", signal.SIGTERM)
    bar.close()
    return state


class TrainingDiverged(UserError):
    """The loss or the gradients became NaN or infinite: the settings make this run diverge.
    ``what``: where and how, without the advice (for callers that give their own)."""

    def __init__(self, message: str, what: str = ""):
        super().__init__(message)
        self.what = what or message


def _finite(loss: float, norm, config: TrainConfig) -> tuple[bool, float | None]:
    """Whether a step may reach the weights (a diverged run would otherwise train on, checkpoint and
    export NaN weights), and the gradient norm as a number. Under fp16's loss scaling an infinite
    gradient is expected now and then (the scaler skips that step); a non-finite loss never is."""
    norm = None if norm is None or config.precision in ("16-mixed", "16") else float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    return math.isfinite(loss) and (norm is None or math.isfinite(norm)), norm


def _on_any_rank(fabric, *flags: bool) -> list[bool]:
    """Each flag, true if it is true on any rank (one all-reduce for all of them)."""
    if fabric.world_size == 1:
        return list(flags)
    summed = fabric.all_reduce(torch.tensor([float(f) for f in flags], device=fabric.device), reduce_op="sum")
    return [bool(v > 0) for v in summed.tolist()]


def _diverged(step: int, total: int, loss: float, norm: float | None, config: TrainConfig, saved: int) -> TrainingDiverged:
    what = f"training diverged at step {step} of {total}: the loss is {loss:g}" + (f", the gradient norm {norm:g}" if norm is not None else "")
    return TrainingDiverged(
        f"{what} (on this rank); nothing of this step was applied or saved ({f'last checkpoint: step {saved}' if saved else 'no checkpoint yet'}). "
        f"Lower lr ({config.lr:g}) or check the data, and train again into another output folder (or with --overwrite)",
        what,
    )


class _StepProgress:
    """The training loop's progress: tqdm's bar on a terminal; elsewhere (a scheduler's log file,
    where a bar's carriage returns make one endless line) a plain line every PROGRESS_SECONDS
    with the step, the last logged loss and tokens/s, and the ETA."""

    PROGRESS_SECONDS = 60.0

    def __init__(self, total: int, start: int, enabled: bool, say: Callable[[str], None]):
        self.total, self.start, self.say = total, start, say
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=2.0)
        self.t0 = self.last = time.perf_counter()
        self.loss = self.tps = None

    def step(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
            return
        now = time.perf_counter()
        if not self.enabled or now - self.last < self.PROGRESS_SECONDS or done >= self.total:
            return
        self.last = now
        eta = (self.total - done) * (now - self.t0) / max(done - self.start, 1)
        logged = f", loss {self.loss:.3f}, {self.tps:,.0f} tokens/s" if self.loss is not None else ""
        self.say(f"step {done}/{self.total} ({100 * done / self.total:.0f}%){logged}, ETA {duration(eta)}")

    def metrics(self, loss: float, tps: float) -> None:
        self.loss, self.tps = loss, tps
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def _stop_on_sigterm():
    """While the loop runs, SIGTERM (a scheduler's preemption notice; a launcher passes it to every
    rank) asks it to save a checkpoint and stop after the current step, instead of killing it and
    losing the steps since the last checkpoint. Yields a list that is non-empty once asked."""
    asked: list[int] = []
    previous = on_sigterm(lambda signum, _frame: asked.append(signum))
    try:
        yield asked
    finally:
        on_sigterm(previous)


def finalize(run: Run, state: dict, export: bool = True) -> dict:
    """Final held-out losses, train_meta.json and (with ``export``) the Hugging Face model."""
    config, fabric, total_steps = run.config, run.fabric, run.total_steps
    cpu_total = fabric.all_reduce(torch.tensor(state["elapsed"]["cpu"], dtype=torch.float64), reduce_op="sum")
    final_eval = _evaluate(fabric, run.model, run.eval_sets, config.eval_blocks, config.micro_batch_size)
    evals = len(state["trajectory"]) + total_steps // config.eval_every + 2
    eval_tokens = config.eval_blocks * config.seq_len * len(run.eval_sets) * evals
    base = Path(config.base)
    meta = {
        "base": str(base.resolve()),
        "base_fingerprint": fingerprint(base),
        "model": str(run.out / MODEL_DIR) if export else None,
        "datasets": {d.name: d.source for d in config.datasets},
        "mixture": config.mixture,
        "ratios": run.ratios,
        "steps": total_steps,
        "tokens": total_steps * run.tokens_per_step,
        "tokens_per_dataset": {n: c * config.seq_len for n, c in zip(run.names, run.sampler.counts)},
        "wall_seconds": state["elapsed"]["wall"],
        "cpu_seconds": float(cpu_total),
        "flops_estimate": _flops_per_token(run.model, run.text_config, config.seq_len) * total_steps * run.tokens_per_step
        + 2.0 * run.n_params * eval_tokens,
        "parameters": run.n_params,
        "trainable_parameters": run.n_trainable,
        "world_size": fabric.world_size,
        "accelerator": fabric.device.type,
        "strategy": config.strategy_config.model_dump(),
        "precision": config.precision,
        "peak_memory_bytes": _peak_memory(fabric.device),
        "initial_eval_loss": state["initial_eval"],
        "final_eval_loss": final_eval,
        "versions": _versions(),
    }
    if run.targets is not None:
        meta["velocitune"] = {**run.targets, "trajectory": state["trajectory"]}
    if fabric.is_global_zero and run.targets is not None:
        write_json(run.out / "velocitune.json", meta["velocitune"])
    if export:
        from optimer_merge.cpt import sharding

        dtype = getattr(torch, saved_dtype(base) if config.save_dtype == "auto" else config.save_dtype)
        sharding.export(fabric, run.model.module, run.tokenizer, run.out / MODEL_DIR, dtype, meta, config.export_shard_bytes, run.checkpoint_names)
    if fabric.is_global_zero:
        write_json(run.out / "train_meta.json", meta)
    fabric.barrier()
    losses = ", ".join(f"{n} {state['initial_eval'][n]:.3f}->{v:.3f}" for n, v in final_eval.items())
    run.say(
        f"trained {meta['tokens']:,} tokens in {total_steps} step{'s' if total_steps != 1 else ''} ({meta['wall_seconds']:.1f}s); "
        + (f"held-out loss {losses}" if losses else "no held-out set (--eval-dataset or a dataset's eval_source gives one)")
    )
    return meta
