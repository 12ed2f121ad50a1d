"""Every recipe shipped in recipes/ parses with mergekit's own config model."""

from pathlib import Path

import pytest
import yaml

from conftest import REPO

RECIPES = sorted((REPO / "recipes").rglob("*.yml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert "gemma3-27b-optimer.yml" in names and len(RECIPES) >= 4


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_validates_with_mergekit(path: Path):
    from mergekit.config import MergeConfiguration

    import optimer_merge.merge.mergekit_method  # noqa: F401  (registers `optimer`)
    from mergekit import merge_methods

    config = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
    method = merge_methods.get(config.merge_method)
    if config.merge_method == "optimer":
        assert config.base_model is not None
        for model in config.models:
            assert isinstance(model.parameters["weight"], (int, float))
    assert method.spec.name == config.merge_method


def test_paper_recipe_setting():
    config = yaml.safe_load((REPO / "recipes" / "gemma3-27b-optimer.yml").read_text())
    assert config["base_model"] == "google/gemma-3-27b-pt"
    inputs = [m["model"] for m in config["models"]]
    assert "google/gemma-3-27b-it" in inputs and len(inputs) == 5
    assert (config["dtype"], config["out_dtype"]) == ("float32", "bfloat16")
