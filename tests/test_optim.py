"""Optimizer / schedule parity with PyTorch and mmcv 1.x.

Reference: `torch.optim.SGD(momentum, weight_decay)` with mmcv-style param groups,
`torch.nn.utils.clip_grad_norm_`, and a line-by-line transcription (below) of mmcv 1.7's
`LrUpdaterHook.get_warmup_lr` / `before_train_iter` and `StepLrUpdaterHook.get_lr`.
Tolerance: fp32, 1e-6 relative on parameters, 1e-6 relative on rates.
"""

import math

import jax
import numpy as np
import optax
import pytest
import torch

from fgd_jax import config as cfglib
from fgd_jax import optim


# ---------------------------------------------------------------- mmcv 1.x transcription
def mmcv_lr(base_lr, it, steps_per_epoch, step_epochs, gamma, warmup, warmup_iters, ratio):
    """mmcv 1.7 by_epoch StepLrUpdaterHook + warm-up: the lr set before iteration `it`."""
    epoch = it // steps_per_epoch
    exp = len(step_epochs)
    for i, s in enumerate(step_epochs):
        if epoch < s:
            exp = i
            break
    regular = base_lr * gamma**exp
    if warmup is None or it >= warmup_iters:
        return regular
    if warmup == "constant":
        return regular * ratio
    k = (1 - it / warmup_iters) * (1 - ratio)
    return regular * (1 - k)


def train_cfg(**kw):
    cfg = cfglib.schedule_2x(batch_size=8, base_lr=0.02)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


@pytest.mark.parametrize("warmup", ["linear", "constant", "none"])
def test_schedule_matches_mmcv(warmup):
    spe = 7
    cfg = train_cfg(warmup=warmup, warmup_iters=20, warmup_ratio=0.001, decay_epochs=(3, 5))
    sched = optim.make_lr_schedule(cfg, spe)
    base = 0.02 * 8 / 16
    for it in range(0, 50):
        want = mmcv_lr(base, it, spe, [3, 5], 0.1, None if warmup == "none" else warmup, 20, 0.001)
        got = float(sched(it))
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"iteration {it}")


def test_schedule_decay_steps_when_num_steps():
    cfg = train_cfg(num_steps=100, decay_steps=(10, 30), warmup="none")
    sched = optim.make_lr_schedule(cfg, steps_per_epoch=1000)
    base = 0.01
    for it, want in [(0, base), (9, base), (10, base * 0.1), (29, base * 0.1), (30, base * 0.01)]:
        np.testing.assert_allclose(float(sched(it)), want, rtol=1e-6)


def test_schedule_bad_config():
    with pytest.raises(ValueError, match="train.warmup"):
        optim.make_lr_schedule(train_cfg(warmup="cosine"), 10)
    with pytest.raises(ValueError, match="decay_epochs"):
        optim.make_lr_schedule(train_cfg(decay_epochs=(5, 2)), 10)


# -------------------------------------------------------------------------- toy parameters
def toy_params(rng):
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    return {
        "backbone": {
            "conv1": {"kernel": f(3, 3, 2, 4)},
            "bn1": {"scale": f(4), "bias": f(4)},
            "layer1_0": {"conv1": {"kernel": f(1, 1, 4, 4)}},
        },
        "head": {
            "conv": {"kernel": f(3, 3, 4, 4), "bias": f(4)},
            "gn": {"scale": f(4), "bias": f(4)},
            "fc": {"kernel": f(4, 3), "bias": f(3)},
        },
    }


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, prefix + k + "/"))
        else:
            out[prefix + k] = v
    return out


def run_pair(cfg, steps, frozen=(), spe=5, grad_scale=1.0, seed=0):
    """Run our optimizer and torch SGD side by side on the same gradients."""
    rng = np.random.default_rng(seed)
    params = toy_params(rng)
    grads_seq = [
        jax_tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32) * grad_scale, params)
        for _ in range(steps)
    ]
    # ours
    mask = optim.trainable_mask_from_patterns(params, frozen)
    tx = optim.make_optimizer(cfg, spe, params, trainable_mask=mask)
    p = params
    state = tx.init(p)
    for g in grads_seq:
        upd, state = tx.update(g, state, p)
        p = optax.apply_updates(p, upd)
    # torch, mmcv param groups: bias of conv/linear (not norm) gets the multipliers.
    names = flat(params)
    tparams = {n: torch.tensor(v.copy(), requires_grad=True) for n, v in names.items()}
    trainable = {n: not any(__import__("re").search(f, n) for f in frozen) for n in names}
    base_lr = optim.scaled_base_lr(cfg)
    groups = []
    for n, t in tparams.items():
        if not trainable[n]:
            t.requires_grad_(False)
        is_layer_bias = n.endswith("/bias") and (n.rsplit("/", 1)[0] + "/kernel") in names
        # mmcv `is_norm`: BN / GN layers (their modules hold exactly scale + bias)
        module = n.rsplit("/", 1)[0]
        is_norm = {k for k in names if k.rsplit("/", 1)[0] == module} == {
            module + "/scale",
            module + "/bias",
        }
        decay_mult = (
            cfg.get("norm_decay_mult", 1.0)
            if is_norm
            else (cfg.bias_decay_mult if is_layer_bias else 1.0)
        )
        groups.append(
            {
                "params": [t],
                "lr": base_lr * (cfg.bias_lr_mult if is_layer_bias else 1.0),
                "weight_decay": cfg.weight_decay * decay_mult,
                "name": n,
            }
        )
    opt = torch.optim.SGD(
        groups,
        lr=base_lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=bool(cfg.get("nesterov", False)),
    )
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    warm = None if cfg.warmup == "none" else cfg.warmup
    for it, g in enumerate(grads_seq):
        gflat = flat(g)
        for group in opt.param_groups:
            group["lr"] = mmcv_lr(
                group["initial_lr"],
                it,
                spe,
                list(cfg.decay_epochs),
                cfg.decay_factor,
                warm,
                cfg.warmup_iters,
                cfg.warmup_ratio,
            )
        opt.zero_grad()
        for n, t in tparams.items():
            if trainable[n]:
                t.grad = torch.tensor(gflat[n])
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(
                [t for n, t in tparams.items() if trainable[n]], cfg.grad_clip_norm, 2
            )
        opt.step()
    return params, flat(p), {n: t.detach().numpy() for n, t in tparams.items()}


def jax_tree_map(fn, tree):
    return {k: jax_tree_map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def assert_close(ours, ref, rtol=1e-6):
    assert ours.keys() == ref.keys()
    for n in ours:
        np.testing.assert_allclose(np.asarray(ours[n]), ref[n], rtol=rtol, atol=1e-7, err_msg=n)


@pytest.mark.parametrize("grad_scale", [1.0, 100.0])  # 100: the clipping branch is active
def test_sgd_matches_torch(grad_scale):
    cfg = train_cfg(warmup_iters=4, decay_epochs=(1, 2), grad_clip_norm=35.0)
    _, ours, ref = run_pair(cfg, steps=12, spe=4, grad_scale=grad_scale)
    assert_close(ours, ref)


def test_sgd_no_clip_constant_warmup():
    cfg = train_cfg(warmup="constant", warmup_iters=3, grad_clip_norm=0.0, decay_epochs=(2,))
    _, ours, ref = run_pair(cfg, steps=8, spe=3, grad_scale=50.0)
    assert_close(ours, ref)


def test_frozen_params_get_zero_update():
    cfg = train_cfg(warmup_iters=2, decay_epochs=(10,), grad_clip_norm=35.0)
    frozen = ("^backbone/(conv1|bn1)",)
    init, ours, ref = run_pair(cfg, steps=6, frozen=frozen, grad_scale=30.0)
    init = flat(init)
    for n in ("backbone/conv1/kernel", "backbone/bn1/scale", "backbone/bn1/bias"):
        np.testing.assert_array_equal(np.asarray(ours[n]), init[n])
    assert not np.array_equal(
        np.asarray(ours["backbone/layer1_0/conv1/kernel"]), init["backbone/layer1_0/conv1/kernel"]
    )
    # torch: frozen params have no grad, are not clipped over, and do not move.
    assert_close(ours, ref)


def test_bias_multipliers_fcos_style():
    cfg = train_cfg(bias_lr_mult=2.0, bias_decay_mult=0.0, warmup_iters=3, decay_epochs=(2,))
    _, ours, ref = run_pair(cfg, steps=7, spe=3, grad_scale=3.0)
    assert_close(ours, ref)
    # Norm-layer biases are not conv biases: the multipliers must not reach them.
    mask = flat(optim.is_layer_bias(toy_params(np.random.default_rng(0))))
    assert mask["head/conv/bias"] and mask["head/fc/bias"]
    assert not mask["head/gn/bias"] and not mask["backbone/bn1/bias"]


def test_trainable_mask_callable_and_bad_mask():
    params = toy_params(np.random.default_rng(1))
    cfg = train_cfg()
    tx = optim.make_optimizer(cfg, 5, params, trainable_mask=lambda p: p.startswith("head"))
    state = tx.init(params)
    g = jax_tree_map(np.ones_like, params)
    upd, _ = tx.update(g, state, params)
    assert np.all(np.asarray(flat(upd)["backbone/conv1/kernel"]) == 0)
    assert np.all(np.asarray(flat(upd)["head/fc/kernel"]) != 0)
    with pytest.raises(ValueError, match="trainable_mask"):
        optim.make_optimizer(cfg, 5, params, trainable_mask={"backbone": True})


def test_current_lr_reads_counter():
    params = toy_params(np.random.default_rng(2))
    cfg = train_cfg(warmup_iters=10)
    tx = optim.make_optimizer(cfg, 5, params)
    sched = optim.make_lr_schedule(cfg, 5)
    state = tx.init(params)
    g = jax_tree_map(np.zeros_like, params)
    for _ in range(3):
        _, state = tx.update(g, state, params)
    np.testing.assert_allclose(float(optim.current_lr(state, sched)), float(sched(3)), rtol=1e-7)


def test_adamw_matches_torch():
    """train.optimizer='adamw' vs torch.optim.AdamW (decoupled decay) with clipping, constant lr."""
    rng = np.random.default_rng(3)
    cfg = train_cfg(
        optimizer="adamw",
        base_lr=1e-3,
        reference_batch_size=8,
        warmup="none",
        weight_decay=0.05,
        grad_clip_norm=1.0,
        decay_epochs=(100,),
    )
    params = {
        "conv": {
            "kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
            "bias": rng.normal(size=(4,)).astype(np.float32),
        }
    }
    grads = [
        jax_tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
        for _ in range(6)
    ]
    tx = optim.make_optimizer(cfg, 10, params)
    p, state = params, tx.init(params)
    for g in grads:
        upd, state = tx.update(g, state, p)
        p = optax.apply_updates(p, upd)
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params["conv"].items()}
    opt = torch.optim.AdamW(
        list(tp.values()), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05
    )
    for g in grads:
        opt.zero_grad()
        for k, t in tp.items():
            t.grad = torch.tensor(g["conv"][k])
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0, 2)
        opt.step()
    for k, t in tp.items():
        np.testing.assert_allclose(
            np.asarray(p["conv"][k]), t.detach().numpy(), rtol=1e-5, atol=1e-7
        )


def test_yolox_optimizer_matches_torch():
    """YOLOX's SGD: Nesterov, weight decay 5e-4 with `norm_decay_mult=0` and
    `bias_decay_mult=0` (mmcv paramwise_cfg) vs torch param groups."""
    cfg = train_cfg(
        nesterov=True,
        weight_decay=0.05,  # large so that a decayed norm leaf would show
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        grad_clip_norm=0.0,
        warmup_iters=3,
        decay_epochs=(2,),
    )
    _, ours, ref = run_pair(cfg, steps=7, spe=3, grad_scale=0.1)
    assert_close(ours, ref)
    norm = flat(optim.is_norm_param(toy_params(np.random.default_rng(0))))
    assert norm["head/gn/scale"] and norm["backbone/bn1/bias"]
    assert not norm["head/conv/bias"] and not norm["head/fc/kernel"]
    assert not flat(optim.is_norm_param({"scale_mod": {"scale": np.ones(())}}))["scale_mod/scale"]


# --------------------------------------------------------- mmdetection 2.x YOLOX schedule
def yolox_lr(base_lr, it, spe, max_epochs, warmup_epochs, last_epochs, min_ratio, ratio=1.0):
    """mmdetection 2.x `YOLOXLrUpdaterHook` (by_epoch=False, warmup_by_epoch=True,
    warmup='exp') with mmcv's `before_train_iter`: the lr set before iteration `it`."""
    warmup_iters = warmup_epochs * spe
    if it < warmup_iters:  # get_warmup_lr
        return base_lr * ratio * ((it + 1) / float(warmup_iters)) ** 2
    last_iter = spe * last_epochs  # get_lr
    progress, max_progress = it + 1, max_epochs * spe
    target = base_lr * min_ratio
    if progress >= max_progress - last_iter:
        return target
    factor = (progress - warmup_iters) / (max_progress - warmup_iters - last_iter)
    return target + 0.5 * (base_lr - target) * (math.cos(math.pi * factor) + 1)  # annealing_cos


def test_yolox_schedule_matches_mmdet():
    spe = 6
    cfg = cfglib.schedule_yolox(batch_size=16, base_lr=0.01)
    cfg.update(lr_policy="yolox", warmup="exp", warmup_epochs=5, warmup_ratio=1.0,
               last_epochs=15, min_lr_ratio=0.05, num_epochs=40)  # fmt: skip
    sched = optim.make_lr_schedule(cfg, spe)
    base = 0.01 * 16 / 64
    got = np.asarray(jax.vmap(sched)(np.arange(40 * spe + 3)))
    want = np.array([yolox_lr(base, k, spe, 40, 5, 15, 0.05) for k in range(40 * spe + 3)])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-9 * base)
    # warm-up ends at the base rate, cosine reaches the floor, the last 15 epochs are flat
    np.testing.assert_allclose(got[5 * spe - 1], base, rtol=1e-6)
    np.testing.assert_allclose(got[25 * spe - 1 :], 0.05 * base, rtol=1e-6)
    with pytest.raises(ValueError, match="no cosine"):
        optim.make_lr_schedule(dict_cfg(cfg, num_epochs=20), spe)
    with pytest.raises(ValueError, match="lr_policy"):
        optim.make_lr_schedule(dict_cfg(cfg, lr_policy="poly"), spe)


def dict_cfg(cfg, **kw):
    out = cfg.copy_and_resolve_references()
    out.update(kw)
    return out


# --------------------------------------------------------------------- EMA of the weights
def test_ema_matches_mmdet_exp_momentum_hook():
    """`optim.ema_momentum` / `ema_update` vs mmdetection 2.x `ExpMomentumEMAHook(momentum,
    total_iter)` on torch buffers: `buf.mul_(1 - m).add_(p, alpha=m)` with
    `m = (1 - momentum) * exp(-(1 + iter) / total_iter) + momentum`."""
    rng = np.random.default_rng(5)
    momentum, total_iter = 1e-4, 7
    p0 = rng.normal(size=(5,)).astype(np.float32)
    buf = torch.tensor(p0.copy())
    ema = {"w": np.asarray(p0), "n": np.zeros((), np.int32)}
    for it in range(30):
        p = rng.normal(size=(5,)).astype(np.float32)
        m = (1 - momentum) * math.exp(-(1 + it) / total_iter) + momentum
        buf.mul_(1 - m).add_(torch.tensor(p), alpha=m)
        w = optim.ema_momentum(it, momentum, total_iter)
        np.testing.assert_allclose(float(w), m, rtol=1e-6)
        ema = optim.ema_update(ema, {"w": p, "n": np.asarray(it, np.int32)}, w)
        np.testing.assert_allclose(np.asarray(ema["w"]), buf.numpy(), rtol=1e-5, atol=1e-6)
    assert int(ema["n"]) == 29  # counters are not averaged
