"""Parallel trials on Ray: two long-lived workers, trials told in proposal order, an exact resume
after a real SIGKILL of the search, and a worker killed mid-search."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from helpers import free_port, wait_for_trials

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (the `ray` extra)")
CLI = [sys.executable, "-m", "optimer_merge.cli"]


def args(zoo: Path, out: Path, *extra: str) -> list[str]:
    return [*CLI, "search", "--base", str(zoo / "tiny-text/base"), "--objective", str(REPO / "recipes/objectives/dev-bpb.yaml"),
            "--output", str(out), "--limit", "3", "--trials", "12", "--finalists", "2", "--finalist-limit", "4",
            "--threads", "1", "--parallel", "2", "--vector", f"ja={zoo / 'tiny-text/ja'}", "--vector", f"zh={zoo / 'tiny-text/zh'}",
            "--vector", f"code={zoo / 'tiny-text/code'}", *extra]  # fmt: skip


def trials(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory, tiny_zoo) -> Path:
    """An uninterrupted 12-trial search on two Ray workers."""
    out = tmp_path_factory.mktemp("parallel") / "run"
    done = subprocess.run(args(tiny_zoo, out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting 2 trial workers on Ray (local)" in done.stdout
    # the finalists, re-scored side by side, each get a line (the first with an ETA for the rest)
    finalist = re.findall(r"^finalist (\d)/2: trial \d+ score -?[\d.]+ at limit 4 \(-?[\d.]+ at 3\) merge [\d.]+s eval [\d.]+s(, ETA .+)?$", done.stdout, re.M)
    assert [(n, bool(eta)) for n, eta in finalist] == [("1", True), ("2", False)], done.stdout[-2000:]
    return out


@needs_ray
def test_two_workers_run_trials_told_in_order(parallel_run):
    records = trials(parallel_run)
    assert [r["trial"] for r in records] == list(range(1, 13))
    assert all(r["status"] == "ok" for r in records)
    assert records[0]["weights"] == {"ja": pytest.approx(1 / 3), "zh": pytest.approx(1 / 3), "code": pytest.approx(1 / 3)}
    # proposals asked before the results of those running: distinct points side by side
    assert all(records[i]["weights"] != records[i + 1]["weights"] for i in range(11))
    summary = json.loads((parallel_run / "summary.json").read_text())
    assert len(summary["finalists"]) == 2 and all(f["final_score"] is not None for f in summary["finalists"])


@needs_ray
def test_a_killed_search_resumes_to_the_same_records(parallel_run, tiny_zoo, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(args(tiny_zoo, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_trials(out, 5, process)  # trial 5 logged, 6 and 7 running or done but not yet told
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = len(trials(out))
    assert 5 <= before < 12
    done = subprocess.run(args(tiny_zoo, out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed {out}: {before} trials already done" in done.stdout
    resumed, reference = trials(out), trials(parallel_run)
    assert [r["weights"] for r in resumed] == [r["weights"] for r in reference]
    assert [r["score"] for r in resumed] == pytest.approx([r["score"] for r in reference], abs=1e-9)


@needs_ray
def test_a_killed_worker_fails_its_trial_and_is_started_again(tiny_zoo, tmp_path):
    out = tmp_path / "run"
    argv = args(tiny_zoo, out, "--trials", "8", "--finalists", "0")
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_trials(out, 3, process)
    workers = subprocess.run(["pgrep", "-f", "ray::_Actor"], capture_output=True, text=True, timeout=30).stdout.split()
    assert len(workers) == 2, workers
    # a local Ray's workers run at the driver's priority (Ray's own default is nice 15)
    assert [os.getpriority(os.PRIO_PROCESS, int(pid)) for pid in workers] == [os.getpriority(os.PRIO_PROCESS, process.pid)] * 2
    os.kill(int(workers[0]), signal.SIGKILL)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    records = trials(out)
    failed = [r for r in records if r["status"] == "failed"]
    assert len(records) == 8 and len(failed) == 1, [r["reason"] for r in failed]
    assert "died" in failed[0]["reason"] and "starting it again" in output
    assert all(r["status"] == "ok" for r in records if r["trial"] > failed[0]["trial"] + 1)


@needs_ray
def test_vllm_workers_join_a_running_cluster_and_leave_it_running(parallel_run, tiny_zoo, tmp_path):
    """`ray_address` joins a cluster started with `ray start --head` (as on a multi-node setup,
    here with token authentication): without the token the search is refused in one line with the
    fix and leaves no folder; with it, each worker starts its own vLLM engine (where vLLM is installed) and
    builds its pool inside it, the trials are those of the hf search on its own local Ray (the same
    proposals, the same scores to 1e-4, only the weights sent), and the cluster outlives the search."""
    import secrets

    ray_cli = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **token}
    # --block: the head runs in the foreground, and SIGTERM stops it and only it (`ray stop` would
    # stop every Ray on the machine, a user's or another test's too)
    head = ["--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false", "--block"]
    with open(tmp_path / "head.log", "w") as log:
        started = subprocess.Popen([ray_cli, "start", *head], stdout=log, stderr=subprocess.STDOUT, env=env)
    address = None
    try:
        # the head's address as `ray start` prints it for other nodes (this machine's IP, not 127.0.0.1)
        deadline = time.monotonic() + 120
        while not (found := re.search(r"--address='([^']+)'", (tmp_path / "head.log").read_text())):
            assert started.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.2)
        address = found.group(1)
        assert address.endswith(f":{port}")
        backend = "vllm" if importlib.util.find_spec("vllm") else "hf"
        out = tmp_path / "run"
        argv = args(tiny_zoo, out, "--trials", "2", "--finalists", "0", "--backend", backend, "--set", f"ray_address={address}")
        # the refused join (Ray retries for some 20 s before it gives up) runs beside the real one
        refused_out = tmp_path / "refused"
        refused_argv = [a if a != str(out) else str(refused_out) for a in argv]
        refused = subprocess.Popen(refused_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, "RAY_AUTH_MODE": "disabled"})
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
        _, refused_err = refused.communicate(timeout=600)
        assert refused.returncode == 2, refused_err[-3000:]
        assert f"error: ray_address {address}: cannot join the Ray cluster" in refused_err
        assert len(refused_err.strip().splitlines()) == 1, refused_err[-3000:]  # Ray's line-a-second retries held back
        assert "set RAY_AUTH_MODE=token" in refused_err and not refused_out.exists()
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"starting 2 trial workers on Ray (cluster {address})" in done.stdout
        assert f"on {backend} in 2 workers" in done.stdout
        joined, reference = trials(out), trials(parallel_run)[:2]
        assert [r["weights"] for r in joined] == [r["weights"] for r in reference]  # the initial design, whatever the scores
        assert [r["score"] for r in joined] == pytest.approx([r["score"] for r in reference], abs=1e-4 if backend == "vllm" else 1e-9)
        assert all(0 < r["bytes_sent"] < 1024 if backend == "vllm" else r["bytes_sent"] == 0 for r in joined), [r["bytes_sent"] for r in joined]
        alive = subprocess.run([ray_cli, "status", "--address", address], capture_output=True, text=True, timeout=120, env=env)
        assert alive.returncode == 0, alive.stderr[-2000:]
    finally:
        started.terminate()
        started.wait(timeout=120)
        # `ray start` recorded the head as this machine's current cluster, where a later `ray.init()`
        # (vLLM's Ray executor among them) would wait minutes for it: the head is gone, so goes the record
        from ray._common.utils import get_ray_address_file

        record = Path(get_ray_address_file(None))
        if address and record.exists() and record.read_text().strip() == address:
            record.unlink()
