"""Parity of fgd_jax.ops.deform_conv with torchvision.ops.deform_conv2d (v1 and modulated v2).

torchvision's kernel is the one mmcv's DeformConv2d / ModulatedDeformConv2d use (same im2col,
same bilinear boundary rule). Offsets are random, large enough that many samples fall in the
(-1, 0) / (H-1, H) bands and outside (-1, H) altogether. Forward (both formulations: the forward
alone and the forward of the gradient pass) and the gradients w.r.t. input, offset, mask, weight
and bias for a random cotangent. float32: both sides in float32, rtol 1e-4
(atol 1e-4 times the output scale); float64 (x64 on our side, double in torch): rtol 1e-10.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from fgd_jax.ops import deform_conv as DC

# (B, C, H, W, Cout, k, stride, pad, dil, groups, dg, modulated)
CASES = [
    (1, 8, 8, 7, 4, 3, 2, 1, 1, 2, 4, True),
    (2, 6, 9, 8, 6, 3, 1, 2, 2, 3, 2, True),
    (1, 4, 6, 10, 2, (2, 3), (1, 2), (0, 1), (2, 1), 1, 2, False),
]


def _data(rng, case, dtype):
    b, c, h, w, cout, k, s, p, d, g, dg, mod = case
    kh, kw = (k, k) if isinstance(k, int) else k
    s2 = (s, s) if isinstance(s, int) else s
    p2 = (p, p) if isinstance(p, int) else p
    d2 = (d, d) if isinstance(d, int) else d
    ho = DC.output_size(h, kh, s2[0], p2[0], d2[0])
    wo = DC.output_size(w, kw, s2[1], p2[1], d2[1])
    x = rng.normal(0, 1, (b, c, h, w))
    off = rng.normal(0, 2.5, (b, 2 * dg * kh * kw, ho, wo))
    off[0, :, 0, 0] = -1.7  # corner position pushed outside by less than / more than 1 pixel
    mask = rng.uniform(0, 1, (b, dg * kh * kw, ho, wo)) if mod else None
    wt = rng.normal(0, 0.5, (cout, c // g, kh, kw))
    bias = rng.normal(0, 1, (cout,))
    cot = rng.normal(0, 1, (b, cout, ho, wo))
    arrs = dict(x=x, offset=off, weight=wt, bias=bias, cot=cot)
    if mod:
        arrs["mask"] = mask
    arrs = {n: a.astype(dtype) for n, a in arrs.items()}
    return arrs, dict(stride=s, padding=p, dilation=d, groups=g, deform_groups=dg)


def _torch(arrs, kw):
    t = {n: torch.from_numpy(a).requires_grad_(n != "cot") for n, a in arrs.items()}
    y = torchvision.ops.deform_conv2d(
        t["x"],
        t["offset"],
        t["weight"],
        t["bias"],
        stride=kw["stride"],
        padding=kw["padding"],
        dilation=kw["dilation"],
        mask=t.get("mask"),
    )
    (y * t["cot"]).sum().backward()
    grads = {n: v.grad.numpy() for n, v in t.items() if n != "cot"}
    return y.detach().numpy(), grads


def _nhwc(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def _ours(arrs, kw):
    names = [n for n in ("x", "offset", "weight", "bias", "mask") if n in arrs]
    to_ours = {
        "x": _nhwc,
        "offset": _nhwc,
        "mask": _nhwc,
        "weight": lambda a: np.ascontiguousarray(a.transpose(2, 3, 1, 0)),
        "bias": lambda a: a,
    }
    inputs = [jnp.asarray(to_ours[n](arrs[n])) for n in names]
    cot = jnp.asarray(_nhwc(arrs["cot"]))

    def f(*vals):
        a = dict(zip(names, vals, strict=True))
        return DC.deform_conv2d(
            a["x"], a["offset"], a["weight"], a.get("mask"), a["bias"], precision="highest", **kw
        )

    @jax.jit
    def fwd_bwd(inputs, cot):  # one compilation for the forward and every gradient
        y, vjp = jax.vjp(f, *inputs)
        return y, vjp(cot)

    y, grads = fwd_bwd(inputs, cot)  # the forward of the gradient pass (2x2-patch gather)
    y_fwd = jax.jit(f)(*inputs)  # the forward alone (four point gathers)
    tol = 1e-5 if y.dtype == jnp.float32 else 1e-12
    np.testing.assert_allclose(y_fwd, y, rtol=tol, atol=tol * float(np.abs(y).max()))
    back = {
        "x": lambda g: g.transpose(0, 3, 1, 2),
        "offset": lambda g: g.transpose(0, 3, 1, 2),
        "mask": lambda g: g.transpose(0, 3, 1, 2),
        "weight": lambda g: g.transpose(3, 2, 0, 1),
        "bias": lambda g: g,
    }
    y = np.asarray(y).transpose(0, 3, 1, 2)
    return y, {n: back[n](np.asarray(g)) for n, g in zip(names, grads, strict=True)}


def _compare(got, ref, rtol):
    scale = np.abs(ref).max() + 1e-30
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"case{i}" for i in range(len(CASES))])
def test_deform_conv2d_float32_vs_torchvision(i):
    arrs, kw = _data(np.random.default_rng(i), CASES[i], np.float32)
    y_ref, g_ref = _torch(arrs, kw)
    y, g = _ours(arrs, kw)
    assert y.shape == y_ref.shape
    _compare(y, y_ref, 1e-4)
    assert set(g) == set(g_ref)
    for n in g_ref:
        _compare(g[n], g_ref[n], 1e-4)


@pytest.mark.parametrize("case", [CASES[0]], ids=["case0"])  # (budget: one float64 case)
def test_deform_conv2d_float64_vs_torchvision(case):
    arrs, kw = _data(np.random.default_rng(7), case, np.float64)
    y_ref, g_ref = _torch(arrs, kw)
    with jax.enable_x64(True):
        y, g = _ours(arrs, kw)
    assert y.dtype == np.float64
    _compare(y, y_ref, 1e-10)
    for n in g_ref:
        _compare(g[n], g_ref[n], 1e-10)


def test_boundary_rule_single_pixel():
    """1x1 kernel on a 1x3 row of ones: a sample at y = -0.25 reads 0.75 of row 0; at
    y = -1, y = 1 (= H) and beyond it is 0; at x = 2.5 it reads 0.5 of the last column."""
    dys = [-0.25, -1.0, 1.0, 0.0, -3.0]
    dxs = [0.0, 0.0, 0.0, 1.5, 0.0]  # output column 1 -> x = 2.5 for the fourth
    x = jnp.ones((5, 1, 3, 1), jnp.float32)  # one image per probe
    off = np.zeros((5, 1, 3, 2), np.float32)
    off[:, :, :, 0] = np.asarray(dys)[:, None, None]
    off[:, :, :, 1] = np.asarray(dxs)[:, None, None]
    out = jax.jit(DC.deform_conv2d)(x, jnp.asarray(off), jnp.ones((1, 1, 1, 1), jnp.float32))
    np.testing.assert_allclose(np.asarray(out[:, 0, 1, 0]), [0.75, 0.0, 0.0, 0.5, 0.0], atol=1e-7)


def test_shape_errors():
    x = jnp.zeros((1, 5, 5, 4))
    wt = jnp.zeros((3, 3, 4, 2))
    with pytest.raises(ValueError, match="offset"):
        DC.deform_conv2d(x, jnp.zeros((1, 5, 5, 18)), wt)
    with pytest.raises(ValueError, match="mask"):
        DC.deform_conv2d(x, jnp.zeros((1, 3, 3, 18)), wt, mask=jnp.zeros((1, 3, 3, 18)))
    with pytest.raises(ValueError, match="groups"):
        DC.deform_conv2d(x, jnp.zeros((1, 3, 3, 18)), wt, groups=2)
