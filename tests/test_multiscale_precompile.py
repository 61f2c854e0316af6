"""The batch multi-scale train steps compiled ahead of time (`train.precompile='parallel'`,
`fgd_jax.trainer.StepsBySize`, what `trainer.train` runs): every size a run will use is
compiled before the first step, in threads, and no size compiles again at its first real
step; 'lazy' compiles each size at its first step. Compiles are counted with JAX's own
monitoring events (a program lowered to MLIR, a backend compile). The step is a toy one (the
batch resize of the real step, a 1x1 conv, an SGD update) so that compiling it is cheap; the
trainer builds its real step the same way (`trainer.sharded_train_steps`:
`jax.jit(make_train_step(..., input_size=size), in_shardings, out_shardings,
donate_argnums=0)`)."""

from __future__ import annotations

import collections
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fgd_jax import config as C
from fgd_jax import parallel
from fgd_jax.experiment import batch_input_size, batch_input_sizes_used, resize_batch
from fgd_jax.trainer import StepsBySize, abstract_tree, precompile_threads

LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
COMPILE = "/jax/core/compile/backend_compile_duration"
CANVAS = (48, 48)


@pytest.fixture
def compiles():
    """Counter of (event, fun_name) of the toy step's lowerings and backend compiles."""
    seen: collections.Counter = collections.Counter()

    def listen(event, duration, **kw):
        if event in (LOWER, COMPILE) and "toy_step" in str(kw.get("fun_name", "")):
            seen[event] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield seen
    jax.monitoring.unregister_event_duration_listener(listen)


def _make_jitted(mesh):
    rep, shard = parallel.replicated(mesh), parallel.data_sharding(mesh)

    def make(size):
        def toy_step(state, teacher, batch):
            if size is not None:
                batch = resize_batch(batch, size)

            def loss(w):
                y = jnp.einsum("bhwc,cd->bhwd", batch["image"], w)
                return jnp.mean(y**2) + 1e-3 * jnp.sum(batch["boxes"] * batch["valid"][..., None])

            value, g = jax.value_and_grad(loss)(state["w"])
            return {"w": state["w"] - 0.1 * g, "step": state["step"] + 1}, {"loss": value}

        return jax.jit(
            toy_step,
            in_shardings=(rep, rep, shard),
            out_shardings=(rep, rep),
            donate_argnums=(0,),
        )

    return make


def _inputs(mesh):
    rng = np.random.default_rng(0)
    batch = dict(
        image=rng.uniform(0, 1, (2, *CANVAS, 3)).astype(np.float32),
        boxes=rng.uniform(0, 40, (2, 3, 4)).astype(np.float32),
        valid=np.array([[True, True, False], [True, False, False]]),
        use_l1=np.zeros((2,), bool),
    )
    state = {"w": np.eye(3, dtype=np.float32), "step": np.zeros((), np.int32)}
    return parallel.replicate(state, mesh), parallel.host_batch_to_global(batch, mesh)


def _train_cfg():
    return ml_collections.ConfigDict(dict(multiscale_sizes=(32, 64), multiscale_interval=2))


def _run(steps, tc, state, batch, num_steps, compiles):
    """The trainer's loop over `num_steps` steps: returns the losses and, per size, the
    number of lowerings / compiles its first real step triggered."""
    losses, at_first_use = [], {}
    for k in range(num_steps):
        size = batch_input_size(tc, k, 0, CANVAS)
        before = dict(compiles)
        state, metrics = steps(size, state, None, batch)
        losses.append(float(metrics["loss"]))
        if size not in at_first_use:
            at_first_use[size] = {e: compiles[e] - before.get(e, 0) for e in (LOWER, COMPILE)}
    return losses, at_first_use


def test_parallel_precompiles_every_size_and_lazy_agrees(compiles):
    mesh = parallel.make_mesh()
    tc = _train_cfg()
    num_steps = 6
    sizes = batch_input_sizes_used(tc, 0, num_steps, 0, CANVAS)
    assert sizes == (CANVAS, (32, 32), (64, 64))  # the canvas, then one size per 2 steps

    steps = StepsBySize(_make_jitted(mesh), mode=C.PRECOMPILE_DEFAULT, threads=2)
    assert steps.mode == "parallel"
    state, batch = _inputs(mesh)
    record, line = steps.precompile(sizes, abstract_tree((state, None, batch)))
    assert compiles[LOWER] == len(sizes)  # each size lowered once, all before any step
    assert all(steps.is_compiled(s) for s in sizes)
    assert record["threads"] == 2 and record["total_wall_s"] > 0
    for h, w in sizes:
        assert record[f"{h}x{w}_lower_s"] > 0 and f"{h}x{w}" in line
    assert steps.precompile(sizes, (state, None, batch)) is None  # nothing left to compile
    losses, first = _run(steps, tc, state, batch, num_steps, compiles)
    assert set(first) == set(sizes)
    assert all(n == {LOWER: 0, COMPILE: 0} for n in first.values()), first

    # 'lazy': nothing ahead of time, each size compiled once at its first step; same losses
    compiles.clear()
    lazy = StepsBySize(_make_jitted(mesh), mode="lazy")
    state, batch = _inputs(mesh)
    assert lazy.precompile(sizes, (state, None, batch)) is None and not compiles
    lazy_losses, lazy_first = _run(lazy, tc, state, batch, num_steps, compiles)
    assert all(n[LOWER] == 1 for n in lazy_first.values()), lazy_first
    assert compiles[LOWER] == len(sizes)
    np.testing.assert_allclose(losses, lazy_losses, rtol=1e-6)


def test_changed_batch_falls_back_to_jit(compiles, caplog):
    """A batch unlike the one compiled for (another dtype) compiles again, with a warning,
    and the donated state is still intact."""
    mesh = parallel.make_mesh()
    steps = StepsBySize(_make_jitted(mesh), mode="parallel", threads=1)
    state, batch = _inputs(mesh)
    steps.precompile([(32, 32)], abstract_tree((state, None, batch)))
    other = dict(batch, boxes=batch["boxes"].astype(jnp.bfloat16))
    with caplog.at_level(logging.WARNING, logger="fgd_jax.trainer"):
        new_state, _ = steps((32, 32), state, None, other)
    assert "compiling it again" in caplog.text and not steps.is_compiled((32, 32))
    assert int(new_state["step"]) == 1 and compiles[LOWER] == 2


def test_sizes_used_and_config():
    tc = _train_cfg()
    for start, stop in [(0, 1), (0, 40), (5, 9), (7, 400), (30, 30)]:
        want = []
        for k in range(start, stop):
            s = batch_input_size(tc, k, 3, CANVAS)
            if s not in want:
                want.append(s)
        assert list(batch_input_sizes_used(tc, start, stop, 3, CANVAS)) == want
    assert batch_input_sizes_used(ml_collections.ConfigDict(), 0, 100) == ()
    assert precompile_threads(0, 1) == 1 and precompile_threads(5, 3) == 3
    assert precompile_threads(2, 11) == 2 and precompile_threads(0, 100) >= 1
    with pytest.raises(ValueError, match="train.precompile"):
        StepsBySize(lambda s: None, mode="eager")
    t = C.schedule_yolox()
    assert t.precompile == C.PRECOMPILE_DEFAULT == "parallel" and t.precompile_threads == 0
