"""Multi-host: `python -m fgd_jax.train` launched as two local processes (jax.distributed,
coordinator on 127.0.0.1, 1 CPU device each) trains the tiny RetinaNet and agrees with a
single-process run of the same global batch (reference: the single-process run).

Both runs train in the stable regime of `_tiny.STABLE` (asserted from the logged gradient
norms), and the parameters are compared with `_compare.assert_trees_close`: each leaf's
difference relative to max(its max, the tree's rms), tolerance 1e-4 (measured ~1e-5: float32,
different reduction order over 2 hosts)."""

import socket
import subprocess
import sys

import numpy as np
import pytest

from fgd_jax.experiment import load_model
from fgd_jax.logging_utils import read_metrics

from ._compare import assert_stable, assert_trees_close
from ._tiny import REPO, STABLE_STEPS, cpu_env

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(workdir, data):
    return [
        sys.executable,
        "-m",
        "fgd_jax.train",
        f"--config=tests/tiny_config.py:baseline+stable,{data}",
        f"--workdir={workdir}",
        "--config.train.ckpt_every=3",
    ]


def test_two_processes_agree_with_one(tmp_path):
    data = str(tmp_path / "data")
    base_env = cpu_env()  # one device per process
    r = subprocess.run(
        _cmd(tmp_path / "single", data),
        cwd=REPO,
        env=base_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(
            base_env,
            FGD_COORDINATOR=f"127.0.0.1:{port}",
            FGD_NUM_PROCESSES="2",
            FGD_PROCESS_ID=str(i),
        )
        procs.append(
            subprocess.Popen(
                _cmd(tmp_path / "multi", data),
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    a, _ = load_model(str(tmp_path / "single"))
    b, _ = load_model(str(tmp_path / "multi"))
    la = [r for r in read_metrics(tmp_path / "single") if "loss" in r]
    lb = [r for r in read_metrics(tmp_path / "multi") if "loss" in r]
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, STABLE_STEPS + 1))
    assert_stable([r["grad_norm"] for r in la], [r["loss"] for r in la])
    for what in ("params", "batch_stats"):
        worst = assert_trees_close(b[what], a[what], rtol=1e-4, what=what)
        print(f"worst {what} difference {worst:.3g}")
    # the logged losses of every step agree too
    for ra, rb in zip(la, lb, strict=True):
        for k in (k for k in ra if k.startswith("loss")):
            np.testing.assert_allclose(rb[k], ra[k], rtol=1e-5, err_msg=f"{k} step {ra['step']}")
    assert (tmp_path / "multi" / "eval" / "metrics.json").is_file()
