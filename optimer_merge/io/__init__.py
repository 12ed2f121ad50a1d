"""Shared plumbing: checkpoints and fingerprints, hub-layout names, atomic writes, jsonl logs, YAML
configs, run folders (identity, lock, clean refusal) and output checks."""
