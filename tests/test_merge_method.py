"""The `optimer` method under the stock `mergekit-yaml` and mergekit's own runner."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from helpers import load_weights, max_abs_diff, mergekit_yaml, reference_merge
from conftest import REPO


def stock_merge(recipe: Path, root: Path, out: str) -> subprocess.CompletedProcess:
    return mergekit_yaml(recipe, out, "--no-copy-tokenizer", cwd=root)


@pytest.mark.parametrize("kind", ["text", "multimodal"])
def test_stock_mergekit_yaml_runs_optimer_and_matches_formula(tiny_zoo, kind):
    recipe = REPO / "recipes" / "tiny" / f"optimer-{kind}.yml"
    result = stock_merge(recipe, tiny_zoo, f"out-stock-{kind}")
    assert result.returncode == 0, result.stderr[-3000:]
    merged = load_weights(tiny_zoo / f"out-stock-{kind}")
    reference = reference_merge(recipe, tiny_zoo)
    assert max_abs_diff(merged, reference) < 1e-6
    # the merge really moved the weights (a no-op merge would also be "close" to the base)
    base = load_weights(tiny_zoo / f"tiny-{kind}" / "base")
    assert max_abs_diff(merged, base) > 1e-3
    if kind == "multimodal":
        assert any(k.startswith("vision_tower.vision_model.") for k in merged)


def run_in_process(config: dict, root: Path, out: str, monkeypatch) -> dict:
    from optimer_merge.merge.recipes import run_recipe

    monkeypatch.chdir(root)
    path = root / f"{out}.yml"
    path.write_text(yaml.safe_dump(config))
    run_recipe(path, out, copy_tokenizer=False, write_model_card=False, quiet=True)
    return load_weights(root / out)


def text_recipe(**changes) -> dict:
    config = yaml.safe_load((REPO / "recipes" / "tiny" / "optimer-text.yml").read_text())
    config.update(changes)
    return config


def test_equal_weights_match_mergekit_task_arithmetic(tiny_zoo, monkeypatch):
    config = text_recipe(parameters={})
    for model in config["models"]:
        model["parameters"] = {"weight": 0.25}
    ours = run_in_process(config, tiny_zoo, "out-eq-optimer", monkeypatch)
    config["merge_method"] = "task_arithmetic"
    theirs = run_in_process(config, tiny_zoo, "out-eq-ta", monkeypatch)
    assert max_abs_diff(ours, theirs) < 1e-6
    assert max_abs_diff(ours, load_weights(tiny_zoo / "tiny-text" / "base")) > 1e-4


def test_bf16_inputs_accumulate_in_fp32(tiny_zoo, monkeypatch):
    recipe = REPO / "recipes" / "tiny" / "optimer-bf16-to-fp32.yml"
    config = yaml.safe_load(recipe.read_text())
    merged = run_in_process(config, tiny_zoo, "out-bf16", monkeypatch)
    reference = reference_merge(recipe, tiny_zoo)
    assert all(t.dtype == torch.float32 for t in merged.values())
    # fp32 precision: a few ulps of each tensor's magnitude, far below bf16's 2^-8 spacing
    for key, ref in reference.items():
        tolerance = 4 * torch.finfo(torch.float32).eps * ref.abs().max().item() + 1e-12
        assert (merged[key].double() - ref).abs().max().item() <= tolerance, key
    # the same merge accumulated in bf16 (mergekit's task_arithmetic; its `lambda` is our `scale`)
    # is measurably worse
    config["merge_method"] = "task_arithmetic"
    config["parameters"] = {"normalize": True, "lambda": config["parameters"]["scale"]}
    bf16_acc = run_in_process(config, tiny_zoo, "out-bf16-ta", monkeypatch)
    assert max_abs_diff(bf16_acc, reference) > 100 * max_abs_diff(merged, reference)


def test_normalize_reads_weights_as_ratios(tiny_zoo, monkeypatch):
    config = text_recipe(parameters={"normalize": True, "scale": 1.0})
    for model, weight in zip(config["models"], (2.0, 2.0, 2.0, 2.0)):
        model["parameters"] = {"weight": weight}
    merged = run_in_process(config, tiny_zoo, "out-norm", monkeypatch)
    # ratios 1/4 each with scale 1 is plain model averaging
    models = [load_weights(tiny_zoo / "tiny-text" / d) for d in ("ja", "zh", "math", "code")]
    average = {k: sum(m[k].double() for m in models) / 4 for k in models[0]}
    assert max_abs_diff(merged, average) < 1e-6


def test_filtered_weights_fall_back_to_the_top_level_default(tiny_zoo, monkeypatch):
    """A model's weight under filters, the rest of its tensors from the top-level weight (mergekit's order)."""
    config = text_recipe(models=text_recipe()["models"][:1], parameters={"weight": [{"filter": "embed", "value": 0.9}, {"value": 0.25}]})
    config["models"][0]["parameters"] = {"weight": [{"filter": "mlp", "value": -0.5}]}
    merged = run_in_process(config, tiny_zoo, "out-filtered", monkeypatch)
    base, ja = load_weights(tiny_zoo / "tiny-text" / "base"), load_weights(tiny_zoo / "tiny-text" / "ja")
    for key, weight in (("model.layers.0.mlp.up_proj.weight", -0.5), ("model.embed_tokens.weight", 0.9), ("model.layers.0.self_attn.q_proj.weight", 0.25)):
        expected = base[key].double() + weight * (ja[key].double() - base[key].double())
        assert (merged[key].double() - expected).abs().max().item() < 1e-6, key


@pytest.mark.parametrize(
    "change, message",
    [
        ("missing_weight", "requires parameter 'weight'"),
        ("missing_base", "requires a base"),
        ("zero_sum", "sum of the weights, which is 0"),
    ],
)
def test_clear_errors(tiny_zoo, monkeypatch, change, message):
    """Checked before mergekit starts (stock mergekit-yaml finds them later: see the tests below)."""
    from optimer_merge.merge.recipes import RecipeError

    config = text_recipe()
    if change == "missing_weight":
        del config["models"][1]["parameters"]["weight"]
    elif change == "missing_base":
        del config["base_model"]
    else:
        config["parameters"] = {"normalize": True}
        for model, weight in zip(config["models"], (0.5, -0.5, 0.25, -0.25)):
            model["parameters"] = {"weight": weight}
    with pytest.raises(RecipeError, match=message):
        run_in_process(config, tiny_zoo, f"out-err-{change}", monkeypatch)
    assert not (tiny_zoo / f"out-err-{change}").exists() and not (tiny_zoo / f"out-err-{change}.partial").exists()


def test_stock_mergekit_yaml_reports_zero_sum(tiny_zoo):
    config = text_recipe(parameters={"normalize": True})
    for model, weight in zip(config["models"], (1.0, -1.0, 0.0, 0.0)):
        model["parameters"] = {"weight": weight}
    recipe = tiny_zoo / "zero-sum.yml"
    recipe.write_text(yaml.safe_dump(config))
    result = stock_merge(recipe, tiny_zoo, "out-zero-sum")
    assert result.returncode != 0
    assert "Error: optimer: normalize=true needs weights whose sum is not 0" in result.stderr
    assert "Traceback" not in result.stderr  # one line, as click prints a command's own errors
    shutil.rmtree(tiny_zoo / "out-zero-sum", ignore_errors=True)


@pytest.mark.parametrize("old, new, message", [("weight: 0.6", "weight: .nan", "finite number"), ("scale: 0.8", "scale: .inf", "finite number"),
                                                ("weight: 0.6", "weight: on", "expected a number, got true")])  # fmt: skip
def test_stock_mergekit_yaml_refuses_non_finite_and_boolean_values_before_merging(tiny_zoo, tmp_path, old, new, message):
    """The method declares its numbers finite and not booleans, so mergekit's planner rejects NaN,
    Inf and `on` (YAML's true, which pydantic would read as 1.0) before any tensor."""
    text = yaml.safe_dump(text_recipe())
    assert old in text
    recipe = tmp_path / "bad.yml"
    recipe.write_text(text.replace(old, new))
    result = stock_merge(recipe, tiny_zoo, str(tmp_path / "out"))
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_a_merge_that_fails_midway_leaves_nothing_behind(tiny_zoo, tmp_path, monkeypatch):
    """A model lacking a tensor passes every check on headers and fails once mergekit reaches the
    tensor: the failure keeps its traceback, and neither OUT nor OUT.partial stays behind."""
    from safetensors.torch import load_file, save_file

    from optimer_merge import cli

    lacking = tmp_path / "lacking"
    shutil.copytree(tiny_zoo / "tiny-text/zh", lacking)
    tensors = load_file(str(lacking / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(lacking / "model.safetensors"), metadata={"format": "pt"})
    config = text_recipe()
    config["models"][1]["model"] = str(lacking)
    monkeypatch.chdir(tiny_zoo)  # the recipe's other paths are relative to the zoo
    recipe = tmp_path / "lacking.yml"
    recipe.write_text(yaml.safe_dump(config))
    with pytest.raises(RuntimeError, match="model.norm.weight required but not present"):
        cli.main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_merge_beyond_float16_is_one_error_and_no_output(tiny_zoo, tmp_path, capsys, monkeypatch):
    """The method checks the merge in float32; the cast to a float16 output happens as mergekit writes it."""
    from optimer_merge import cli

    config = text_recipe(models=text_recipe()["models"][:1], parameters={}, out_dtype="float16")
    config["models"][0]["parameters"] = {"weight": 1e8}
    monkeypatch.chdir(tiny_zoo)
    (tmp_path / "r.yml").write_text(yaml.safe_dump(config))
    assert cli.main(["merge", str(tmp_path / "r.yml"), str(tmp_path / "out")]) == 2
    assert "overflows float16 (largest value 65504)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    config["models"][0]["parameters"] = {"weight": 0.5}  # within range: written as before
    (tmp_path / "r.yml").write_text(yaml.safe_dump(config))
    assert cli.main(["merge", str(tmp_path / "r.yml"), str(tmp_path / "out")]) == 0
    assert all(t.dtype == torch.float16 for t in load_weights(tmp_path / "out").values())


def test_a_model_with_nan_weights_is_one_error_and_no_output(tiny_zoo, tmp_path, capfd, monkeypatch):
    """A NaN in a model (a diverged run's export) is found in the merged tensor, by stock
    mergekit-yaml and by `optimer-merge merge`: one line, nothing written."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from optimer_merge import cli

    nan_model = tmp_path / "nan-model"
    shutil.copytree(tiny_zoo / "tiny-text/zh", nan_model)
    path = nan_model / "model.safetensors"
    with safe_open(str(path), "pt") as reader:
        metadata = reader.metadata()
    tensors = load_file(str(path))
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, str(path), metadata=metadata)
    config = text_recipe()
    config["models"][1]["model"] = str(nan_model)
    recipe = tmp_path / "nan.yml"
    recipe.write_text(yaml.safe_dump(config))
    result = stock_merge(recipe, tiny_zoo, str(tmp_path / "stock"))
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "Error: optimer: the merged weights have NaN/Inf values: an input model holds some" in result.stderr
    assert not list((tmp_path / "stock").glob("*.safetensors"))
    capfd.readouterr()
    monkeypatch.chdir(tiny_zoo)  # the recipe's other paths are relative to the zoo
    assert cli.main(["merge", str(recipe), str(tmp_path / "ours"), "--quiet"]) == 2
    err = capfd.readouterr().err
    assert err.strip().splitlines() == [
        "optimer-merge merge: error: optimer: the merged weights have NaN/Inf values: an input model holds some (a diverged training run? "
        "`optimer-merge vectors extract` names the model and tensor) or the weights are too large for float32"
    ], err
    assert not (tmp_path / "ours").exists() and not (tmp_path / "ours.partial").exists()


def test_a_recipe_read_from_a_pipe_is_read_once(tiny_zoo, tmp_path, monkeypatch):
    """`optimer-merge merge /dev/stdin OUT` (or `<(envsubst < recipe.yml)`): a pipe can be read only once."""
    import os

    from optimer_merge import cli

    recipe = REPO / "recipes" / "tiny" / "optimer-text.yml"
    read_end, write_end = os.pipe()
    os.write(write_end, recipe.read_bytes())  # far below a pipe's buffer
    os.close(write_end)
    monkeypatch.chdir(tiny_zoo)  # the recipe's model paths are relative
    try:
        assert cli.main(["merge", f"/dev/fd/{read_end}", str(tmp_path / "out"), "--quiet"]) == 0
    finally:
        os.close(read_end)
    assert max_abs_diff(load_weights(tmp_path / "out"), reference_merge(recipe, tiny_zoo)) < 1e-6
