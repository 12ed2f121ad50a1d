"""Shared plumbing: jsonl logs, run folders (lock, identity, clean refusal), YAML errors, checkpoints."""

from __future__ import annotations

import os
import shutil

import pytest

from optimer_merge.errors import ConfigError, RunFolderError, UserError
from optimer_merge.io.checkpoints import Checkpoint, CheckpointError
from optimer_merge.io.jsonl import CorruptLog, append_jsonl, read_jsonl
from optimer_merge.io.run_folder import RunFolder
from optimer_merge.io.yaml_config import load_yaml


def test_torn_last_line_is_cut_and_a_damaged_middle_line_keeps_what_follows(tmp_path):
    log = tmp_path / "log.jsonl"
    for i in range(4):
        append_jsonl(log, {"i": i})
    lines = log.read_text().splitlines()
    # killed while writing a fifth line
    log.write_text("\n".join(lines) + '\n{"i": 4, "wei')
    assert read_jsonl(log) == [{"i": i} for i in range(4)]
    assert log.read_text() == "".join(line + "\n" for line in lines)
    append_jsonl(log, {"i": 4})
    assert [r["i"] for r in read_jsonl(log)] == [0, 1, 2, 3, 4]
    # a damaged line in the middle: the records after it are kept, never truncated
    damaged = lines[:1] + ["{not json"] + lines[2:] + ['{"i": 4}']
    log.write_text("\n".join(damaged) + "\n")
    with pytest.raises(CorruptLog, match=r"log.jsonl:2: not a JSON record"):
        read_jsonl(log)
    assert read_jsonl(log, holes=True) == [{"i": 0}, None, {"i": 2}, {"i": 3}, {"i": 4}]
    assert log.read_text().count("\n") == 5
    # a complete last record without its newline gets it back, so the next append stays apart
    log.write_text('{"i": 0}\n{"i": 1}')
    assert read_jsonl(log) == [{"i": 0}, {"i": 1}]
    append_jsonl(log, {"i": 2})
    assert read_jsonl(log) == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_run_folder_locks_checks_identity_and_removes_what_a_refusal_created(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(ConfigError):
        with RunFolder(out, "search"):
            assert out.is_dir()
            raise ConfigError("refused")
    assert not (tmp_path / "a").exists()  # the parents it created go too
    with pytest.raises(KeyboardInterrupt):  # so does a stop before any work
        with RunFolder(out, "search"):
            raise KeyboardInterrupt
    assert not (tmp_path / "a").exists()

    with RunFolder(out, "search") as folder:
        assert folder.check("record.json", {"seed": 0}) is False
        folder.record("record.json", {"seed": 0, "threads": 1})
        with pytest.raises(RunFolderError, match=r"is in use by another search \(process \d+\)"):
            with RunFolder(out, "search"):
                pass
        with pytest.raises(RunFolderError, match=rf"is in use by another search \(process {os.getpid()}\)"):
            with RunFolder(out, "training run"):  # the message names what holds the folder
                pass
        folder.keep()
    with RunFolder(out, "search") as folder:
        assert folder.check("record.json", {"seed": 0, "threads": 2}, ignore=("threads",)) is True
        with pytest.raises(RunFolderError, match=r"holds a different search \(settings differ: seed\)"):
            folder.check("record.json", {"seed": 1, "threads": 1})
        # a setting that joined the identity later: the recorded run had its old value
        assert folder.check("record.json", {"seed": 0, "threads": 1, "parallel": 1}, added={"parallel": 1}) is True
        with pytest.raises(RunFolderError, match=r"settings differ: parallel\)"):
            folder.check("record.json", {"seed": 0, "threads": 1, "parallel": 2}, added={"parallel": 1})
    assert (out / "record.json").exists()  # an existing folder is never removed

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="is not empty and holds no search"):
        with RunFolder(other, "search") as folder:
            folder.check("record.json", {})
    assert (other / "notes.txt").read_text() == "mine"
    # --overwrite clears a run (under the lock) and never a folder of other files
    with pytest.raises(RunFolderError, match="--overwrite deletes only a search"):
        with RunFolder(other, "search") as folder:
            folder.clear("record.json")
    assert (other / "notes.txt").read_text() == "mine"
    with RunFolder(out, "search") as folder:
        (out / "sub").mkdir()
        folder.clear("record.json")
        assert [p.name for p in out.iterdir()] == [".lock"]


def test_yaml_errors_name_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\nb: 2\n  c: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml:3:\d+: malformed YAML"):
        load_yaml(path)
    path.write_bytes(b"a: caf\xe9\n")
    with pytest.raises(ConfigError, match="c.yaml: not UTF-8"):
        load_yaml(path)
    path.write_text("a: 1\nb: {c: 1, c: 2}\n")  # PyYAML would keep the last c silently
    with pytest.raises(ConfigError, match=r"c.yaml:2:\d+: malformed YAML: key 'c' is given twice in one mapping \(first on line 2\)"):
        load_yaml(path)
    path.write_text("x: &x {a: 1}\ny:\n  <<: *x\n  b: 2\n")  # merge keys are not repeats
    assert load_yaml(path) == {"x": {"a": 1}, "y": {"a": 1, "b": 2}}
    with pytest.raises(UserError, match="is a folder"):
        load_yaml(tmp_path)


def test_truncated_checkpoint_is_named(tmp_path, tiny_zoo):
    data = (tiny_zoo / "tiny-text/base/model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable safetensors file"):
        Checkpoint.open(tmp_path)
    ckpt = Checkpoint.open(tiny_zoo / "tiny-text/base")
    assert ckpt.meta["model.norm.weight"] == ("F32", (64,)) and ckpt.metadata == {"format": "pt"}
    assert "model.embed_tokens.weight" in ckpt.names()


def test_bytes_progress_reports_share_eta_and_the_end(monkeypatch):
    from optimer_merge.io import progress

    clock = iter([0.0, 30.0, 35.0, 60.0])  # start, then one reading per advance
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    lines: list[str] = []
    bar = progress.BytesProgress(4 * 2**30, lines.append, what="read ")
    bar.advance(2**30)  # 30 s for a quarter: 90 s left
    bar.advance(2**30)  # 5 s after the last line: quiet
    bar.advance(2 * 2**30)
    assert lines == ["  read 1.00 GiB of 4.00 GiB (25%), ETA 1.5 min", "  read 4.00 GiB of 4.00 GiB (100%), in 1.0 min"]
    assert progress.human_bytes(3.5 * 2**20) == "3.5 MiB" and progress.human_bytes(512) == "512 B"
    quick: list[str] = []
    clock = iter([0.0, 1.0])
    progress.BytesProgress(2**20, quick.append).advance(2**20)
    assert quick == []  # work shorter than a progress interval says nothing


def test_validation_message_names_the_field_not_the_union_members():
    from typing import Literal

    from pydantic import BaseModel, Field, PositiveInt, ValidationError

    from optimer_merge.io.yaml_config import validation_message

    class Spec(BaseModel):
        weight: float = Field(gt=0)

    class Config(BaseModel):
        threads: PositiveInt | Literal["auto"] = "auto"
        objective: str | Spec = "x"

    def message(**values) -> str:
        with pytest.raises(ValidationError) as error:
            Config(**values)
        return validation_message(error.value, "config")

    # a value of the spec's type: only the spec's complaint, under the field's own name
    assert message(objective={"weight": 0}) == "invalid config: objective.weight: Input should be greater than 0 (got 0)"
    # no member fits: each member's requirement, as alternatives
    assert message(threads=0) == "invalid config: threads: Input should be greater than 0, or Input should be 'auto' (got 0)"


def test_paths_in_config_files_expand_the_home_folder(tmp_path, monkeypatch):
    """`~` in a YAML config is the home folder, as on the command line (it was a folder named `~`)."""
    from optimer_merge.cpt.config import load_config as load_train_config
    from optimer_merge.evaluation.objective import Objective
    from optimer_merge.search.config import load_search_config

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "search.yaml").write_text("base: ~/base\nobjective: ~/objective.yaml\noutput: ~/runs/s\n"
                                          "vectors: [{name: ja, model: ~/ja}, {name: zh, vector: ~/v/zh.safetensors}]\n")  # fmt: skip
    search = load_search_config(tmp_path / "search.yaml")
    assert (search.base, search.objective, search.output) == (f"{tmp_path}/base", f"{tmp_path}/objective.yaml", f"{tmp_path}/runs/s")
    assert [v.model or v.vector for v in search.vectors] == [f"{tmp_path}/ja", f"{tmp_path}/v/zh.safetensors"]
    (tmp_path / "train.yaml").write_text("base: ~/base\noutput: ~/runs/t\nmax_steps: 2\ndatasets: [{name: mine, source: ~/d.jsonl, eval_source: ~/e.jsonl}]\n")
    train = load_train_config(tmp_path / "train.yaml")
    assert (train.base, train.output, train.datasets[0].source, train.datasets[0].eval_source) == (
        f"{tmp_path}/base", f"{tmp_path}/runs/t", f"{tmp_path}/d.jsonl", f"{tmp_path}/e.jsonl")  # fmt: skip
    (tmp_path / "objective.yaml").write_text("tasks: [{task: t, metric: acc}]\nreference: ~/results.json\n")
    (tmp_path / "results.json").write_text("{}")
    assert Objective.load(tmp_path / "objective.yaml").reference == f"{tmp_path}/results.json"


def test_vectors_are_extracted_and_measured_a_piece_at_a_time(tmp_path, tiny_zoo, monkeypatch):
    """Large tensors are read in pieces: a tensor whose first pieces equal the base's is still
    written whole (zeros there), one equal everywhere is left out, and the result is model - base."""
    import torch
    from safetensors.torch import load_file, save_file

    import optimer_merge.io.checkpoints as checkpoints
    from optimer_merge.vectors.extract import extract

    base = load_file(str(tiny_zoo / "tiny-text/base/model.safetensors"))
    model = load_file(str(tiny_zoo / "tiny-text/ja/model.safetensors"))
    embed, norm = "model.embed_tokens.weight", "model.norm.weight"
    rows = base[embed].shape[0]
    model[embed][: rows // 2] = base[embed][: rows // 2]  # the first pieces equal the base's
    model[norm] = base[norm].clone()  # equal everywhere
    folder = tmp_path / "ja"
    shutil.copytree(tiny_zoo / "tiny-text/ja", folder)
    save_file(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(checkpoints, "PIECE_ELEMENTS", base[embed].shape[1] * 16)  # 16 rows a piece
    assert len(list(checkpoints.Checkpoint.open(folder).pieces(embed))) == -(-rows // 16) > 2
    manifest = extract(tiny_zoo / "tiny-text/base", {"ja": folder}, tmp_path / "v", dtype="float32", log=lambda _m: None)
    vector = load_file(str(tmp_path / "v/ja.safetensors"))
    assert manifest["skipped"]["equal_in_all_models"] == [norm] and norm not in vector
    assert not vector[embed][: rows // 2].any() and vector[embed][rows // 2 :].any()
    for name, delta in vector.items():
        assert torch.equal(delta, model[name].float() - base[name].float()), name


def test_an_atomic_write_that_fails_leaves_neither_file_nor_partial(tmp_path):
    from optimer_merge.io.files import atomic_write_text

    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(tmp_path / "a.txt", "fine, then a lone surrogate \ud800")
    assert list(tmp_path.iterdir()) == []
    atomic_write_text(tmp_path / "a.txt", "whole")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"] and (tmp_path / "a.txt").read_text() == "whole"


def test_a_file_system_without_locks_is_said_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)  # as on a Lustre mount without flock
    with RunFolder(tmp_path / "run", "search") as folder:
        folder.keep()
    assert f"warning: {tmp_path / 'run'}: cannot lock (No locks available): nothing stops a second search" in capsys.readouterr().err
    assert (tmp_path / "run").is_dir()
