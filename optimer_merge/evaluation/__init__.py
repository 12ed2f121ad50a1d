"""Scoring models with lm-evaluation-harness: the project's tasks, one evaluator, objectives.

``tasks`` locates eval_tasks/, builds lm-eval task managers offline and lists a task's metrics;
``evaluator`` loads a model once on the hf, vllm or server backend, scores tasks and swaps its
weights in place; ``objective`` turns lm-eval results into the one number a search maximises.
"""

BACKENDS = ("hf", "vllm", "server")
