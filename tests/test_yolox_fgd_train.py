"""A tiny YOLOX student distilled by a tiny YOLOX teacher with the `yolox` FGD variant and the
YOLOX training recipe: jitted train steps (`fgd_jax.experiment.make_train_step`, what
`fgd_jax.trainer.train` runs) on a batch resized to 32 x 32 (batch multi-scale, resize factors
!= 1 in the FGD variant), the teacher's BN on batch statistics, the L1 term switched on by the
batch's `use_l1`, the YOLOX schedule, Nesterov SGD without norm decay, and the EMA of the
weights. Every loss part decreases; the student's params and BN statistics move, the
teacher's variables do not; the EMA follows mmdetection's recursion and survives a
checkpoint round trip as the variables evaluation uses."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgd_jax import checkpoint as ckpt_lib
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
        use_l1=np.ones((n,), bool),
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
    # the branch's FGD weights x 100: at 16 channels and 16 steps the detection losses would
    # otherwise move the student's features more than the distillation pulls them back
    cfg.distill = C.yolox_fgd_distill(student_channels=16, teacher_channels=32, alpha_fgd=0.2,
                                      beta_fgd=0.1, gamma_fgd=0.1, lambda_fgd=0.001)  # fmt: skip
    cfg.train = C.schedule_yolox(batch_size=2)
    # the recipe's optimizer at a rate that overfits one batch in a few steps; a short EMA
    # ramp (total_iter 4) so that the average differs from the weights
    cfg.train.update(lr_policy="yolox", warmup="none", num_steps=1000, last_epochs=15,
                     min_lr_ratio=0.05, base_lr=0.02, reference_batch_size=2,
                     norm_decay_mult=0.0, ema_momentum=1e-4, ema_total_iter=4)  # fmt: skip
    cfg.seed = 0
    assert cfg.distill.teacher_bn == "train" and cfg.distill.variant == "yolox"
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
    assert exp.uses_ema
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
        opt_state=tx.init(params), rng=jax.random.key(3),
        ema=jax.tree.map(jnp.array, {"params": params, "model_state": model_state}),
    )  # fmt: skip
    t_before = jax.tree.map(np.asarray, tvars)
    p_before = jax.tree.map(np.asarray, state.params)
    s_before = jax.tree.map(np.asarray, state.model_state)
    step = jax.jit(make_train_step(exp, tx, schedule, input_size=(32, 32)),
                   compiler_options=_FAST)  # fmt: skip
    leaf = lambda tree: np.asarray(tree["student"]["bbox_head"]["multi_level_conv_reg_0"]["kernel"])  # noqa: E731, E501
    ema_ref = leaf(state.params)
    history = []
    for k in range(16):
        state, metrics = step(state, tvars, batch)
        history.append({key: float(v) for key, v in metrics.items()})
        w = (1 - 1e-4) * np.exp(-(1 + k) / 4) + 1e-4  # mmdet ExpMomentumEMAHook, iter k
        ema_ref = ema_ref * (1 - w) + leaf(state.params) * w
        np.testing.assert_allclose(leaf(state.ema["params"]), ema_ref, rtol=1e-5, atol=1e-7)
    keys = {"loss_cls", "loss_bbox", "loss_obj", "loss_l1"} | {
        f"loss_fgd_fpn_{i}" for i in range(3)
    }
    assert keys <= set(history[0]) and "loss_fgd_fpn_3" not in history[0]
    for rec in history:
        assert all(np.isfinite(v) for k, v in rec.items() if k.startswith("loss")), rec
        assert all(rec[f"loss_fgd_fpn_{i}"] > 0 for i in range(3)), rec
    for key in sorted(keys):  # every part: the last 3 steps below the first 3
        first = np.mean([r[key] for r in history[:3]])
        last = np.mean([r[key] for r in history[-3:]])
        assert last < first, (key, [round(r[key], 4) for r in history])
    np.testing.assert_allclose(history[0]["lr"], float(schedule(0)), rtol=1e-6)
    assert step._cache_size() == 1
    assert not np.allclose(leaf(state.ema["params"]), leaf(state.params))
    # the EMA is part of the checkpoint, and what evaluation / export read
    with ckpt_lib.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        manager.save(16, state)
        manager.wait()
        restored, _, _ = manager.restore(16, target=ckpt_lib.abstract_tree(state))
    ev = exp.eval_variables(restored)
    np.testing.assert_array_equal(
        np.asarray(ev["params"]["bbox_head"]["multi_level_conv_reg_0"]["kernel"]),
        leaf(state.ema["params"]),
    )
    np.testing.assert_array_equal(
        np.asarray(jax.tree.leaves(ev["batch_stats"])[0]),
        np.asarray(jax.tree.leaves(state.ema["model_state"]["batch_stats"]["student"])[0]),
    )
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), p_before, state.params)
    assert all(jax.tree.leaves(moved["distill_losses"]["loss_fgd_fpn_0"]["align"]))
    assert any(jax.tree.leaves(moved["student"]["backbone"]))
    stats = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), s_before,
                         state.model_state)  # fmt: skip
    assert any(jax.tree.leaves(stats))  # the student's BN trains on batch statistics
    jax.tree.map(np.testing.assert_array_equal, t_before, jax.tree.map(np.asarray, tvars))
