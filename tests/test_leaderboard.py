"""`optimer-merge leaderboard` over real lm-eval results: ours and a plain lm_eval run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

from optimer_merge import cli

TASKS = "optimer_ja_dev_bpb,optimer_zh_dev_bpb"


def test_leaderboard_from_ours_and_plain_lm_eval(small_base, cpt_runs, tmp_path, capsys):
    for name, model in (("base", small_base), ("ja", cpt_runs["ja"] / "model")):
        assert cli.main(["eval", str(model), "--tasks", TASKS, "--limit", "4", "--output", str(tmp_path / name)]) == 0
    cmd = [
        str(Path(sys.executable).with_name("lm_eval")), "--model", "hf",
        "--model_args", f"pretrained={cpt_runs['zh'] / 'model'},dtype=float32", "--device", "cpu",
        "--include_path", str(REPO / "eval_tasks"), "--tasks", TASKS, "--limit", "4",
        "--batch_size", "8", "--output_path", str(tmp_path / "lm-eval-zh"),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    capsys.readouterr()

    out = tmp_path / "board"
    args = ["leaderboard", f"base={tmp_path / 'base/results.json'}", str(tmp_path / "ja"), f"zh={tmp_path / 'lm-eval-zh'}", "--output", str(out), "--metrics", "bits_per_byte"]
    assert cli.main(args) == 0
    markdown = (out / "leaderboard.md").read_text()
    assert "optimer_ja_dev_bpb/bits_per_byte ↓" in markdown and "**" in markdown
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert [r["model"] for r in rows] == ["base", "ja", "zh"]  # the folder of `eval` output is named after its model
    expected = json.loads((tmp_path / "ja/results.json").read_text())["results"]["optimer_ja_dev_bpb"]["bits_per_byte,none"]
    assert float(rows[1]["optimer_ja_dev_bpb/bits_per_byte"]) == expected
    ja_column = {r["model"]: float(r["optimer_ja_dev_bpb/bits_per_byte"]) for r in rows}
    assert min(ja_column, key=ja_column.get) == "ja"  # CPT on ja gives the lowest ja bits per byte
    assert f"**{ja_column['ja']:.4f}**" in markdown
    assert (out / "leaderboard.png").stat().st_size > 10_000


def test_leaderboard_errors(tmp_path, capsys):
    (tmp_path / "x.json").write_text(json.dumps({"not": "results"}))
    assert cli.main(["leaderboard", str(tmp_path / "x.json"), "--output", str(tmp_path)]) == 2
    assert "not an lm-eval results file" in capsys.readouterr().err
    assert cli.main(["leaderboard", str(tmp_path / "missing"), "--output", str(tmp_path)]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_rows_scored_on_different_items_or_shots_are_flagged(tmp_path, capsys):
    def results(effective: int, shots: int = 0) -> dict:
        return {"results": {"t": {"acc,none": 0.5}}, "higher_is_better": {"t": {"acc": True}},
                "n-samples": {"t": {"original": 300, "effective": effective}}, "n-shot": {"t": shots}}  # fmt: skip

    for name, r in (("a", results(100)), ("b", results(100)), ("c", results(300, shots=5)), ("plain", {"results": {"t": {"acc,none": 0.4}}})):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    rows = lambda *names: [f"{n}={tmp_path / n}.json" for n in names]  # noqa: E731
    assert cli.main(["leaderboard", *rows("a", "b", "plain"), "--output", str(tmp_path / "same")]) == 0
    assert "warning" not in capsys.readouterr().err and "warning" not in (tmp_path / "same/leaderboard.md").read_text()
    assert cli.main(["leaderboard", *rows("a", "b", "plain", "c"), "--output", str(tmp_path / "mixed")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: t: rows scored on different numbers of items (100 for a, b; 300 for c): their values are not comparable",
                   "warning: t: rows scored on different numbers of shots (0 for a, b; 5 for c): their values are not comparable"]  # fmt: skip
    assert "> warning: t: rows scored on different numbers of items" in (tmp_path / "mixed/leaderboard.md").read_text()


def test_labels_stay_in_their_markdown_cell(tmp_path):
    """A row label with `|` or a line break (NAME= is free text) keeps the table's columns."""
    (tmp_path / "r.json").write_text(json.dumps({"results": {"t": {"acc,none": 0.5}}}))
    assert cli.main(["leaderboard", f"a|b={tmp_path / 'r.json'}", f"c\nd={tmp_path / 'r.json'}", "--output", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out/leaderboard.md").read_text().splitlines()
    assert table[2:] == ["| a\\|b | **0.5000** |", "| c d | **0.5000** |"]
    with open(tmp_path / "out/leaderboard.csv", newline="") as f:
        assert [row[0] for row in csv.reader(f)] == ["model", "a|b", "c\nd"]  # CSV quotes what it must


def test_huge_values_stay_short_in_the_table(tmp_path):
    """A word perplexity of an untrained model has a hundred digits in fixed point."""
    (tmp_path / "r.json").write_text(json.dumps({"results": {"t": {"word_perplexity,none": 7.0559e101, "bits_per_byte,none": 8.43351}}}))
    assert cli.main(["leaderboard", str(tmp_path / "r.json"), "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out/leaderboard.md").read_text().splitlines()[2].endswith("| **7.0559e+101** | **8.4335** |")
