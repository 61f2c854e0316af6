"""Layering of `fgd_jax` (README, "Layers"): the import-linter contract in pyproject.toml.

Commands (`train`, `eval`, `export`, `demo`) are leaves; below them the run assembly
(`trainer`, `experiment`, `evaluation`, ...), then models/distill, then ops. The contract is
checked on the real package, shown to catch an upward import in a copy of it, and every
top-level module must sit in a layer (a new one cannot escape the check).
"""

from __future__ import annotations

import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tomllib

import fgd_jax

from ._tiny import REPO

COMMANDS = ("train", "eval", "export", "demo")


def _lint(root: str) -> subprocess.CompletedProcess:
    """`lint-imports` with `root`'s pyproject.toml, importing `fgd_jax` from `root`."""
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"
    )
    env = dict(os.environ, PYTHONPATH=root)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def _layers() -> list[str]:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["id"] == "layers"]
    return layers


def test_the_layers_contract_is_kept():
    r = _lint(REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 kept, 0 broken" in r.stdout


def test_commands_are_leaves_and_every_module_is_layered():
    layers = _layers()
    assert layers[0].replace(" ", "") == "|".join(f"fgd_jax.{c}" for c in COMMANDS)
    named = {m.strip() for layer in layers for m in re.split(r"[|:]", layer)}
    modules = {f"fgd_jax.{m.name}" for m in pkgutil.iter_modules(fgd_jax.__path__)}
    assert modules - named == set(), "modules outside every layer of pyproject.toml"
    assert named - modules == set(), "layers naming modules that do not exist"


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The circle this contract ended (a library importing a command), in a copy."""
    root = tmp_path / "repo"
    shutil.copytree(
        os.path.join(REPO, "fgd_jax"),
        root / "fgd_jax",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(os.path.join(REPO, "pyproject.toml"), root / "pyproject.toml")
    with open(root / "fgd_jax" / "evaluation.py", "a") as f:
        f.write("\n\ndef _late():\n    from fgd_jax import export  # noqa: F401\n")
    r = _lint(str(root))
    assert r.returncode == 1, r.stdout[-3000:]
    assert "0 kept, 1 broken" in r.stdout
    assert "fgd_jax.evaluation -> fgd_jax.export" in r.stdout
