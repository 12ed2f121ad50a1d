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
then continues. A trial killed midway left no line and runs again; a torn last line is dropped.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

from optimer_merge.search.config import SearchConfig, identity_hash
from optimer_merge.search.optimizers import make_optimizer


class SearchError(RuntimeError):
    """The search cannot go on (a run folder of another search, failures, a diverged replay)."""


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


def model_sources(config: SearchConfig) -> dict[str, str]:
    """The model folder behind each vector (recipes merge models, not vector files)."""
    from optimer_merge.vectors import Checkpoint

    sources = {}
    for v in config.vectors:
        if v.model:
            sources[v.name] = str(Path(v.model).resolve())
        else:
            source = Checkpoint.open(v.vector).metadata().get("source")
            if not source:
                raise SearchError(f"vector {v.name}: {v.vector} does not record its model, so no recipe can name it")
            sources[v.name] = str(Path(source).resolve())
    return sources


def _read_jsonl(path: Path) -> list[dict]:
    """Complete lines only; a torn last line (killed mid-write) is cut off the file."""
    if not path.exists():
        return []
    records, good = [], 0
    with open(path, "rb") as f:
        data = f.read()
    for line in data.split(b"\n"):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line) + 1
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(min(good, len(data)))
    return records


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _check_folder(config: SearchConfig, out: Path) -> dict:
    """Refuse a run folder that holds another search; returns the metadata to store (nothing written)."""
    identity = config.identity()
    meta_path = out / "search_config.json"
    if meta_path.exists():
        stored = json.loads(meta_path.read_text())
        if stored.get("identity_hash") != identity_hash(identity):
            old = stored.get("identity", {})
            changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            raise SearchError(
                f"{out} holds a different search (settings differ: {', '.join(changed)}); "
                "choose another output folder or delete this one"
            )
    elif out.exists() and any(out.iterdir()):
        raise SearchError(f"{out} is not empty and holds no search; choose another output folder")
    return {"identity_hash": identity_hash(identity), "identity": identity, "config": config.model_dump(mode="json")}


def check(config: SearchConfig, log: Callable[[str], None] = print):
    """Everything that can be wrong before any trial: tasks, bounds, vectors, the run folder.

    Nothing is written until all checks pass. Returns (objective, pool, sources)."""
    from optimer_merge.evaluation.tasks import resolve
    from optimer_merge.vectors import load_pool

    objective = config.load_objective()
    resolve(objective.task_names())
    out = Path(config.output)
    meta = _check_folder(config, out)
    sources = model_sources(config)
    pool = load_pool(
        config.base,
        {v.name: ({"model": v.model} if v.model else {"vector": v.vector}) for v in config.vectors},
        log=log,
    )
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    (out / "search_config.json").write_text(json.dumps(meta, indent=2))
    return objective, pool, sources


def search(config: SearchConfig, *, export: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run (or resume, or extend) the search described by ``config``; returns summary.json's content."""
    from optimer_merge.evaluation.evaluator import Evaluator

    objective, pool, sources = check(config, log)
    out = Path(config.output)
    tasks = objective.task_names()
    bounds = {v.name: config.bounds_of(v) for v in config.vectors}
    optimizer = make_optimizer(config.optimizer, bounds, config.seed, out / "smac", config.initial_points)

    trials_path = out / "trials.jsonl"
    records = _read_jsonl(trials_path)
    for record in records:  # replay
        weights = optimizer.ask()
        if any(not math.isclose(weights[n], record["weights"][n], rel_tol=1e-9, abs_tol=1e-12) for n in config.names):
            raise SearchError(
                f"resume: the optimizer proposed {weights} for trial {record['trial']}, the log has "
                f"{record['weights']}; the installed optimizer gives other proposals than the one that "
                "wrote this log (a different version?). Start a new output folder."
            )
        optimizer.tell(weights, record["told"])
    if records:
        log(f"resumed {out}: {len(records)} trials already done")
    _check_failures(records, config.max_consecutive_failures)

    evaluator = None

    def get_evaluator() -> Evaluator:
        nonlocal evaluator
        if evaluator is None:
            log(f"loading {config.base} on {config.backend}")
            evaluator = Evaluator(
                config.base, config.backend, batch_size=config.batch_size, dtype=config.dtype, threads=config.threads,
                max_length=config.max_length, tensor_parallel_size=config.tensor_parallel_size, log=log,
            )  # fmt: skip
        return evaluator

    def score(weights: dict[str, float], limit: int | None) -> dict:
        """Merge in memory and score; a failure is returned as a reason, never raised."""
        result = {"status": "ok", "reason": None, "score": None, "metrics": {}, "seconds": {}}
        start = time.perf_counter()
        try:
            ev = get_evaluator()
            start = time.perf_counter()
            if config.backend == "hf":
                ev.update_weights(lambda model: pool.write_into(model, weights))
            else:
                ev.update_weights(dict(pool.merged(weights)))
        except Exception as error:  # noqa: BLE001 - recorded, the search goes on
            result.update(status="failed", reason=f"merge failed: {type(error).__name__}: {error}")
            result["seconds"]["merge"] = time.perf_counter() - start
            return result
        result["seconds"]["merge"] = time.perf_counter() - start
        start = time.perf_counter()
        try:
            results = ev.evaluate(tasks, limit, confirm_run_unsafe_code=config.confirm_run_unsafe_code, quiet=True)
            value, breakdown = objective.score(results)
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

    try:
        for number in range(len(records) + 1, config.trials + 1):
            start = time.perf_counter()
            weights = optimizer.ask()
            asked = time.perf_counter() - start
            recipe_path = out / "recipes" / f"trial-{number:04d}.yaml"
            write_yaml(recipe_path, trial_recipe(config, sources, weights))
            outcome = score(weights, config.limit)
            told = outcome["score"] if outcome["status"] == "ok" else _crash_value(records)
            start = time.perf_counter()
            optimizer.tell(weights, told)
            outcome["seconds"]["optimizer"] = asked + time.perf_counter() - start
            record = {"trial": number, "weights": weights, **outcome, "told": told, "limit": config.limit, "recipe": str(recipe_path.relative_to(out))}
            _append_jsonl(trials_path, record)
            records.append(record)
            log(_trial_line(record, records, config.trials))
            _check_failures(records, config.max_consecutive_failures)

        finalists = _finalists(config, records, out, score, log)
    finally:
        if evaluator is not None:
            evaluator.close()
    summary = _summarize(config, sources, records, finalists, out)
    if export:
        from optimer_merge.recipes import run_recipe

        target = out / "best-model"
        log(f"exporting the best merge with mergekit -> {target}")
        run_recipe(out / "best.yaml", target, quiet=True)
        summary["export"] = str(target)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


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
        raise SearchError(f"stopped after {run} consecutive failed trials; the last: {records[-1]['reason']}")


def _trial_line(record: dict, records: list[dict], total: int) -> str:
    ok = [r["score"] for r in records if r["status"] == "ok"]
    weights = " ".join(f"{n}={w:.3f}" for n, w in record["weights"].items())
    s = record["seconds"]
    timing = f"merge {s.get('merge', 0):.2f}s eval {s.get('eval', 0):.1f}s opt {s.get('optimizer', 0):.2f}s"
    if record["status"] != "ok":
        return f"trial {record['trial']}/{total} FAILED: {record['reason']} [{weights}] {timing}"
    return f"trial {record['trial']}/{total} score {record['score']:.5f} (best {max(ok):.5f}) [{weights}] {timing}"


def _finalists(config: SearchConfig, records: list[dict], out: Path, score, log) -> list[dict]:
    """Re-score the top trials at the finalist limit (each once; logged so a rerun reuses them)."""
    ok = sorted((r for r in records if r["status"] == "ok"), key=lambda r: (-r["score"], r["trial"]))
    top = ok[: config.finalists]
    if config.finalist_limit == config.limit:
        return [{"trial": r["trial"], "weights": r["weights"], "score": r["score"], "final_score": r["score"], "metrics": r["metrics"]} for r in top]
    path = out / "finalists.jsonl"
    done = {(r["trial"], r["limit"]): r for r in _read_jsonl(path)}
    finalists = []
    for r in top:
        key = (r["trial"], config.finalist_limit)
        if key not in done:
            log(f"finalist: trial {r['trial']} at limit {config.finalist_limit}")
            outcome = score(r["weights"], config.finalist_limit)
            done[key] = {"trial": r["trial"], "limit": config.finalist_limit, **outcome}
            _append_jsonl(path, done[key])
        f = done[key]
        finalists.append({"trial": r["trial"], "weights": r["weights"], "score": r["score"], "final_score": f["score"], "metrics": f["metrics"], "status": f["status"], "reason": f.get("reason")})
    return finalists


def _summarize(config: SearchConfig, sources: dict, records: list[dict], finalists: list[dict], out: Path) -> dict:
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
    write_yaml(out / "best.yaml", trial_recipe(config, sources, weights, config.out_dtype))
    uniform = next((r for r in records if r["status"] == "ok" and _is_uniform(r["weights"], config)), None)
    best_so_far, trace = -math.inf, []
    for r in records:
        if r["status"] == "ok":
            best_so_far = max(best_so_far, r["score"])
        trace.append(best_so_far)
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
        "best_recipe": "best.yaml",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
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


def write_yaml(path: Path, data: dict) -> None:
    """Write YAML atomically: a partial file renamed into place."""
    import yaml

    partial = path.with_name(path.name + ".partial")
    partial.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(partial, path)
