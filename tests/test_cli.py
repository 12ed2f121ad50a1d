"""The `optimer-merge` command line."""

import subprocess
import sys
from pathlib import Path

from conftest import REPO
from helpers import load_weights, max_abs_diff, reference_merge

CLI = str(Path(sys.executable).parent / "optimer-merge")


def run_cli(*args, cwd=None):
    return subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_lists_subcommands_and_version():
    import optimer_merge
    from optimer_merge.cli import COMMANDS

    result = run_cli("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout
    version = run_cli("--version")
    assert version.stdout.strip() == f"optimer-merge {optimer_merge.__version__}"


def test_merge_subcommand_matches_formula_with_progress(tiny_zoo):
    recipe = REPO / "recipes" / "tiny" / "optimer-text.yml"
    result = run_cli("merge", str(recipe), "out-cli", cwd=tiny_zoo)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "merging [optimer]" in result.stdout and "done in" in result.stdout
    assert "Executing graph" in result.stderr  # mergekit's progress bar
    merged = load_weights(tiny_zoo / "out-cli")
    assert max_abs_diff(merged, reference_merge(recipe, tiny_zoo)) < 1e-6
    assert (tiny_zoo / "out-cli" / "tokenizer.json").exists()


def test_merge_errors_are_one_line(tmp_path):
    missing = run_cli("merge", str(tmp_path / "none.yml"), str(tmp_path / "out"))
    assert missing.returncode == 2 and "recipe not found" in missing.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: optimer\nmodels: 3\n")
    invalid = run_cli("merge", str(bad), str(tmp_path / "out"))
    assert invalid.returncode == 2 and "not a valid mergekit recipe" in invalid.stderr
    assert "Traceback" not in invalid.stderr
