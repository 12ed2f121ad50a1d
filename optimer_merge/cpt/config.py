"""Typed configuration of a CPT run, loaded from YAML; command-line flags override fields."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveInt, ValidationInfo, field_validator, model_validator

from optimer_merge.io.yaml_config import ConfigModel, LocalPath, PlainName, Seed
from optimer_merge.threads import too_many_threads

# Lightning Fabric's precision settings.
PRECISIONS = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "bf16-true", "16-true", "64-true", "64", "transformer-engine", "transformer-engine-float16")


class DatasetSpec(ConfigModel):
    """One training dataset: a corpus domain (``ja``, ``zh``, ``math``, ``code``, ``en``) or files.

    ``source`` is a corpus domain name or a path to a ``.jsonl``/``.jsonl.gz``/``.json``,
    ``.txt`` or ``.parquet`` file, or a folder of such files. Held-out loss is measured on
    ``eval_source`` (default: the corpus domain's dev split; none for files unless given).
    """

    name: PlainName
    source: LocalPath
    ratio: float = 1.0
    text_field: str = "text"
    eval_source: LocalPath | None = None

    @field_validator("ratio")
    @classmethod
    def _ratio_non_negative(cls, value: float) -> float:
        if not value >= 0:
            raise ValueError(f"ratio must be >= 0, got {value}")
        return value


class VelocituneConfig(ConfigModel):
    """Velocitune (Luo et al., ACL 2025): reweight domains by learning velocity every ``update_every`` steps.

    Target losses come from ``targets`` (per dataset name) or, for the datasets without one, from
    a scaling-law fit L(D) = E + B / D^beta on a short proxy run of ``proxy_fraction`` of the budget.
    The law is fitted on the proxy's constant-lr phase; where the full run's learning rate decays,
    the proxy decays too over its last ``proxy_decay_fraction`` and the loss that decay gains is
    taken off the targets (a decaying run ends below the constant-lr curve, and targets without
    that gain are reached early, after which every velocity is 0 and the weights stop moving).
    With ``refit``, every update also refits the law on the run's own held-out losses and takes the
    lower target (``optimer_merge.cpt.velocitune.refit_targets``).
    """

    update_every: int = Field(20, ge=1)
    targets: dict[str, float] = {}
    proxy_fraction: float = Field(0.2, gt=0, le=1)
    proxy_evals: int = Field(8, ge=4)
    proxy_decay_fraction: float = Field(0.25, gt=0, lt=1)
    refit: bool = True  # refit the targets on the run's own losses at every update (velocitune.refit_targets)


class StrategyConfig(ConfigModel):
    """A distributed strategy with its settings. ``fsdp`` is this project's FSDP2 path (meta-device
    creation, sharding by layer, distributed checkpoints; optimer_merge.cpt.sharding); any other
    name is a Lightning Fabric strategy (``ddp``, ``deepspeed``, ...) built with ``options``."""

    name: str = "auto"
    activation_checkpointing: bool = False  # fsdp: recompute each layer's activations in backward
    options: dict[str, Any] = {}  # keyword arguments of the Lightning strategy

    @model_validator(mode="after")
    def _settings_fit_the_strategy(self) -> "StrategyConfig":
        if self.activation_checkpointing and self.name != "fsdp":
            raise ValueError(f"activation_checkpointing is a setting of fsdp; {self.name!r} does not use it: drop it or use fsdp")
        if self.options and self.name in ("auto", "fsdp"):
            why = "give a named Lightning strategy, e.g. {name: ddp, options: {...}}" if self.name == "auto" else "its settings are activation_checkpointing and the run's precision"
            raise ValueError(f"{self.name} takes no options (got {', '.join(map(str, self.options))}): {why}")
        return self


class TrainConfig(ConfigModel):
    """Everything one CPT run needs; the defaults suit the tiny CPU models."""

    base: LocalPath
    output: LocalPath
    # tokenized datasets, keyed by their content and the tokenizer; runs over the same data may share
    # one (the demo's do); default OUTPUT/tokens
    token_cache: LocalPath | None = None
    datasets: list[DatasetSpec]
    eval_datasets: list[DatasetSpec] = []
    mixture: Literal["static", "velocitune"] = "static"
    velocitune: VelocituneConfig = VelocituneConfig()

    seq_len: int = Field(256, ge=2)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, ge=1)

    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["cosine", "constant", "wsd"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, le=1)
    decay_fraction: float = Field(0.2, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)  # each in [0, 1)
    grad_clip: float | None = Field(1.0, gt=0)

    accelerator: str = "auto"
    strategy: str | StrategyConfig = "auto"
    devices: int | str = 1
    num_nodes: int = Field(1, ge=1)
    precision: Literal[PRECISIONS] = "32-true"  # type: ignore[valid-type]
    threads: PositiveInt | Literal["auto"] | None = "auto"
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    export_shard_bytes: int = Field(4 << 30, ge=1)  # safetensors files of the exported model, at most this large

    seed: Seed = 0
    eval_every: int = Field(50, ge=1)
    eval_blocks: int = Field(16, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    progress: bool = True

    @field_validator("datasets", "eval_datasets", mode="before")
    @classmethod
    def _shorthand(cls, value: Any, info: ValidationInfo) -> Any:
        """``datasets: [ja, zh:0.5, data/x.jsonl]``: the command line's SOURCE[:RATIO] entries; an
        entry written out without a ``name`` is named after its source the same way."""
        if not isinstance(value, list):
            return value
        taken = {d.name: d.source for d in info.data.get("datasets", [])} if info.field_name == "eval_datasets" else {}
        taken.update({v["name"]: v.get("source") for v in value if isinstance(v, dict) and "name" in v})
        unnamed = [isinstance(v, str) or isinstance(v, dict) and "name" not in v and isinstance(v.get("source"), str) for v in value]
        named = iter(datasets_from_specs([v if isinstance(v, str) else v["source"] for v, u in zip(value, unnamed) if u], taken))
        return [v if not u else next(named) if isinstance(v, str) else {"name": next(named)["name"], **v} for v, u in zip(value, unnamed)]

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: int | str) -> int | str:
        """Lightning's forms: a count, -1 (all), "auto", or device indices ("0,1")."""
        if isinstance(value, int) and (value >= 1 or value == -1):
            return value
        text = value.strip() if isinstance(value, str) else ""
        if text in ("auto", "-1") or re.fullmatch(r"[1-9]\d*|\d+(\s*,\s*\d+)*\s*,|\d+(\s*,\s*\d+)+", text):
            return value
        raise ValueError(f"expected a number of devices per node >= 1, -1 (all), 'auto', or device indices such as '0,1'; got {value!r}")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if not self.datasets:
            raise ValueError("datasets is empty: name at least one dataset to train on")
        if (self.max_tokens is None) == (self.max_steps is None):
            raise ValueError("set exactly one of max_tokens and max_steps (--max-tokens N or --max-steps N)")
        from optimer_merge.cpt.datasets import is_corpus

        watched = {d.name for d in self.eval_datasets}
        for d in self.datasets:
            if d.name in watched:
                held_out = d.eval_source or (f"the {d.source} corpus's dev split" if is_corpus(d.source) else None)
                raise ValueError(f"eval_datasets: {d.name} is also a training dataset, " + (
                    f"whose held-out loss is logged already (on {held_out}); leave it out of eval_datasets" if held_out else
                    "and its loss on the data it trains on is not held out; give it an eval_source (held-out text) instead"))  # fmt: skip
        names = [d.name for d in self.datasets + self.eval_datasets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"dataset names must be unique; repeated: {', '.join(duplicates)}")
        if problem := too_many_threads(self.threads):
            raise ValueError(f"threads: {problem}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas {list(self.betas)} must each be in [0, 1)")
        if sum(d.ratio for d in self.datasets) <= 0:
            raise ValueError("dataset ratios are all zero: give at least one a positive ratio")
        if self.mixture == "velocitune" and len(self.datasets) < 2:
            raise ValueError(f"mixture velocitune reweights between datasets: give at least 2 (got {', '.join(d.name for d in self.datasets)})")
        unknown = set(self.velocitune.targets) - {d.name for d in self.datasets}
        if unknown:
            raise ValueError(f"velocitune.targets names unknown datasets: {', '.join(sorted(unknown))}")
        return self

    @property
    def strategy_config(self) -> StrategyConfig:
        return self.strategy if isinstance(self.strategy, StrategyConfig) else StrategyConfig(name=self.strategy)

    def token_dir(self, output: str | Path | None = None) -> Path:
        """Where the tokenized datasets are cached (``output``: where the run's folder is now, if moved)."""
        return Path(self.token_cache) if self.token_cache else Path(output or self.output) / "tokens"

    def ratios(self) -> dict[str, float]:
        """Dataset ratios normalised to sum to 1."""
        total = sum(d.ratio for d in self.datasets)
        return {d.name: d.ratio / total for d in self.datasets}


def dataset_from_spec(spec: str) -> dict[str, Any]:
    """Parse a command-line dataset ``SOURCE[:RATIO]`` (``ja``, ``ja:0.25``, ``data/x.jsonl:2``),
    named after its file or folder name up to the first dot, made a plain name (``my data`` ->
    ``my_data``)."""
    source, _, ratio = spec.rpartition(":") if _looks_like_ratio(spec) else (spec, "", "")
    stem = Path(source).name.lstrip(".").split(".")[0]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._-")[:120] or "data"
    entry: dict[str, Any] = {"name": name, "source": source}
    if ratio:
        entry["ratio"] = float(ratio)
    return entry


def datasets_from_specs(specs: list[str], taken: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """``dataset_from_spec`` for each; different sources that would share a name (``a/train.jsonl``,
    ``b/train.jsonl``; or a name in ``taken``, name -> source) get ``-2``, ``-3``, ... One source
    given twice keeps its name, and is refused as a repeated dataset."""
    sources = dict(taken or {})
    entries = []
    for spec in specs:
        entry = dataset_from_spec(spec)
        stem, n = entry["name"], 2
        while entry["name"] in sources and sources[entry["name"]] != entry["source"]:
            entry["name"], n = f"{stem}-{n}", n + 1
        sources[entry["name"]] = entry["source"]
        entries.append(entry)
    return entries


def _looks_like_ratio(spec: str) -> bool:
    _, sep, tail = spec.rpartition(":")
    try:
        float(tail)
    except ValueError:
        return False
    return bool(sep)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a training config YAML (optional), apply ``overrides`` (dotted keys) and validate."""
    from optimer_merge.io.yaml_config import load_yaml_config

    flags = {"base": "--base", "output": "--output", "datasets": "--dataset SOURCE[:RATIO]"}
    return load_yaml_config(TrainConfig, path, overrides, "training config", flags)
