"""The search config: which vectors, bounds, objective, budget, optimizer and backend."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from optimer_merge.evaluation import DEFAULT_BATCH_SIZE, check_settings
from optimer_merge.evaluation.objective import Objective
from optimer_merge.io.yaml_config import ConfigModel, LocalPath, PlainName, Seed
from optimer_merge.threads import too_many_threads

Dtype = Literal["float32", "bfloat16", "float16"]
# Bounds beyond this move a model further than its own CPT did, several times over: allowed, but warned.
LARGE_BOUND = 10.0
# Settings only one backend reads: set away from their default with the other backend, they are refused.
BACKEND_ONLY = {"hf": ("device_map",), "vllm": ("tensor_parallel_size", "executor", "gpu_memory_utilization")}


def check_bounds(bounds: tuple[float, float], where: str = "") -> None:
    """Bounds of a weight: min <= max, and a width a float holds (SMAC scales by it)."""
    lo, hi = bounds
    if lo > hi:
        raise ValueError(f"{where}bounds {list(bounds)} have min > max")
    if not math.isfinite(hi - lo):
        raise ValueError(f"{where}bounds {list(bounds)} are wider than a float holds; narrow them (weights beyond +-{LARGE_BOUND:g} are rarely useful)")


class VectorSource(ConfigModel):
    """One vector of the pool: a CPT model folder (v = model - base) or an extracted vector file."""

    name: PlainName
    model: LocalPath | None = None
    vector: LocalPath | None = None
    bounds: tuple[float, float] | None = None  # overrides the search's default bounds

    @model_validator(mode="after")
    def _one_source(self) -> "VectorSource":
        if (self.model is None) == (self.vector is None):
            raise ValueError(f"vector {self.name}: give exactly one of `model` (a CPT model folder) or `vector` (an extracted .safetensors)")
        if self.bounds is not None:
            check_bounds(self.bounds, f"vector {self.name}: ")
        return self


class Acquisition(ConfigModel):
    """How hard SMAC works on each proposal (see optimer_merge.search.optimizers.SMACSearch)."""

    challengers: PositiveInt = 200
    local_search_iterations: PositiveInt = 1
    local_search_steps: PositiveInt | None = 20  # climbing steps of each local search (None: until no neighbour improves)
    plateau_walk: PositiveInt = 1
    vectorize: PositiveInt = 64
    gp_restarts: PositiveInt = 2
    gp_refit_growth: float = Field(0.1, ge=0)  # refit the GP's kernel once the trials grew by this fraction


class SearchConfig(ConfigModel):
    """`optimer-merge search --config FILE.yaml`; every field can also be set with --set key=value."""

    base: LocalPath
    vectors: list[VectorSource]
    bounds: tuple[float, float] = (0.0, 1.0)
    objective: LocalPath | Objective  # a spec file (recipes/objectives/*.yaml) or the spec inline
    limit: PositiveInt | None = 100  # items per task for each trial (the paper: first 100)
    trials: PositiveInt = 100  # can be raised on a later run to extend a finished search
    finalists: int = Field(3, ge=0)  # top trials re-scored at finalist_limit
    finalist_limit: PositiveInt | None = 300
    seed: Seed = 0
    optimizer: Literal["smac", "random", "tpe"] = "smac"
    initial_points: int | None = Field(None, ge=0)  # smac: Sobol points before the model (default 2K)
    acquisition: Acquisition = Acquisition()  # smac: the cost of each proposal
    backend: Literal["hf", "vllm"] = "hf"
    parallel: PositiveInt = 1  # trials side by side, each worker a Ray actor with its own evaluator and pool
    ray_address: str | None = None  # join this Ray cluster (multi-node); default: a local Ray, always stopped
    batch_size: PositiveInt | Literal["auto"] = 16  # unset: the backend's DEFAULT_BATCH_SIZE (auto on vllm)
    dtype: Dtype | None = None  # of the evaluated model (default: the base's)
    threads: PositiveInt | Literal["auto"] = "auto"
    tensor_parallel_size: PositiveInt = 1
    device_map: str | None = None  # hf: spread the model over several GPUs (e.g. "auto"); the pool follows
    executor: Literal["auto", "mp", "ray"] = "auto"  # vllm: the engine's executor (ray: multi-node engines)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # vllm: the engine's share of each GPU, pool included
    pool_dtype: Dtype | None = None  # rows of the pool (default: each source's own dtype; exact)
    pool_device: Literal["auto", "device", "host"] = "auto"  # with the live weights, or in host memory
    weight_update: Literal["pool", "push"] = "pool"  # push: the fallback sending whole merged tensors per trial
    max_length: PositiveInt | None = None
    confirm_run_unsafe_code: bool = False
    max_consecutive_failures: PositiveInt = 5
    out_dtype: Dtype | None = None  # dtype of best.yaml's merge and the export (default: the base's)
    output: LocalPath = "runs/search"

    @model_validator(mode="before")
    @classmethod
    def _backend_batch_size(cls, data):
        if isinstance(data, dict) and data.get("batch_size") is None:
            return {**data, "batch_size": DEFAULT_BATCH_SIZE.get(data.get("backend", "hf"), 16)}  # an unknown backend is refused below
        return data

    @model_validator(mode="after")
    def _check(self) -> "SearchConfig":
        if not self.vectors:
            raise ValueError("the vector pool is empty: list at least one entry under `vectors`")
        names = [v.name for v in self.vectors]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"vector names must be unique (repeated: {', '.join(duplicates)})")
        check_bounds(self.bounds)
        if all(lo == hi for lo, hi in map(self.bounds_of, self.vectors)):
            raise ValueError("every weight's bounds have min = max: nothing is left to search; widen them "
                             "(or merge those fixed weights with `optimer-merge merge`)")  # fmt: skip
        other = "vllm" if self.backend == "hf" else "hf"
        for name in BACKEND_ONLY[other]:
            if getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"{name}: {getattr(self, name)!r} is a setting of the {other} backend; backend {self.backend} would ignore it")
        check_settings(self.backend, self.dtype, self.batch_size, self.threads, self.tensor_parallel_size)  # batch_size auto: vllm only
        if self.parallel > self.trials:
            raise ValueError(f"parallel {self.parallel} is more than trials {self.trials}: workers would have no trial; give parallel <= trials")
        if self.parallel == 1 and (problem := too_many_threads(self.threads)):  # parallel workers: Ray checks their CPUs
            raise ValueError(f"threads: {problem}")
        if self.ray_address and self.parallel == 1:
            raise ValueError(f"ray_address {self.ray_address!r} needs parallel >= 2 (parallel: 1 scores in this process)")
        return self

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.vectors]

    def bounds_of(self, source: VectorSource) -> tuple[float, float]:
        return source.bounds or self.bounds

    def large_bounds(self) -> list[str]:
        """The vectors whose bounds reach beyond +-LARGE_BOUND."""
        return [v.name for v in self.vectors if max(abs(b) for b in self.bounds_of(v)) > LARGE_BOUND]

    def load_objective(self) -> Objective:
        return self.objective if isinstance(self.objective, Objective) else Objective.load(self.objective)

    # Fields that do not change which trials run (they may change how a trial runs, or whether it
    # fails for lack of memory); they may differ on resume, and a changed one retries the failed
    # trials at the end of the log.
    OPERATIONAL: ClassVar[tuple[str, ...]] = (
        "output", "threads", "batch_size", "dtype", "tensor_parallel_size", "max_length", "trials", "finalists",
        "finalist_limit", "max_consecutive_failures", "out_dtype", "confirm_run_unsafe_code", "executor",
        "gpu_memory_utilization", "pool_dtype", "pool_device", "weight_update", "device_map", "ray_address",
    )  # fmt: skip

    # Result-changing fields added since searches were first recorded, with the value a search
    # recorded without them ran with (it resumes under that value).
    ADDED: ClassVar[dict] = {"parallel": 1}

    def identity(self, objective: Objective | None = None) -> dict:
        """What must match for a run folder to be resumed: every result-changing field, with the
        objective spec resolved to its content (``objective``: the spec already loaded)."""
        data = self.model_dump(mode="json", exclude=set(self.OPERATIONAL))
        data["objective"] = (objective or self.load_objective()).model_dump(mode="json")
        data["base"] = str(Path(self.base).resolve())
        data["vectors"] = [
            {**v, **{k: str(Path(v[k]).resolve()) for k in ("model", "vector") if v.get(k)}} for v in data["vectors"]
        ]
        return data

    @staticmethod
    def without_paths(identity: dict) -> dict:
        """``identity`` as a resumed search compares it: where the base and the vectors lie is left
        out (their weights are compared instead, see ``runner.input_fingerprints``), so a search
        folder moved with its inputs resumes."""
        vectors = [{**{k: v for k, v in e.items() if k not in ("model", "vector")}, "kind": "model" if e.get("model") else "vector"}
                   for e in identity["vectors"]]  # fmt: skip
        return {**{k: v for k, v in identity.items() if k != "base"}, "vectors": vectors}

    def may_differ_on_resume(self) -> tuple[str, ...]:
        """The fields left out when a run folder's identity is compared: the operational ones, and
        the acquisition settings where the optimizer is not SMAC (only its proposals use them)."""
        return self.OPERATIONAL + (("acquisition",) if self.optimizer != "smac" else ())

    def operational(self) -> dict:
        """The settings a trial ran with that may change between runs of one search."""
        keys = ("threads", "batch_size", "dtype", "tensor_parallel_size", "max_length", "confirm_run_unsafe_code",
                "executor", "gpu_memory_utilization", "pool_dtype", "pool_device", "weight_update", "device_map")  # fmt: skip
        return {k: getattr(self, k) for k in keys}

    def evaluator_settings(self) -> dict:
        """Settings of the evaluator the trials run on."""
        settings = {"dtype": self.dtype, "batch_size": self.batch_size, "threads": self.threads, "max_length": self.max_length}
        if self.backend == "hf" and self.device_map:
            settings["device_map"] = self.device_map
        if self.backend == "vllm":
            settings.update(tensor_parallel_size=self.tensor_parallel_size, gpu_memory_utilization=self.gpu_memory_utilization,
                            distributed_executor_backend=None if self.executor == "auto" else self.executor,
                            weight_update=self.weight_update)  # fmt: skip
        return settings


def load_search_config(path: str | Path | None, overrides: dict | None = None) -> SearchConfig:
    """Read a search config YAML, apply dotted ``overrides`` and validate (one line per problem)."""
    from optimer_merge.io.yaml_config import load_yaml_config

    flags = {"base": "--base", "vectors": "--vector NAME=MODEL_OR_VECTOR (one per vector)", "objective": "--objective"}
    return load_yaml_config(SearchConfig, path, overrides, "search config", flags)
