"""Orbax checkpointing: exact round trips, keep-last-K, async saves, shardings, crash safety.

Reference: the saved values themselves (bitwise equality), and for the crash test an
uninterrupted run of the same toy training (`tests/_mp_worker.py ckpt_train`): a run killed
with SIGKILL right after a save was started and then resumed must end with bitwise-identical
params.
"""

import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fgd_jax import checkpoint, optim, parallel
from fgd_jax import config as cfglib

WORKER = os.path.join(os.path.dirname(__file__), "_mp_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_state(seed=0, steps=3):
    """A train state with a non-trivial optimizer state (momentum after a few updates)."""
    rng = np.random.default_rng(seed)
    params = {
        "conv": {
            "kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=4), jnp.float32),
        },
        "bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
    }
    tx = optim.make_optimizer(cfglib.schedule_2x(batch_size=2), 10, params)
    opt_state = tx.init(params)
    for _ in range(steps):
        g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        upd, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, upd)
    return {"params": params, "opt_state": opt_state, "step": jnp.asarray(steps, jnp.int32)}


def assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, (ta, tb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype


def test_round_trip_exact(tmp_path):
    state = toy_state()
    cfg = cfglib.ConfigDict({"train": cfglib.schedule_2x(batch_size=4), "seed": 3})
    with checkpoint.CheckpointManager(tmp_path / "ckpt", keep=3) as mngr:
        assert mngr.latest_step() is None
        assert mngr.save(
            7,
            state,
            data_state={"epoch": 1, "pos": [3, 4]},
            config=cfg,
            metrics={"loss": jnp.float32(0.5)},
        )
        mngr.wait()
        assert mngr.latest_step() == 7
        restored, data_state, rcfg = mngr.restore(target=state)
        assert mngr.metrics(7) == {"loss": 0.5}
        assert mngr.restore_config() == cfg
    assert_trees_equal(restored, state)
    # Optimizer state types survive, so the restored state can keep training.
    assert isinstance(restored["opt_state"], tuple)
    assert data_state == {"epoch": 1, "pos": [3, 4]}
    assert rcfg == cfg and rcfg.train.decay_epochs == (16, 22)
    # A fresh manager on the same directory (a new run) sees the checkpoint.
    with checkpoint.CheckpointManager(tmp_path / "ckpt") as mngr2:
        again, _, _ = mngr2.restore(target=state)
    assert_trees_equal(again, state)


def test_bytes_data_state_and_no_config(tmp_path):
    state = toy_state(steps=1)
    with checkpoint.CheckpointManager(tmp_path, keep=1) as mngr:
        mngr.save(1, state, data_state=b"\x00grain-state\xff")
        mngr.wait()
        _, ds, cfg = mngr.restore(target=state)
        _, ds2, _ = mngr.restore(target=state, data_state=False)
    assert ds == b"\x00grain-state\xff" and cfg is None and ds2 is None


def test_keep_last_k(tmp_path):
    state = toy_state(steps=0)
    with checkpoint.CheckpointManager(tmp_path, keep=2) as mngr:
        for step in range(1, 6):
            state = dict(state, step=jnp.asarray(step, jnp.int32))
            mngr.save(step, state, data_state={"s": step})
        mngr.wait()
        assert mngr.all_steps() == [4, 5]
        restored, ds, _ = mngr.restore(step=4, target=state)
        assert int(restored["step"]) == 4 and ds == {"s": 4}
        with pytest.raises(FileNotFoundError, match="step 2"):
            mngr.restore(step=2, target=state)
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]


def test_async_save_is_a_snapshot(tmp_path):
    """save() returns before the write finishes, but the checkpoint holds the values at call
    time even if the device buffers are freed (donated) right after."""
    state = toy_state()
    expected = jax.tree.map(np.asarray, state)
    with checkpoint.CheckpointManager(tmp_path, keep=2, async_save=True) as mngr:
        mngr.save(1, state, data_state={"s": 1})
        for leaf in jax.tree.leaves(state):
            leaf.delete()
        mngr.wait()
        restored, _, _ = mngr.restore(target=expected)
    assert_trees_equal(restored, expected)


def test_restore_onto_sharding(tmp_path):
    state = toy_state()
    with checkpoint.CheckpointManager(tmp_path) as mngr:
        mngr.save(2, state)
        mngr.wait()
        mesh = parallel.make_mesh()
        target = checkpoint.abstract_tree(state, sharding=parallel.replicated(mesh))
        restored, _, _ = mngr.restore(target=target)
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == parallel.replicated(mesh)
    assert_trees_equal(restored, state)


def test_restore_errors(tmp_path):
    with checkpoint.CheckpointManager(tmp_path / "empty") as mngr:
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            mngr.restore()
    with pytest.raises(ValueError, match="keep_ckpts"):
        checkpoint.CheckpointManager(tmp_path / "x", keep=0)


def test_incomplete_tmp_dir_is_ignored(tmp_path):
    state = toy_state(steps=1)
    with checkpoint.CheckpointManager(tmp_path) as mngr:
        mngr.save(1, state)
    # What a crash mid-save leaves behind: an unfinished temporary step directory.
    junk = tmp_path / "2.orbax-checkpoint-tmp-123"
    (junk / "state").mkdir(parents=True)
    (junk / "state" / "partial").write_bytes(b"garbage")
    with checkpoint.CheckpointManager(tmp_path) as mngr:
        assert mngr.latest_step() == 1
        restored, _, _ = mngr.restore(target=state)
    assert_trees_equal(restored, state)


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_is_exact(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    steps = 8

    def cmd(workdir, out, sleep):
        return [
            sys.executable,
            WORKER,
            "ckpt_train",
            "--workdir",
            str(workdir),
            "--out",
            str(out),
            "--steps",
            str(steps),
            "--ckpt-every",
            "1",
            "--keep",
            "2",
            "--sleep",
            str(sleep),
        ]

    ref = subprocess.run(
        cmd(tmp_path / "ref", tmp_path / "ref.npz", 0),
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert ref.returncode == 0, ref.stderr[-4000:]

    work = tmp_path / "run"
    proc = subprocess.Popen(
        cmd(work, tmp_path / "run.npz", 0.3),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.strip() == "saved 3":  # the async write of step 3 is most likely in flight
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "run.npz").exists()
    with checkpoint.CheckpointManager(work) as mngr:
        latest = mngr.latest_step()
        assert latest in (2, 3), mngr.all_steps()

    resumed = subprocess.run(
        cmd(work, tmp_path / "run.npz", 0), env=env, capture_output=True, text=True, timeout=180
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed at {latest}" in resumed.stdout
    a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "run.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------ model exports
def test_save_load_variables(tmp_path):
    variables = {
        "params": toy_state()["params"],
        "batch_stats": {"bn": {"mean": jnp.ones(4), "var": jnp.ones(4)}},
    }
    cfg = cfglib.ConfigDict({"model": {"type": "toy", "channels": (4, 8)}})
    path = checkpoint.save_variables(tmp_path / "export", variables, cfg)
    loaded, rcfg = checkpoint.load_variables(path)
    assert_trees_equal(loaded, variables)
    assert isinstance(jax.tree.leaves(loaded)[0], np.ndarray)
    assert rcfg == cfg and rcfg.model.channels == (4, 8)
    # With an expected abstract tree carrying shardings: restored onto them.
    mesh = parallel.make_mesh()
    expected = checkpoint.abstract_tree(variables, sharding=parallel.replicated(mesh))
    loaded2, _ = checkpoint.load_variables(path, expected=expected)
    assert_trees_equal(loaded2, variables)
    assert jax.tree.leaves(loaded2)[0].sharding == parallel.replicated(mesh)
    with pytest.raises(FileExistsError):
        checkpoint.save_variables(path, variables)
    checkpoint.save_variables(path, variables, overwrite=True)


def test_load_variables_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        checkpoint.load_variables(tmp_path / "missing")
    (tmp_path / "notckpt").mkdir()
    (tmp_path / "notckpt" / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="not a variables checkpoint"):
        checkpoint.load_variables(tmp_path / "notckpt")
    variables = {
        "params": {
            "conv": {"kernel": np.zeros((3, 3, 2, 4), np.float32), "bias": np.zeros(4, np.float32)}
        }
    }
    path = checkpoint.save_variables(tmp_path / "export", variables)
    other = {
        "params": {
            "conv": {
                "kernel": jax.ShapeDtypeStruct((3, 3, 2, 8), jnp.float32),
                "bias": jax.ShapeDtypeStruct((4,), jnp.float32),
            },
            "fc": {"kernel": jax.ShapeDtypeStruct((8, 2), jnp.float32)},
        }
    }
    with pytest.raises(ValueError) as err:
        checkpoint.load_variables(path, expected=other)
    msg = str(err.value)
    assert "another architecture" in msg
    assert "shape of params/conv/kernel: checkpoint (3, 3, 2, 4), expected (3, 3, 2, 8)" in msg
    assert "missing in checkpoint: params/fc/kernel" in msg
