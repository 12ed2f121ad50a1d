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
    # help, and every command's refusal of a bad flag, come before torch is imported (~1 s)
    code = "import atexit, sys; atexit.register(lambda: print(sorted({'torch', 'transformers', 'lm_eval'} & set(sys.modules)))); from optimer_merge import cli; cli.main(sys.argv[1:])"
    for argv in (["--help"], ["search", "--help"], ["train", "--help"], ["eval", "--help"]):
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
        assert done.stdout.strip().endswith("[]"), (argv, done.stdout[-300:], done.stderr[-2000:])


def test_merge_subcommand_matches_formula_with_progress(tiny_zoo):
    recipe = REPO / "recipes" / "tiny" / "optimer-text.yml"
    result = run_cli("merge", str(recipe), "out-cli", cwd=tiny_zoo)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "merging [optimer]" in result.stdout and "done in" in result.stdout
    assert "Executing graph" in result.stderr  # mergekit's progress bar
    merged = load_weights(tiny_zoo / "out-cli")
    assert max_abs_diff(merged, reference_merge(recipe, tiny_zoo)) < 1e-6
    assert (tiny_zoo / "out-cli" / "tokenizer.json").exists()


def test_a_second_merge_into_one_folder_waits_its_turn(tiny_zoo, tmp_path, monkeypatch, capsys):
    """While a merge writes OUT (its OUT.partial locked), another into OUT is refused and touches
    nothing; what a killed merge left in OUT.partial is cleared by the next."""
    import os

    from optimer_merge import cli
    from optimer_merge.merge.recipes import _lock_partial

    monkeypatch.chdir(tiny_zoo)  # the recipe's model paths are relative
    recipe, out = str(REPO / "recipes" / "tiny" / "optimer-text.yml"), tmp_path / "merged"
    partial = tmp_path / "merged.partial"
    lock = _lock_partial(partial, out)  # a merge in progress
    (partial / "model-00001-of-00002.safetensors").write_text("half written")
    assert cli.main(["merge", recipe, str(out), "--quiet"]) == 2
    assert f"another merge is writing {out}" in capsys.readouterr().err
    assert (partial / "model-00001-of-00002.safetensors").exists() and not out.exists()
    os.close(lock)  # it was killed: its files stay, unlocked
    assert cli.main(["merge", recipe, str(out), "--quiet"]) == 0
    assert not partial.exists() and not (out / "model-00001-of-00002.safetensors").exists()
    assert max_abs_diff(load_weights(out), reference_merge(REPO / "recipes" / "tiny" / "optimer-text.yml", tiny_zoo)) < 1e-6


def test_a_merge_of_local_models_never_asks_the_hub(tiny_zoo, tmp_path, monkeypatch):
    """mergekit's model card asks the Hub whether a relative path like `tiny-text/ja` that exists
    here is also a Hub repo (offline: an error after the whole merge was written). Our merge names
    local models by absolute path for mergekit, keeps the recipe as written in mergekit_config.yml,
    and titles the card with OUT's name, not the temporary folder's."""
    import huggingface_hub

    from optimer_merge import cli

    asked = []
    monkeypatch.setattr(huggingface_hub, "repo_exists", lambda *args, **kwargs: asked.append(args) or False)
    monkeypatch.chdir(tiny_zoo)
    text = (REPO / "recipes" / "tiny" / "optimer-text.yml").read_text().replace("./tiny-text/", "tiny-text/")
    (tmp_path / "recipe.yml").write_text(text)
    assert cli.main(["merge", str(tmp_path / "recipe.yml"), str(tmp_path / "merged"), "--quiet"]) == 0
    assert asked == []
    assert (tmp_path / "merged" / "mergekit_config.yml").read_text() == text
    assert "# merged\n" in (tmp_path / "merged" / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "recipe.yml"]
    assert max_abs_diff(load_weights(tmp_path / "merged"), reference_merge(REPO / "recipes" / "tiny" / "optimer-text.yml", tiny_zoo)) < 1e-6


def test_merge_errors_are_one_line(tmp_path):
    missing = run_cli("merge", str(tmp_path / "none.yml"), str(tmp_path / "out"))
    assert missing.returncode == 2 and missing.stderr.strip().endswith("none.yml does not exist")
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: optimer\nmodels: 3\n")
    invalid = run_cli("merge", str(bad), str(tmp_path / "out"))
    assert invalid.returncode == 2 and "invalid mergekit recipe: models: Input should be a valid list (got 3)" in invalid.stderr
    assert "Traceback" not in invalid.stderr and len(invalid.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_negative_value_after_a_flag_gets_the_fix(capsys):
    """argparse reads `--lr -1e-3` as two options; the one-line error says how to write it."""
    import pytest

    from optimer_merge import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--base", "b", "--output", "o", "--dataset", "ja", "--lr", "-1e-3"])
    assert done.value.code == 2
    assert "argument --lr: expected one argument; write a negative value as --lr=-1e-3" in capsys.readouterr().err


def test_only_user_errors_become_one_line(monkeypatch):
    """A bug is not a user error: it keeps its traceback (exit 1), whatever its exception type."""
    import pytest

    from optimer_merge import cli
    from optimer_merge.commands import leaderboard

    for error in (ValueError("a bug"), KeyError("a bug"), RuntimeError("a bug"), FileNotFoundError(2, "a bug")):

        def crash(args, error=error):
            raise error

        monkeypatch.setattr(leaderboard, "run", crash)
        with pytest.raises(type(error)):
            cli.main(["leaderboard", "x.json"])


def test_ctrl_c_exits_130_and_says_whether_a_rerun_resumes(monkeypatch, capsys):
    from optimer_merge import cli
    from optimer_merge.commands import leaderboard, search

    def interrupted(args):
        raise KeyboardInterrupt

    for module in (search, leaderboard):
        monkeypatch.setattr(module, "run", interrupted)
    assert cli.main(["search", "--base", "b"]) == 130
    assert capsys.readouterr().err == "interrupted; the same command resumes where this run stopped\n"
    assert cli.main(["leaderboard", "x.json"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_sigterm_inside_an_import_stops_right_after_it(tmp_path):
    """A SIGTERM that lands while a module is being imported (torch takes a second, vLLM several)
    stops the command once the import is done: raised inside it, the stop could be swallowed by the
    importing extension (torch's C code drops a failed numpy import, and the run went on) or leave
    the module half-initialised."""
    (tmp_path / "slow_module.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.5)\ndone = True\n")
    code = (
        "import signal, sys, time\n"
        "from optimer_merge import cli\n"
        "signal.signal(signal.SIGTERM, cli._terminated)\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "try:\n"
        "    import slow_module\n"
        "    print('imported')\n"
        "    time.sleep(10)\n"
        "except KeyboardInterrupt as stop:\n"
        "    print(stop, 'after the import' if getattr(sys.modules.get('slow_module'), 'done', False) else 'inside the import')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines() == ["imported", "stopped by SIGTERM after the import"], done.stdout + done.stderr


def test_a_crash_keeps_its_traceback_through_the_console_script(tmp_path):
    # a results file whose metric value is a dict crashes inside the leaderboard writer: a bug's shape
    (tmp_path / "r.json").write_text('{"results": {"t": {"acc,none": 1}}, "higher_is_better": {"t": {"acc": true}}}')
    ok = run_cli("leaderboard", str(tmp_path / "r.json"), "--output", str(tmp_path / "board"))
    assert ok.returncode == 0, ok.stderr
    code = "import sys; from optimer_merge import cli; from optimer_merge.report import leaderboard as lb; lb.write = None; sys.exit(cli.main(sys.argv[1:]))"
    crash = subprocess.run([sys.executable, "-c", code, "leaderboard", str(tmp_path / "r.json"), "--output", str(tmp_path / "b2")], capture_output=True, text=True, timeout=300)
    assert crash.returncode == 1 and "Traceback" in crash.stderr and "TypeError" in crash.stderr


def test_a_reader_gone_early_ends_quietly_but_other_broken_pipes_are_crashes(monkeypatch):
    """`optimer-merge ... | head` whose reader exits first: exit 141 (SIGPIPE's), no traceback. A
    broken pipe that is not stdout's (a server's socket) stays a crash."""
    import pytest

    from optimer_merge import cli
    from optimer_merge.commands import leaderboard

    process = subprocess.Popen([CLI, "data", "sizes"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before the command prints anything: it starts in about a second
    err = process.stderr.read()
    assert process.wait(timeout=300) == 141 and err == ""

    def socket_gone(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(leaderboard, "run", socket_gone)
    with pytest.raises(BrokenPipeError):
        cli.main(["leaderboard", "x.json"])
