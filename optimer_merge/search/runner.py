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
import time
from pathlib import Path
from typing import Callable

from optimer_merge.errors import UserError
from optimer_merge.io.files import atomic_write_text, write_json, write_yaml
from optimer_merge.io.jsonl import append_jsonl, read_jsonl
from optimer_merge.io.run_folder import RunFolder
from optimer_merge.search.config import LARGE_BOUND, SearchConfig
from optimer_merge.search.optimizers import make_optimizer

RECORD = "search_config.json"


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
    whose model no longer exists there."""
    from optimer_merge.io.checkpoints import Checkpoint

    sources, missing = {}, []
    for v in config.vectors:
        source = v.model or Checkpoint.open(v.vector).metadata.get("source")
        if not source:
            raise SearchError(f"vector {v.name}: {v.vector} does not record its model, so no recipe can name it")
        sources[v.name] = str(Path(source).resolve())
        if not (Path(source) / "config.json").exists():
            missing.append(v.name)
    return sources, missing


def search(config: SearchConfig, *, export: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run (or resume, or extend) the search described by ``config``; returns summary.json's content.

    Everything that can be wrong is checked before the first trial (tasks and metrics, bounds,
    vectors, the run folder, models an export needs); a search refused then leaves no folder."""
    objective = config.load_objective()
    objective.check()
    if config.large_bounds():
        log(f"warning: bounds of {', '.join(config.large_bounds())} reach beyond +-{LARGE_BOUND:g}: "
            "such merges move the base many times further than its CPT did")  # fmt: skip
    out = Path(config.output)
    with RunFolder(out, "search") as folder:
        folder.check(RECORD, config.identity(), ignore=SearchConfig.OPERATIONAL)
        sources, missing = model_sources(config)
        if missing:
            gone = ", ".join(f"{n} ({sources[n]})" for n in missing)
            if export:
                raise SearchError(f"--export needs the models behind the vectors, and these no longer exist: {gone}")
            log(f"warning: the models behind {gone} no longer exist; best.yaml names them and cannot be merged until they are back")
        from optimer_merge.search.pool import check_sources

        spec = check_sources(config.base, {v.name: ({"model": v.model} if v.model else {"vector": v.vector}) for v in config.vectors},
                             pool_dtype=config.pool_dtype, placement=config.pool_device)  # fmt: skip
        folder.record(RECORD, config.identity(), config=config.model_dump(mode="json"))
        (out / "recipes").mkdir(exist_ok=True)
        return _Search(config, objective, spec, sources, missing, out, log, folder).run(export)


class _Search:
    """One search in its locked folder: the replay, the trials, the finalists, the summary."""

    def __init__(self, config: SearchConfig, objective, spec, sources, missing, out: Path, log, folder: RunFolder):
        self.config, self.objective, self.spec, self.sources, self.missing = config, objective, spec, sources, missing
        self.out, self.log, self.folder = out, log, folder
        self.trials_path = out / "trials.jsonl"
        self.evaluator = None
        self.host_pool = None  # the push fallback's pool, in this process
        self.durations: list[float] = []  # seconds of each trial run by this process

    # -- evaluation ---------------------------------------------------------------------------
    def get_evaluator(self):
        """The evaluator with the pool loaded (once; its refusals come before the first trial)."""
        if self.evaluator is None:
            from optimer_merge.evaluation.evaluator import open_evaluator
            from optimer_merge.search.pool import build_host_pool

            c = self.config
            self.log(f"loading {c.base} on {c.backend}")
            settings = c.evaluator_settings()
            if c.backend == "vllm":
                settings["pool"] = self.spec
            self.evaluator = open_evaluator(c.backend, c.base, log=self.log, **settings)
            if c.weight_update == "push":
                self.host_pool = build_host_pool(self.spec, log=self.log)
            else:
                info = self.evaluator.build_pool(self.spec)
                if info.get("nonfinite"):
                    from optimer_merge.vectors.checks import VectorError

                    raise VectorError(f"NaN/Inf values in {', '.join(info['nonfinite'][:3])}")
            pool = self.host_pool or getattr(self.evaluator, "pool", None)
            if pool is not None and pool.relative_norms:
                self.log("||v|| / ||base||: " + ", ".join(f"{n} {v:.3g}" for n, v in pool.relative_norms.items()))
            self.folder.keep()
        return self.evaluator

    def score(self, weights: dict[str, float], limit: int | None) -> dict:
        """Merge in memory and score; a failure is returned as a reason, never raised."""
        c = self.config
        ev = self.get_evaluator()
        result = {"status": "ok", "reason": None, "score": None, "metrics": {}, "seconds": {}, "settings": c.operational()}
        start = time.perf_counter()
        try:
            if self.host_pool is not None:  # the explicit fallback: whole merged tensors
                ev.load_state_dict(dict(self.host_pool.merged(weights)))
            else:
                ev.set_weights(weights)
            result["bytes_sent"] = getattr(ev, "bytes_sent", 0)
        except Exception as error:  # noqa: BLE001 - recorded, the search goes on
            result.update(status="failed", reason=f"merge failed: {type(error).__name__}: {error}")
            result["seconds"]["merge"] = time.perf_counter() - start
            return result
        result["seconds"]["merge"] = time.perf_counter() - start
        start = time.perf_counter()
        try:
            results = ev.evaluate(self.objective.task_names(), limit, confirm_run_unsafe_code=c.confirm_run_unsafe_code, quiet=True)
            value, breakdown = self.objective.score(results)
            result["metrics"] = {k: v["value"] for k, v in breakdown.items()}
            if not math.isfinite(value):
                bad = [k for k, v in result["metrics"].items() if not math.isfinite(v)]
                result.update(status="failed", reason=f"score is not finite ({', '.join(bad) or value} not finite)")
            else:
                result["score"] = value
        except Exception as error:  # noqa: BLE001
            result.update(status="failed", reason=f"evaluation failed: {type(error).__name__}: {error}")
        result["seconds"]["eval"] = time.perf_counter() - start
        return result

    def trial(self, optimizer, number: int, weights: dict[str, float], records: list[dict], asked: float) -> dict:
        """Run one trial and tell the optimizer; returns its record (not yet logged)."""
        recipe_path = self.out / "recipes" / f"trial-{number:04d}.yaml"
        write_yaml(recipe_path, trial_recipe(self.config, self.sources, weights))
        outcome = self.score(weights, self.config.limit)
        told = outcome["score"] if outcome["status"] == "ok" else _crash_value(records)
        start = time.perf_counter()
        optimizer.tell(weights, told)
        outcome["seconds"]["optimizer"] = asked + time.perf_counter() - start
        self.durations.append(sum(outcome["seconds"].values()))
        return {"trial": number, "weights": weights, **outcome, "told": told, "limit": self.config.limit, "recipe": str(recipe_path.relative_to(self.out))}

    # -- the loop -----------------------------------------------------------------------------
    def replay(self, optimizer) -> list[dict]:
        """Bring the optimizer to where the log ends; damaged lines are run again in place."""
        c = self.config
        records = read_jsonl(self.trials_path, holes=True)
        retry = self._failed_tail(records)
        if retry:
            kept = records[: len(records) - retry]
            atomic_write_text(self.trials_path, "".join(json.dumps(r) + "\n" for r in kept))
            records = kept
        repaired = False
        for i, record in enumerate(records):
            weights = optimizer.ask()
            if record is None:
                self.log(f"trial {i + 1}: its line in {self.trials_path} is damaged; running it again")
                records[i] = self.trial(optimizer, i + 1, weights, records[:i], 0.0)
                repaired = True
                continue
            if any(not math.isclose(weights[n], record["weights"][n], rel_tol=1e-9, abs_tol=1e-12) for n in c.names):
                raise SearchError(
                    f"resume: the optimizer proposed {weights} for trial {record['trial']}, the log has "
                    f"{record['weights']}; the installed optimizer gives other proposals than the one that "
                    "wrote this log (a different version?). Start a new output folder."
                )
            optimizer.tell(weights, record["told"])
        if repaired:
            atomic_write_text(self.trials_path, "".join(json.dumps(r) + "\n" for r in records))
        if records:
            self.log(f"resumed {self.out}: {len(records)} trials already done")
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

    def run(self, export: bool) -> dict:
        c, out = self.config, self.out
        bounds = {v.name: c.bounds_of(v) for v in c.vectors}
        optimizer = make_optimizer(c.optimizer, bounds, c.seed, out / "smac", c.initial_points)
        try:
            records = self.replay(optimizer)
            _check_failures(records, c.max_consecutive_failures)
            for number in range(len(records) + 1, c.trials + 1):
                start = time.perf_counter()
                weights = optimizer.ask()
                record = self.trial(optimizer, number, weights, records, time.perf_counter() - start)
                append_jsonl(self.trials_path, record)
                records.append(record)
                self.log(self._trial_line(record, records))
                _check_failures(records, c.max_consecutive_failures)
            finalists = self.finalists(records)
        finally:
            if self.evaluator is not None:
                self.evaluator.close()
        summary = _summarize(c, self.sources, self.missing, records, finalists, out)
        if export:
            from optimer_merge.merge.recipes import run_recipe

            target = out / "best-model"
            self.log(f"exporting the best merge with mergekit -> {target}")
            run_recipe(out / "best.yaml", target, quiet=True)
            summary["export"] = str(target)
            write_json(out / "summary.json", summary)
        return summary

    def _trial_line(self, record: dict, records: list[dict]) -> str:
        ok = [r["score"] for r in records if r["status"] == "ok"]
        weights = " ".join(f"{n}={w:.3f}" for n, w in record["weights"].items())
        s = record["seconds"]
        timing = f"merge {s.get('merge', 0):.2f}s eval {s.get('eval', 0):.1f}s opt {s.get('optimizer', 0):.2f}s"
        left = self.config.trials - record["trial"]
        eta = f", ETA {_duration(left * statistics.median(self.durations))}" if left and self.durations else ""
        head = f"trial {record['trial']}/{self.config.trials}"
        if record["status"] != "ok":
            return f"{head} FAILED: {record['reason']} [{weights}] {timing}{eta}"
        return f"{head} score {record['score']:.5f} (best {max(ok):.5f}) [{weights}] {timing}{eta}"

    def finalists(self, records: list[dict]) -> list[dict]:
        """Re-score the top trials at the finalist limit (each once; logged so a rerun reuses them)."""
        c = self.config
        ok = sorted((r for r in records if r["status"] == "ok"), key=lambda r: (-r["score"], r["trial"]))
        top = ok[: c.finalists]
        if c.finalist_limit == c.limit:
            return [{"trial": r["trial"], "weights": r["weights"], "score": r["score"], "final_score": r["score"], "metrics": r["metrics"]} for r in top]
        path = self.out / "finalists.jsonl"
        done = {(r["trial"], r["limit"]): r for r in read_jsonl(path)}
        finalists = []
        for r in top:
            key = (r["trial"], c.finalist_limit)
            if key not in done:
                self.log(f"finalist: trial {r['trial']} at limit {c.finalist_limit}")
                outcome = self.score(r["weights"], c.finalist_limit)
                done[key] = {"trial": r["trial"], "limit": c.finalist_limit, **outcome}
                append_jsonl(path, done[key])
            f = done[key]
            finalists.append({"trial": r["trial"], "weights": r["weights"], "score": r["score"], "final_score": f["score"], "metrics": f["metrics"], "status": f["status"], "reason": f.get("reason")})
        return finalists


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


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


def _summarize(config: SearchConfig, sources: dict, missing: list[str], records: list[dict], finalists: list[dict], out: Path) -> dict:
    from optimer_merge.io.checkpoints import saved_dtype
    from optimer_merge.search.plots import plot_trace, plot_weights

    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        raise SearchError("no trial succeeded; see trials.jsonl for the reasons")
    scored = [f for f in finalists if f.get("final_score") is not None]
    if scored:
        best = max(scored, key=lambda f: (f["final_score"], f["score"]))
    else:
        top = max(ok, key=lambda r: r["score"])
        best = {"trial": top["trial"], "weights": top["weights"], "score": top["score"], "final_score": None, "metrics": top["metrics"]}
    weights = best["weights"]
    total = sum(weights.values())
    ratios = {n: w / total for n, w in weights.items()} if abs(total) > 1e-12 else None
    header = "\n".join(
        f"WARNING: the model behind vector {n} ({sources[n]}) no longer exists; restore it before merging this recipe."
        for n in missing
    )
    write_yaml(out / "best.yaml", trial_recipe(config, sources, weights, config.out_dtype or saved_dtype(config.base)), header or None)
    uniform = next((r for r in records if r["status"] == "ok" and _is_uniform(r["weights"], config)), None)
    seconds = {k: sum(r["seconds"].get(k, 0.0) for r in records) for k in ("merge", "eval", "optimizer")}
    summary = {
        "best": {"trial": best["trial"], "weights": weights, "mixture_ratios": ratios, "score": best["score"], "final_score": best["final_score"], "metrics": best.get("metrics")},
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
        "objective": config.load_objective().model_dump(mode="json"),
        "vectors": sources,
        "missing_models": {n: sources[n] for n in missing},
        "best_recipe": "best.yaml",
    }
    write_json(out / "summary.json", summary)
    plot_trace(records, out / "trace.png")
    plot_weights(weights, ratios, out / "weights.png")
    return summary


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
