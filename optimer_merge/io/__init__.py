"""Shared plumbing: checkpoints and fingerprints, hub-layout names, atomic writes, jsonl logs, YAML
configs, run folders (identity, lock, clean refusal) and output checks."""

FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # of stored models and vectors, and of evaluated models
