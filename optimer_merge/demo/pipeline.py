"""The demo's stages as jobs, run by a pool of worker processes as soon as their inputs exist.

Run folder::

    demo_settings.json        the settings; a rerun must match them (except ``workers``)
    base/model                link to the shipped base (optimer_merge/demo/base: a tiny Gemma 3 pre-trained
                              on general English and a little of each domain, see its BUILD.json)
    cpt/<domain>/             one CPT run per domain (train_meta.json, metrics.csv, model/)
    vectors/                  v_i = theta_i - theta_base, stats.json, cosine.png
    merges/average/           model averaging (w_i = 1/K), merged by mergekit from average.yaml
    search/<objective>/       OptiMer searches: all domains, then re-optimised for ja and math+code
    mixture/<kind>/           data-mixture CPT at the total token budget of the K runs:
                              uniform ratios, Velocitune, and OptiMer's weights read as ratios
    eval/<candidate>/results.json   every candidate on the test tasks (lm-eval results files)
    state/<job>.json          written when a job finishes; a rerun skips those jobs
    logs/<job>.log            each job's full output

Every job is idempotent: CPT runs resume from their last checkpoint and searches replay their
trial log, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Literal

from pydantic import Field, field_validator

from optimer_merge.errors import UserError
from optimer_merge.io.progress import duration
from optimer_merge.io.yaml_config import ConfigModel, Seed

DOMAINS = ("ja", "zh", "math", "code")
SETTINGS_RECORD = "demo_settings.json"
# Objectives the searches optimise: bits per byte on dev splits (the signal a 1.5 M-parameter model
# carries; its multiple-choice accuracy is at chance). Test tasks are never seen by a search.
OBJECTIVES = {"all": DOMAINS, "ja": ("ja",), "math-code": ("math", "code")}
TEST_TASKS = [f"optimer_{d}_test_bpb" for d in DOMAINS]


class DemoJobFailed(RuntimeError):
    """A job of the demo raised; the message holds the end of its log (with the traceback)."""


class DemoSettingError(UserError):
    """A job stopped because of the demo's settings (a --lr that makes CPT diverge, say)."""


class DemoSettings(ConfigModel):
    """Sizes of the demo; the defaults fit a 2-core CPU in 5-7 minutes."""

    seed: Seed = 0
    base: str = Field(default_factory=lambda: _shipped_base_digest())  # sha256 of the shipped base's weights
    cpt_tokens: int = 100_000  # per domain; each mixture run gets K times this
    lr: float = Field(3e-4, gt=0)  # a tenth of the base's peak: small updates, as CPT of a well-trained model
    trials: int = Field(30, gt=0)  # the all-domain search
    reopt_trials: int = Field(15, gt=0)  # each re-optimisation
    limit: int = Field(20, gt=0)  # dev items per task in a trial
    finalists: int = Field(3, ge=0)
    finalist_limit: int = Field(60, gt=0)
    test_limit: int | None = Field(40, gt=0)  # test items per task (None: all)
    optimizer: Literal["smac", "tpe", "random"] = "smac"
    workers: int = Field(2, ge=1)  # worker processes, one CPU thread each
    search_workers: int = Field(1, ge=1)  # Ray workers of each search (trials side by side)

    OPERATIONAL: ClassVar[tuple[str, ...]] = ("workers",)
    ADDED: ClassVar[dict] = {"search_workers": 1}  # settings a run recorded before they existed ran with

    @field_validator("cpt_tokens")
    @classmethod
    def _at_least_one_step(cls, value: int) -> int:
        step = TRAIN["seq_len"] * TRAIN["micro_batch_size"]
        if value < step:
            raise ValueError(f"less than one training step ({step:,} tokens: {TRAIN['seq_len']} x {TRAIN['micro_batch_size']}); give at least {step}")
        return value

    def identity(self) -> dict:
        return self.model_dump(exclude=set(self.OPERATIONAL))


def _shipped_base_digest() -> str:
    from optimer_merge.cpt.demo_base import shipped_record

    return shipped_record()["sha256"]["model.safetensors"]


# Training settings of every CPT and mixture run (those of the base, at the demo's learning rate).
TRAIN = dict(seq_len=256, micro_batch_size=8, warmup_fraction=0.05, schedule="cosine", eval_every=25, eval_blocks=8, checkpoint_every=50)


@dataclass(frozen=True)
class Candidate:
    """A model scored on the test tasks: ``job`` produces it, ``label`` names it in the report."""

    name: str
    job: str
    label: str


CANDIDATES = [
    Candidate("base", "base", "base model"),
    *(Candidate(f"cpt-{d}", f"cpt-{d}", f"CPT on {d} only") for d in DOMAINS),
    Candidate("average", "average", "model averaging (w = 1/K)"),
    Candidate("mix-uniform", "mix-uniform", "data mixture, uniform ratios"),
    Candidate("mix-velocitune", "mix-velocitune", "data mixture, Velocitune"),
    Candidate("mix-optimer", "mix-optimer", "data mixture, OptiMer's weights as ratios"),
    Candidate("optimer", "search-all", "OptiMer (dev: all domains)"),
    Candidate("optimer-ja", "search-ja", "OptiMer re-optimised (dev: ja)"),
    Candidate("optimer-math-code", "search-math-code", "OptiMer re-optimised (dev: math+code)"),
]


@dataclass(frozen=True)
class Job:
    name: str
    deps: tuple[str, ...]
    what: str
    cost: float = 1.0  # expected seconds on one core of a reference machine (for the ETA)


def plan(settings: DemoSettings) -> list[Job]:
    """Jobs in priority order (the all-domain search and the mixture that needs it come early)."""
    s, k = settings, len(DOMAINS)
    cpts = tuple(f"cpt-{d}" for d in DOMAINS)
    # costs: seconds per training token and per scored item measured on a 2-core x86 machine
    train, mix = 2e-4 * s.cpt_tokens + 1, 1.9e-4 * k * s.cpt_tokens + 1

    def search(objective: str, trials: int) -> float:
        return 8 + 0.027 * len(OBJECTIVES[objective]) * (trials * s.limit + s.finalists * s.finalist_limit)

    test = 2 + 0.03 * len(TEST_TASKS) * (s.test_limit or 500)
    jobs = [Job("base", (), "the shipped base, checked against its BUILD.json", 0.5)]
    jobs += [Job(f"cpt-{d}", ("base",), f"CPT on {d}, {s.cpt_tokens:,} tokens", train) for d in DOMAINS]
    jobs += [
        Job("vectors", cpts, "distribution vectors and their stats", 4),
        Job("search-all", ("vectors",), f"OptiMer search, {s.trials} trials on dev (all domains)", search("all", s.trials)),
        Job("mix-uniform", ("base",), f"data-mixture CPT, uniform ratios, {k * s.cpt_tokens:,} tokens", mix),
        Job("mix-velocitune", ("base",), f"Velocitune mixture CPT, {k * s.cpt_tokens:,} tokens", 1.4 * mix),
        Job("mix-optimer", ("search-all",), f"data-mixture CPT with OptiMer's ratios, {k * s.cpt_tokens:,} tokens", mix),
        Job("average", ("vectors",), "model averaging merged by mergekit", 1),
        Job("search-ja", ("vectors",), f"re-optimisation for ja, {s.reopt_trials} trials", search("ja", s.reopt_trials)),
        Job("search-math-code", ("vectors",), f"re-optimisation for math+code, {s.reopt_trials} trials", search("math-code", s.reopt_trials)),
    ]
    jobs += [Job(f"test-{c.name}", (c.job,), f"{c.label} on the test tasks", test) for c in CANDIDATES]
    return jobs


def eta(jobs: list[Job], states: dict, running: dict[str, float], ran: dict[str, float], workers: int) -> float:
    """Seconds left: the scheduler replayed on expected durations. Each job's expected cost is scaled
    by how this machine did on the jobs this invocation finished (``ran``: job -> seconds); a running
    job (``running``: job -> seconds so far) has what it has done taken off; the jobs left start in
    the scheduler's order on the first free worker once their dependencies are done, so a chain of
    jobs is not spread over idle workers."""
    cost = {job.name: job.cost for job in jobs}
    prior = 30.0  # seconds of expected cost at the reference speed, so that a few short jobs do not decide it
    speed = (sum(ran.values()) + prior) / (sum(cost[name] for name in ran) + prior)
    ends = {name: max(cost[name] * speed - seconds, 0.0) for name, seconds in running.items()}  # job -> when it ends
    done, now = set(states), 0.0
    waiting = [job for job in jobs if job.name not in states and job.name not in running]
    while True:
        for job in list(waiting):
            if len(ends) >= max(1, workers):
                break
            if all(d in done for d in job.deps):
                ends[job.name] = now + cost[job.name] * speed
                waiting.remove(job)
        if not ends:
            return now
        name = min(ends, key=ends.get)
        now = ends.pop(name)
        done.add(name)


# -- the stages (run in worker processes) ------------------------------------------------------
PATH_KEYS = ("model", "recipe")  # the job results that name files


def _portable(result: dict, run: Path) -> dict:
    """``result`` with the paths inside the run folder relative to it, so the folder can move."""
    inside = lambda v: Path(v).resolve().is_relative_to(run.resolve())  # noqa: E731
    return {k: os.path.relpath(Path(v).resolve(), run.resolve()) if k in PATH_KEYS and inside(v) else v for k, v in result.items()}


class _Context:
    def __init__(self, run_dir: Path, settings: DemoSettings, log: Callable[[str], None]):
        self.run, self.s, self.log = run_dir, settings, log

    def result(self, job: str) -> dict:
        """A finished job's result, its paths inside the run folder made absolute again (see ``_portable``)."""
        result = json.loads((self.run / "state" / f"{job}.json").read_text())["result"]
        return {k: os.path.abspath(self.run / v) if k in PATH_KEYS and not os.path.isabs(v) else v for k, v in result.items()}

    @property
    def base(self) -> str:
        return self.result("base")["model"]


def _train_summary(meta: dict) -> dict:
    keys = ("tokens", "tokens_per_dataset", "wall_seconds", "cpu_seconds", "initial_eval_loss", "final_eval_loss")
    return {"model": meta["model"], **{k: meta[k] for k in keys}}


def _base(ctx: _Context) -> dict:
    from optimer_merge.cpt.demo_base import shipped_base, shipped_record

    model, record = shipped_base(), shipped_record()  # the run folder's settings hold its sha256 (DemoSettings.base)
    link = ctx.run / "base" / "model"  # a stable path for the shipped recipes (recipes/train, recipes/search)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(model)
    keys = ("parameters", "tokens", "tokens_per_parameter", "epochs_per_source", "wall_seconds", "initial_eval_loss", "final_eval_loss")
    return {"model": str(model), **{k: record[k] for k in keys}, "cpu_seconds": record["wall_seconds"] * record["settings"].get("devices", 1)}


def _cpt(ctx: _Context, domain: str) -> dict:
    from optimer_merge.cpt import TrainConfig

    steps = -(-ctx.s.cpt_tokens // (TRAIN["seq_len"] * TRAIN["micro_batch_size"]))
    config = TrainConfig(  # checkpoints at mid-run and at the end (both kept) for the linearity measurement
        base=ctx.base, output=str(ctx.run / "cpt" / domain), token_cache=str(ctx.run / "tokens"), datasets=[{"name": domain, "source": domain}],
        max_tokens=ctx.s.cpt_tokens, lr=ctx.s.lr, seed=ctx.s.seed, progress=False, **{**TRAIN, "checkpoint_every": -(-steps // 2)},
    )  # fmt: skip
    return _train_summary(_train(config, ctx))


def _train(config, ctx: _Context) -> dict:
    """A CPT or mixture run of the demo; one that diverges says which demo setting to change."""
    from optimer_merge.cpt import train
    from optimer_merge.cpt.trainer import TrainingDiverged

    try:
        return train(config, log=ctx.log)
    except TrainingDiverged as error:
        raise DemoSettingError(f"{error.what} at --lr {config.lr:g}: lower --lr, and run the demo into another --run-dir "
                               "(a run folder keeps its settings)") from None  # fmt: skip


def _mixture(ctx: _Context, kind: str) -> dict:
    from optimer_merge.cpt import TrainConfig

    s = ctx.s
    if kind == "optimer":
        ratios = ctx.result("search-all")["best"]["mixture_ratios"]
        if not ratios:
            raise ValueError("the best OptiMer weights give no mixture ratios (one is negative, or they do not sum above 0)")
    else:
        ratios = {d: 1.0 / len(DOMAINS) for d in DOMAINS}
    tokens = len(DOMAINS) * s.cpt_tokens
    steps = -(-tokens // (TRAIN["seq_len"] * TRAIN["micro_batch_size"]))
    config = TrainConfig(
        base=ctx.base, output=str(ctx.run / "mixture" / kind), token_cache=str(ctx.run / "tokens"),
        datasets=[{"name": d, "source": d, "ratio": ratios[d]} for d in DOMAINS],
        mixture="velocitune" if kind == "velocitune" else "static",
        velocitune={"update_every": max(1, steps // 12)},
        max_tokens=tokens, lr=s.lr, seed=s.seed, progress=False, **TRAIN,
    )  # fmt: skip
    meta = _train(config, ctx)
    result = _train_summary(meta)
    if kind == "velocitune":
        proxy = meta["velocitune"].get("proxy") or {}
        result["proxy"] = proxy
        result["trajectory"] = meta["velocitune"]["trajectory"]
    return result


def _vectors(ctx: _Context) -> dict:
    from optimer_merge import vectors
    from optimer_merge.vectors.linearity import linearity
    from optimer_merge.vectors.stats import kind_summary

    out = ctx.run / "vectors"
    models = {d: ctx.result(f"cpt-{d}")["model"] for d in DOMAINS}
    manifest = vectors.extract(ctx.base, models, out, log=ctx.log)
    result = vectors.stats({d: out / manifest["vectors"][d]["file"] for d in DOMAINS}, out, base=ctx.base, log=ctx.log)
    kinds = kind_summary(result)
    return {  # the rest: stats.json
        "l2_norm": result["l2_norm"],
        "relative_norm": result["relative_norm"],
        "off_diagonal_cosine": result["off_diagonal_cosine"],
        "cosine_range_per_kind": {kind: e["cosine_range"] for kind, e in kinds.items()},
        "share_per_kind": {kind: {"parameters": e["parameters"], "norm_sq": e["norm_sq"]} for kind, e in kinds.items()},
        "linearity": {d: linearity(ctx.run / "cpt" / d) for d in DOMAINS},
    }


def search_config(ctx: _Context, objective: str):
    from optimer_merge.search import SearchConfig

    s = ctx.s
    trials = s.trials if objective == "all" else s.reopt_trials
    return SearchConfig(
        base=ctx.base,
        vectors=[{"name": d, "vector": str(ctx.run / "vectors" / f"{d}.safetensors")} for d in DOMAINS],
        objective={"tasks": [{"task": f"optimer_{d}_dev_bpb", "metric": "bits_per_byte"} for d in OBJECTIVES[objective]]},
        limit=s.limit, trials=trials,
        finalists=s.finalists, finalist_limit=s.finalist_limit, seed=s.seed, optimizer=s.optimizer,
        threads=1, parallel=min(s.search_workers, trials), output=str(ctx.run / "search" / objective),
    )  # fmt: skip


def _search(ctx: _Context, objective: str) -> dict:
    from optimer_merge.search import search

    config = search_config(ctx, objective)
    summary = search(config, export=True, log=ctx.log)
    return {"model": summary["export"], **{k: summary[k] for k in ("best", "uniform_average", "trials")}}


def write_best(run: Path, settings: DemoSettings) -> None:
    """best.yaml: the best weights of the OptiMer search on dev (all domains) over this run folder's
    CPT models, found wherever the folder has moved since the search ran."""
    from optimer_merge.search.runner import model_sources, write_best_recipe

    ctx = _Context(run, settings, print)
    config = search_config(ctx, "all")
    write_best_recipe(run / "best.yaml", config, *model_sources(config), ctx.result("search-all")["best"]["weights"])


def _average(ctx: _Context) -> dict:
    from optimer_merge.io.files import write_yaml
    from optimer_merge.merge.recipes import run_recipe
    from optimer_merge.search.runner import model_sources, trial_recipe

    config = search_config(ctx, "all")
    weights = {d: 1.0 / len(DOMAINS) for d in DOMAINS}
    recipe = ctx.run / "merges" / "average.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    write_yaml(recipe, trial_recipe(config, model_sources(config)[0], weights))
    summary = run_recipe(recipe, ctx.run / "merges" / "average", quiet=True)
    return {"model": str(ctx.run / "merges" / "average"), "weights": weights, "recipe": str(recipe), "merge_seconds": summary["seconds"]}


def _test(ctx: _Context, candidate: str) -> dict:
    from lm_eval.utils import handle_non_serializable

    from optimer_merge.evaluation.evaluator import open_evaluator

    job = next(c.job for c in CANDIDATES if c.name == candidate)
    model = ctx.result(job)["model"]
    start = time.perf_counter()
    with open_evaluator("hf", model, threads=1) as evaluator:
        results = evaluator.evaluate(TEST_TASKS, ctx.s.test_limit, quiet=True)
    results["config"]["model_args"] = f"pretrained={Path(model).resolve()}"
    out = ctx.run / "eval" / candidate
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "results.json.partial"
    partial.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    os.replace(partial, out / "results.json")
    bpb = {d: results["results"][f"optimer_{d}_test_bpb"]["bits_per_byte,none"] for d in DOMAINS}
    ctx.log(f"{model}: test bits/byte " + ", ".join(f"{d} {v:.4f}" for d, v in bpb.items()) + f" -> {out / 'results.json'}")
    return {"model": model, "bits_per_byte": bpb, "mean_bits_per_byte": sum(bpb.values()) / len(bpb), "eval_seconds": time.perf_counter() - start}


def _stage(name: str) -> Callable[[_Context], dict]:
    if name == "base":
        return _base
    if name == "vectors":
        return _vectors
    if name == "average":
        return _average
    kind, _, arg = name.partition("-")
    stages = {"cpt": _cpt, "mix": _mixture, "search": _search, "test": _test}
    return lambda ctx: stages[kind](ctx, arg)


def _stop_workers(running: dict) -> None:
    """Stop the jobs still running when the demo stops (Ctrl-C, SIGTERM, a failed job): SIGTERM
    first, so a training job saves a checkpoint at the end of its step, then SIGKILL for every
    worker, busy or idle (a pool whose worker died mid-queue would wait for the others forever)."""
    workers = multiprocessing.active_children()
    for worker in workers:
        worker.terminate()
    wait(running, timeout=STOP_GRACE_SECONDS)
    for worker in workers:
        worker.kill()
        worker.join()


def _worker_init() -> None:
    """Workers die with the demo process (Linux), so a killed demo leaves no stray training."""
    import signal

    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_job(run_dir: str, settings: dict, name: str) -> dict:
    """Run one job in this process, output to logs/<name>.log; writes state/<name>.json when done."""
    import torch

    from optimer_merge.io.quiet import redirect_fds

    run = Path(run_dir)
    (run / "logs").mkdir(exist_ok=True)
    torch.set_num_threads(1)
    with open(run / "logs" / f"{name}.log", "a", encoding="utf-8", buffering=1) as handle:
        log = lambda message: print(message, file=handle, flush=True)  # noqa: E731
        ctx = _Context(run, DemoSettings(**settings), log)
        wall, cpu = time.perf_counter(), time.process_time()
        log(f"== {name} ({time.strftime('%Y-%m-%d %H:%M:%S')})")
        with redirect_fds(handle.fileno()):
            try:
                result = _stage(name)(ctx)
            except BaseException:
                traceback.print_exc(file=handle)
                raise
        state = {"job": name, "seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu, "result": _portable(result, run)}
    (run / "state").mkdir(exist_ok=True)
    partial = run / "state" / f"{name}.json.partial"
    partial.write_text(json.dumps(state, indent=2))
    os.replace(partial, run / "state" / f"{name}.json")
    return state


# -- the scheduler (the demo process) ----------------------------------------------------------
def _summary_line(name: str, state: dict) -> str:
    r = state["result"]
    if name.startswith("test-"):
        return f"test mean bits/byte {r['mean_bits_per_byte']:.4f}"
    if name.startswith("search-"):
        w = " ".join(f"{d}={v:.2f}" for d, v in r["best"]["weights"].items())
        return f"best dev score {r['best']['score']:.4f} [{w}]"
    if "final_eval_loss" in r:
        losses = ", ".join(f"{d} {r['initial_eval_loss'][d]:.2f}->{v:.2f}" for d, v in r["final_eval_loss"].items())
        return f"{r['tokens']:,} tokens, held-out loss {losses}"
    if name == "vectors":
        return "norms " + " ".join(f"{d}={v:.2f}" for d, v in r["l2_norm"].items())
    return "done"


HEARTBEAT_SECONDS = 60.0
STOP_GRACE_SECONDS = 120.0  # for running jobs to stop cleanly (a training step and its checkpoint)


def _progress(run: Path, settings: DemoSettings, name: str) -> str:
    """How far a running job is, from the files it writes (metrics.csv rows, trials.jsonl lines)."""
    kind, _, arg = name.partition("-")
    if kind == "search":
        path = run / "search" / arg / "trials.jsonl"
        total = settings.trials if arg == "all" else settings.reopt_trials
        return f"trial {sum(1 for _ in open(path)) if path.exists() else 0}/{total}"
    folder, tokens = {
        "cpt": (run / "cpt" / arg, settings.cpt_tokens),
        "mix": (run / "mixture" / arg, len(DOMAINS) * settings.cpt_tokens),
    }.get(kind, (None, 0))
    path = folder / "metrics.csv" if folder else None
    if path and path.exists():
        step = path.read_text().strip().splitlines()[-1].split(",")[0]
        if step.isdigit():
            return f"step {step}/{-(-tokens // (TRAIN['seq_len'] * TRAIN['micro_batch_size']))}"
    return "running"


@contextlib.contextmanager
def job_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """The worker processes that run the jobs; a multi-seed demo keeps them for every seed (each
    worker imports torch, transformers and lm-eval once)."""
    context = multiprocessing.get_context("spawn")
    # the semaphore tracker (started with the pool, with these warning options) would report the
    # pool's locks as "leaked" after a stop that kills the workers: nothing a user can act on
    if "ignore:resource_tracker:UserWarning" not in sys.warnoptions:
        sys.warnoptions.append("ignore:resource_tracker:UserWarning")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init) as pool:
        yield pool


def run_demo(run_dir: str | Path, settings: DemoSettings, log: Callable[[str], None] = print, pool: ProcessPoolExecutor | None = None) -> dict:
    """Run (or resume) every job of the demo, in ``pool`` or in a pool of its own; returns {job: state}."""
    from optimer_merge.io.files import write_json
    from optimer_merge.io.run_folder import RunFolder

    run = Path(run_dir).resolve()
    with RunFolder(run, "demo", fix="choose another --run-dir or delete this one") as folder:
        folder.check(SETTINGS_RECORD, settings.identity(), added=DemoSettings.ADDED)
        folder.record(SETTINGS_RECORD, settings.identity(), settings=settings.model_dump())
        folder.keep()
        log(f"OptiMer demo into {run} ({settings.workers} workers); each job logs to {run}/logs/")
        start, ran = time.perf_counter(), []
        try:
            with contextlib.nullcontext(pool) if pool is not None else job_pool(settings.workers) as jobs:
                return _schedule(run, settings, log, ran, jobs)
        finally:
            if ran:  # wall time of every invocation that did work, for the report
                path = run / "invocations.json"
                items = json.loads(path.read_text()) if path.exists() else []
                items.append({"ended": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": time.perf_counter() - start, "jobs": ran})
                write_json(path, items)


def _schedule(run: Path, settings: DemoSettings, log: Callable[[str], None], ran: list[str], pool: ProcessPoolExecutor) -> dict:
    jobs = plan(settings)
    states = {}
    for job in jobs:
        path = run / "state" / f"{job.name}.json"
        if path.exists():
            states[job.name] = json.loads(path.read_text())
    if states:
        log(f"resuming {run}: {len(states)} of {len(jobs)} jobs already done")
    start = time.perf_counter()
    started: dict[str, float] = {}

    def left() -> str:
        now = time.perf_counter()
        seconds = eta(jobs, states, {name: now - started[name] for name in running.values()},
                      {name: states[name]["seconds"] for name in ran}, settings.workers)  # fmt: skip
        return f"ETA {duration(seconds)}"

    running: dict = {}
    try:
        while len(states) < len(jobs):
            for job in jobs:
                if len(running) >= settings.workers:
                    break
                if job.name in states or job.name in running.values() or not all(d in states for d in job.deps):
                    continue
                log(f"  start  {job.name}: {job.what}")
                running[pool.submit(run_job, str(run), settings.model_dump(), job.name)] = job.name
                started[job.name] = time.perf_counter()
            if not running:
                raise RuntimeError("no job can start (a dependency cycle?)")
            finished, _ = wait(running, timeout=HEARTBEAT_SECONDS, return_when=FIRST_COMPLETED)
            if not finished:
                log("  ... " + "; ".join(f"{name} {_progress(run, settings, name)}" for name in running.values()) + f"; {left()}")
            for future in finished:
                name = running.pop(future)
                try:
                    states[name] = future.result()
                    ran.append(name)
                except UserError as error:  # the settings, not a bug: one line
                    raise DemoSettingError(f"{name}: {error} (its log: {run / 'logs' / f'{name}.log'})") from None
                except Exception as error:
                    job_log = run / "logs" / f"{name}.log"
                    tail = job_log.read_text(errors="replace")[-3000:] if job_log.exists() else ""
                    raise DemoJobFailed(f"{name} failed: {type(error).__name__}: {error}\n--- end of {job_log} ---\n{tail}") from None
                elapsed = time.perf_counter() - start
                done = f"{elapsed / 60:.1f} min in" + (f", {left()}" if len(states) < len(jobs) else "")
                log(f"[{len(states)}/{len(jobs)}] {name} ({states[name]['seconds']:.0f}s, {done}): {_summary_line(name, states[name])}")
    except BaseException:
        _stop_workers(running)
        raise
    return states
