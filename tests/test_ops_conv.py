"""fgd_jax.ops.conv (the CPU kernel gradient per tap) and csp_darknet.spp_max_pools (separable,
cascaded SPP pools) against the plain XLA ops they replace: `lax.conv_general_dilated` and
its VJP, `max_pool_torch` (the 2-D `reduce_window`) and its VJP.

Tolerances: forwards bitwise equal; gradients in float64 1e-12 relative to each tensor's max
(the same sums in another order), float32 1e-5.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fgd_jax.models.csp_darknet import spp_max_pools
from fgd_jax.models.layers import max_pool_torch
from fgd_jax.ops import conv as conv_ops

# XLA's backend optimization level 0 compiles these graphs ~2x faster; both sides of every
# comparison are in the same compiled graph.
_FAST = {"xla_backend_optimization_level": 0}
# (batch, H, W, C_in, C_out, kernel, stride, padding ((top, bottom), (left, right)))
CASES = [
    (2, 9, 7, 3, 5, 3, 1, ((1, 1), (1, 1))),
    (2, 9, 8, 4, 6, 3, 2, ((1, 1), (1, 1))),
    (1, 7, 5, 3, 2, 5, 1, ((2, 2), (2, 2))),
    (1, 8, 8, 2, 3, 3, 2, ((0, 1), (2, 0))),
]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_conv_forward_equal_and_grads_match_xla(dtype, rtol) -> None:
    rng = np.random.default_rng(0)
    with jax.enable_x64(dtype == np.float64):
        args, fns = [], []
        for b, h, w, ci, co, k, s, pad in CASES:
            x = jnp.asarray(rng.normal(size=(b, h, w, ci)).astype(dtype))
            kern = jnp.asarray(rng.normal(size=(k, k, ci, co)).astype(dtype))
            dn = lax.conv_dimension_numbers(x.shape, kern.shape, ("NHWC", "HWIO", "NHWC"))

            def ref(x, kern, s=s, pad=pad, dn=dn):
                return lax.conv_general_dilated(x, kern, (s, s), pad, dimension_numbers=dn)

            def new(x, kern, s=s, pad=pad, dn=dn):
                return conv_ops.conv_general_dilated(x, kern, (s, s), pad, dimension_numbers=dn)

            g = jnp.asarray(rng.normal(size=jax.eval_shape(ref, x, kern).shape).astype(dtype))
            args.append((x, kern, g))
            fns.append((ref, new))

        @functools.partial(jax.jit, compiler_options=_FAST)
        def run(args):  # every case in one compiled graph
            return [
                [(f(x, kern), *jax.vjp(f, x, kern)[1](g)) for f in pair]
                for pair, (x, kern, g) in zip(fns, args, strict=True)
            ]

        for case, ((y0, dx0, dw0), (y1, dx1, dw1)), (x, kern, _) in zip(
            CASES, run(args), args, strict=True
        ):
            np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0), err_msg=str(case))
            assert _rel(dx1, dx0) <= rtol, case
            assert _rel(dw1, dw0) <= rtol, case
            assert dw1.dtype == kern.dtype and dx1.dtype == x.dtype


def test_conv_other_layouts_fall_back_to_lax() -> None:
    """NCHW with groups or dilation, string padding: exactly `lax.conv_general_dilated`."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 4, 6, 6)), jnp.float32)
    nchw = ("NCHW", "OIHW", "NCHW")
    p1 = ((1, 1), (1, 1))
    for kern, pad, kwargs in (
        (rng.normal(size=(4, 2, 3, 3)), p1, dict(dimension_numbers=nchw, feature_group_count=2)),
        (rng.normal(size=(4, 4, 3, 3)), p1, dict(dimension_numbers=nchw, rhs_dilation=(2, 2))),
        (rng.normal(size=(3, 3, 6, 2)), "SAME", dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    ):
        kern = jnp.asarray(kern, jnp.float32)
        want = lax.conv_general_dilated(x, kern, (1, 1), pad, **kwargs)
        got = conv_ops.conv_general_dilated(x, kern, (1, 1), pad, **kwargs)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.slow  # ~6 s: the 2-D pools' VJP compiles slowly
def test_spp_pools_equal_2d_pools() -> None:
    """Values bitwise equal to `max_pool_torch` (also on a map smaller than the windows, and
    with a repeated value in every window: a constant row), gradients (the sum over the
    pools, each window's maximum unique) equal to float64 rounding."""
    rng = np.random.default_rng(2)
    # YOLOX's pools; unsorted windows on a map smaller than the largest
    cases = [((5, 9, 13), (2, 11, 9, 3)), ((13, 5), (1, 4, 6, 2))]
    with jax.enable_x64(True):
        xs = [jnp.asarray(rng.permutation(np.prod(s)).reshape(s), jnp.float64) for _, s in cases]
        gs = [[jnp.asarray(rng.normal(size=s)) for _ in ks] for ks, s in cases]

        def ref(x, ks):
            return [max_pool_torch(x, k, 1, k // 2) for k in ks]

        @functools.partial(jax.jit, compiler_options=_FAST)
        def run(xs, gs, xc):  # every case in one compiled graph
            ties = [(spp_max_pools(xc, ks), ref(xc, ks)) for ks, _ in cases]
            out = []
            for (ks, _), x, g in zip(cases, xs, gs, strict=True):
                for f in (ref, spp_max_pools):
                    y, vjp = jax.vjp(lambda x, f=f, ks=ks: f(x, ks), x)
                    out.append((y, vjp(g)[0]))
            return out, ties

        xc = jnp.zeros((1, 6, 6, 1)).at[:, 2].set(1.0)  # ties: values only
        res, ties = run(xs, gs, xc)
        for (y0, d0), (y1, d1) in zip(res[::2], res[1::2], strict=True):
            for a, b in zip(y1, y0, strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert _rel(d1, d0) <= 1e-12
        for a, b in ties:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
