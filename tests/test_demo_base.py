"""The shipped demo base: its files match BUILD.json, the record describes a well-trained base, a
changed file is refused."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from optimer_merge.cpt import demo_base as db


def test_shipped_base_matches_its_record():
    from optimer_merge.io.checkpoints import Checkpoint

    folder = db.shipped_base()
    record = db.shipped_record()
    assert record["command"] == db.BUILD_COMMAND and record["settings"]["tokens"] == db.SHIPPED_TOKENS
    assert set(record["sha256"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    parameters = sum(math.prod(shape) for _, shape in Checkpoint.open(folder).meta.values())
    assert record["parameters"] == parameters
    assert record["tokens_per_parameter"] == pytest.approx(record["tokens"] / parameters, abs=0.01) and record["tokens_per_parameter"] > 5
    assert set(record["epochs_per_source"]) == set(db.MIXTURE)
    for source, epochs in record["epochs_per_source"].items():
        assert epochs == pytest.approx(record["tokens_per_source"][source] / record["source_tokens"][source], abs=0.01)
    # pre-training took every domain's held-out loss well down
    assert all(record["final_eval_loss"][d] < record["initial_eval_loss"][d] - 2 for d in db.MIXTURE)
    assert json.loads((folder / "config.json").read_text())["model_type"].startswith("gemma3")


def test_a_changed_base_file_is_refused(tmp_path, monkeypatch):
    from optimer_merge.errors import ConfigError

    copy = tmp_path / "base"
    shutil.copytree(db.SHIPPED, copy)
    monkeypatch.setattr(db, "SHIPPED", copy)
    db.shipped_base()
    config = copy / "config.json"
    config.write_text(config.read_text().replace("}", ' }', 1))
    with pytest.raises(ConfigError, match="config.json does not match BUILD.json"):
        db.shipped_base()
    (copy / db.BUILD_RECORD).unlink()
    with pytest.raises(ConfigError, match="the demo base is missing"):
        db.shipped_base()
