"""What every command shares: `--help` exits 0 and lists the one override syntax
(`--config.KEY=VALUE`, `fgd_jax.config.split_overrides` + `load_config`), and batch sizes
that do not split over the devices are refused before the first step, naming the key."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_collections
import pytest

from fgd_jax.config import load_config, split_overrides
from fgd_jax.experiment import check_batch_sizes

from ._tiny import REPO

COMMANDS = ("train", "eval", "export", "demo")


def _run(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu", **env),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_0_and_lists_the_override_syntax(command):
    r = _run(["-m", f"fgd_jax.{command}", "--help"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"python -m fgd_jax.{command}" in r.stdout
    assert "--config.KEY=VALUE" in " ".join(r.stdout.split())


def test_split_overrides_takes_both_spellings_and_leaves_the_rest():
    rest, overrides = split_overrides(
        ["--config=c.py:x", "--config.train.batch_size=8", "--workdir", "w",
         "--config.data.root", "/d", "--config.train.decay_steps=(8, 11)"]
    )  # fmt: skip
    assert rest == ["--config=c.py:x", "--workdir", "w"]
    assert overrides == ["train.batch_size=8", "data.root=/d", "train.decay_steps=(8, 11)"]
    with pytest.raises(ValueError, match="needs a value"):
        split_overrides(["--config.train.batch_size", "--workdir=w"])


def test_command_line_overrides_set_typed_values(tmp_path):
    path = tmp_path / "c.py"
    path.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict(dict(train=dict(batch_size=2, flip=False,\n"
        "        decay_steps=(1,), lr=0.1), data=dict(root='x')))\n"
    )
    _, overrides = split_overrides(
        ["--config.train.batch_size=8", "--config.train.flip=true", "--config.data.root=/d",
         "--config.train.decay_steps=(8, 11)", "--config.train.lr=1"]
    )  # fmt: skip
    cfg = load_config(str(path), overrides)
    assert cfg.train.batch_size == 8 and cfg.train.flip is True and cfg.data.root == "/d"
    assert cfg.train.decay_steps == (8, 11) and cfg.train.lr == 1.0
    assert isinstance(cfg.train.lr, float)
    with pytest.raises(TypeError, match="train.flip"):
        load_config(str(path), ["train.flip=yes please"])


def test_batch_sizes_are_checked_against_the_device_count():
    cfg = ml_collections.ConfigDict(dict(train=dict(batch_size=16), eval=dict(batch_size=8)))
    check_batch_sizes(cfg, 8)
    check_batch_sizes(cfg, 1)
    cfg.eval.batch_size = 4
    with pytest.raises(ValueError, match=r"eval.batch_size=4 .* 8 devices .*8, 16, 24, 32"):
        check_batch_sizes(cfg, 8)
    cfg.eval.batch_size, cfg.train.batch_size = 8, 12
    with pytest.raises(ValueError, match=r"train.batch_size=12 .* 8 devices over 2 processes"):
        check_batch_sizes(cfg, 8, process_count=2)
    check_batch_sizes(cfg, 8, keys=("eval.batch_size",))  # what the eval command checks
    cfg.train.batch_size = 0
    with pytest.raises(ValueError, match="train.batch_size=0"):
        check_batch_sizes(cfg, 1)


@pytest.mark.slow
def test_train_refuses_an_eval_batch_size_before_the_first_step(tmp_path):
    """8 devices and eval.batch_size=4: refused at once (it used to train, save a checkpoint,
    and die at the first evaluation without naming the key)."""
    work = tmp_path / "work"
    r = _run(
        ["-m", "fgd_jax.train", f"--config=tests/tiny_config.py:baseline,{tmp_path / 'data'}",
         f"--workdir={work}", "--config.train.batch_size=8", "--config.eval.batch_size=4"],
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
    )  # fmt: skip
    assert r.returncode == 1, r.stderr[-3000:]
    assert "eval.batch_size=4" in r.stderr and "8, 16, 24" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not work.exists() and not (tmp_path / "data").exists()  # nothing written
