"""The YOLOX configs (configs/yolox_*.py): the recipe's settings the trainer has, the FGD row's
variant settings against the original `fgd_yoloxl_distill_yoloxm_coco`, and `train.nesterov`
against `torch.optim.SGD(nesterov=True)`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from fgd_jax import config as C
from fgd_jax import optim


@pytest.mark.parametrize("size,channels", [("s", 128), ("m", 192), ("l", 256)])
def test_baseline_configs(size, channels):
    cfg = C.load_config(f"configs/yolox_{size}_baseline.py")
    assert cfg.model.type == "yolox" and cfg.model.neck.out_channels == channels
    t = cfg.train
    assert (t.batch_size, t.reference_batch_size, t.base_lr, t.num_epochs) == (64, 64, 0.01, 300)
    assert (t.momentum, t.nesterov, t.weight_decay, t.bias_decay_mult) == (0.9, True, 5e-4, 0.0)
    assert t.grad_clip_norm == 0.0 and "teacher" not in cfg
    assert cfg.data.img_scale == (640, 640) and cfg.data.canvases == ((640, 640),)
    _check_recipe(cfg)
    doc = open(f"configs/yolox_{size}_baseline.py").read()
    assert "NOT YET" not in doc  # the whole recipe is in


def _check_recipe(cfg):
    """mmdetection 2.x YOLOX's recipe settings (yolox_s_8x8_300e_coco and its hooks)."""
    t, d = cfg.train, cfg.data
    assert (t.lr_policy, t.warmup, t.warmup_epochs, t.warmup_ratio) == ("yolox", "exp", 5, 1.0)
    assert (t.last_epochs, t.min_lr_ratio, t.norm_decay_mult) == (15, 0.05, 0.0)
    assert (t.ema_momentum, t.ema_total_iter) == (1e-4, 2000)
    assert t.multiscale_sizes == tuple(range(480, 801, 32)) and t.multiscale_interval == 10
    assert len(t.multiscale_sizes) == 11
    assert (d.augment, d.pixel_style, d.pad_value, d.filter_empty_gt) == (
        "yolox",
        "raw_bgr",
        114.0,
        False,
    )
    y = d.yolox
    assert y.mode_switch_epoch == t.num_epochs - 15 == 285
    assert (y.affine_scale, y.mixup_scale, y.mosaic_center_range) == ((0.1, 2.0), (0.8, 1.6),
                                                                      (0.5, 1.5))  # fmt: skip
    assert (y.affine_max_rotate, y.affine_max_shear, y.hsv_delta) == (10.0, 2.0, (5, 30, 30))
    assert cfg.model.train_cfg.use_l1 is False  # switched on by the data (use_l1 key)


def test_fgd_row_config_is_the_branch():
    cfg = C.load_config("configs/yolox_l_m.py")
    assert cfg.model.neck.out_channels == 192 and cfg.teacher.model.neck.out_channels == 256
    d = cfg.distill
    # fgd_yoloxl_distill_yoloxm_coco: temp, weights, 3 levels neck.out_convs.{0,1,2}, 192->256
    assert (d.temp, d.alpha_fgd, d.beta_fgd, d.gamma_fgd, d.lambda_fgd) == (
        0.5,
        0.002,
        0.001,
        0.001,
        0.00001,
    )
    assert (d.num_levels, d.student_channels, d.teacher_channels) == (3, 192, 256)
    assert d.variant == "yolox" and d.init_student is False and d.teacher_bn == "train"
    assert d.box_scale == "img_shape"
    _check_recipe(cfg)
    assert "NOT YET" not in open("configs/yolox_l_m.py").read()


def test_nesterov_matches_torch_sgd():
    rng = np.random.default_rng(0)
    p0 = {"conv": {"kernel": rng.normal(size=(3, 4)).astype(np.float32)}}
    grads = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(4)]
    cfg = ml_collections.ConfigDict(
        dict(batch_size=64, reference_batch_size=64, base_lr=0.01, momentum=0.9, nesterov=True,
             weight_decay=5e-4, warmup="none", decay_epochs=(), num_steps=-1)
    )  # fmt: skip
    tx = optim.make_optimizer(cfg, 10, p0)
    params = jax.tree.map(jnp.asarray, p0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    w = torch.nn.Parameter(torch.tensor(p0["conv"]["kernel"]))
    sgd = torch.optim.SGD([w], lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)
    for g in grads:
        upd, state = update({"conv": {"kernel": jnp.asarray(g)}}, state, params)
        params = jax.tree.map(lambda a, b: a + b, params, upd)
        w.grad = torch.tensor(g)
        sgd.step()
    np.testing.assert_allclose(np.asarray(params["conv"]["kernel"]), w.detach().numpy(), 1e-6)
    plain = optim.make_optimizer(ml_collections.ConfigDict(dict(cfg, nesterov=False)), 10, p0)
    g0 = {"conv": {"kernel": jnp.asarray(grads[0])}}
    upd_n = update(g0, tx.init(p0), p0)[0]  # first step: nesterov = plain + momentum * d
    upd_p = jax.jit(plain.update)(g0, plain.init(p0), p0)[0]
    np.testing.assert_allclose(
        np.asarray(upd_n["conv"]["kernel"]), 1.9 * np.asarray(upd_p["conv"]["kernel"]), 1e-6
    )
