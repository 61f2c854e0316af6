"""Parity of fgd_jax.ops.losses (values and gradients), elementwise.

References: torchvision.ops.sigmoid_focal_loss and generalized_box_iou_loss (reduction none),
torch.nn.functional binary_cross_entropy_with_logits / cross_entropy (ignore_index) / l1_loss /
smooth_l1_loss, and mmdet's `iou_loss` (-log(clamp(iou, eps))) written in torch with
torchvision.ops.box_iou. Tolerance fp32: rtol 1e-5, atol 1e-6 (gradients rtol 1e-4).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from fgd_jax.ops import losses as L

RTOL, ATOL = 1e-5, 1e-6


def _boxes(rng, n):
    xy = rng.uniform(0, 50, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(1, 30, (n, 2))], 1).astype(np.float32)


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (1.5, -1.0), (0.0, 0.5)])
def test_sigmoid_focal_loss_and_grad_vs_torchvision(gamma, alpha):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (40, 5)).astype(np.float32)
    x[0, :] = [-60.0, 60.0, -30.0, 30.0, 0.0]  # saturated logits stay finite
    t = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 40)]
    t[1:5] = 0  # background rows
    xt = torch.from_numpy(x).requires_grad_()
    ref = torchvision.ops.sigmoid_focal_loss(xt, torch.from_numpy(t), alpha, gamma, "none")
    got = L.sigmoid_focal_loss(x, t, gamma, alpha)
    np.testing.assert_allclose(np.asarray(got), ref.detach().numpy(), rtol=RTOL, atol=ATOL)
    ref.sum().backward()
    g = jax.grad(lambda z: L.sigmoid_focal_loss(z, t, gamma, alpha).sum())(jnp.asarray(x))
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(np.asarray(g), xt.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "gamma,alpha,n", [(2.0, 0.25, 30), (1.5, -1.0, 30), (0.0, 0.5, 30), (2.0, 0.25, 31)]
)
def test_sigmoid_focal_loss_sum_and_grad_vs_torchvision(gamma, alpha, n, monkeypatch):
    """The per-image sum (integer labels, background = C or -1, per-anchor weights, chunks of
    anchors, padded when the count has no near divisor, its own backward pass) against
    torchvision's elementwise focal loss, also under jit and in bf16."""
    monkeypatch.setattr(L, "FOCAL_CHUNK_ROWS", 7)  # 30 anchors: 5 x 6; 31 (prime): 5 x 7, padded
    rng = np.random.default_rng(3)
    b, c = 2, 6
    x = rng.normal(0, 3, (b, n, c)).astype(np.float32)
    x[0, 0] = [-60.0, 60.0, -30.0, 30.0, 0.0, 5.0]
    labels = rng.integers(0, c + 1, (b, n))
    labels[1, :4] = -1
    w = (rng.uniform(size=(b, n)) > 0.3).astype(np.float32)
    w[0, 5] = 0.5
    t = np.zeros((b, n, c), np.float32)
    ok = (labels >= 0) & (labels < c)
    t[np.nonzero(ok) + (labels[ok],)] = 1.0
    xt = torch.from_numpy(x).requires_grad_()
    elem = torchvision.ops.sigmoid_focal_loss(xt, torch.from_numpy(t), alpha, gamma, "none")
    ref = (elem * torch.from_numpy(w)[..., None]).sum(dim=(1, 2))
    cot = np.array([1.0, -2.5], np.float32)
    (ref * torch.from_numpy(cot)).sum().backward()

    def f(z):
        return L.sigmoid_focal_loss_sum(z, labels, w, gamma, alpha)

    np.testing.assert_allclose(np.asarray(f(x)), ref.detach().numpy(), rtol=RTOL, atol=ATOL)
    g = jax.jit(jax.grad(lambda z: jnp.sum(f(z) * cot)))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g), xt.grad.numpy(), rtol=1e-4, atol=1e-6)
    gb = jax.grad(lambda z: jnp.sum(f(z)))(jnp.asarray(x, jnp.bfloat16))
    assert gb.dtype == jnp.bfloat16  # the cotangent keeps the logits' dtype
    np.testing.assert_allclose(f(jnp.asarray(x, jnp.bfloat16)), ref.detach().numpy(), rtol=2e-2)


def test_bce_and_ce_vs_torch():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 4, (30, 7)).astype(np.float32)
    t = rng.uniform(0, 1, (30, 7)).astype(np.float32)
    ref = F.binary_cross_entropy_with_logits(
        torch.from_numpy(x), torch.from_numpy(t), reduction="none"
    )
    got = L.binary_cross_entropy_with_logits(x, t)
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=RTOL, atol=ATOL)
    labels = rng.integers(0, 7, 30)
    labels[:3] = -1  # padding: ignored
    ref = F.cross_entropy(
        torch.from_numpy(x), torch.from_numpy(labels), reduction="none", ignore_index=-1
    )
    got = L.softmax_cross_entropy(x, labels)
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=RTOL, atol=ATOL)
    assert (np.asarray(got)[:3] == 0).all()


def test_l1_smooth_l1_vs_torch():
    rng = np.random.default_rng(2)
    p, t = rng.normal(0, 1, (2, 50, 4)).astype(np.float32)
    pt, tt = torch.from_numpy(p), torch.from_numpy(t)
    np.testing.assert_allclose(
        np.asarray(L.l1_loss(p, t)), F.l1_loss(pt, tt, reduction="none").numpy(), rtol=RTOL
    )
    for beta in (1.0, 1.0 / 9.0, 0.0):
        ref = F.smooth_l1_loss(pt, tt, reduction="none", beta=beta).numpy()
        got = np.asarray(L.smooth_l1_loss(p, t, beta))
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def test_iou_and_giou_losses_vs_torch():
    rng = np.random.default_rng(3)
    a, b = _boxes(rng, 60), _boxes(rng, 60)
    b[:20] = a[:20] + rng.normal(0, 2, (20, 4)).astype(np.float32)  # overlapping pairs
    b[20:22] = a[20:22] + 200  # disjoint: iou clamps to eps
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    ref_g = torchvision.ops.generalized_box_iou_loss(at, bt, reduction="none").numpy()
    np.testing.assert_allclose(np.asarray(L.giou_loss(a, b)), ref_g, rtol=RTOL, atol=1e-6)
    iou = torch.diagonal(torchvision.ops.box_iou(at, bt)).clamp(min=1e-6)
    np.testing.assert_allclose(np.asarray(L.iou_loss(a, b)), (-iou.log()).numpy(), rtol=RTOL)
    np.testing.assert_allclose(
        np.asarray(L.iou_loss(a, b, "linear")), (1 - iou).numpy(), rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        np.asarray(L.iou_loss(a, b, "square")), (1 - iou**2).numpy(), rtol=RTOL, atol=ATOL
    )
    # gradient of giou loss w.r.t. predicted boxes (overlapping pairs only: away from kinks)
    at.requires_grad_()
    torchvision.ops.generalized_box_iou_loss(at[:20], bt[:20], reduction="sum").backward()
    g = jax.grad(lambda z: L.giou_loss(z, b[:20]).sum())(jnp.asarray(a[:20]))
    np.testing.assert_allclose(np.asarray(g), at.grad[:20].numpy(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="unknown mode"):
        L.iou_loss(a, b, "cube")
