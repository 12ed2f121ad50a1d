"""Small helpers shared by tests: reading checkpoints, the float64 reference merge, waiting for a search."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import traceback
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file


def load_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def reference_merge(recipe: str | Path, root: Path) -> dict[str, torch.Tensor]:
    """The OptiMer formula in float64, straight from a recipe's numbers."""
    config = yaml.safe_load(Path(recipe).read_text())
    params = config.get("parameters", {})
    scale, normalize = params.get("scale", 1.0), params.get("normalize", False)
    base = load_weights(root / config["base_model"])
    models = [
        (load_weights(root / m["model"]), m["parameters"]["weight"]) for m in config["models"]
    ]
    total = sum(w for _, w in models) if normalize else 1.0
    return {
        key: tensor.double()
        + scale * sum((w / total) * (m[key].double() - tensor.double()) for m, w in models)
        for key, tensor in base.items()
    }


def mergekit_yaml(recipe: str | Path, out: str | Path, *options: str, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Stock `mergekit-yaml RECIPE OUT [OPTIONS]` in this process: the click command its console
    script calls, without a second interpreter importing mergekit (10-20 s on 2 cores; test_install
    runs the console script of a wheel install). An exception click leaves unhandled comes back as
    the traceback the console script would print."""
    from click.testing import CliRunner
    from mergekit.scripts.run_yaml import main

    argv = [str(recipe), str(out), *options]
    with contextlib.chdir(cwd or os.getcwd()):
        result = CliRunner().invoke(main, argv)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["mergekit-yaml", *argv], result.exit_code, result.stdout, stderr)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def wait_for_trials(run: Path, count: int, process: subprocess.Popen, seconds: float = 300) -> None:
    """Until a running search has logged ``count`` trials (it must not end first)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        path = run / "trials.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        assert process.poll() is None, "the search ended before it could be interrupted"
        time.sleep(0.1)
    raise AssertionError(f"no {count} trials within {seconds}s")


def free_port() -> int:
    """A TCP port nothing listens on now (for a server or a rendezvous a test starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
