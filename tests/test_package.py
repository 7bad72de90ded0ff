"""Every module imports; the code passes the linter (undefined names, unused imports); the CLI lists methods."""

import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import mule
from mule.cli import main


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(mule.__path__, "mule.")]
    assert "mule.train" in names and "mule.losses.bitopk" in names
    for name in names:
        importlib.import_module(name)


def test_lint_is_clean():
    root = Path(__file__).resolve().parents[1]
    ruff = shutil.which("ruff") or [sys.executable, "-m", "ruff"]
    cmd = ([ruff] if isinstance(ruff, str) else ruff) + ["check", "src", "tests", "benchmarks"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_methods_lists_every_method(capsys):
    from mule.methods import METHODS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS) and "arXiv 2604.15482" in out
