"""CPT on Lightning Fabric: real training runs on tiny models, resume after a real kill, Velocitune, errors."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CPT_SETTINGS, DOMAINS, REPO
from helpers import free_port

from optimer_merge import cli
from optimer_merge.cpt import TrainConfig, load_config, train
from optimer_merge.cpt import datasets as ds
from optimer_merge.cpt import velocitune as vt
from optimer_merge.cpt.trainer import lr_at
from optimer_merge.errors import ConfigError

QUIET = lambda _m: None  # noqa: E731


def meta(run: Path) -> dict:
    return json.loads((run / "train_meta.json").read_text())


@pytest.mark.parametrize("domain", DOMAINS)
def test_cpt_lowers_its_own_domain_loss_most(cpt_runs, domain):
    m = meta(cpt_runs[domain])
    drops = {d: m["initial_eval_loss"][d] - m["final_eval_loss"][d] for d in DOMAINS}
    others = {d: v for d, v in drops.items() if d != domain}
    assert drops[domain] > 0.05, drops
    assert drops[domain] > max(others.values()), drops
    assert m["tokens_per_dataset"] == {domain: CPT_SETTINGS["max_steps"] * 8 * 128}
    assert m["steps"] == 40 and m["wall_seconds"] > 0 and m["cpu_seconds"] > 0 and m["flops_estimate"] > 0
    model = cpt_runs[domain] / "model"
    assert (model / "model.safetensors").exists() and (model / "tokenizer.json").exists()
    rows = (cpt_runs[domain] / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,tokens,lr,train_loss") and len(rows) == 1 + 3  # steps 0, 20, 40


def test_cpt_models_merge_with_stock_mergekit(cpt_runs, small_base, tmp_path):
    import yaml
    from helpers import load_weights, max_abs_diff, mergekit_yaml, reference_merge

    recipe = {
        "merge_method": "optimer",
        "base_model": str(small_base),
        "models": [{"model": str(cpt_runs[d] / "model"), "parameters": {"weight": 0.25}} for d in DOMAINS],
        "dtype": "float32",
    }
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    done = mergekit_yaml(path, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-2000:]
    assert max_abs_diff(load_weights(tmp_path / "out"), reference_merge(path, tmp_path)) < 1e-6


def test_static_mixture_consumes_tokens_at_its_ratios(small_base, tmp_path):
    config = TrainConfig(
        base=str(small_base),
        output=str(tmp_path / "mix"),
        datasets=[{"name": "ja", "source": "ja"}, {"name": "code", "source": "code", "ratio": 3}],  # ja: the default ratio, 1
        **{**CPT_SETTINGS, "max_steps": 25},
    )
    said = []
    m = train(config, log=said.append)
    assert "static mixture: ja 25.0%, code 75.0% of the training tokens" in said, said
    tokens = m["tokens_per_dataset"]
    share = tokens["ja"] / (tokens["ja"] + tokens["code"])
    assert abs(share - 0.25) < 0.02 * 0.25, tokens
    assert tokens["ja"] + tokens["code"] == m["tokens"] == 25 * 8 * 128


def _train_cmd(base: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "optimer_merge.cli", "train", "--base", str(base), "--output", str(out),
        "--dataset", "ja:1", "--dataset", "math:1", "--max-steps", "30", "--seq-len", "64",
        "--micro-batch-size", "4", "--set", "checkpoint_every=5", "--set", "eval_every=10", "--no-progress",
    ]  # fmt: skip


def test_stopped_and_killed_runs_resume_to_the_uninterrupted_run(small_base, tmp_path, capsys):
    """SIGTERM (a scheduler's preemption): a checkpoint at the step it arrived in and exit 143; the
    rerun SIGKILLed (a node lost) after a later checkpoint; the next rerun ends with the weights,
    tokens and metrics of an uninterrupted run."""
    from helpers import load_weights, max_abs_diff

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert cli.main(_train_cmd(small_base, tmp_path / "full")[3:]) == 0
    part = tmp_path / "part"
    proc = subprocess.Popen(_train_cmd(small_base, part), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (part / "checkpoints" / "step-00000005.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be stopped"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, err
    step = int(err.split("stopped by SIGTERM at step ")[1].split()[0])
    assert "of 30, after saving a checkpoint; the same command resumes where this run stopped" in err and "Traceback" not in err
    assert (part / "checkpoints" / f"step-{step:08d}.ckpt").exists() and not (part / "model").exists()

    proc = subprocess.Popen(_train_cmd(small_base, part), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (part / "checkpoints" / "step-00000020.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline + 120, "training ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (part / "model").exists()

    done = subprocess.run(_train_cmd(small_base, part), check=True, env=env, capture_output=True, text=True, timeout=600)
    resumed = re.search(r"resuming .* from step (\d+) of 30", done.stdout)
    assert resumed and int(resumed.group(1)) >= 20, done.stdout  # from the killed rerun's checkpoints
    assert max_abs_diff(load_weights(tmp_path / "full" / "model"), load_weights(part / "model")) <= 1e-6
    assert meta(part)["tokens_per_dataset"] == meta(tmp_path / "full")["tokens_per_dataset"]
    strip = lambda rows: [r.split(",")[:4] + r.split(",")[5:] for r in rows]  # noqa: E731  (drop tokens/s)
    assert strip((part / "metrics.csv").read_text().splitlines()) == strip((tmp_path / "full" / "metrics.csv").read_text().splitlines())
    assert cli.main(_train_cmd(small_base, part)[3:]) == 0
    assert "already trained" in capsys.readouterr().out


def test_velocitune_rule_and_scaling_law():
    v = vt.velocities({"a": 3.0, "b": 2.0}, initial={"a": 4.0, "b": 4.0}, targets={"a": 2.0, "b": 2.5})
    assert v == {"a": 0.5, "b": 0.0}
    # a target at or above the initial loss (a proxy run that predicted no progress): a domain whose
    # loss rises past it gets data again (the rule's limit as the span shrinks to 0), not none
    flat = vt.velocities({"c": 4.5, "d": 3.9, "e": 4.1}, initial={n: 4.0 for n in "cde"}, targets={n: 4.1 for n in "cde"})
    assert flat == {"c": 1.0, "d": 0.0, "e": 0.0}
    assert vt.velocities({"c": 4.5}, initial={"c": 4.0}, targets={"c": 3.999}) == {"c": 1.0}  # and just below: the same
    w = vt.update_weights({"a": 0.5, "b": 0.5}, v)
    assert w["a"] == pytest.approx(math.exp(0.5) / (math.exp(0.5) + 1))
    law = vt.ScalingLaw(E=1.5, B=40.0, beta=0.3)
    tokens = [1e3, 2e3, 5e3, 1e4, 2e4, 5e4]
    fit = vt.fit_scaling_law(tokens, [law(t) for t in tokens])
    assert fit(1e6) == pytest.approx(law(1e6), rel=0.02)
    # refitted targets: the run's own curve L = 2 + 5 / D^0.5 extrapolated to the tokens at the end
    curve = vt.ScalingLaw(E=2.0, B=5.0, beta=0.5)
    history = [{"tokens": {n: t for n in "abc"}, "losses": {n: curve(t) for n in "abc"}} for t in (1e3, 2e3)]
    now = {n: curve(4e3) for n in "abc"}
    targets = vt.refit_targets(history, now, {n: 4e3 for n in "abc"}, {n: 0.5 for n in "abc"}, 8e3,
                               {"a": 2.5, "b": 1.0, "c": 2.5}, {"a": {"decay_gain": 0.01}, "b": {}})  # fmt: skip
    assert targets["a"] == pytest.approx(curve(8e3) - 0.01, abs=2e-3) and targets["a"] < now["a"]
    assert targets["b"] == 1.0 and targets["c"] == 2.5  # a lower proxy target stays; a user's target is kept
    assert vt.refit_targets(history[:1], now, {}, {}, 8e3, {"a": 2.5}, {"a": {}}) == {"a": 2.5}  # too few points


def test_velocitune_raises_weight_of_domain_furthest_from_target(small_base, tmp_path):
    config = TrainConfig(
        base=str(small_base),
        output=str(tmp_path / "vt"),
        datasets=[{"name": "ja", "source": "ja"}, {"name": "math", "source": "math"}],
        mixture="velocitune",
        # ja's target is far below anything this run reaches; math's is above its starting loss (velocity 0).
        velocitune={"update_every": 5, "targets": {"ja": 0.5, "math": 20.0}},
        **{**CPT_SETTINGS, "max_steps": 20, "eval_every": 10},
    )
    m = train(config, log=QUIET)
    trajectory = json.loads((tmp_path / "vt" / "velocitune.json").read_text())["trajectory"]
    assert trajectory[0]["weights"] == {"ja": 0.5, "math": 0.5}
    assert [t["step"] for t in trajectory] == [0, 5, 10, 15]
    assert trajectory[-1]["velocity"]["ja"] > 0.5 and trajectory[-1]["velocity"]["math"] == 0.0
    assert trajectory[-1]["weights"]["ja"] > 0.6
    assert m["tokens_per_dataset"]["ja"] > m["tokens_per_dataset"]["math"]


def test_velocitune_shorter_than_one_update_warns_that_its_weights_stay(small_base, tmp_path):
    said = []
    config = TrainConfig(base=str(small_base), output=str(tmp_path / "vt"), datasets=["ja", "math"], mixture="velocitune",
                         velocitune={"update_every": 5, "targets": {"ja": 0.5, "math": 20.0}}, **{**CPT_SETTINGS, "max_steps": 5})  # fmt: skip
    train(config, log=said.append)
    assert any("velocitune reweights every 5 steps and this run has 5: its weights never change" in line for line in said), said
    assert "velocitune mixture, starting from ja 50.0%, math 50.0% of the training tokens" in said, said
    trajectory = json.loads((tmp_path / "vt" / "velocitune.json").read_text())["trajectory"]
    assert [t["weights"] for t in trajectory] == [{"ja": 0.5, "math": 0.5}]


def test_velocitune_fits_targets_on_a_proxy_run(small_base, tmp_path):
    config = TrainConfig(
        base=str(small_base),
        output=str(tmp_path / "vt"),
        datasets=[{"name": "zh", "source": "zh"}, {"name": "code", "source": "code"}],
        mixture="velocitune",
        velocitune={"update_every": 5, "proxy_fraction": 0.5, "proxy_evals": 5},
        **{**CPT_SETTINGS, "max_steps": 20, "eval_every": 10},
    )
    m = train(config, log=QUIET)
    info = m["velocitune"]
    assert set(info["fits"]) == {"zh", "code"} and info["proxy"]["steps"] == 10
    assert not (tmp_path / "vt" / "velocitune-proxy" / "tokens").exists()  # the proxy reads the run's own token files
    for name, target in info["targets"].items():
        assert 0 < target < m["initial_eval_loss"][name]
        # the cosine run decays: its targets sit below the constant-lr law by what the proxy's decay gained
        fit = info["fits"][name]
        law = fit["E"] + fit["B"] / fit["tokens"] ** fit["beta"]
        assert fit["decay_gain"] >= 0 and target == pytest.approx(law - fit["decay_gain"])
    # the third update (step 15) refits the targets on the run's own losses, never above the proxy's
    trajectory = info["trajectory"]
    assert [t["step"] for t in trajectory] == [0, 5, 10, 15] and trajectory[1]["targets"] == info["targets"]
    remaining = (20 - 15) * CPT_SETTINGS["seq_len"] * CPT_SETTINGS["micro_batch_size"]
    expected = vt.refit_targets(trajectory[1:3], trajectory[3]["losses"], trajectory[3]["tokens"], trajectory[2]["weights"],
                                remaining, info["targets"], info["fits"])  # fmt: skip
    assert trajectory[3]["targets"] == pytest.approx(expected)
    assert all(trajectory[3]["targets"][n] <= info["targets"][n] for n in info["targets"])


@pytest.mark.parametrize("strategy", ["one process", "fsdp"])
def test_multimodal_trains_text_only_and_merges_with_stock_mergekit(tiny_zoo, tmp_path, strategy):
    """Also sharded: FSDP wraps the vision encoder layers too, and the export keeps the hub names."""
    import yaml
    from helpers import load_weights, mergekit_yaml

    base = tiny_zoo / "tiny-multimodal" / "base"
    if strategy == "fsdp":
        cmd = [sys.executable, "-m", "optimer_merge.cli", "train", "--base", str(base), "--output", str(tmp_path / "mm"), "--dataset", "zh",
               "--max-steps", "5", "--seq-len", "64", "--micro-batch-size", "4", "--accelerator", "cpu", "--strategy", "fsdp", "--devices", "2",
               "--no-progress"]  # fmt: skip
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=600)
        m = meta(tmp_path / "mm")
    else:
        config = TrainConfig(base=str(base), output=str(tmp_path / "mm"), datasets=[{"name": "zh", "source": "zh"}], **{**CPT_SETTINGS, "max_steps": 5, "seq_len": 64})
        m = train(config, log=QUIET)
    before, after = load_weights(base), load_weights(tmp_path / "mm" / "model")
    assert sorted(before) == sorted(after)
    frozen = [k for k in before if not k.startswith("language_model.")]  # checkpoint (hub) key layout
    assert any(k.startswith("vision_tower.vision_model.") for k in frozen)
    assert all((before[k] == after[k]).all() for k in frozen)
    assert all(not (before[k] == after[k]).all() for k in before if k.startswith("language_model.model.layers.0."))
    assert m["trainable_parameters"] < m["parameters"]
    recipe = {
        "merge_method": "optimer",
        "base_model": str(base),
        "models": [{"model": str(tmp_path / "mm" / "model"), "parameters": {"weight": 0.5}}],
        "dtype": "float32",
    }
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    assert mergekit_yaml(tmp_path / "r.yml", tmp_path / "merged").returncode == 0
    merged = load_weights(tmp_path / "merged")
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    assert ((merged[key] - (before[key] + 0.5 * (after[key] - before[key]))).abs().max()) < 1e-6


def test_lr_schedules():
    cfg = lambda **kw: TrainConfig(base="b", output="o", datasets=[{"name": "ja", "source": "ja"}], max_steps=100, lr=1.0, min_lr_ratio=0.1, warmup_steps=10, **kw)  # noqa: E731
    cosine = cfg(schedule="cosine")
    assert lr_at(0, 100, cosine) == pytest.approx(0.1) and lr_at(9, 100, cosine) == pytest.approx(1.0)
    assert lr_at(10, 100, cosine) == pytest.approx(1.0) and lr_at(100, 100, cosine) == pytest.approx(0.1)
    assert lr_at(55, 100, cosine) == pytest.approx(0.55)
    wsd = cfg(schedule="wsd", decay_fraction=0.2)
    assert lr_at(79, 100, wsd) == 1.0 and lr_at(99, 100, wsd) == pytest.approx(0.1)
    assert lr_at(50, 100, cfg(schedule="constant")) == 1.0


def test_strategy_options_reach_lightning_and_timeout_is_seconds():
    import datetime

    from lightning.fabric.strategies import DDPStrategy

    from optimer_merge.cpt.trainer import _strategy, _strategy_settings

    config = TrainConfig(base="b", output="o", datasets=["ja"], max_steps=1,
                         strategy={"name": "ddp_spawn", "options": {"timeout": 90, "bucket_cap_mb": 10, "static_graph": True}})  # fmt: skip
    settings = _strategy_settings(config)
    assert settings == {"start_method": "spawn", "timeout": datetime.timedelta(seconds=90), "bucket_cap_mb": 10, "static_graph": True}
    strategy = _strategy(config, settings)
    assert isinstance(strategy, DDPStrategy) and strategy._start_method == "spawn"
    assert strategy._timeout == datetime.timedelta(seconds=90) and strategy._ddp_kwargs == {"bucket_cap_mb": 10, "static_graph": True}
    assert _strategy_settings(TrainConfig(base="b", output="o", datasets=["ja"], max_steps=1, strategy="ddp")) is None  # Lightning picks


def test_more_cpu_processes_than_cpus_are_warned_about(monkeypatch):
    from optimer_merge.cpt.trainer import _crowded_cpus

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    config = lambda **kw: TrainConfig(base="b", output="o", datasets=["ja"], max_steps=1, **kw)  # noqa: E731
    assert "devices 3 starts 3 training processes on this machine's 2 CPUs" in _crowded_cpus(config(devices=3, accelerator="cpu"))
    assert _crowded_cpus(config(devices=2, accelerator="cpu")) is None and _crowded_cpus(config(devices=3, accelerator="cuda")) is None


def test_user_files_jsonl_txt_parquet(tmp_path, small_base):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    folder.mkdir()
    docs = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 20 for i in range(30)]
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"content": d}) for d in docs[:10]))
    (folder / "b.txt").write_text(docs[10])
    pq.write_table(pa.table({"content": docs[11:]}), folder / "c.parquet")
    assert list(ds.documents(str(folder), text_field="content")) == docs
    config = TrainConfig(
        base=str(small_base), output=str(tmp_path / "run"),
        datasets=[{"name": "mine", "source": str(folder), "text_field": "content", "eval_source": str(folder / "b.txt")}],
        **{**CPT_SETTINGS, "max_steps": 3, "seq_len": 64},
    )  # fmt: skip
    m = train(config, log=QUIET)
    assert m["tokens_per_dataset"] == {"mine": 3 * 8 * 64}
    assert m["final_eval_loss"]["mine"] < m["initial_eval_loss"]["mine"]


def test_yaml_config_and_flag_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: b\noutput: o\ndatasets: [{name: ja, source: ja}]\nmax_steps: 10\nlr: 0.1\n")
    args = cli.build_parser().parse_args(
        ["train", "--config", str(path), "--max-tokens", "5000", "--dataset", "zh:0.3", "--dataset", "x/y.jsonl:2",
         "--set", "velocitune.update_every=7", "--devices", "2"]
    )  # fmt: skip
    from optimer_merge.commands.train import overrides_from_args

    config = load_config(path, overrides_from_args(args))
    assert config.max_tokens == 5000 and config.max_steps is None and config.lr == 0.1 and config.devices == 2
    assert [(d.name, d.source, d.ratio) for d in config.datasets] == [("zh", "zh", 0.3), ("y", "x/y.jsonl", 2.0)]
    assert config.velocitune.update_every == 7
    # the config takes the command line's SOURCE[:RATIO] shorthand too
    path.write_text("base: b\noutput: o\ndatasets: [ja, 'x/y.jsonl:2']\neval_datasets: [zh]\nmax_steps: 10\n")
    config = load_config(path)
    assert [(d.name, d.source, d.ratio) for d in config.datasets + config.eval_datasets] == [("ja", "ja", 1.0), ("y", "x/y.jsonl", 2.0), ("zh", "zh", 1.0)]
    # names come from the sources' file names, made plain and distinct; one source given twice is refused
    specs = ["my data/part.1.jsonl", "a/train.jsonl:0.5", "b/train.jsonl", ".hidden.jsonl", "zoo é", "ja"]
    args = cli.build_parser().parse_args(["train", "--base", "b", "--output", "o", "--max-steps", "1", *(f"--dataset={s}" for s in specs),
                                          "--eval-dataset", "c/train.jsonl", "--eval-dataset", "ja"])  # fmt: skip
    with pytest.raises(ConfigError, match="eval_datasets: ja is also a training dataset, whose held-out loss is logged already .on the ja corpus's dev"):
        load_config(None, overrides_from_args(args))
    with pytest.raises(ConfigError, match="train is also a training dataset, and its loss on the data it trains on is not held out; give it an eval_source"):
        load_config(None, overrides_from_args(args) | {"eval_datasets": ["a/train.jsonl"]})
    config = load_config(None, overrides_from_args(args) | {"eval_datasets": ["c/train.jsonl", "/data/é.txt"]})
    assert [d.name for d in config.datasets] == ["part", "train", "train-2", "hidden", "zoo", "ja"]
    assert [d.name for d in config.eval_datasets] == ["train-3", "data"]
    # an entry written out (to give text_field, say) is named like the shorthand when it names itself not
    config = load_config(None, {"base": "b", "output": "o", "max_steps": 1, "datasets": [{"source": "a/train.jsonl", "text_field": "body"}, "b/train.jsonl"]})
    assert [(d.name, d.source, d.text_field) for d in config.datasets] == [("train", "a/train.jsonl", "body"), ("train-2", "b/train.jsonl", "text")]


def test_a_domain_name_is_the_corpus_even_where_a_folder_has_that_name(tmp_path, small_base, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ja").mkdir()
    (tmp_path / "ja/mine.jsonl").write_text("\n".join(json.dumps({"text": "local text " * 40}) for _ in range(8)))
    base = ["train", "--base", str(small_base), "--max-steps", "1", "--seq-len", "64", "--no-progress"]
    assert cli.main([*base, "--output", "corpus", "--dataset", "ja"]) == 0
    out = capsys.readouterr().out
    assert "warning: dataset source 'ja' is the shipped ja corpus, not the local ja/ here; write ./ja to train on that" in out
    assert "held-out loss ja" in out  # the corpus's dev split: local files have none
    assert cli.main([*base, "--output", "local", "--dataset", "./ja"]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and "no held-out set" in out


def test_a_run_resumes_from_another_folder_with_its_paths_spelt_another_way(tmp_path, small_base, monkeypatch, capsys):
    data = tmp_path / "data/mine.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(json.dumps({"text": f"document {i}: " + "a quick brown fox. " * 30}) for i in range(20)))
    shutil.copytree(small_base, tmp_path / "base")
    settings = ["--max-steps", "2", "--seq-len", "64", "--no-progress", "--set", "checkpoint_every=1"]
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--base", "base", "--output", "run", "--dataset", "data/mine.jsonl", "--dataset", "ja", *settings]) == 0
    shutil.rmtree(tmp_path / "run/model")
    (tmp_path / "run/train_meta.json").unlink()  # as if killed after its last checkpoint
    capsys.readouterr()
    monkeypatch.chdir(tmp_path / "data")
    again = ["train", "--base", "../base", "--output", str(tmp_path / "run"), "--dataset", "./mine.jsonl", "--dataset", "ja", *settings]
    assert cli.main(again) == 0, capsys.readouterr().err
    assert f"resuming {tmp_path / 'run'} from step 2 of 2" in capsys.readouterr().out
    assert meta(tmp_path / "run")["base"] == str(tmp_path / "base")
    (tmp_path / "other").mkdir()
    (tmp_path / "other/mine.jsonl").write_text(data.read_text())  # the same text, another file: another run
    assert cli.main([*again[:5], "--dataset", "../other/mine.jsonl", "--dataset", "ja", *settings]) == 2
    assert "holds a different training run (settings differ: datasets)" in capsys.readouterr().err


def _bad_run(tmp_path, small_base, *extra: str):
    out = tmp_path / "bad"
    code = cli.main(["train", "--base", str(small_base), "--output", str(out), "--max-steps", "2", "--seq-len", "64", "--no-progress", *extra])
    return code, out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset", "/nonexistent/file.jsonl"], "no such file"),
        (["--dataset", "klingon"], "unknown dataset source 'klingon'"),
        (["--dataset", "EMPTY"], "fewer than seq_len"),
        (["--dataset", "ja:-1"], "ratio must be >= 0"),
        (["--dataset", "ja:0", "--dataset", "zh:0"], "ratios are all zero"),
        (["--dataset", "ja", "--seq-len", "4096"], "above the model's maximum of 1024"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_no_model(tmp_path, small_base, capsys, extra, message):
    if "EMPTY" in extra:
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        extra = [str(empty) if e == "EMPTY" else e for e in extra]
    code, out = _bad_run(tmp_path, small_base, *extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not out.exists()  # refused before the first step: no folder left


def test_tokenizer_mismatch_on_resume_is_refused(tmp_path, small_base, tiny_tokenizer, capsys):
    base = tmp_path / "base"
    shutil.copytree(small_base, base)
    code, out = _bad_run(tmp_path, base, "--dataset", "ja", "--set", "checkpoint_every=1")
    assert code == 0
    shutil.rmtree(out / "model")
    (out / "train_meta.json").unlink()  # as if killed after its last checkpoint
    tiny_tokenizer.save_pretrained(base)
    code, out = _bad_run(tmp_path, base, "--dataset", "ja", "--set", "checkpoint_every=1")
    err = capsys.readouterr().err
    assert code == 2 and "tokenizer mismatch" in err and not (out / "model").exists()


def test_data_changed_before_a_resume_is_refused(tmp_path, small_base, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"document {i}: " + "a quick brown fox. " * 30}) for i in range(20)))
    code, out = _bad_run(tmp_path, small_base, "--dataset", str(data), "--set", "checkpoint_every=1")
    assert code == 0
    shutil.rmtree(out / "model")
    (out / "train_meta.json").unlink()  # as if killed after its last checkpoint
    data.write_text(data.read_text() + "\n" + json.dumps({"text": "one more document"}))
    code, out = _bad_run(tmp_path, small_base, "--dataset", str(data), "--set", "checkpoint_every=1")
    err = capsys.readouterr().err
    assert code == 2 and "training data changed since checkpoint step-00000002.ckpt: mine" in err, err
    assert not (out / "model").exists()


@pytest.mark.parametrize("clip", ["1.0", "null"])
def test_a_diverging_run_stops_before_a_nan_reaches_the_weights(tmp_path, small_base, capsys, clip):
    args = ["--dataset", "ja", "--max-steps", "12", "--lr", "1e4", "--set", "checkpoint_every=1", "--set", f"grad_clip={clip}"]
    code, out = _bad_run(tmp_path, small_base, *args)
    err = capsys.readouterr().err
    found = re.search(r"error: training diverged at step (\d+) of 12: the loss is \S+, the gradient norm \S+ \(on this rank\); nothing of this step", err)
    assert code == 2 and found and "Traceback" not in err, err
    assert not (out / "model").exists() and not (out / "train_meta.json").exists()
    checkpoints = sorted((out / "checkpoints").glob("step-*.ckpt"))
    assert checkpoints and checkpoints[-1].name == f"step-{int(found.group(1)) - 1:08d}.ckpt"  # every step before it saved
    state = torch.load(checkpoints[-1], weights_only=False)["model"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_bad_data_under_two_ranks_is_one_line_before_the_second_starts(tmp_path, small_base):
    data = tmp_path / "numbers.jsonl"
    data.write_text('{"text": "a fine first document, long enough to tokenize"}\n{"text": 42}\n')
    out = tmp_path / "run"
    argv = [str(Path(sys.executable).with_name("optimer-merge")), "train", "--base", str(small_base), "--output", str(out), "--dataset", str(data),
            "--max-steps", "2", "--seq-len", "8", "--no-progress", "--devices", "2", "--accelerator", "cpu", "--strategy", "ddp"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [f"optimer-merge train: error: {data}:2: 'text' is not a string but int 42"], done.stderr[-3000:]
    assert "Initializing distributed" not in done.stdout + done.stderr  # refused before rank 1 started
    assert not out.exists()


def test_a_disk_too_small_on_another_node_stops_both_in_one_line(tmp_path, small_base):
    """Two nodes, started by hand as on a cluster without a launcher (MASTER_ADDR, MASTER_PORT,
    NODE_RANK), sharing the output folder: only node 0 keeps the folder's books. The disk check
    needs the model, so it runs on every rank after the launch, each on its own disk (a cluster's
    nodes have their own): the ranks decide together (none is left waiting for the others) and the
    primary says which rank is short and why. Only node 1's disk is short here: a `sitecustomize`
    on its PYTHONPATH makes it report 100 KiB free."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import collections, os, shutil\n"
        "if os.environ.get('NODE_RANK') == '1':\n"
        "    usage = collections.namedtuple('usage', 'total used free')\n"
        "    shutil.disk_usage = lambda path: usage(2**30, 2**30 - 100 * 1024, 100 * 1024)\n"
    )
    out = tmp_path / "run"
    argv = [str(Path(sys.executable).with_name("optimer-merge")), "train", "--base", str(small_base), "--output", str(out), "--dataset", "ja",
            "--max-steps", "2", "--seq-len", "8", "--no-progress", "--num-nodes", "2", "--devices", "1", "--accelerator", "cpu", "--strategy", "fsdp"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    nodes = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, "NODE_RANK": str(rank)}) for rank in (0, 1)]
    (out0, err0), (out1, err1) = (node.communicate(timeout=300) for node in nodes)
    assert [node.returncode for node in nodes] == [2, 2], err0[-3000:] + err1[-3000:]
    assert out0.startswith("waiting for all 2 nodes to join (this is node 0; node 0 at 127.0.0.1:") and "this is node 1;" in out1
    errors = [line for line in err0.splitlines() if "error" in line]
    assert len(errors) == 1 and re.fullmatch(r"optimer-merge train: error: rank 1: training \(3 checkpoints of .+\) needs about .+ free under .+, "
                                             r"and its disk has 100 KiB; .+", errors[0]), err0[-3000:]  # fmt: skip
    assert "Traceback" not in err0 + err1 and "error" not in err1 and not out.exists()


def test_progress_away_from_a_terminal_is_plain_lines_with_an_eta(tmp_path, small_base, capsys, monkeypatch):
    from optimer_merge.cpt import trainer

    monkeypatch.setattr(trainer._StepProgress, "PROGRESS_SECONDS", 0.0)  # a line every step (60 s in use)
    code, _ = _bad_run(tmp_path, small_base, "--dataset", "ja", "--max-steps", "4", "--set", "eval_every=2", "--set", "progress=true")
    captured = capsys.readouterr()
    assert code == 0 and "\r" not in captured.err  # no bar: stderr is not a terminal here
    lines = [line for line in captured.out.splitlines() if line.startswith("step ")]
    assert [line.split(",")[0] for line in lines] == ["step 1/4 (25%)", "step 2/4 (50%)", "step 3/4 (75%)"], captured.out
    assert re.fullmatch(r"step 3/4 \(75%\), loss \d+\.\d{3}, [\d,]+ tokens/s, ETA \d+ s", lines[-1]), lines


def test_rerun_with_different_settings_is_refused(tmp_path, small_base, capsys):
    assert _bad_run(tmp_path, small_base, "--dataset", "ja")[0] == 0
    code, _ = _bad_run(tmp_path, small_base, "--dataset", "zh")
    assert code == 2 and "holds a different training run (settings differ: datasets)" in capsys.readouterr().err
    # a static mixture does not use the velocitune settings: changing them reuses the run
    assert _bad_run(tmp_path, small_base, "--dataset", "ja", "--set", "velocitune.update_every=3")[0] == 0
    assert "already trained, reused" in capsys.readouterr().out


@pytest.mark.slow
def test_fsdp_two_ranks_shard_resume_exactly_and_export_what_ddp_trains(small_base, tmp_path):
    """``--strategy fsdp --devices 2`` on CPU (gloo): each rank saves its own shard of a distributed
    checkpoint; a run whose whole process group is SIGKILLed resumes from it and ends with the
    weights 2-process DDP trains, exported as sharded safetensors with an index."""
    from helpers import load_weights, max_abs_diff
    from transformers import AutoModelForCausalLM

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shard = (small_base / "model.safetensors").stat().st_size // 3

    def cmd(out: Path, strategy: str) -> list[str]:
        return [
            sys.executable, "-m", "optimer_merge.cli", "train", "--base", str(small_base), "--output", str(out),
            "--dataset", "ja:1", "--dataset", "math:1", "--max-steps", "8", "--seq-len", "64", "--micro-batch-size", "2",
            "--accelerator", "cpu", "--strategy", strategy, "--devices", "2", "--no-progress",
            "--set", "checkpoint_every=3", "--set", "eval_every=4", "--set", f"export_shard_bytes={shard}",
        ]  # fmt: skip

    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    subprocess.run(cmd(ddp, "ddp"), check=True, env=env, capture_output=True, timeout=600)
    proc = subprocess.Popen(cmd(fsdp, "fsdp"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = fsdp / "checkpoints" / "step-00000003.ckpt"
    deadline = time.time() + 300
    while not checkpoint.exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # both ranks, as when a node fails
    proc.wait()
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank
    assert not (fsdp / "model").exists()
    done = subprocess.run(cmd(fsdp, "fsdp"), check=True, env=env, capture_output=True, text=True, timeout=600)
    assert "resuming" in done.stdout
    assert "Initializing distributed" not in done.stdout + done.stderr and "processes registered" not in done.stdout + done.stderr  # Lightning's banner

    weights = load_weights(fsdp / "model")
    assert max_abs_diff(load_weights(ddp / "model"), weights) <= 1e-6
    assert meta(fsdp)["tokens_per_dataset"] == meta(ddp)["tokens_per_dataset"]
    assert meta(fsdp)["world_size"] == 2 and meta(fsdp)["strategy"]["name"] == "fsdp"
    index = json.loads((fsdp / "model" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3 and set(index["weight_map"]) == set(weights)
    loaded = AutoModelForCausalLM.from_pretrained(fsdp / "model").state_dict()
    assert all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in weights.items())


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_train_configs_are_valid(path):
    config = load_config(path)
    assert config.datasets and (config.max_tokens or config.max_steps)


def test_metrics_rows_do_not_depend_on_checkpoints(small_base, tmp_path):
    """Each metrics row averages the train loss of the steps since the previous row, whether or not
    checkpoints were written in between (and resumed from)."""
    import csv

    cache = tmp_path / "tokens"  # shared by both runs (token_cache)

    def rows(out: Path, checkpoint_every: int) -> list[dict]:
        config = TrainConfig(
            base=str(small_base), output=str(out), token_cache=str(cache), datasets=[{"name": "ja", "source": "ja"}],
            **{**CPT_SETTINGS, "max_steps": 12, "seq_len": 64, "micro_batch_size": 4, "eval_every": 4, "checkpoint_every": checkpoint_every},
        )  # fmt: skip
        train(config, log=QUIET)
        with open(out / "metrics.csv", newline="") as f:
            return list(csv.DictReader(f))

    plain = rows(tmp_path / "plain", 100)
    tokenized = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    checkpointed = rows(tmp_path / "ckpt", 3)
    assert sorted(n.split("-")[:2] for n in tokenized) == [["ja", "dev"], ["ja", "train"]]
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == tokenized  # the second run tokenized nothing
    assert not (tmp_path / "plain" / "tokens").exists() and not (tmp_path / "ckpt" / "tokens").exists()
    assert [r["step"] for r in plain] == ["0", "4", "8", "12"]
    assert [r["train_loss"] for r in checkpointed] == [r["train_loss"] for r in plain]
    assert all(float(r["tokens_per_s"]) > 0 for r in checkpointed[1:])


def test_linearity_of_a_cpt_run_reproduces_its_own_losses(small_base, tmp_path):
    """Along theta_base + t v, t = 0 and t = 1 give the run's own initial and final held-out
    losses; the mid-run checkpoint projects onto v between them."""
    from optimer_merge.vectors.linearity import linearity

    config = TrainConfig(
        base=str(small_base), output=str(tmp_path / "run"), datasets=[{"name": "ja", "source": "ja"}],
        eval_datasets=[{"name": "code", "source": "code"}],
        **{**CPT_SETTINGS, "max_steps": 12, "seq_len": 64, "micro_batch_size": 4, "eval_blocks": 4, "checkpoint_every": 6},
    )  # fmt: skip
    meta = train(config, log=QUIET)
    result = linearity(tmp_path / "run")
    for name in ("ja", "code"):
        assert result["line"]["0.0"][name] == pytest.approx(meta["initial_eval_loss"][name], rel=1e-5)
        assert result["line"]["1.0"][name] == pytest.approx(meta["final_eval_loss"][name], rel=1e-5)
    assert result["line"]["1.0"]["ja"] < result["line"]["0.5"]["ja"] < result["line"]["0.0"]["ja"]
    mid = result["mid"]
    assert mid["step"] == 6 and 0.2 < mid["t"] < 1.0 and 0.5 < mid["cosine_with_final"] <= 1.0
    assert set(mid["loss"]) == {"ja", "code"} and 0 < result["relative_norm"] < 1


@pytest.mark.parametrize(
    "settings, warning",
    [
        ({"max_steps": None, "max_tokens": 5}, "warning: max_tokens 5 is less than one step's 256 tokens"),
        ({"max_steps": 1, "precision": "bf16-true"}, "warning: precision bf16-true keeps the weights in 16 bits"),
        ({"max_steps": 1, "warmup_steps": 1000}, "warning: warmup_steps 1000 is not less than the run's 1 step: the learning rate peaks at 3e-06, not lr 0.003"),
        ({"max_steps": 1, "datasets": [{"name": "ja", "source": "ja"}, {"name": "code", "source": "code", "ratio": 0}]},
         "warning: ratio 0 for code: the run trains on no tokens of it"),
    ],
)
def test_settings_that_defeat_a_run_are_warned_about(small_base, tmp_path, settings, warning):
    lines = []
    config = TrainConfig(base=str(small_base), output=str(tmp_path / "run"), **{**CPT_SETTINGS, "seq_len": 32, "datasets": [{"name": "ja", "source": "ja"}], **settings})
    m = train(config, export=False, log=lines.append)
    assert m["steps"] == 1 and m["tokens"] == 8 * 32  # one step runs
    assert any(line.startswith(warning) for line in lines), lines
