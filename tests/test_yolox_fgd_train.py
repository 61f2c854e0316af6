"""A tiny YOLOX student distilled by a tiny YOLOX teacher with the `yolox` FGD variant: three
jitted train steps (`fgd_jax.experiment.make_train_step`, what `fgd_jax.trainer.train` runs)
with the teacher's BN on batch statistics and batch resize factors != 1; every loss finite,
the student's params and BN statistics move, the teacher's variables do not."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgd_jax import config as C
from fgd_jax.distill.distiller import build_distill_losses
from fgd_jax.experiment import Experiment, TrainState, make_train_step, run_optimizer

pytestmark = pytest.mark.slow

# the step compiled at XLA's backend optimization level 0: several times faster, same math
_FAST = {"xla_backend_optimization_level": 0}


def _batch(n: int = 2) -> dict:
    """64x64 raw-pixel images with 1-3 boxes painted on noise, padded to 4 slots."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (n, 64, 64, 3)).astype(np.float32)
    boxes = np.zeros((n, 4, 4), np.float32)
    labels = np.full((n, 4), -1, np.int32)
    valid = np.zeros((n, 4), bool)
    for i in range(n):
        for j in range(1 + i % 3):
            x1, y1 = rng.uniform(0, 36, 2)
            w, h = rng.uniform(10, 26, 2)
            boxes[i, j] = [x1, y1, min(x1 + w, 64), min(y1 + h, 64)]
            labels[i, j], valid[i, j] = j % 3, True
            images[i, int(y1) : int(y1 + h), int(x1) : int(x1 + w)] = 40.0 * (j + 1)
    hw = np.tile(np.array([[64, 64]], np.int32), (n, 1))
    return dict(
        image=images, boxes=boxes, labels=labels, valid=valid, img_shape=hw, pad_shape=hw,
        scale_factor=np.ones((n, 4), np.float32),
        ignore_boxes=np.zeros((n, 1, 4), np.float32), ignore_valid=np.zeros((n, 1), bool),
        input_scale=np.tile(np.array([[1.25, 0.75]], np.float32), (n, 1)),
    )  # fmt: skip


def _fill(shapes, seed: int):
    """Values for a variable tree of `jax.ShapeDtypeStruct`s: kernels N(0, 1 / fan_in),
    norm scales and running variances 1, everything else 0."""
    rng = np.random.default_rng(seed)

    def leaf(path, sd):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            fan_in = int(np.prod(sd.shape[:-1]))
            return jnp.asarray(rng.normal(0, fan_in**-0.5, sd.shape), sd.dtype)
        return jnp.full(sd.shape, 1.0 if name in ("scale", "var") else 0.0, sd.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def test_tiny_yolox_fgd_train_steps(tmp_path):
    cfg = C.ConfigDict()
    cfg.model = C.yolox_model("s", num_classes=3, widen_factor=0.0625)  # neck 16 channels
    cfg.teacher = C.teacher(C.yolox_model("s", num_classes=3, widen_factor=0.125), ckpt="")
    cfg.distill = C.yolox_fgd_distill(student_channels=16, teacher_channels=32)
    cfg.train = C.schedule_yolox(batch_size=2)
    cfg.train.update(warmup="none", decay_epochs=(), base_lr=0.01)
    cfg.seed = 0
    assert cfg.distill.teacher_bn == "train"
    exp = Experiment(cfg)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    x = batch["image"][:1]
    # variables from their shapes (tracing only): compiling the detectors' `init` is the
    # slowest part of such a test on XLA:CPU, and any sane values do for the mechanics
    init = functools.partial(exp.student.init, train=False)
    svars = _fill(jax.eval_shape(init, jax.random.key(0), x), seed=0)
    tinit = functools.partial(exp.teacher.init, train=False)
    tvars = _fill(jax.eval_shape(tinit, jax.random.key(1), x), seed=1)
    shapes_s = jax.eval_shape(
        functools.partial(exp.student.apply, train=False, method="extract_feat"), svars, x
    )
    shapes_t = jax.eval_shape(
        functools.partial(exp.teacher.apply, train=False, method="extract_feat"), tvars, x
    )
    assert [f.shape[-1] for f in shapes_s] == [16] * 3
    assert [f.shape[-1] for f in shapes_t] == [32] * 3
    fgd_init = build_distill_losses(cfg.distill).init
    fgd_vars = _fill(
        jax.eval_shape(fgd_init, jax.random.key(2), shapes_s, shapes_t, jax.tree.map(
            lambda v: v[:1], batch)),
        seed=2,
    )  # fmt: skip
    params = {"student": svars["params"], "distill_losses": fgd_vars["params"]}
    model_state = {"batch_stats": {"student": svars["batch_stats"]}}
    tx, schedule = run_optimizer(exp, params, 10)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
        opt_state=tx.init(params), rng=jax.random.key(3),
    )  # fmt: skip
    t_before = jax.tree.map(np.asarray, tvars)
    p_before = jax.tree.map(np.asarray, state.params)
    s_before = jax.tree.map(np.asarray, state.model_state)
    step = jax.jit(make_train_step(exp, tx, schedule), compiler_options=_FAST)
    history = []
    for _ in range(3):
        state, metrics = step(state, tvars, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    keys = {"loss_cls", "loss_bbox", "loss_obj"} | {f"loss_fgd_fpn_{i}" for i in range(3)}
    assert keys <= set(history[0]) and "loss_fgd_fpn_3" not in history[0]
    for rec in history:
        assert all(np.isfinite(v) for k, v in rec.items() if k.startswith("loss")), rec
        assert all(rec[f"loss_fgd_fpn_{i}"] > 0 for i in range(3)), rec
    assert step._cache_size() == 1
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), p_before, state.params)
    assert all(jax.tree.leaves(moved["distill_losses"]["loss_fgd_fpn_0"]["align"]))
    assert any(jax.tree.leaves(moved["student"]["backbone"]))
    stats = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), s_before,
                         state.model_state)  # fmt: skip
    assert any(jax.tree.leaves(stats))  # the student's BN trains on batch statistics
    jax.tree.map(np.testing.assert_array_equal, t_before, jax.tree.map(np.asarray, tvars))
