"""Distribution vectors and `optimer-merge search`: real CPT models, real mergekit, lm-eval and SMAC."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DOMAINS, REPO
from helpers import load_weights, max_abs_diff, mergekit_yaml, wait_for_trials
from safetensors.torch import load_file, save_file

from optimer_merge import cli
from optimer_merge.search import workers
from optimer_merge.search.optimizers import make_optimizer, uniform_point
from optimer_merge.search.pool import build_host_pool, build_module_pool, check_sources

CLI = [sys.executable, "-m", "optimer_merge.cli"]
OBJECTIVE = str(REPO / "recipes/objectives/dev-bpb.yaml")
TRIALS = 20


def search_args(small_base, cpt_runs, output, *extra) -> list[str]:
    args = ["search", "--base", str(small_base), "--objective", OBJECTIVE, "--output", str(output)]
    args += ["--limit", "6", "--finalists", "2", "--finalist-limit", "12", "--trials", str(TRIALS), "--threads", "1"]
    for d in DOMAINS:
        args += ["--vector", f"{d}={cpt_runs[d] / 'model'}"]
    return args + list(extra)


def trials(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def vectors_dir(tmp_path_factory, small_base, cpt_runs) -> Path:
    out = tmp_path_factory.mktemp("vectors")
    args = ["vectors", "extract", "--base", str(small_base), "--out", str(out)]
    for d in DOMAINS:
        args += ["--model", f"{d}={cpt_runs[d] / 'model'}"]
    assert cli.main(args) == 0
    return out


@pytest.fixture(scope="session")
def search_run(tmp_path_factory, small_base, cpt_runs) -> Path:
    """A 20-trial SMAC search over the four CPT models, run through the CLI with --export."""
    out = tmp_path_factory.mktemp("search") / "run"
    env = {**os.environ, "PYTHONHASHSEED": "1"}
    done = subprocess.run(CLI + search_args(small_base, cpt_runs, out, "--export"), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (out.parent / "stdout.txt").write_text(done.stdout)
    return out


def test_extracted_vectors_are_model_minus_base(vectors_dir, small_base, cpt_runs):
    manifest = json.loads((vectors_dir / "vectors.json").read_text())
    base = load_weights(small_base)
    for d in DOMAINS:
        vector, model = load_file(str(vectors_dir / f"{d}.safetensors")), load_weights(cpt_runs[d] / "model")
        assert set(vector) == set(base)
        assert max((model[k].float() - base[k].float() - vector[k]).abs().max().item() for k in vector) == 0.0
        norm = math.sqrt(sum(float(v.double().square().sum()) for v in vector.values()))
        assert manifest["vectors"][d]["l2_norm"] == pytest.approx(norm, rel=1e-9)
    assert manifest["skipped"] == {"equal_in_all_models": [], "not_floating_point": []}


def test_extracting_into_a_vectors_folder_adds_to_it(vectors_dir, small_base, cpt_runs, tmp_path):
    """One more vector extracted into the pool's folder joins the earlier ones (it replaced the
    manifest before, orphaning them); a name given again is replaced."""
    out = tmp_path / "v"
    shutil.copytree(vectors_dir, out)
    before = json.loads((out / "vectors.json").read_text())
    for d in ("zh", "code"):
        (out / f"{d}.safetensors").unlink()  # no longer listed
    assert cli.main(["vectors", "extract", "--base", str(small_base), "--out", str(out), "--model", f"extra={cpt_runs['code'] / 'model'}"]) == 0
    after = json.loads((out / "vectors.json").read_text())
    assert list(after["vectors"]) == ["ja", "math", "extra"]
    assert after["vectors"]["extra"]["l2_norm"] == pytest.approx(before["vectors"]["code"]["l2_norm"], rel=1e-9)
    assert {d: after["vectors"][d] for d in ("ja", "math")} == {d: before["vectors"][d] for d in ("ja", "math")}
    assert cli.main(["vectors", "extract", "--base", str(small_base), "--out", str(out), "--model", f"ja={cpt_runs['zh'] / 'model'}"]) == 0
    assert json.loads((out / "vectors.json").read_text())["vectors"]["ja"]["l2_norm"] == pytest.approx(before["vectors"]["zh"]["l2_norm"], rel=1e-9)


def test_an_extraction_rerun_keeps_the_vectors_of_unchanged_models(vectors_dir, small_base, cpt_runs, tmp_path, capsys):
    """The same command again reads nothing and rewrites nothing; a model folder whose weights
    changed since (retrained in place) is extracted again."""
    out, model = tmp_path / "v", tmp_path / "ja-model"
    shutil.copytree(vectors_dir, out)
    shutil.copytree(cpt_runs["ja"] / "model", model)
    args = ["vectors", "extract", "--base", str(small_base), "--out", str(out), "--model", f"ja={model}", "--model", f"zh={cpt_runs['zh'] / 'model'}"]
    before = json.loads((out / "vectors.json").read_text())["vectors"]
    assert cli.main(args) == 0  # ja now comes from another folder: extracted again
    assert "ja replaced (another model, or changed since)" in capsys.readouterr().out
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".safetensors"}
    assert cli.main(args) == 0
    log = capsys.readouterr().out
    assert "ja, zh up to date (same model, unchanged since)" in log and "extracting" not in log
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".safetensors"} == stamps
    shutil.copy(cpt_runs["zh"] / "model/model.safetensors", model / "model.safetensors")  # retrained in place
    assert cli.main(args) == 0
    assert "ja replaced (another model, or changed since)" in capsys.readouterr().out
    after = json.loads((out / "vectors.json").read_text())["vectors"]
    assert after["ja"]["l2_norm"] == pytest.approx(before["zh"]["l2_norm"], rel=1e-9)
    assert {d: after[d]["l2_norm"] for d in ("zh", "math", "code")} == {d: before[d]["l2_norm"] for d in ("zh", "math", "code")}


def test_tensors_equal_in_all_models_are_skipped_and_recorded(tmp_path, small_base, cpt_runs):
    base = load_weights(small_base)
    frozen = "model.norm.weight"
    models = {}
    for d in ("ja", "zh"):
        weights = load_weights(cpt_runs[d] / "model")
        weights[frozen] = base[frozen].clone()
        folder = tmp_path / d
        folder.mkdir()
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        models[d] = str(folder)
    assert cli.main(["vectors", "extract", "--base", str(small_base), "--out", str(tmp_path / "v"), "--model", f"ja={models['ja']}", "--model", f"zh={models['zh']}"]) == 0
    manifest = json.loads((tmp_path / "v/vectors.json").read_text())
    assert manifest["skipped"]["equal_in_all_models"] == [frozen]
    assert frozen not in load_file(str(tmp_path / "v/ja.safetensors"))
    pool = build_host_pool(check_sources(small_base, {d: {"vector": str(tmp_path / f"v/{d}.safetensors")} for d in ("ja", "zh")}), log=lambda _m: None)
    assert frozen in pool.skipped and frozen not in {e.name for e in pool.entries}


def test_a_delta_beyond_float16_is_refused_and_leaves_nothing(tmp_path, tiny_zoo, capsys):
    base = tiny_zoo / "tiny-text/base"
    weights = load_weights(base)
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1e5  # float16 tops out at 65504
    (tmp_path / "far").mkdir()
    shutil.copy(base / "config.json", tmp_path / "far/config.json")
    save_file(weights, str(tmp_path / "far/model.safetensors"), metadata={"format": "pt"})
    argv = ["vectors", "extract", "--base", str(base), "--out", str(tmp_path / "v"), "--model", f"far={tmp_path / 'far'}", "--dtype", "float16"]
    assert cli.main(argv) == 2
    assert "tensor model.norm.weight differs from the base by up to 100000, beyond float16's largest value 65504" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_vector_stats_match_direct_cosines(vectors_dir, tmp_path, monkeypatch):
    import optimer_merge.io.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "PIECE_ELEMENTS", 1000)  # large tensors are read in pieces: many of them here
    assert cli.main(["vectors", "stats", str(vectors_dir), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "stats.json").read_text())
    assert (tmp_path / "cosine.png").stat().st_size > 10_000
    flat = {d: torch.cat([t.double().reshape(-1) for _, t in sorted(load_file(str(vectors_dir / f"{d}.safetensors")).items())]) for d in DOMAINS}
    for i, a in enumerate(DOMAINS):
        assert result["l2_norm"][a] == pytest.approx(float(flat[a].norm()), rel=1e-9)
        for j, b in enumerate(DOMAINS):
            expected = float(flat[a] @ flat[b] / flat[a].norm() / flat[b].norm())
            assert result["cosine"][i][j] == pytest.approx(expected, abs=1e-9)
    assert set(result["per_layer"]) == {"embed", "layer 0", "layer 1", "other"}
    # per kind of tensor, and relative to the base that vectors.json records
    assert set(result["per_kind"]) == {"embeddings", "attention", "mlp", "norms"}
    base = {k: v.double() for k, v in load_weights(json.loads((vectors_dir / "vectors.json").read_text())["base"]).items()}
    base_norm = math.sqrt(sum(float(t.pow(2).sum()) for t in base.values()))
    for d in DOMAINS:
        assert result["relative_norm"][d] == pytest.approx(float(flat[d].norm()) / base_norm, rel=1e-9)
    mlp = [k for k in sorted(load_file(str(vectors_dir / "ja.safetensors"))) if ".mlp." in k]
    ja, zh = (torch.cat([load_file(str(vectors_dir / f"{d}.safetensors"))[k].double().reshape(-1) for k in mlp]) for d in ("ja", "zh"))
    assert result["per_kind"]["mlp"]["cosine"][0][1] == pytest.approx(float(ja @ zh / ja.norm() / zh.norm()), abs=1e-9)
    mlp_base = math.sqrt(sum(float(base[k].pow(2).sum()) for k in mlp))
    assert result["per_kind"]["mlp"]["relative_norm"]["ja"] == pytest.approx(float(ja.norm()) / mlp_base, rel=1e-9)
    # where each vector's length sits: shares of ||v||^2 and of the base's parameters per kind
    for d in DOMAINS:
        kind_sq = {kind: e["l2_norm"][d] ** 2 for kind, e in result["per_kind"].items()}
        assert sum(e["share_of_norm_sq"][d] for e in result["per_kind"].values()) == pytest.approx(1.0, rel=1e-9)
        assert result["per_kind"]["mlp"]["share_of_norm_sq"][d] == pytest.approx(kind_sq["mlp"] / sum(kind_sq.values()), rel=1e-9)
    mlp_params = sum(base[k].numel() for k in mlp)
    assert result["per_kind"]["mlp"]["share_of_parameters"] == pytest.approx(mlp_params / sum(t.numel() for t in base.values()), rel=1e-12)
    # Distinct domains give distinct directions: no pair is nearly parallel.
    assert result["off_diagonal_cosine"]["max"] < 0.9
    # a vector file without a tensor (extracted apart, where that tensor equalled the base's) is 0 there
    from safetensors import safe_open
    from safetensors.torch import save_file

    from optimer_merge.vectors.stats import stats

    with safe_open(str(vectors_dir / "zh.safetensors"), "pt") as reader:
        metadata = reader.metadata()
    zh = load_file(str(vectors_dir / "zh.safetensors"))
    dropped = max(zh, key=lambda k: zh[k].numel())
    save_file({k: v for k, v in zh.items() if k != dropped}, str(tmp_path / "zh-part.safetensors"), metadata=metadata)
    part = stats({"ja": vectors_dir / "ja.safetensors", "zh": tmp_path / "zh-part.safetensors"}, log=lambda _m: None)
    ja = load_file(str(vectors_dir / "ja.safetensors"))
    a = torch.cat([ja[k].double().reshape(-1) for k in sorted(ja)])
    b_part = torch.cat([zh[k].double().reshape(-1) if k != dropped else torch.zeros(zh[k].numel(), dtype=torch.float64) for k in sorted(ja)])
    assert zh[dropped].any()
    assert part["cosine"][0][1] == pytest.approx(float(a @ b_part / a.norm() / b_part.norm()), abs=1e-9)
    assert part["l2_norm"]["zh"] == pytest.approx(float(b_part.norm()), rel=1e-9)


def test_search_writes_every_artefact(search_run, small_base):
    records = trials(search_run)
    assert [r["trial"] for r in records] == list(range(1, TRIALS + 1))
    for r in records:
        assert r["status"] == "ok" and math.isfinite(r["score"]) and set(r["weights"]) == set(DOMAINS)
        assert all(0.0 <= w <= 1.0 for w in r["weights"].values())
        assert set(r["metrics"]) == {f"optimer_{d}_dev_bpb/bits_per_byte" for d in DOMAINS}
        assert set(r["seconds"]) == {"merge", "eval", "optimizer"}
        recipe = yaml.safe_load((search_run / r["recipe"]).read_text())
        assert recipe["merge_method"] == "optimer" and [m["parameters"]["weight"] for m in recipe["models"]] == list(r["weights"].values())
    summary = json.loads((search_run / "summary.json").read_text())
    uniform = summary["uniform_average"]
    assert uniform == {"trial": 1, "weights": {d: 0.25 for d in DOMAINS}, "score": records[0]["score"]}
    best = summary["best"]
    assert best["trial"] in {f["trial"] for f in summary["finalists"]} and len(summary["finalists"]) == 2
    assert all(f["final_score"] is not None for f in summary["finalists"])
    assert best["final_score"] == max(f["final_score"] for f in summary["finalists"]) and best["rescored"] is True
    assert sum(best["mixture_ratios"].values()) == pytest.approx(1.0)
    said = f"score {best['score']:.5f} at limit 6, {best['final_score']:.5f} at limit 12 (trial {best['trial']})\n"
    assert said in (search_run.parent / "stdout.txt").read_text()
    for name in ("trace.png", "weights.png", "best.yaml"):
        assert (search_run / name).stat().st_size > 0
    finalists = [json.loads(line) for line in (search_run / "finalists.jsonl").read_text().splitlines()]
    assert {f["limit"] for f in finalists} == {12}
    # --export: stock mergekit on best.yaml gives the in-memory merge of the best weights.
    pool = build_host_pool(check_sources(small_base, {d: {"model": summary["vectors"][d]} for d in DOMAINS}), log=lambda _m: None)
    exported = load_weights(search_run / "best-model")
    merged = dict(pool.merged(best["weights"]))
    assert max((exported[k] - merged[k]).abs().max().item() for k in merged) < 1e-6


def test_a_finished_search_rerun_loads_no_model_and_keeps_its_export(search_run, small_base, cpt_runs, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(search_run, out)
    weights = out / "best-model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert cli.main(search_args(small_base, cpt_runs, out, "--export")) == 0
    said = capsys.readouterr().out
    assert f"resumed {out}: {TRIALS} trials already done" in said and "loading" not in said, said
    assert f"{out / 'best-model'} already holds the merge of best.yaml; not merged again" in said and weights.stat().st_mtime_ns == stamp
    (out / "best-model" / "notes").mkdir()  # a folder of the user's: the export must not replace it with the merge
    assert cli.main(search_args(small_base, cpt_runs, out, "--export")) == 2
    assert "best-model holds an earlier merge and also notes/" in capsys.readouterr().err and (out / "best-model" / "notes").is_dir()


def test_trial_recipe_through_stock_mergekit_equals_in_memory_merge(search_run, small_base, tmp_path):
    from transformers import AutoModelForCausalLM

    record = next(r for r in trials(search_run) if len(set(r["weights"].values())) > 1)
    recipe = search_run / record["recipe"]
    done = mergekit_yaml(recipe, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-2000:]
    on_disk = load_weights(tmp_path / "out")
    config = yaml.safe_load(recipe.read_text())
    spec = check_sources(small_base, {Path(m["model"]).parent.name: {"model": m["model"]} for m in config["models"]})
    # the in-memory trial merge writes straight into a live model's parameters
    model = AutoModelForCausalLM.from_pretrained(small_base, dtype=torch.float32)
    build_module_pool(model, spec, log=lambda _m: None).apply(record["weights"])
    pool = build_host_pool(spec, log=lambda _m: None)
    live = {k: v for k, v in model.state_dict().items() if k in on_disk}
    assert max_abs_diff(live, on_disk) < 1e-6
    assert max((on_disk[k] - t).abs().max().item() for k, t in pool.merged(record["weights"])) < 1e-6


def test_stopped_and_killed_searches_resume_to_the_same_search(search_run, small_base, cpt_runs, tmp_path, capsys):
    """SIGTERM (a scheduler's stop) unwinds like Ctrl-C: one line, exit 143; the rerun SIGKILLed past
    SMAC's initial design, in the middle of writing a line; the next rerun replays to the very search
    an uninterrupted run makes. A rerun asking for fewer trials than are done runs none and says so."""
    out = tmp_path / "run"
    args = CLI + search_args(small_base, cpt_runs, out)
    env = {**os.environ, "PYTHONHASHSEED": "2"}  # another process hash seed: proposals must not depend on it

    def start_and_wait_for(count: int, **streams) -> subprocess.Popen:
        process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, start_new_session=True, text=True, **streams)
        wait_for_trials(out, count, process)
        return process

    process = start_and_wait_for(1, stderr=subprocess.PIPE)
    process.send_signal(signal.SIGTERM)
    err = process.stderr.read()
    assert process.wait(timeout=120) == 143, err
    assert "stopped by SIGTERM; the same command resumes where this run stopped" in err.splitlines() and "Traceback" not in err, err
    assert 1 <= len(trials(out)) < 11
    process = start_and_wait_for(11, stderr=subprocess.DEVNULL)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(trials(out))
    assert 11 <= done_before < TRIALS
    with open(out / "trials.jsonl", "a") as f:  # as if killed in the middle of writing a line
        f.write('{"trial": 99, "weights": {"ja"')
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed {out}: {done_before} trials already done" in done.stdout
    resumed, reference = trials(out), trials(search_run)
    assert [r["trial"] for r in resumed] == list(range(1, TRIALS + 1))
    assert [r["weights"] for r in resumed] == [r["weights"] for r in reference]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(resumed, reference)) < 1e-9
    best = json.loads((out / "summary.json").read_text())["best"]
    assert best["weights"] == json.loads((search_run / "summary.json").read_text())["best"]["weights"]

    assert cli.main(search_args(small_base, cpt_runs, out, "--trials", "12")) == 0
    assert f"resumed {out}: {TRIALS} trials already done (more than trials 12: the results cover all {TRIALS})" in capsys.readouterr().out
    assert trials(out) == resumed and json.loads((out / "summary.json").read_text())["best"] == best


def test_failed_trials_are_recorded_and_the_search_goes_on(small_base, cpt_runs, tmp_path, capsys):
    # float16 evaluation with ja up to 1e7: such weights overflow float16, and the score is NaN
    out = tmp_path / "run"
    args = search_args(small_base, cpt_runs, out, "--optimizer", "random", "--trials", "6", "--finalists", "0")
    args += ["--set", "vectors=" + json.dumps([{"name": d, "model": str(cpt_runs[d] / "model"), **({"bounds": [0, 1e7]} if d == "ja" else {})} for d in DOMAINS])]
    args += ["--set", "max_consecutive_failures=10", "--set", "dtype=float16"]
    assert cli.main(args) == 0
    records = trials(out)
    assert records[0]["status"] == "ok" and records[0]["weights"]["ja"] == 0.25
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) >= 3 and all("score is not finite" in r["reason"] and r["score"] is None for r in failed)
    assert all(r["told"] < records[0]["score"] for r in failed)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_trials"] == len(failed) and summary["best"]["trial"] == records[0]["trial"]
    assert "FAILED: score is not finite" in capsys.readouterr().out


def test_consecutive_failures_stop_the_search_with_the_cause(small_base, cpt_runs, tmp_path, capsys):
    out = tmp_path / "run"
    args = search_args(small_base, cpt_runs, out, "--optimizer", "random", "--set", "bounds=[1.0e+7, 1.1e+7]", "--set", "max_consecutive_failures=2", "--set", "dtype=float16")
    assert cli.main(args + ["--finalist-limit", "3"]) == 2
    captured = capsys.readouterr()
    assert "stopped after 2 consecutive failed trials" in captured.err and "score is not finite" in captured.err
    # re-scoring finalists on fewer items than the trials saw is allowed, and said at the start
    assert "warning: finalist_limit 3 is below limit 6" in captured.out.split("loading")[0]
    assert len(trials(out)) == 2


def test_finalists_are_not_rescored_on_the_items_the_trials_saw(small_base, cpt_runs, tmp_path, capsys):
    # optimer_code_dev_bpb has 138 items: a limit of 200 scores all of them, so a finalist limit
    # of 300 would score the very same items again
    objective = tmp_path / "code.yaml"
    objective.write_text("tasks:\n- {task: optimer_code_dev_bpb, metric: bits_per_byte}\n")
    out = tmp_path / "run"
    args = search_args(small_base, cpt_runs, out, "--objective", str(objective), "--optimizer", "random", "--trials", "2")
    assert cli.main(args + ["--limit", "200", "--finalists", "1", "--finalist-limit", "300"]) == 0
    assert [r["items"] for r in trials(out)] == [{"optimer_code_dev_bpb": 138}] * 2
    said = capsys.readouterr().out
    assert "finalists keep their trial scores" in said
    assert not (out / "finalists.jsonl").exists()
    best = json.loads((out / "summary.json").read_text())["best"]
    assert best["final_score"] == best["score"] == max(r["score"] for r in trials(out)) and best["rescored"] is False
    assert f"score {best['score']:.5f} at limit 200 (trial {best['trial']})\n" in said and " at limit 300" not in said


def test_a_failed_finalist_is_said_and_scored_again_once_a_setting_changed(small_base, cpt_runs, tmp_path, capsys):
    out = tmp_path / "run"
    args = search_args(small_base, cpt_runs, out, "--optimizer", "random", "--trials", "3", "--limit", "2", "--finalist-limit", "3")
    assert cli.main(args) == 0
    best = json.loads((out / "summary.json").read_text())["best"]
    # the best finalist failed (as an out-of-memory at the longer limit would)
    lines = [json.loads(line) for line in (out / "finalists.jsonl").read_text().splitlines()]
    failed = next(r for r in lines if r["trial"] == best["trial"])
    failed.update(status="failed", score=None, reason="evaluation failed: OutOfMemoryError: simulated")
    (out / "finalists.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    capsys.readouterr()
    assert cli.main(args) == 0  # the same settings: it would fail again, so it stays failed, and is said
    assert f"warning: finalist trial {best['trial']} failed at limit 3 (evaluation failed: OutOfMemoryError: simulated)" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["best"]["trial"] != best["trial"]
    assert cli.main(args + ["--set", "batch_size=8"]) == 0  # a changed setting: scored again
    assert f"finalist 1/1: trial {best['trial']} score {best['final_score']:.5f} at limit 3" in capsys.readouterr().out
    again = json.loads((out / "summary.json").read_text())["best"]
    # another batch size pads the requests differently: the same score up to float rounding
    assert again["trial"] == best["trial"] and again["final_score"] == pytest.approx(best["final_score"], abs=1e-6)


def test_trials_score_against_the_reference_as_it_was_when_the_search_started(small_base, cpt_runs, tmp_path):
    """The reference results rewritten during a search (the base evaluated again into the same
    folder) change no trial's score: every trial of one run is scored against one reference."""
    from optimer_merge.search import load_search_config, search

    reference = tmp_path / "reference.json"
    write = lambda bpb: reference.write_text(json.dumps({"results": {"optimer_ja_dev_bpb": {"bits_per_byte,none": bpb}}}))  # noqa: E731
    (tmp_path / "objective.yaml").write_text("tasks:\n- {task: optimer_ja_dev_bpb, metric: bits_per_byte}\nreference: reference.json\n")
    settings = {"base": str(small_base), "vectors": [{"name": d, "model": str(cpt_runs[d] / "model")} for d in DOMAINS],
                "objective": str(tmp_path / "objective.yaml"), "limit": 2, "trials": 3, "finalists": 0, "optimizer": "random", "threads": 1}  # fmt: skip

    def rewrite_after_trial_1(line: str) -> None:
        if line.startswith("trial 1/"):
            write(4.0)

    write(2.0)
    search(load_search_config(None, {**settings, "output": str(tmp_path / "changed")}), log=rewrite_after_trial_1)
    write(2.0)
    search(load_search_config(None, {**settings, "output": str(tmp_path / "kept")}), log=lambda _line: None)
    changed, kept = trials(tmp_path / "changed"), trials(tmp_path / "kept")
    assert [r["score"] for r in changed] == [r["score"] for r in kept]
    summary = json.loads((tmp_path / "changed" / "summary.json").read_text())
    assert summary["objective"]["reference"] == str(reference)  # the spec as given, its reference a path


def _no_evaluator(*args, **kwargs):
    raise AssertionError("an evaluator was started")


def _fails_before_work(args: list[str], capsys, out: Path, *, loads_model: bool = False) -> str:
    """Refused with exit code 2, nothing written; unless ``loads_model`` (a check of the pool, built
    with the trials' model), before an evaluator is started."""
    with pytest.MonkeyPatch.context() as patch:
        if not loads_model:
            patch.setattr(workers, "open_workers", _no_evaluator)
        assert cli.main(args) == 2
    assert not out.exists()  # nothing written
    return capsys.readouterr().err


def test_bad_configs_fail_before_any_trial(small_base, cpt_runs, vectors_dir, tiny_zoo, tmp_path, capsys):
    out = tmp_path / "run"
    base_args = search_args(small_base, cpt_runs, out)

    # bounds with min > max
    assert "min > max" in _fails_before_work(base_args + ["--set", "bounds=[1, 0]"], capsys, out)
    # an unknown task in the objective
    objective = tmp_path / "objective.yaml"
    objective.write_text("tasks:\n- {task: no_such_task, metric: acc}\n")
    assert "no_such_task" in _fails_before_work(base_args + ["--objective", str(objective)], capsys, out)
    # a vector file with NaN
    bad = tmp_path / "nan.safetensors"
    vector = load_file(str(vectors_dir / "ja.safetensors"))
    vector["model.norm.weight"][0] = float("nan")
    from safetensors import safe_open

    save_file(vector, str(bad), metadata=safe_open(str(vectors_dir / "ja.safetensors"), "pt").metadata())
    with_bad = [f"bad={bad}" if a == f"ja={cpt_runs['ja'] / 'model'}" else a for a in base_args]  # in place of the model it comes from
    assert "NaN/Inf" in _fails_before_work(with_bad, capsys, out, loads_model=True)
    # vectors extracted from another base (a copy of the model without the train_meta.json that records its base)
    other, unrecorded = tmp_path / "other-vectors", tmp_path / "unrecorded"
    shutil.copytree(cpt_runs["ja"] / "model", unrecorded, ignore=shutil.ignore_patterns("train_meta.json"))
    assert cli.main(["vectors", "extract", "--base", str(small_base.parent.parent / "init"), "--model", f"ja={unrecorded}", "--out", str(other)]) == 0
    capsys.readouterr()
    assert "different base" in _fails_before_work(base_args + ["--vector", f"other={other / 'ja.safetensors'}"], capsys, out)
    # a model of another shape
    err = _fails_before_work(base_args + ["--vector", f"odd={tiny_zoo / 'tiny-text/ja'}"], capsys, out)
    assert "does not have the base's tensors" in err or "has shape" in err
    # an output folder that holds a different search
    assert cli.main(base_args + ["--trials", "1", "--finalists", "0", "--optimizer", "random"]) == 0
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(workers, "open_workers", _no_evaluator)
        assert cli.main(base_args + ["--trials", "1", "--seed", "7", "--optimizer", "random"]) == 2
    assert "holds a different search (settings differ: seed)" in capsys.readouterr().err
    assert len(trials(out)) == 1


def test_only_non_negative_weights_read_as_mixture_ratios():
    from optimer_merge.search.runner import mixture_ratios

    assert mixture_ratios({"ja": 0.3, "zh": 0.1, "math": 0.0}) == pytest.approx({"ja": 0.75, "zh": 0.25, "math": 0.0})
    assert mixture_ratios({"ja": -0.2, "zh": 0.0}) is None  # was {ja: 1.0, zh: -0.0}
    assert mixture_ratios({"ja": 0.5, "zh": -0.1}) is None and mixture_ratios({"ja": 0.0, "zh": 0.0}) is None


@pytest.mark.parametrize("kind", ["smac", "tpe", "random"])
def test_optimizers_start_with_uniform_and_repeat_for_a_seed(kind, tmp_path):
    bounds = {d: (0.0, 1.0) for d in DOMAINS}

    def run(seed: int) -> list[dict]:
        optimizer, asked = make_optimizer(kind, bounds, seed, tmp_path / f"w{seed}"), []
        for _ in range(12):
            w = optimizer.ask()
            optimizer.tell(w, -sum((v - 0.3) ** 2 for v in w.values()))
            asked.append(w)
        return asked

    first = run(0)
    assert first[0] == uniform_point(bounds)
    assert run(0) == first and run(1) != first
    assert all(set(w) == set(DOMAINS) and all(0 <= v <= 1 for v in w.values()) for w in first)


def test_smac_proposals_do_not_depend_on_the_process_hash_seed(tmp_path):
    code = (
        "import json, sys; from optimer_merge.search.optimizers import make_optimizer\n"
        "o = make_optimizer('smac', {n: (0.0, 1.0) for n in 'abc'}, 0, sys.argv[1]); out = []\n"
        "for _ in range(9):\n    w = o.ask(); o.tell(w, -sum((v - 0.3) ** 2 for v in w.values())); out.append(w)\n"
        "print(json.dumps(out))\n"
    )
    outputs = []
    for seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / seed)], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(json.loads(done.stdout.splitlines()[-1]))
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("name", ["tiny-demo.yaml", "gemma3-27b.yaml"])
def test_shipped_search_configs_validate(name):
    from optimer_merge.search import load_search_config

    config = load_search_config(REPO / "recipes/search" / name)
    assert config.optimizer == "smac" and config.trials >= 40 and len(config.vectors) >= 4
    assert (REPO / config.objective).exists()


def test_two_searches_cannot_share_a_folder(small_base, cpt_runs, tmp_path, capsys):
    from optimer_merge.io.run_folder import RunFolder

    out = tmp_path / "run"
    with RunFolder(out, "search"):  # another search holds the folder
        assert cli.main(search_args(small_base, cpt_runs, out, "--trials", "1")) == 2
    err = capsys.readouterr().err
    assert f"{out} is in use by another search (process {os.getpid()})" in err
    assert not (out / "trials.jsonl").exists()


def test_failures_from_a_setting_are_retried_once_it_is_fixed(small_base, cpt_runs, tmp_path, capsys):
    """Trials that failed under one batch size (as an out-of-memory would) run again once the
    setting changes; with the same settings the failures stand."""
    out = tmp_path / "run"
    args = search_args(small_base, cpt_runs, out, "--optimizer", "random", "--trials", "3", "--finalists", "0")
    args += ["--set", "max_consecutive_failures=2"]
    assert cli.main(args) == 0
    good = trials(out)
    assert [r["settings"]["batch_size"] for r in good] == [16, 16, 16]
    failed = [{**r, "status": "failed", "reason": "evaluation failed: OutOfMemoryError: CPU out of memory", "score": None,
               "metrics": {}, "told": -1.0, "settings": {**r["settings"], "batch_size": 64}} for r in good[1:]]  # fmt: skip
    (out / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good[:1] + failed))
    capsys.readouterr()
    assert cli.main(args + ["--set", "batch_size=64"]) == 2
    assert "stopped after 2 consecutive failed trials; the last: evaluation failed: OutOfMemoryError" in capsys.readouterr().err
    assert len(trials(out)) == 3
    assert cli.main(args) == 0
    assert "retrying the 2 failed trial(s) at the end of the log: batch_size changed since" in capsys.readouterr().out
    again = trials(out)
    assert [r["status"] for r in again] == ["ok", "ok", "ok"] and [r["weights"] for r in again] == [r["weights"] for r in good]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(again, good)) < 1e-9
    retried = [json.loads(line) for line in (out / "trials.retried.jsonl").read_text().splitlines()]
    assert [(r["trial"], r["settings"]["batch_size"]) for r in retried] == [(2, 64), (3, 64)]


def test_a_damaged_line_inside_the_log_is_run_again_in_place(search_run, small_base, cpt_runs, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(search_run, out)
    reference = trials(search_run)
    lines = (out / "trials.jsonl").read_text().splitlines()
    lines[4] = lines[4][: len(lines[4]) // 2]  # trial 5, cut in half
    (out / "trials.jsonl").write_text("\n".join(lines) + "\n")
    assert cli.main(search_args(small_base, cpt_runs, out)) == 0
    assert f"trial 5: a damaged line in {out / 'trials.jsonl'}; running it again" in capsys.readouterr().out
    repaired = trials(out)
    assert [r["weights"] for r in repaired] == [r["weights"] for r in reference]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(repaired, reference)) < 1e-9


def test_best_yaml_says_when_a_vectors_model_is_gone(small_base, cpt_runs, tmp_path, capsys):
    models = {d: tmp_path / f"model-{d}" for d in ("ja", "zh")}
    for d, folder in models.items():
        shutil.copytree(cpt_runs[d] / "model", folder)
    args = ["vectors", "extract", "--base", str(small_base), "--out", str(tmp_path / "v")]
    assert cli.main(args + [f"--model={d}={folder}" for d, folder in models.items()]) == 0
    shutil.rmtree(models["zh"])
    out = tmp_path / "run"
    search = ["search", "--base", str(small_base), "--objective", OBJECTIVE, "--output", str(out), "--limit", "2", "--trials", "1", "--finalists", "1",
              "--finalist-limit", "2", "--threads", "1", "--vector", f"ja={tmp_path / 'v/ja.safetensors'}", "--vector", f"zh={tmp_path / 'v/zh.safetensors'}"]  # fmt: skip
    assert cli.main(search) == 0
    said = capsys.readouterr().out
    assert f"the models behind zh ({models['zh']}) no longer exist" in said
    # a finalist re-scored on the items its trial saw keeps its score: said once
    score = json.loads((out / "trials.jsonl").read_text())["score"]
    assert f"score {score:.5f} at limit 2 (trial 1)\n" in said
    best = (out / "best.yaml").read_text()
    assert best.startswith(f"# WARNING: the model behind vector zh ({models['zh']}) no longer exists")
    assert yaml.safe_load(best)["models"][1]["model"] == str(models["zh"])
    assert json.loads((out / "summary.json").read_text())["missing_models"] == {"zh": str(models["zh"])}


def test_a_project_moved_with_its_vectors_and_models_keeps_its_vectors_and_resumes_its_search(small_base, cpt_runs, tmp_path, capsys):
    """A project folder (models, vectors, search) moved elsewhere: each vector finds its model again
    at the same place relative to it (its fingerprint checked), so the extraction rerun there reads
    nothing, the search resumes there, and best.yaml names the models where they are now. Another
    model in a moved one's place is not taken for it."""
    project, moved = tmp_path / "project", tmp_path / "moved"
    for d in ("ja", "zh"):
        shutil.copytree(cpt_runs[d] / "model", project / "models" / d)

    def extract(root: Path) -> list[str]:
        return ["vectors", "extract", "--base", str(small_base), "--out", str(root / "v"), *(f"--model={d}={root / 'models' / d}" for d in ("ja", "zh"))]

    assert cli.main(extract(project)) == 0

    def search(root: Path, trials: int) -> list[str]:
        return ["search", "--base", str(small_base), "--objective", OBJECTIVE, "--output", str(root / "run"), "--limit", "2", "--trials", str(trials),
                "--finalists", "0", "--threads", "1", *(f"--vector={d}={root / 'v' / f'{d}.safetensors'}" for d in ("ja", "zh"))]  # fmt: skip

    assert cli.main(search(project, 1)) == 0
    project.rename(moved)
    stamps = {p.name: p.stat().st_mtime_ns for p in (moved / "v").glob("*.safetensors")}
    capsys.readouterr()
    assert cli.main(extract(moved)) == 0
    said = capsys.readouterr().out
    assert "ja, zh up to date (same model, unchanged since)" in said and "extracting" not in said, said
    assert {p.name: p.stat().st_mtime_ns for p in (moved / "v").glob("*.safetensors")} == stamps
    manifest = json.loads((moved / "v" / "vectors.json").read_text())
    assert (manifest["base"], [e["model"] for e in manifest["vectors"].values()]) == (str(small_base), [str(moved / "models" / d) for d in ("ja", "zh")])
    assert cli.main(search(moved, 2)) == 0
    said = capsys.readouterr().out
    assert f"resumed {moved / 'run'}: 1 trial already done" in said and "no longer exist" not in said, said
    assert [r["trial"] for r in trials(moved / "run")] == [1, 2]
    best = (moved / "run" / "best.yaml").read_text()
    assert [m["model"] for m in yaml.safe_load(best)["models"]] == [str(moved / "models" / d) for d in ("ja", "zh")] and "WARNING" not in best
    shutil.rmtree(moved / "models" / "zh")
    shutil.copytree(moved / "models" / "ja", moved / "models" / "zh")
    assert cli.main(search(moved, 2)) == 0
    assert f"the models behind zh ({project / 'models' / 'zh'}) no longer exist" in capsys.readouterr().out
