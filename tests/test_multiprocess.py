"""Two local JAX processes (2 CPU devices each, gloo collectives) vs one process.

Each process runs `jax.distributed.initialize(127.0.0.1:<free port>, 2, i)`, feeds its half of
the global batch through `host_batch_to_global`, and trains the toy model a few steps; it
also saves a checkpoint with its own data-iterator state and restores it.
Reference: the same steps on a single process (this pytest process, 1 CPU device) with the
same global batch. Tolerance 1e-5 (params: `_compare`'s tree-floored measure; measured ~1e-7,
reduction order differs).
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "_mp_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
    import _mp_worker

    from fgd_jax import parallel

    from ._compare import assert_trees_close
    from ._tiny import cpu_env

    steps = 3
    port = _free_port()
    env = cpu_env(devices=2, PYTHONPATH=ROOT)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                WORKER,
                "multiprocess",
                "--process-id",
                str(i),
                "--num-processes",
                "2",
                "--port",
                str(port),
                "--out",
                str(tmp_path),
                "--steps",
                str(steps),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=180)
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-4000:] if i < len(logs) else ''}"

    ref_losses, ref_params = _mp_worker.run_training(parallel.make_mesh(), steps)
    ref_flat = _mp_worker.flat(ref_params)
    for i in range(2):
        d = np.load(tmp_path / f"process_{i}.npz")
        assert int(d["global_devices"]) == 4 and int(d["local_devices"]) == 2
        np.testing.assert_allclose(d["losses"], ref_losses, rtol=1e-5, atol=1e-6)
        assert_trees_close({k: d["p/" + k] for k in ref_flat}, ref_flat, 1e-5)
    # Each process wrote its own data-iterator state into the one checkpoint.
    names = sorted(os.listdir(tmp_path / "ckpt" / "3" / "data_state"))
    assert "process_0.json" in names and "process_1.json" in names
