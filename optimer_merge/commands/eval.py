"""Score a model with lm-evaluation-harness tasks on the hf, vllm or server backend.

Writes OUTPUT/results.json (lm-eval's results schema, readable by leaderboard tooling),
OUTPUT/results.md (the table) and, with --objective, OUTPUT/objective.json (score and breakdown).
"""

from __future__ import annotations

import argparse

from optimer_merge.commands import auto_or_positive_int, local_threads, path, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from optimer_merge.evaluation import BACKENDS
    from optimer_merge.io import FLOAT_DTYPES

    parser.add_argument("model", type=path, help="Hugging Face model folder (with --url: the tokenizer folder, optional)")
    parser.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks or groups (default: the objective's, else optimer_dev)")
    parser.add_argument("--backend", choices=BACKENDS, default="hf")
    parser.add_argument("--limit", type=positive_int, default=None, help="first N items of each task")
    parser.add_argument("--output", type=path, required=True, help="folder for results.json and results.md")
    parser.add_argument("--objective", type=path, help="objective spec YAML: also compute its score")
    parser.add_argument("--batch-size", type=auto_or_positive_int, default=None,
                        help="requests per batch: a number (default 16 on hf and server), or 'auto' (vllm's default: every request "
                        "goes to the engine at once, which batches them itself)")
    parser.add_argument("--dtype", choices=FLOAT_DTYPES, default=None, help="default: the model's own")
    parser.add_argument("--threads", type=local_threads, default="auto", help="CPU threads (default auto: 1 for tiny models)")
    parser.add_argument("--tensor-parallel-size", type=positive_int, default=1, help="vllm/server: GPUs per model")
    parser.add_argument("--url", help="with --backend server: use this running OpenAI-compatible server instead of starting vllm serve")
    parser.add_argument("--confirm-run-unsafe-code", action="store_true", help="allow tasks that execute model-written code")
    parser.add_argument("--log-samples", action="store_true", help="keep per-item outputs in results.json")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from lm_eval.utils import handle_non_serializable

    from optimer_merge.errors import ConfigError
    from optimer_merge.evaluation import check_settings
    from optimer_merge.evaluation.evaluator import open_evaluator
    from optimer_merge.evaluation.objective import Objective
    from optimer_merge.evaluation.tasks import check_distinct
    from optimer_merge.io.checkpoints import check_model_folder
    from optimer_merge.io.files import atomic_write_text, check_output_dir, write_json
    from optimer_merge.io.run_folder import RunFolder

    if args.url and args.backend != "server":
        raise ConfigError(f"--url {args.url} needs --backend server (got --backend {args.backend})")
    if args.tensor_parallel_size > 1 and args.backend == "hf":
        raise ConfigError(f"--tensor-parallel-size {args.tensor_parallel_size} needs --backend vllm or server (hf runs one copy of the model in this process)")
    if args.tensor_parallel_size > 1 and args.url:
        raise ConfigError(f"--tensor-parallel-size {args.tensor_parallel_size} has no effect with --url: the server running there keeps its own")
    check_settings(args.backend, args.dtype, args.batch_size, args.threads, args.tensor_parallel_size)
    url = None
    if args.url:
        from optimer_merge.evaluation.server_backend import server_root

        url = server_root(args.url)  # a malformed URL is refused before any work
    if url is None:  # the model folder first: reading the task index takes seconds
        check_model_folder(args.model, "model", tokenizer=True)
    objective = Objective.load(args.objective) if args.objective else None
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",")]
        if not all(tasks):
            raise ConfigError(f"--tasks {args.tasks!r} names an empty task; give comma-separated task names")
        twice = sorted({t for t in tasks if tasks.count(t) > 1})
        if twice:
            raise ConfigError(f"--tasks {args.tasks!r} names {', '.join(twice)} twice; give each task once")
    else:
        tasks = objective.task_names() if objective else ["optimer_dev"]
    check_distinct(tasks)  # unknown or overlapping task names fail here, before any model is loaded
    if objective is not None:
        objective.check()
        missing = [t for t in objective.task_names() if t not in tasks]
        if missing:
            raise ConfigError(f"--objective scores {', '.join(missing)}, which --tasks leaves out")
    out = check_output_dir(args.output, "--output")
    settings = {"batch_size": args.batch_size, "dtype": args.dtype, "threads": args.threads}
    if args.backend != "hf":
        settings["tensor_parallel_size"] = args.tensor_parallel_size
    if args.backend == "server":
        settings["url"] = url
    with RunFolder(out, "evaluation"):  # one evaluation at a time writes here
        previous = _evaluated_model(out / "results.json")
        if previous and previous != str(Path(args.model).resolve()):
            print(f"warning: {out} holds the results of {previous}; this evaluation replaces them", flush=True)
        with open_evaluator(args.backend, args.model, **settings) as evaluator:
            results = evaluator.evaluate(tasks, args.limit, confirm_run_unsafe_code=args.confirm_run_unsafe_code, log_samples=args.log_samples)
        results["config"]["model"] = f"optimer-merge/{args.backend}"
        results["config"]["model_args"] = f"pretrained={Path(args.model).resolve()}"
        score = None
        if objective is not None:
            score, breakdown = objective.score(results)
        atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
        table = _table(results)
        atomic_write_text(out / "results.md", table)
        if objective is not None:
            write_json(out / "objective.json", {"score": score, "breakdown": breakdown})
        else:
            (out / "objective.json").unlink(missing_ok=True)  # an earlier evaluation's score would not be this one's
    print(table)
    if objective is not None:
        print(f"objective score: {score:.6g}")
    print(f"results: {out / 'results.json'}")
    return 0


def _table(results: dict) -> str:
    """lm-eval's Markdown table of ``results`` (and of its groups): its columns, order and
    indentation, written here so that every value keeps four decimals, in scientific notation from
    a million on (a word perplexity can have 100 digits; lm-eval's table writer parses numbers
    back and prints them in full, and 0.0000 as 0)."""
    return _markdown(results, "results") + ("\n" + _markdown(results, "groups") if results.get("groups") else "")


def _markdown(results: dict, column: str) -> str:
    from optimer_merge.report.leaderboard import format_value

    entries, children = results[column], results.get("group_subtasks", {})
    nested = {child for subtasks in children.values() for child in subtasks}
    ordered: list[tuple[str, int]] = []

    def visit(task: str, depth: int) -> None:  # a group, then its subtasks a level deeper (sorted, as lm-eval)
        if task in entries:
            ordered.append((task, depth))
        for child in sorted(children.get(task, ())):
            visit(child, depth + 1 if task in entries else depth)

    for task in sorted(t for t in {*entries, *children} if t not in nested):
        visit(task, 0)
    cell = lambda v: format_value(v) if isinstance(v, float) else str(v)  # noqa: E731
    rows = []
    for task, depth in ordered:
        metrics, arrows = entries[task], results.get("higher_is_better", {}).get(task, {})
        name = metrics.get("alias", task)
        version = results.get("versions", {}).get(task, "N/A")
        version = f"{version:g}" if isinstance(version, float) else str(version)
        shots = str(results.get("n-shot", {}).get(task, ""))
        first = [" " * depth + "- " + name if depth else name, version]
        for key, value in sorted(metrics.items()):
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr"):  # alias, name, sample_len; errors go beside their metric
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            arrow = {True: "↑", False: "↓"}.get(arrows.get(metric), "")
            rows.append([*first, filter_name, shots, metric, arrow, cell(value), "±" if stderr is not None else "", "" if stderr is None else cell(stderr)])
            first = ["", ""]
    header = ["Groups" if column == "groups" else "Tasks", "Version", "Filter", "n-shot", "Metric", "", "Value", "", "Stderr"]
    right = {1, 3, 6, 8}  # numbers
    widths = [max(len(text) for text in (title, *(row[i] for row in rows))) for i, title in enumerate(header)]
    line = lambda cells: "|" + "|".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + "|"  # noqa: E731
    rule = "|" + "|".join("-" * (w - 1) + ":" if i in right else "-" * w for i, w in enumerate(widths)) + "|"
    return "\n".join([line([h.center(w) for h, w in zip(header, widths)]), rule, *map(line, rows)]) + "\n"


def _evaluated_model(results) -> str | None:
    """The model folder an earlier evaluation's results.json (a Path) names (``pretrained=...``), if any."""
    import json

    try:
        model_args = json.loads(results.read_text(encoding="utf-8"))["config"]["model_args"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return model_args.removeprefix("pretrained=") if isinstance(model_args, str) and model_args.startswith("pretrained=") else None
