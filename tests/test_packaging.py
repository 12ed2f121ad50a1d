"""The package declares what it imports, and its Python floor fits the standard library it uses."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys

import tomllib

import pytest
from conftest import REPO


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]
    return {_normal(re.split(r"[\s<>=!~\[;]", spec, maxsplit=1)[0]) for spec in specs}


def _imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (REPO / "optimer_merge").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(path.name)
    return found


def test_every_third_party_import_is_a_declared_dependency():
    declared, owners = _declared(), metadata.packages_distributions()
    missing = {}
    for module, files in _imports().items():
        if module in sys.stdlib_module_names or module in ("optimer_merge", "__future__"):
            continue
        candidates = {_normal(module), *(_normal(d) for d in owners.get(module, []))}
        candidates |= {c.removesuffix("-cpu") for c in candidates}  # vLLM's CPU build provides `vllm`
        if not candidates & declared:
            missing[module] = sorted(files)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_pins_the_code_relies_on():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    smac = next(s for s in project["dependencies"] if s.startswith("smac"))
    assert "<" in smac  # SMAC internals (initial design, local search) are patched by the search
    assert "mergekit==0.1.5" in project["dependencies"]
    # tarfile's extraction filters arrived in 3.10.12 and 3.11.4; the floor excludes what lacks them
    floor = project["requires-python"]
    assert ">=3.10.12" in floor and all(f"!=3.11.{i}" in floor for i in range(4))


def test_benchmarks_import_names_the_package_has():
    """Benchmarks run by hand, not in the suite: a name they import that a refactor removed is found here."""
    import importlib
    import importlib.util

    missing = []
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optimer_merge"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                        missing.append(f"{path.name}: from {node.module} import {alias.name}")
    assert not missing, missing


def test_gpu_check_runs_on_the_cpu(tmp_path):
    """`make gpu-check` runs only where a GPU is: its checks run here on a small model (vllm on
    vLLM's CPU build), so the script is known to work before GPU time is spent on it."""
    import importlib.util
    import json
    import math
    import os
    import subprocess

    out = tmp_path / "gpu-check.json"
    cmd = [sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--device", "cpu", "--tiny", "--out", str(out), "--workdir", str(tmp_path / "work")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    summary = json.loads(out.read_text())
    hf, vllm, cpt = summary["hf"], summary["vllm"], summary["cpt"]
    assert summary["device"] == "cpu" and list(summary) == ["device", "torch", "hf", "vllm", "cpt", "seconds"]
    assert hf["max_abs_diff_vs_cpu_rule_bf16"] < 1e-6  # the in-place merge is the rule, cast once to bf16
    assert hf["pool_bytes"] == 5 * 2 * hf["params"]  # base + 4 rows, bf16
    if importlib.util.find_spec("vllm") is None:
        assert vllm == {"skipped": "vLLM is not installed here"}
    else:  # the search's vllm path: the pool in the engine's worker, K numbers per trial, the merge as a fresh engine loads it
        assert vllm["placement"] == "cpu" and vllm["bytes_sent_per_trial"] < 256
        assert vllm["pool_bytes"] == pytest.approx(hf["pool_bytes"], rel=0.05)  # the same rows in the engine's layout (vocabulary padded)
        assert vllm["max_abs_logprob_diff_vs_fresh_load"] < 1e-3 < vllm["max_abs_logprob_change_by_the_merge"]
    assert cpt["strategy"]["name"] == "fsdp" and cpt["precision"] == "bf16-mixed" and cpt["parameters"] == hf["params"]
    assert cpt["tokens_per_step"] == 4 * 1024
    first, last = cpt["loss_first_last"]
    assert math.isfinite(last) and last < first
