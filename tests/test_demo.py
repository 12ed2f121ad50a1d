"""`optimer-merge demo` at reduced size over two seeds: every artefact exists and parses, numbers come
from the run, a stopped run resumes to the same result, and the seeds aggregate into intervals."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

CLI = str(Path(sys.executable).parent / "optimer-merge")
CPT_TOKENS = 4000
REDUCED = [
    "--cpt-tokens", str(CPT_TOKENS), "--trials", "5", "--reopt-trials", "3", "--limit", "2",
    "--finalists", "2", "--finalist-limit", "3", "--test-limit", "3", "--workers", "2",
]  # fmt: skip
CANDIDATES = ["base", "cpt-ja", "cpt-zh", "cpt-math", "cpt-code", "average", "mix-uniform", "mix-velocitune", "mix-optimer", "optimer", "optimer-ja", "optimer-math-code"]
DOMAINS = ("ja", "zh", "math", "code")


def demo(run_dir: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "demo", "--run-dir", str(run_dir), *REDUCED, *extra], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_seeds(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """A reduced two-seed demo (seeds 0 and 1), stopped (SIGTERM, as a scheduler does) once seed 0's
    first CPT run has finished, then resumed to the end: its folder, the folder its report was
    copied to, and the resumed run."""
    root = tmp_path_factory.mktemp("demo")
    run_dir, copy = root / "run", root / "docs"
    argv = [CLI, "demo", "--run-dir", str(run_dir), "--seeds", "2", "--report-dir", str(copy), *REDUCED]
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((run_dir / "seed-0" / "state").glob("cpt-*.json")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, "the demo ended before it could be interrupted"
    workers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == first.pid]
    assert workers, "the demo runs its jobs in worker processes"
    first.send_signal(signal.SIGTERM)
    err = first.stderr.read()
    assert first.wait(timeout=300) == 143, err
    assert "stopped by SIGTERM; the same command resumes where this run stopped" in err and "Traceback" not in err and "leaked" not in err, err
    assert not any(w.exists() and _parent(w) == first.pid for w in workers), "workers outlived the demo"
    assert not (run_dir / "seed-0" / "report.md").exists() and not (run_dir / "seed-1").exists()
    resumed = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return run_dir, copy, resumed


@pytest.fixture(scope="module")
def demo_run(demo_seeds) -> tuple[Path, subprocess.CompletedProcess]:
    """Seed 0 of the two-seed demo, and the one-seed demo its folder holds, run again (every job
    done: only the report is written again)."""
    run_dir = demo_seeds[0] / "seed-0"
    again = demo(run_dir)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "25 of 25 jobs already done" in again.stdout and "  start " not in again.stdout
    return run_dir, again


def seed_log(stdout: str, seed: int) -> str:
    """The part of a multi-seed demo's output about one seed."""
    return stdout.split(f"== seed {seed} (", 1)[1].split("\n== seed ", 1)[0]


def _parent(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_resumed_run_reuses_finished_jobs(demo_seeds):
    run_dir, _, resumed = demo_seeds
    stopped, fresh = seed_log(resumed.stdout, 0), seed_log(resumed.stdout, 1)
    done = re.search(r"resuming .*: (\d+) of 25 jobs already done", stopped)
    assert done and int(done.group(1)) >= 2  # base and at least one CPT run
    assert "start  base:" not in stopped and "start  base:" in fresh and "resuming" not in fresh
    assert len(list((run_dir / "seed-0" / "state").glob("*.json"))) == 25


def test_two_seeds_aggregate_their_summaries(demo_seeds):
    """`demo --seeds 2` at the smallest sizes: two complete runs, the aggregate from their summaries."""
    run, copy, out = demo_seeds
    assert f"== seed 0 (1/2) into {run / 'seed-0'}\n" in out.stdout
    assert re.search(rf"== seed 1 \(2/2\) into {re.escape(str(run / 'seed-1'))}, ETA for the seeds left [\d.]+ (s|min)\n", out.stdout)
    per_seed = {s: json.loads((run / f"seed-{s}" / "summary.json").read_text()) for s in (0, 1)}
    assert per_seed[0]["settings"]["seed"] == 0 and per_seed[1]["settings"]["seed"] == 1
    assert per_seed[0]["test_mean_bits_per_byte"] != per_seed[1]["test_mean_bits_per_byte"]  # the seeds really differ
    summary = json.loads((run / "summary.json").read_text())
    claim = summary["claims"]["beats_data_mixing"]
    diffs = [per_seed[s]["test_mean_bits_per_byte"]["mix-uniform"] - per_seed[s]["test_mean_bits_per_byte"]["optimer"] for s in (0, 1)]
    assert list(claim["per_seed"].values()) == pytest.approx(diffs) and claim["mean"] == pytest.approx(sum(diffs) / 2)
    half = 12.706205 * abs(diffs[0] - diffs[1]) / 2  # t_0.975 (1 degree of freedom) x sd / sqrt(2), sd = diff / sqrt(2)
    assert claim["high"] - claim["mean"] == pytest.approx(half, rel=1e-5)
    assert claim["verdict"] in ("reproduced", "not reproduced", "inconclusive") and f"**{claim['verdict']}**" in (run / "report.md").read_text()
    assert (copy / "report.md").read_text() == (run / "report.md").read_text() and (copy / "plots" / "claims.png").exists()
    assert "claims:" in out.stdout and claim["claim"] in out.stdout


def test_every_artefact_exists_and_parses(demo_run):
    run_dir, _ = demo_run
    report = (run_dir / "report.md").read_text()
    for section in ("## Leaderboard on test", "## OptiMer searches", "## Distribution vectors", "## Velocitune", "## Cost", "## The paper's claims"):
        assert section in report
    for image in ("leaderboard.png", "plots/velocitune.png", "plots/reoptimization.png", "search/all/trace.png", "search/all/weights.png", "vectors/cosine.png"):
        assert (run_dir / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
        assert f"]({image})" in report
    best = yaml.safe_load((run_dir / "best.yaml").read_text())
    assert best["merge_method"] == "optimer" and [m["parameters"]["weight"] for m in best["models"]]
    with open(run_dir / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == CANDIDATES
    assert all(float(r[f"optimer_{d}_test_bpb/bits_per_byte"]) > 0 for r in rows for d in DOMAINS)
    assert (run_dir / "leaderboard.md").read_text().count("\n") == len(CANDIDATES) + 2
    for name in CANDIDATES:
        results = json.loads((run_dir / "eval" / name / "results.json").read_text())
        assert set(results["results"]) == {f"optimer_{d}_test_bpb" for d in DOMAINS}
    for objective, trials in (("all", 5), ("ja", 3), ("math-code", 3)):
        lines = (run_dir / "search" / objective / "trials.jsonl").read_text().splitlines()
        assert len(lines) == trials and all(json.loads(line)["status"] == "ok" for line in lines)
        assert (run_dir / "search" / objective / "best-model" / "model.safetensors").exists()
    velocitune = json.loads((run_dir / "mixture" / "velocitune" / "velocitune.json").read_text())
    assert len(velocitune["trajectory"]) >= 2
    json.loads((run_dir / "costs.json").read_text())
    json.loads((run_dir / "vectors" / "stats.json").read_text())


def test_report_numbers_come_from_the_run(demo_run):
    run_dir, resumed = demo_run
    summary = json.loads((run_dir / "summary.json").read_text())
    report = (run_dir / "report.md").read_text()
    means = summary["test_mean_bits_per_byte"]
    for name in CANDIDATES:
        results = json.loads((run_dir / "eval" / name / "results.json").read_text())["results"]
        bpb = [results[f"optimer_{d}_test_bpb"]["bits_per_byte,none"] for d in DOMAINS]
        assert means[name] == pytest.approx(sum(bpb) / 4, abs=1e-12)
        assert f"| {means[name]:.4f} |" in report
        assert f"{means[name]:.4f}  " in resumed.stdout
    # the uniform data mixture and the retrained one really used those ratios
    ratios = summary["mixture_ratios"]
    meta = json.loads((run_dir / "mixture" / "optimer" / "train_meta.json").read_text())
    assert meta["ratios"] == pytest.approx(ratios)
    assert sum(ratios.values()) == pytest.approx(1.0)
    weights = summary["best_weights"]["all"]
    assert ratios == pytest.approx({d: w / sum(weights.values()) for d, w in weights.items()})
    assert json.loads((run_dir / "mixture" / "uniform" / "train_meta.json").read_text())["ratios"] == pytest.approx({d: 0.25 for d in DOMAINS})
    # the cost ratio follows from the trial log and the mixture runs' train_meta
    costs = json.loads((run_dir / "costs.json").read_text())["comparison"]["all"]
    trials = [json.loads(line) for line in (run_dir / "search" / "all" / "trials.jsonl").read_text().splitlines()]
    finalists = [json.loads(line) for line in (run_dir / "search" / "all" / "finalists.jsonl").read_text().splitlines()]
    optimer = sum(sum(r["seconds"].values()) for r in trials) + sum(f["seconds"]["merge"] + f["seconds"]["eval"] for f in finalists)
    assert costs["optimer_search_seconds"] == pytest.approx(optimer)
    mix = [json.loads((run_dir / "mixture" / k / "train_meta.json").read_text())["wall_seconds"] for k in ("uniform", "optimer")]
    dev_eval = sum(r["seconds"]["eval"] for r in trials) / len(trials)
    expected = sum(mix) + 2 * dev_eval + (len(trials) - 2) * (sum(mix) / 2 + dev_eval)
    assert costs["mixture_search_seconds"] == pytest.approx(expected)
    cpt = sum(json.loads((run_dir / "cpt" / d / "train_meta.json").read_text())["wall_seconds"] for d in DOMAINS)
    assert summary["cost_ratio_with_training"] == pytest.approx(expected / (cpt + optimer))
    assert f"**{summary['cost_ratio_with_training']:.1f}x** counting" in report
    # the regime: each vector's norm relative to the base, from vectors/stats.json
    stats = json.loads((run_dir / "vectors" / "stats.json").read_text())
    assert 0 < stats["relative_norm"]["ja"] < 1
    assert "||v|| / ||theta_base|| = " + ", ".join(f"{d} {stats['relative_norm'][d]:.3f}" for d in DOMAINS) in report
    # linearity: each CPT run's kept mid-run checkpoint lies part of the way along its vector
    linearity = json.loads((run_dir / "state" / "vectors.json").read_text())["result"]["linearity"]
    for d in DOMAINS:
        steps, mid = linearity[d]["steps"], linearity[d]["mid"]
        assert mid["step"] == -(-steps // 2) < steps and 0 < mid["t"] < 1, (d, steps, mid)
        final = json.loads((run_dir / "cpt" / d / "train_meta.json").read_text())["final_eval_loss"][d]
        assert linearity[d]["line"]["1.0"][d] == pytest.approx(final, rel=1e-5)
    # interference: each single-domain CPT's own gain and its mean cost on the other domains, from the test results
    test = {n: json.loads((run_dir / "eval" / n / "results.json").read_text())["results"] for n in ("base", "cpt-ja")}
    bpb = {n: {d: r[f"optimer_{d}_test_bpb"]["bits_per_byte,none"] for d in DOMAINS} for n, r in test.items()}
    assert summary["interference"]["own_gain"]["ja"] == pytest.approx(bpb["base"]["ja"] - bpb["cpt-ja"]["ja"])
    assert summary["interference"]["cross_harm"]["ja"] == pytest.approx(sum(bpb["cpt-ja"][d] - bpb["base"][d] for d in DOMAINS[1:]) / 3)
    # each verdict matches its numbers
    claims = summary["claims"]
    assert claims["beats_model_averaging"] == (means["optimer"] < means["average"])
    assert claims["beats_data_mixing"] == (means["optimer"] < means["mix-uniform"])
    verdict = "**Reproduced.**" if claims["beats_model_averaging"] else "**Not reproduced.**"
    assert f"**OptiMer beats model averaging.** {verdict}" in report


def test_rerun_is_deterministic_and_settings_are_checked(demo_run):
    run_dir, _ = demo_run
    before = json.loads((run_dir / "summary.json").read_text())
    os.remove(run_dir / "state" / "test-optimer.json")
    os.remove(run_dir / "eval" / "optimer" / "results.json")
    again = demo(run_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "24 of 25 jobs already done" in again.stdout and "start  test-optimer:" in again.stdout
    after = json.loads((run_dir / "summary.json").read_text())
    assert after["test_bits_per_byte"] == before["test_bits_per_byte"]
    other = demo(run_dir, "--cpt-tokens", "7000")
    assert other.returncode == 2 and "cpt_tokens" in other.stderr and "Traceback" not in other.stderr


def test_a_learning_rate_that_makes_cpt_diverge_is_one_line_naming_the_job_and_the_flag(tmp_path):
    done = demo(tmp_path / "run", "--lr", "1e9")
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.fullmatch(r"optimer-merge demo: error: cpt-(ja|zh): training diverged at step \d of 2: the loss is nan.* at --lr 1e\+09: lower --lr, "
                        r"and run the demo into another --run-dir \(a run folder keeps its settings\) \(its log: .*/logs/cpt-(ja|zh)\.log\)\n", done.stderr), done.stderr


def test_progress_of_running_jobs_is_read_from_their_files(demo_run):
    from optimer_merge.demo.pipeline import DemoSettings, _progress

    run_dir, _ = demo_run
    settings = DemoSettings(**json.loads((run_dir / "demo_settings.json").read_text())["settings"])
    steps = -(-CPT_TOKENS // (256 * 8))
    assert _progress(run_dir, settings, "cpt-ja") == f"step {steps}/{steps}"
    mix_steps = -(-4 * CPT_TOKENS // 2048)
    assert _progress(run_dir, settings, "mix-uniform") == f"step {mix_steps}/{mix_steps}"
    assert _progress(run_dir, settings, "search-all") == "trial 5/5"
    assert _progress(run_dir, settings, "search-ja") == "trial 3/3"
    assert _progress(run_dir, settings, "test-base") == "running"


def test_every_finished_job_but_the_last_says_the_eta(demo_run, demo_seeds):
    from optimer_merge.demo.pipeline import DemoSettings, eta, plan

    run_dir, _ = demo_run
    finished = [line for line in seed_log(demo_seeds[2].stdout, 0).splitlines() if re.match(r"\[\d+/25\]", line)]
    assert finished and all(re.search(r"min in, ETA [\d.]+ (s|min)\)", line) for line in finished[:-1]), finished
    assert finished[-1].startswith("[25/25]") and "ETA" not in finished[-1]
    jobs = plan(DemoSettings(**json.loads((run_dir / "demo_settings.json").read_text())["settings"]))
    states = {job.name: json.loads((run_dir / "state" / f"{job.name}.json").read_text()) for job in jobs}
    assert eta(jobs, states, {}, {}, 2) == 0


def test_eta_replays_the_scheduler_on_expected_durations():
    from optimer_merge.demo.pipeline import Job, eta

    jobs = [Job("a", (), "", 10), Job("b", ("a",), "", 20), Job("c", ("a",), "", 20), Job("d", ("b",), "", 40), Job("e", (), "", 5)]
    # 2 workers: a and e start; e ends at 5 and nothing else can start before a ends at 10; b and c
    # end at 30; d runs 30-70 with the other worker idle (not 95 / 2 seconds of work per worker)
    assert eta(jobs, {}, {}, {}, 2) == pytest.approx(70)
    assert eta(jobs, {}, {}, {}, 1) == pytest.approx(95)
    # a took twice its expected cost (plus 30 s of it at the reference speed): the rest 1.25x theirs
    assert eta(jobs, {"a": {}}, {}, {"a": 20.0}, 2) == pytest.approx(1.25 * 60)
    # what a running job has done is taken off, never more than its own cost
    assert eta(jobs, {"a": {}}, {"b": 5.0}, {}, 2) == pytest.approx(15 + 40)
    assert eta(jobs, {"a": {}}, {"b": 1e6}, {}, 2) == pytest.approx(40)
    assert eta(jobs, {n: {} for n in "abcde"}, {}, {}, 2) == 0


def test_shipped_recipes_run_on_the_demos_folders(demo_run, tmp_path, monkeypatch):
    """recipes/train and recipes/search name runs/demo/base/model and runs/demo/cpt/<domain>/model,
    which `make demo` (optimer-merge demo --run-dir runs/demo) creates."""
    from optimer_merge import cli
    from optimer_merge.cpt import load_config

    run_dir, _ = demo_run
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(run_dir)
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "recipes").symlink_to(repo / "recipes")  # the commands run from the repository root
    monkeypatch.chdir(tmp_path)
    for recipe in sorted((repo / "recipes" / "train").glob("tiny-*.yaml")):
        assert (tmp_path / load_config(recipe).base / "config.json").exists(), recipe.name
    train = ["train", "--config", str(repo / "recipes/train/tiny-cpt-ja.yaml"), "--max-steps", "2", "--no-progress", "--output", "runs/cpt-ja"]
    assert cli.main(train) == 0
    assert (tmp_path / "runs/cpt-ja/model/model.safetensors").exists()
    search = ["search", "--config", str(repo / "recipes/search/tiny-demo.yaml"), "--trials", "1", "--limit", "1", "--finalists", "0", "--threads", "1"]
    assert cli.main(search) == 0
    assert (tmp_path / "runs/search-tiny/best.yaml").exists()


def test_a_moved_run_folder_resumes_and_its_best_yaml_names_its_own_models(demo_seeds, tmp_path):
    """Seed 1's folder copied elsewhere and the original out of the way (as after `mv`): jobs left
    to run find the finished ones' models there (a search resumes, a merge and evaluations run),
    the results are those of the original, and best.yaml names the moved folder's CPT models."""
    original = demo_seeds[0] / "seed-1"
    moved, hidden = tmp_path / "moved", tmp_path / "original"
    shutil.copytree(original, moved, symlinks=True)
    for job in ("search-ja", "average", "test-optimer"):
        os.remove(moved / "state" / f"{job}.json")
    trials_log = moved / "search" / "ja" / "trials.jsonl"
    trials_log.write_text("".join(trials_log.read_text().splitlines(keepends=True)[:-1]))
    shutil.rmtree(moved / "search" / "ja" / "best-model")
    shutil.rmtree(moved / "merges" / "average")
    original.rename(hidden)
    try:
        again = demo(moved, "--seed", "1")
    finally:
        hidden.rename(original)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "22 of 25 jobs already done" in again.stdout and "start  search-ja:" in again.stdout
    assert f"resumed {moved / 'search' / 'ja'}: 2 trials already done" in (moved / "logs" / "search-ja.log").read_text()
    scores = lambda run: json.loads((run / "summary.json").read_text())["test_bits_per_byte"]  # noqa: E731
    assert scores(moved) == scores(original)
    best = yaml.safe_load((moved / "best.yaml").read_text())
    assert [m["model"] for m in best["models"]] == [str(moved / "cpt" / d / "model") for d in DOMAINS]


def synthetic_states(bpb: dict[str, dict[str, float]]) -> tuple[dict, dict]:
    """Job states and costs of a demo whose test bits per byte are ``bpb`` (candidate -> domain -> value)."""
    from optimer_merge.demo.pipeline import CANDIDATES, OBJECTIVES

    weights = {d: 0.5 for d in DOMAINS}
    search = {"trials": 5, "best": {"trial": 3, "weights": weights, "mixture_ratios": {d: 0.25 for d in DOMAINS}, "score": -1.9, "final_score": -1.91},
              "uniform_average": {"trial": 1, "weights": {d: 0.25 for d in DOMAINS}, "score": -2.0}}  # fmt: skip
    states = {f"test-{c.name}": {"result": {"bits_per_byte": bpb[c.name], "mean_bits_per_byte": sum(bpb[c.name].values()) / 4}} for c in CANDIDATES}
    states.update({f"search-{name}": {"result": search} for name in OBJECTIVES})
    states["base"] = {"result": {"tokens": 20_000, "parameters": 1000, "tokens_per_parameter": 20.0, "epochs_per_source": {"en": 1.0}}}
    linearity = {d: {"mid": {"cosine_with_final": 0.9, "t": 0.5, "loss": {d: 2.0}}, "line": {"0": {d: 2.5}, "1": {d: 2.0}}} for d in DOMAINS}
    states["vectors"] = {"result": {"l2_norm": {d: 1.0 for d in DOMAINS}, "relative_norm": {d: 0.05 for d in DOMAINS},
                                    "off_diagonal_cosine": {"min": -0.1, "max": 0.2, "mean": 0.05},
                                    "cosine_range_per_kind": {"embeddings": [-0.1, 0.2], "mlp": [0.0, 0.1]}, "linearity": linearity,
                                    "share_per_kind": {"embeddings": {"parameters": 0.4, "norm_sq": 0.8}, "mlp": {"parameters": 0.6, "norm_sq": 0.2}}}}
    trajectory = [{"step": 0, "weights": {d: 0.25 for d in DOMAINS}}, {"step": 6, "weights": {d: 0.25 for d in DOMAINS}, "velocity": {d: 0.0 for d in DOMAINS}}]
    states["mix-velocitune"] = {"result": {"trajectory": trajectory, "tokens_per_dataset": {d: 6000 for d in DOMAINS}}}
    entry = {"candidates": 5, "optimer_search_seconds": 10.0, "mixture_search_seconds": 400.0, "mixture_measured_seconds": 160.0,
             "mixture_extrapolated_seconds": 240.0, "mixture_run_seconds": 80.0, "dev_eval_seconds": 1.0, "ratio_search_only": 40.0}  # fmt: skip
    comparison = {name: dict(entry) for name in OBJECTIVES}
    comparison["all"].update(optimer_training_seconds=30.0, ratio_with_training=10.0, ratio_with_training_at_100_trials=20.0)
    return states, {"stages": [], "comparison": comparison, "assumptions": ["synthetic"]}


def test_report_numbers_and_verdicts_from_synthetic_states():
    from optimer_merge.demo.pipeline import CANDIDATES, DemoSettings
    from optimer_merge.demo.report import numbers, render

    flat = lambda v: {d: v for d in DOMAINS}  # noqa: E731
    bpb = {c.name: flat(2.0) for c in CANDIDATES}
    bpb.update(optimer=flat(1.8), average=flat(1.9), **{"mix-uniform": flat(1.7), "mix-optimer": flat(1.6)})
    bpb["optimer-ja"] = {**flat(1.9), "ja": 1.5}  # better on ja than the all-domain merge
    bpb["optimer-math-code"] = {**flat(1.9), "math": 1.85, "code": 1.9}  # worse on math+code (1.875 > 1.8)
    states, costs = synthetic_states(bpb)
    n = numbers(DemoSettings(), states, costs, [{"seconds": 60.0}, {"seconds": 30.0}])
    assert n["claims"] == {
        "beats_data_mixing": False,
        "beats_model_averaging": True,
        "search_cost_15x_or_more": {"search_only": True, "with_training": False},
        "ratios_improve_mixture": True,
        "reoptimization_without_retraining": False,
    }
    assert n["test_mean_bits_per_byte"]["optimer"] == pytest.approx(1.8) and n["wall_seconds"] == 90.0
    assert n["velocitune"]["frozen_from_step"] == 6
    report = render(n)
    assert "**OptiMer beats data mixing.** **Not reproduced.**" in report
    assert "**OptiMer beats model averaging.** **Reproduced.**" in report
    assert "**15-35x lower search cost.** **Reproduced for the search itself, not once OptiMer's training is counted.**" in report
    assert "wall time 1.5 min over 2 invocations (resumed)" in report
    assert "From step 6 every domain was at or below its fitted target loss" in report
    assert "per kind of tensor: embeddings 40% / 80%, mlp 60% / 20%." in report
