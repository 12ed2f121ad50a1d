"""The OptiMer search: propose weights, merge in memory into the live evaluator, score, record.

Run folder::

    search_config.json   the config and the identity a resume must match
    trials.jsonl         one line per finished trial (the source of truth; appended, fsynced)
    recipes/trial-NNNN.yaml  each trial as a stock mergekit recipe
    finalists.jsonl      the top trials re-scored at the finalist limit
    best.yaml            the winner as a stock mergekit recipe
    summary.json         best weights, the same as mixture ratios, finalists at both limits
    trace.png, weights.png
    best-model/          with export: the winner merged by stock mergekit

Resume: the optimizers are deterministic for a seed, so a rerun rebuilds the optimizer and
replays the log (asking again must give the logged weights; the logged value is told back),
then continues. A trial killed midway left no line and runs again; a torn last line is dropped;
a damaged line inside the log is run again in place. Failed trials at the end of the log are
retried when an operational setting (threads, batch size, dtype, ...) changed since they ran.
One search runs in a folder at a time.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from optimer_merge.errors import UserError
from optimer_merge.io.checkpoints import Checkpoint, check_tokenizer, fingerprint
from optimer_merge.io.files import atomic_write_text, check_free_space, write_json, write_yaml
from optimer_merge.io.jsonl import append_jsonl, read_jsonl
from optimer_merge.io.progress import duration
from optimer_merge.io.run_folder import RunFolder
from optimer_merge.search.config import LARGE_BOUND, SearchConfig
from optimer_merge.search.optimizers import make_optimizer
from optimer_merge.search.workers import score_all

RECORD = "search_config.json"


def input_fingerprints(config: SearchConfig, objective) -> dict[str, str]:
    """What the trials' scores depend on besides the settings: the weights of the base and of each
    vector's source, and the objective's reference results (their contents, wherever they lie, so a
    resumed search cannot mix trials of two pools)."""
    import hashlib

    found = {"base": fingerprint(config.base)}
    found.update({f"vector {v.name}": fingerprint(v.model or v.vector) for v in config.vectors})
    reference = objective.reference
    if isinstance(reference, str):
        found["objective reference"] = hashlib.sha256(Path(reference).read_bytes()).hexdigest()[:16]
    return found


class SearchError(UserError, RuntimeError):
    """The search cannot go on (failures, a diverged replay, models a recipe needs are gone)."""


def trial_recipe(config: SearchConfig, sources: dict[str, str], weights: dict[str, float], out_dtype: str | None = None) -> dict:
    """A stock mergekit recipe computing base + sum_i w_i (theta_i - base) with these weights."""
    recipe = {
        "merge_method": "optimer",
        "base_model": str(Path(config.base).resolve()),
        "models": [{"model": sources[n], "parameters": {"weight": float(weights[n])}} for n in config.names],
        "parameters": {"scale": 1.0, "normalize": False},
        "dtype": "float32",
    }
    if out_dtype:
        recipe["out_dtype"] = out_dtype
    return recipe


def model_sources(config: SearchConfig) -> tuple[dict[str, str], list[str]]:
    """The model folder behind each vector (recipes merge models, not vector files), and the names
    whose model no longer exists there; two sources from one model are refused."""
    from optimer_merge.vectors.checks import same_path, source_model

    sources, missing = {}, []
    for v in config.vectors:
        source = v.model or source_model(v.vector)
        if not source:
            raise SearchError(f"vector {v.name}: {v.vector} does not record its model, so no recipe can name it")
        sources[v.name] = str(Path(source).resolve())
        if not (Path(source) / "config.json").exists():
            missing.append(v.name)
    if repeated := same_path(sources):
        (name, other), kinds = repeated, {v.name: "model" if v.model else "vector" for v in config.vectors}
        raise SearchError(f"{kinds[name]} {name} and {kinds[other]} {other} both come from the model {sources[name]}: only the sum of "
                          "their weights would matter, and best.yaml would list that model twice; give it once")  # fmt: skip
    return sources, missing


def search(config: SearchConfig, *, export: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run (or resume, or extend) the search described by ``config``; returns summary.json's content.

    Everything that can be wrong is checked before the first trial (tasks and metrics, bounds,
    vectors, the run folder, models an export needs); a search refused then leaves no folder."""
    objective = config.load_objective()
    objective.check()
    check_tokenizer(config.base, "base")  # the trials evaluate it with its tokenizer
    if config.ray_address:
        from optimer_merge.search.workers import check_ray_address

        check_ray_address(config.ray_address)
    if config.backend == "vllm":
        from optimer_merge.evaluation.vllm_backend import check_executor

        check_executor(config.executor)
    if config.large_bounds():
        log(f"warning: bounds of {', '.join(config.large_bounds())} reach beyond +-{LARGE_BOUND:g}: "
            "such merges move the base many times further than its CPT did")  # fmt: skip
    if config.finalists and config.limit is not None and config.finalist_limit is not None and config.finalist_limit < config.limit:
        log(f"warning: finalist_limit {config.finalist_limit} is below limit {config.limit}: the finalists are re-scored on "
            "fewer items than every trial saw, and the best is picked on that noisier score")  # fmt: skip
    out = Path(config.output)
    with RunFolder(out, "search") as folder:
        identity = config.identity(objective)  # the objective file is read once (it may be a pipe)
        resumed = folder.check(RECORD, SearchConfig.without_paths(identity), ignore=config.may_differ_on_resume(), added=SearchConfig.ADDED,
                               normalize=SearchConfig.without_paths)  # fmt: skip
        from optimer_merge.search.pool import check_sources

        spec = check_sources(config.base, {v.name: ({"model": v.model} if v.model else {"vector": v.vector}) for v in config.vectors},
                             pool_dtype=config.pool_dtype, placement=config.pool_device)  # fmt: skip
        sources, missing = model_sources(config)  # after the check: a model given as a vector source exists
        if missing:
            gone = ", ".join(f"{n} ({sources[n]})" for n in missing)
            if export:
                raise SearchError(f"--export needs the models behind the vectors, and these no longer exist: {gone}")
            log(f"warning: the models behind {gone} no longer exist; best.yaml names them and cannot be merged until they are back")
        if export:
            from optimer_merge.merge.recipes import check_merge_target

            check_merge_target(out / "best-model")  # what holds it now may be replaced at the end
            size = Checkpoint.open(config.base).size_as(config.out_dtype)
            check_free_space(out / "best-model", size, "--export")
        inputs = input_fingerprints(config, objective)
        earlier = json.loads((out / RECORD).read_text()).get("inputs", {}) if resumed else {}  # runs before this record: {}
        changed = [key for key, value in inputs.items() if earlier.get(key, value) != value]
        if changed:
            raise SearchError(f"{out} holds trials scored with other weights or reference results: {', '.join(changed)} changed since "
                              "(new content, at the same path or another); choose another output folder")  # fmt: skip
        folder.record(RECORD, identity, config=config.model_dump(mode="json"), inputs=inputs)
        (out / "recipes").mkdir(exist_ok=True)
        # trials score against the reference as it is now, even if its file is rewritten during the search
        return _Search(config, objective.resolved(), spec, sources, missing, out, log, folder).run(export, objective)


def _recipe(number: int) -> str:
    """Where trial ``number``'s mergekit recipe is, in the search folder."""
    return f"recipes/trial-{number:04d}.yaml"


class _Proposals:
    """The optimizer's proposals, numbered in order. Trial m + ``lag`` is asked right after trial m
    is told (trials 1..lag at the start), and trials are told in order, whatever the timing: a
    replay repeats the same asks and tells, so a resumed search proposes what an uninterrupted one
    does. With N workers the lag is N + 1: a proposal waits ready for the first worker that frees
    up, and the optimizer works while the trials run. One worker: lag 1 (ask, run, tell)."""

    def __init__(self, optimizer, lag: int):
        self.optimizer, self.lag = optimizer, lag
        self.asked: dict[int, dict] = {}  # trial number -> weights, not told yet
        self.seconds: dict[int, float] = {}  # trial number -> seconds its ask took
        self.told = 0
        self._ask_through(lag)

    def _ask_through(self, last: int) -> None:
        while (number := self.told + len(self.asked) + 1) <= last:
            start = time.perf_counter()
            self.asked[number] = self.optimizer.ask()
            self.seconds[number] = time.perf_counter() - start

    def tell(self, number: int, value: float) -> float:
        """Tell trial ``number`` (the next in order) and ask the one ``lag`` after it; returns the
        seconds the optimizer spent on this trial (its ask and its tell)."""
        assert number == self.told + 1, (number, self.told)
        start = time.perf_counter()
        self.optimizer.tell(self.asked.pop(number), value)
        self.told = number
        spent = self.seconds.pop(number) + time.perf_counter() - start
        self._ask_through(number + self.lag)
        return spent


class _Search:
    """One search in its locked folder: the replay, the trials on ``parallel`` workers, the
    finalists, the summary."""

    def __init__(self, config: SearchConfig, objective, spec, sources, missing, out: Path, log, folder: RunFolder):
        self.config, self.objective, self.spec, self.sources, self.missing = config, objective, spec, sources, missing
        self.out, self.log, self.folder = out, log, folder
        self.trials_path = out / "trials.jsonl"
        self.workers = None
        self.durations: list[float] = []  # seconds of each trial run by this process

    # -- evaluation ---------------------------------------------------------------------------
    def get_workers(self):
        """The trial workers with their pools loaded (once; their refusals come before the first trial)."""
        if self.workers is None:
            from optimer_merge.search.workers import open_workers

            c = self.config
            portable = c.model_copy(update={"objective": self.objective, "base": str(Path(c.base).resolve())})
            self.workers = open_workers(portable, self.spec, log=self.log)
            if self.workers.relative_norms:
                self.log("||v|| / ||base||: " + ", ".join(f"{n} {v:.3g}" for n, v in self.workers.relative_norms.items()))
            self.folder.keep()
        return self.workers

    def run_trials(self, proposals: _Proposals, records: list[dict]) -> None:
        """Run trials up to ``trials``: each proposal starts as soon as a worker is idle; finished
        trials are told, logged and printed in proposal order (a trial done early waits for those
        before it; its worker meanwhile runs the next proposal)."""
        c = self.config
        if len(records) >= c.trials:
            return  # a finished search loads no model
        workers = self.get_workers()
        finished: dict[int, dict] = {}
        upcoming = len(records) + 1  # the next trial to start

        def start_ready() -> None:
            nonlocal upcoming
            while upcoming <= c.trials and upcoming in proposals.asked and workers.idle():
                weights = proposals.asked[upcoming]
                write_yaml(self.out / _recipe(upcoming), trial_recipe(c, self.sources, weights))
                workers.start(upcoming, weights, c.limit)
                upcoming += 1

        while len(records) < c.trials:
            start_ready()
            number, outcome = workers.wait()
            finished[number] = outcome
            start_ready()  # the worker just freed takes a proposal ready for it before the optimizer tells and asks
            while (number := len(records) + 1) in finished:
                record = self._told(proposals, number, finished.pop(number), records)
                append_jsonl(self.trials_path, record)
                self.log(self._trial_line(record, records))
                _check_failures(records, c.max_consecutive_failures)

    def _told(self, proposals: _Proposals, number: int, outcome: dict, records: list[dict]) -> dict:
        """A finished trial told to the optimizer (a failure as a value worse than any so far) and
        appended to ``records``."""
        weights = proposals.asked[number]
        told = outcome["score"] if outcome["status"] == "ok" else _crash_value(records)
        outcome["seconds"]["optimizer"] = proposals.tell(number, told)
        self.durations.append(sum(outcome["seconds"].values()))
        record = {"trial": number, "weights": weights, **outcome, "told": told, "limit": self.config.limit,
                  "recipe": _recipe(number), "finished_at": time.time()}  # fmt: skip
        records.append(record)
        return record

    # -- the loop -----------------------------------------------------------------------------
    def replay(self, proposals: _Proposals) -> list[dict]:
        """Bring the optimizer to where the log ends, telling the trials in order as the run did;
        damaged lines are run again in place. Returns the records."""
        c = self.config
        logged = read_jsonl(self.trials_path, holes=True)
        retry = self._failed_tail(logged)
        if retry:
            logged = logged[: len(logged) - retry]
            atomic_write_text(self.trials_path, "".join(json.dumps(r) + "\n" for r in logged))
        records: list[dict] = []
        repaired = False
        for number, record in enumerate(logged, 1):
            weights = proposals.asked[number]
            if record is None:
                self.log(f"trial {number}: a damaged line in {self.trials_path}; running it again")
                workers = self.get_workers()
                workers.start(number, weights, c.limit)
                self._told(proposals, number, workers.wait()[1], records)
                repaired = True
                continue
            if any(not math.isclose(weights[k], record["weights"][k], rel_tol=1e-9, abs_tol=1e-12) for k in c.names):
                raise SearchError(
                    f"resume: the optimizer proposed {weights} for trial {number}, the log has "
                    f"{record['weights']}; the installed optimizer gives other proposals than the one that "
                    "wrote this log (a different version?). Start a new output folder."
                )
            proposals.tell(number, record["told"])
            records.append(record)
        if repaired:
            atomic_write_text(self.trials_path, "".join(json.dumps(r) + "\n" for r in records))
        if records:
            done = f"{len(records)} trial{'s' if len(records) > 1 else ''} already done"
            if len(records) > self.config.trials:
                done += f" (more than trials {self.config.trials}: the results cover all {len(records)})"
            self.log(f"resumed {self.out}: {done}")
        return records

    def _failed_tail(self, records: list[dict | None]) -> int:
        """How many failed trials at the end of the log to run again: all of them, if an
        operational setting changed since they ran (the fix for an out-of-memory or a bad dtype)."""
        tail = []
        for record in reversed(records):
            if record is None or record["status"] == "ok":
                break
            tail.append(record)
        now = self.config.operational()
        changed = sorted({k for r in tail for k, v in now.items() if r.get("settings", {}).get(k) != v})
        if tail and changed:
            self.log(f"retrying the {len(tail)} failed trial(s) at the end of the log: {', '.join(changed)} changed since")
            for record in reversed(tail):
                append_jsonl(self.out / "trials.retried.jsonl", record)
            return len(tail)
        return 0

    def run(self, export: bool, given_objective) -> dict:
        """The search; ``given_objective``: the objective as given (its reference a path), for the summary."""
        c, out = self.config, self.out
        bounds = {v.name: c.bounds_of(v) for v in c.vectors}
        optimizer = make_optimizer(c.optimizer, bounds, c.seed, out / "smac", c.initial_points, c.acquisition.model_dump())
        try:
            proposals = _Proposals(optimizer, 1 if c.parallel == 1 else c.parallel + 1)
            records = self.replay(proposals)
            _check_failures(records, c.max_consecutive_failures)
            self.run_trials(proposals, records)
            finalists = self.finalists(records)
        finally:
            if self.workers is not None:
                self.workers.close()
        summary = _summarize(c, given_objective, self.sources, self.missing, records, finalists, out)
        if export:
            from optimer_merge.merge.recipes import run_recipe

            target, recipe = out / "best-model", (out / "best.yaml").read_text()
            exported = target / "mergekit_config.yml"  # the recipe a finished export was made from
            if exported.is_file() and exported.read_text() == recipe:
                self.log(f"{target} already holds the merge of best.yaml; not merged again")
            else:
                self.log(f"exporting the best merge with mergekit -> {target}")
                run_recipe(out / "best.yaml", target, quiet=not sys.stderr.isatty())  # mergekit's progress bar on a terminal
            summary["export"] = str(target)
            write_json(out / "summary.json", summary)
        return summary

    def _trial_line(self, record: dict, records: list[dict]) -> str:
        ok = [r["score"] for r in records if r["status"] == "ok"]
        weights = " ".join(f"{n}={w:.3f}" for n, w in record["weights"].items())
        s = record["seconds"]
        timing = f"merge {s.get('merge', 0):.2f}s eval {s.get('eval', 0):.1f}s opt {s.get('optimizer', 0):.2f}s"
        left = self.config.trials - record["trial"]
        per_trial = statistics.median(self.durations) / self.config.parallel if self.durations else 0.0
        eta = f", ETA {duration(left * per_trial)}" if left and self.durations else ""
        state = self.workers.state() if self.workers is not None else ""
        head = f"trial {record['trial']}/{self.config.trials}"
        tail = f" [{weights}] {timing}{eta}" + (f"; {state}" if state else "")
        if record["status"] != "ok":
            return f"{head} FAILED: {record['reason']}{tail}"
        return f"{head} score {record['score']:.5f} (best {max(ok):.5f}){tail}"

    def _finalist_line(self, i: int, n: int, trial: dict, outcome: dict, elapsed: float) -> str:
        """One line per re-scored finalist, with an ETA from the finalists' pace so far."""
        head = f"finalist {i}/{n}: trial {trial['trial']}"
        eta = f", ETA {duration(elapsed / i * (n - i))}" if i < n else ""
        s = outcome["seconds"]
        timing = f"merge {s.get('merge', 0):.2f}s eval {s.get('eval', 0):.1f}s"
        if outcome["status"] != "ok":
            return f"{head} FAILED: {outcome['reason']} {timing}{eta}"
        return f"{head} score {outcome['score']:.5f} at limit {self.config.finalist_limit} ({trial['score']:.5f} at {self.config.limit}) {timing}{eta}"

    def finalists(self, records: list[dict]) -> list[dict]:
        """Re-score the top trials at the finalist limit, side by side on the workers (each once;
        logged so a rerun reuses them)."""
        c = self.config
        ok = sorted((r for r in records if r["status"] == "ok"), key=lambda r: (-r["score"], r["trial"]))
        top = ok[: c.finalists]
        every_item = c.finalist_limit != c.limit and all(_every_item(r, c.limit) for r in top)
        if top and every_item:
            scored = "limit null" if c.limit is None else f"every task has fewer than {c.limit} items"
            self.log(f"finalists: the trials scored every item ({scored}); finalist_limit {c.finalist_limit} "
                     "would score no new ones: the finalists keep their trial scores")  # fmt: skip
        if c.finalist_limit == c.limit or every_item:
            return [{"trial": r["trial"], "weights": r["weights"], "score": r["score"], "final_score": r["score"], "rescored": False, "metrics": r["metrics"]} for r in top]
        path = self.out / "finalists.jsonl"
        done = {(r["trial"], r["limit"]): r for r in read_jsonl(path)}  # a later line (a retry) wins
        now = c.operational()
        # failed under settings since changed (the fix for an out-of-memory): scored again
        done = {k: r for k, r in done.items() if r["status"] == "ok" or r.get("settings") == now}
        todo = [r for r in top if (r["trial"], c.finalist_limit) not in done]
        if todo:
            self.log(f"finalists: trials {', '.join(str(r['trial']) for r in todo)} at limit {c.finalist_limit}")
            start = time.perf_counter()
            outcomes = score_all(self.get_workers(), [(r["weights"], c.finalist_limit) for r in todo])
            for i, (r, outcome) in enumerate(zip(todo, outcomes), 1):
                done[(r["trial"], c.finalist_limit)] = {"trial": r["trial"], "limit": c.finalist_limit, **outcome}
                append_jsonl(path, done[(r["trial"], c.finalist_limit)])
                self.log(self._finalist_line(i, len(todo), r, outcome, time.perf_counter() - start))
        finalists = []
        for r in top:
            f = done[(r["trial"], c.finalist_limit)]
            finalists.append({"trial": r["trial"], "weights": r["weights"], "score": r["score"], "final_score": f["score"], "rescored": True, "metrics": f["metrics"], "status": f["status"], "reason": f.get("reason")})
            if f["status"] != "ok":
                self.log(f"warning: finalist trial {r['trial']} failed at limit {c.finalist_limit} ({f['reason']}); the best is picked "
                         "without it. If a setting caused it, fix it and rerun: it is then scored again")  # fmt: skip
        return finalists


def _every_item(record: dict, limit: int | None) -> bool:
    """Whether a trial scored every item of every task (no limit, or each task had fewer items), so
    no finalist limit scores new ones; records from before items were logged say no."""
    items = record.get("items")
    return limit is None or (bool(items) and all(n < limit for n in items.values()))


def _crash_value(records: list[dict]) -> float:
    """What the optimizer is told for a failed trial: clearly worse than anything seen so far."""
    scores = [r["score"] for r in records if r["status"] == "ok"]
    if not scores:
        return -1.0
    spread = max(scores) - min(scores)
    return min(scores) - max(spread, 0.1 * abs(min(scores)), 1e-3)


def _check_failures(records: list[dict], limit: int) -> None:
    run = 0
    for record in reversed(records):
        if record["status"] == "ok":
            break
        run += 1
    if run >= limit:
        raise SearchError(
            f"stopped after {run} consecutive failed trials; the last: {records[-1]['reason']}. If a setting caused "
            "them (threads, batch_size, dtype, ...), fix it and rerun: the failed trials are then run again"
        )


def write_best_recipe(path: Path, config: SearchConfig, sources: dict[str, str], missing: list[str], weights: dict[str, float]) -> None:
    """The merge of these weights as a stock mergekit recipe in the output dtype, headed by a warning
    for each model that no longer exists (``model_sources``)."""
    from optimer_merge.io.checkpoints import saved_dtype

    header = "\n".join(f"WARNING: the model behind vector {n} ({sources[n]}) no longer exists; restore it before merging this recipe." for n in missing)
    write_yaml(path, trial_recipe(config, sources, weights, config.out_dtype or saved_dtype(config.base)), header or None)


def _summarize(config: SearchConfig, objective, sources: dict, missing: list[str], records: list[dict], finalists: list[dict], out: Path) -> dict:
    from optimer_merge.search.plots import plot_trace, plot_weights

    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        raise SearchError("no trial succeeded; see trials.jsonl for the reasons")
    scored = [f for f in finalists if f.get("final_score") is not None]
    if scored:
        best = max(scored, key=lambda f: (f["final_score"], f["score"]))
    else:
        top = max(ok, key=lambda r: r["score"])
        best = {"trial": top["trial"], "weights": top["weights"], "score": top["score"], "final_score": None, "rescored": False, "metrics": top["metrics"]}
    weights = best["weights"]
    ratios = mixture_ratios(weights)
    write_best_recipe(out / "best.yaml", config, sources, missing, weights)
    uniform = next((r for r in records if r["status"] == "ok" and _is_uniform(r["weights"], config)), None)
    seconds = {k: sum(r["seconds"].get(k, 0.0) for r in records) for k in ("merge", "eval", "optimizer")}
    summary = {
        "best": {"trial": best["trial"], "weights": weights, "mixture_ratios": ratios, "score": best["score"], "final_score": best["final_score"],
                 "rescored": best["rescored"], "metrics": best.get("metrics")},
        "uniform_average": {"trial": uniform["trial"], "weights": uniform["weights"], "score": uniform["score"]} if uniform else None,
        "best_trial_at_proxy_limit": max(ok, key=lambda r: r["score"])["trial"],
        "finalists": finalists,
        "limit": config.limit,
        "finalist_limit": config.finalist_limit,
        "trials": len(records),
        "failed_trials": len(records) - len(ok),
        "trials_to_99pct_of_best": _trials_to_fraction(records, 0.99),
        "seconds": seconds,
        "optimizer": config.optimizer,
        "seed": config.seed,
        "objective": objective.model_dump(mode="json"),
        "vectors": sources,
        "missing_models": {n: sources[n] for n in missing},
        "best_recipe": "best.yaml",
    }
    write_json(out / "summary.json", summary)
    plot_trace(records, out / "trace.png")
    plot_weights(weights, ratios, out / "weights.png")
    return summary


def mixture_ratios(weights: dict[str, float]) -> dict[str, float] | None:
    """The weights read as data-mixture ratios (w_i / sum w); None where no mixture reads them so
    (a negative weight, or a sum that is not positive)."""
    total = sum(weights.values())
    if total <= 1e-12 or any(w < 0 for w in weights.values()):
        return None
    return {n: w / total for n, w in weights.items()}


def _is_uniform(weights: dict[str, float], config: SearchConfig) -> bool:
    from optimer_merge.search.optimizers import uniform_point

    target = uniform_point({v.name: config.bounds_of(v) for v in config.vectors})
    return all(math.isclose(weights[n], target[n], abs_tol=1e-9) for n in target)


def _trials_to_fraction(records: list[dict], fraction: float) -> int | None:
    """Trials until the best-so-far reached ``fraction`` of the way from the worst to the best score
    (scores can be negative, so "99 % of the best" is measured on the observed range)."""
    scores = [(r["trial"], r["score"]) for r in records if r["status"] == "ok"]
    if not scores:
        return None
    best, worst = max(s for _, s in scores), min(s for _, s in scores)
    target = worst + fraction * (best - worst)
    return next(t for t, s in scores if s >= target)
