"""`optimer` is registered in plain mergekit after an editable install and from a built wheel."""

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

from conftest import REPO

PROBE = "from mergekit import merge_methods; print('optimer' in [m.spec.name for m in merge_methods.registered_methods()])"


def test_editable_install_registers_on_import(tmp_path):
    # a fresh interpreter, outside the repository: only the installed .pth can register it
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.stdout.strip() == "True", out.stderr


def test_startup_hook_imports_neither_torch_nor_mergekit(tmp_path):
    code = "import sys; print(any(m.split('.')[0] in ('torch', 'mergekit') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.stdout.strip() == "False", out.stderr


def test_wheel_install_registers_for_stock_mergekit_yaml(tmp_path, tiny_zoo):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    (wheel,) = wheels.glob("optimer_merge-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("optimer_merge_hook.pth").decode().strip() == "import optimer_merge.merge.hook"

    # a bare venv holding only the wheel; its dependencies come from this environment's site-packages
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True, timeout=600).strip())
    (site / "aaa_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    out = subprocess.run([str(python), "-c", "import optimer_merge; print(optimer_merge.__file__)"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.stdout.startswith(str(site)), (out.stdout, out.stderr)

    # the stock mergekit-yaml entry point, run by that interpreter
    recipe = REPO / "recipes" / "tiny" / "optimer-text.yml"
    merge = subprocess.run(
        [str(python), "-c", "from mergekit.scripts.run_yaml import main; main()", str(recipe), "out-wheel", "--no-copy-tokenizer"],
        cwd=tiny_zoo, capture_output=True, text=True, timeout=300,
    )
    assert merge.returncode == 0, merge.stderr[-2000:]
    assert (tiny_zoo / "out-wheel" / "model.safetensors").exists()
