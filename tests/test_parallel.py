"""Mesh / sharding helpers, and data parallelism on 8 forced CPU devices.

Reference for the 8-device test: the same jitted toy train step on a 1-device mesh with the
same global batch (losses and updated params within 1e-5, params by `_compare`'s tree-floored
measure; measured ~3e-8).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgd_jax import parallel

from ._compare import assert_trees_close
from ._tiny import cpu_env

WORKER = os.path.join(os.path.dirname(__file__), "_mp_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_eight_devices_equal_one_device(tmp_path):
    out = tmp_path / "d8.npz"
    env = cpu_env(devices=8, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, WORKER, "devices8", "--out", str(out), "--steps", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    d = np.load(out)
    np.testing.assert_allclose(d["losses8"], d["losses1"], rtol=1e-5, atol=1e-6)
    keys = [k[3:] for k in d.files if k.startswith("p1/")]
    assert keys
    assert_trees_close({k: d["p8/" + k] for k in keys}, {k: d["p1/" + k] for k in keys}, 1e-5)
    # The run actually trained: params moved from their init (not a vacuous comparison).
    assert not np.allclose(d["losses8"][0], d["losses8"][-1])


def test_mesh_and_shardings_single_process():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.devices.size == jax.device_count()
    assert parallel.data_sharding(mesh).spec == jax.sharding.PartitionSpec("data")
    assert parallel.replicated(mesh).spec == jax.sharding.PartitionSpec()


def test_host_batch_to_global_single_process():
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(4, 6, 6, 3)).astype(np.float32),
        "image_id": np.arange(4, dtype=np.int64),
        "valid": rng.random((4, 5)) > 0.5,
    }
    out = parallel.host_batch_to_global(batch, mesh)
    np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
    np.testing.assert_array_equal(np.asarray(out["image_id"]), batch["image_id"])
    assert out["valid"].dtype == jnp.bool_
    assert out["image"].sharding.spec == jax.sharding.PartitionSpec("data")


def test_host_batch_to_global_errors():
    mesh = parallel.make_mesh()
    with pytest.raises(ValueError, match="different batch sizes"):
        parallel.host_batch_to_global({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}, mesh)
    with pytest.raises(ValueError, match="'s'.*scalar"):
        parallel.host_batch_to_global({"s": np.float32(1.0)}, mesh)


def test_fetch_and_replicate():
    mesh = parallel.make_mesh()
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float32(2.5)}
    rep = parallel.replicate(tree, mesh)
    assert rep["w"].sharding.is_fully_replicated
    got = parallel.fetch(rep)
    np.testing.assert_array_equal(got["w"], tree["w"])
    assert got["s"] == 2.5 and isinstance(got["s"], float)


def test_maybe_initialize_distributed_single_process_is_noop(monkeypatch):
    for k in (
        "FGD_COORDINATOR",
        "FGD_NUM_PROCESSES",
        "FGD_PROCESS_ID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
    ):
        monkeypatch.delenv(k, raising=False)
    assert parallel.maybe_initialize_distributed() is False
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert parallel.maybe_initialize_distributed() is False
    assert jax.process_count() == 1


def test_maybe_initialize_distributed_bad_env(monkeypatch):
    monkeypatch.setenv("FGD_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="FGD_NUM_PROCESSES"):
        parallel.maybe_initialize_distributed()
    monkeypatch.setenv("FGD_NUM_PROCESSES", "2")
    monkeypatch.delenv("FGD_COORDINATOR", raising=False)
    monkeypatch.delenv("FGD_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="FGD_COORDINATOR"):
        parallel.maybe_initialize_distributed()


_CLUSTER_ENV = (
    "FGD_COORDINATOR",
    "FGD_NUM_PROCESSES",
    "FGD_PROCESS_ID",
    "FGD_LOCAL_DEVICE_IDS",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE",
    "SLURM_GPUS_ON_NODE",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "CUDA_VISIBLE_DEVICES",
)


@pytest.mark.parametrize(
    "env, expected",
    [
        # SLURM, one process per node with 8 GPUs: all of them (JAX alone would pick [0])
        (
            {
                "SLURM_NTASKS": "2",
                "SLURM_TASKS_PER_NODE": "1(x2)",
                "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
            },
            list(range(8)),
        ),
        # SLURM, one process per GPU: JAX's own [local_rank] (None here)
        ({"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8"}, None),
        # Open MPI, one process per node, GPU count from SLURM-less env
        ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}, None),
        (
            {
                "OMPI_COMM_WORLD_SIZE": "2",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
                "CUDA_VISIBLE_DEVICES": "2,3",
            },
            [0, 1],
        ),
        # explicit wins
        ({"SLURM_NTASKS": "2", "FGD_LOCAL_DEVICE_IDS": "0,2"}, [0, 2]),
    ],
)
def test_cluster_launch_passes_the_node_gpus(monkeypatch, env, expected):
    """The SLURM / Open MPI branch calls jax.distributed.initialize (captured here, not run)
    with every GPU of the node when one process per node is launched."""
    for k in _CLUSTER_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert parallel.maybe_initialize_distributed() is True
    assert calls == [{"local_device_ids": expected}]
    # the explicit coordinator path passes them too
    calls.clear()
    parallel.maybe_initialize_distributed("10.0.0.1:1234", 2, 1)
    assert calls[0]["local_device_ids"] == expected
    assert calls[0]["coordinator_address"] == "10.0.0.1:1234" and calls[0]["process_id"] == 1


def test_bad_local_device_ids(monkeypatch):
    monkeypatch.setenv("FGD_LOCAL_DEVICE_IDS", "0,x")
    with pytest.raises(ValueError, match="FGD_LOCAL_DEVICE_IDS"):
        parallel.local_device_ids_from_env()
