"""Score a model with lm-evaluation-harness tasks on the hf, vllm or server backend.

Writes OUTPUT/results.json (lm-eval's results schema, readable by leaderboard tooling),
OUTPUT/results.md (the table) and, with --objective, OUTPUT/objective.json (score and breakdown).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hugging Face model folder (with --url: the tokenizer folder, optional)")
    parser.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks or groups (default: the objective's, else optimer_dev)")
    parser.add_argument("--backend", choices=["hf", "vllm", "server"], default="hf")
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task")
    parser.add_argument("--output", required=True, help="folder for results.json and results.md")
    parser.add_argument("--objective", help="objective spec YAML: also compute its score")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", default="auto", help="CPU threads (default auto: 1 for tiny models)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm/server: GPUs per model")
    parser.add_argument("--url", help="server: use this running OpenAI-compatible server instead of starting vllm serve")
    parser.add_argument("--confirm-run-unsafe-code", action="store_true", help="allow tasks that execute model-written code")
    parser.add_argument("--log-samples", action="store_true", help="keep per-item outputs in results.json")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from lm_eval.utils import handle_non_serializable, make_table

    from optimer_merge.cli import UserError
    from optimer_merge.evaluation.evaluator import Evaluator
    from optimer_merge.evaluation.objective import Objective
    from optimer_merge.evaluation.tasks import resolve

    try:
        objective = Objective.load(args.objective) if args.objective else None
    except (OSError, ValueError) as error:
        raise UserError(f"objective {args.objective}: {error}") from None
    tasks = args.tasks.split(",") if args.tasks else (objective.task_names() if objective else ["optimer_dev"])
    try:
        resolve(tasks)  # unknown task names fail here, before any model is loaded
        evaluator = Evaluator(
            args.model,
            args.backend,
            batch_size=args.batch_size,
            dtype=args.dtype,
            threads=args.threads,
            tensor_parallel_size=args.tensor_parallel_size,
            url=args.url,
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    with evaluator:
        results = evaluator.evaluate(tasks, args.limit, confirm_run_unsafe_code=args.confirm_run_unsafe_code, log_samples=args.log_samples)
    results["config"]["model"] = f"optimer-merge/{args.backend}"
    results["config"]["model_args"] = f"pretrained={Path(args.model).resolve()}"
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    table = make_table(results) + ("\n" + make_table(results, "groups") if results.get("groups") else "")
    (out / "results.md").write_text(table)
    print(table)
    if objective is not None:
        try:
            score, breakdown = objective.score(results)
        except ValueError as error:
            raise UserError(f"objective: {error}") from None
        (out / "objective.json").write_text(json.dumps({"score": score, "breakdown": breakdown}, indent=2))
        print(f"objective score: {score:.6g}")
    print(f"results: {out / 'results.json'}")
    return 0
