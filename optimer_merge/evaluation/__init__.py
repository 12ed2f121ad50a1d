"""Scoring models with lm-evaluation-harness: the project's tasks, backends, a live evaluator, objectives.

``tasks`` locates eval_tasks/ and builds lm-eval task managers, ``backends`` runs tasks on the hf,
vllm or server backend, ``live`` keeps one model loaded and swaps its weights between
evaluations, and ``objective`` turns lm-eval results into the one number a search maximises.
"""
