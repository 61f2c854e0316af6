"""A 2-D convolution whose kernel gradient is computed as one matrix product per kernel tap on
XLA:CPU (the forward and the input gradient are XLA's own).

Why: XLA:CPU (jax 0.10, YNNPACK) computes the kernel gradient of an NHWC / HWIO convolution
as another convolution with the batch and channel axes swapped (a `H_out x W_out` window, the
batch as the input channels): on the YOLOX-s train step that took 4-8x the time of the forward
convolution (e.g. 2x80x80x128 -> 128, 3x3: 1.2 s vs 0.28 s forward on one loaded core;
benchmarks/results/yolox_cpu.md). Written as `sum_{b,h,w} x_pad[b, s*h + i, s*w + j, c] *
g[b, h, w, o]` for each tap `(i, j)`, i.e. `k*k` `dot_general`s of `[B*H_out*W_out, C_in]`
by `[B*H_out*W_out, C_out]`, it runs at 1.3-2x the forward (0.38 s there).

`conv_general_dilated` has `lax.conv_general_dilated`'s signature (so it can be given to
`flax.linen.Conv(conv_general_dilated=...)`). It takes the fast path for the case it was
written for: 2-D NHWC input, HWIO kernel, NHWC output, explicit padding, no input / kernel
dilation, one group, no `preferred_element_type`; anything else is `lax.conv_general_dilated`
unchanged. On that path:
- forward: the very same `lax.conv_general_dilated` call (bitwise the same output);
- gradient w.r.t. the input: the VJP of that call (XLA's transposed convolution);
- gradient w.r.t. the kernel: the per-tap products above on the CPU platform
  (`lax.platform_dependent`), XLA's own rule elsewhere (GPU / TPU have fast kernel-gradient
  convolutions). Same sums in another order: equal up to float rounding (float64: 1e-12).
Reverse mode only (`jax.jvp` of a `custom_vjp` function is refused).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array, lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def kernel_grad_per_tap(
    x: Array,
    g: Array,
    kernel_hw: tuple[int, int],
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
) -> Array:
    """Kernel gradient of `conv(x, w)` (NHWC / HWIO, no dilation, one group).

    Args: x `[B, H, W, C_in]`; g `[B, H_out, W_out, C_out]` (the output's cotangent);
      kernel_hw `(kh, kw)`; strides `(sh, sw)`; padding `((top, bottom), (left, right))`.
    Returns: `[kh, kw, C_in, C_out]` in `g`'s dtype: per tap `(i, j)`, `sum_{b, h, w}
      x_pad[b, sh*h + i, sw*w + j, :]^T g[b, h, w, :]`.
    """
    kh, kw = kernel_hw
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    b, ho, wo, co = g.shape
    ci = x.shape[-1]
    xp = jnp.pad(x, ((0, 0), (max(pt, 0), max(pb, 0)), (max(pl, 0), max(pr, 0)), (0, 0)))
    # negative padding crops (lax semantics)
    xp = xp[:, max(-pt, 0) : xp.shape[1] - max(-pb, 0), max(-pl, 0) : xp.shape[2] - max(-pr, 0)]
    n = b * ho * wo
    g2 = g.reshape(n, co)
    taps = []
    for i in range(kh):
        for j in range(kw):
            xs = xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
            taps.append(
                lax.dot_general(xs.reshape(n, ci).astype(g.dtype), g2, (((0,), (0,)), ((), ())))
            )
    return jnp.stack(taps).reshape(kh, kw, ci, co)


def _conv(x: Array, w: Array, strides: tuple, padding: tuple, precision: Any) -> Array:
    return lax.conv_general_dilated(
        x,
        w,
        strides,
        padding,
        lhs_dilation=(1, 1),
        rhs_dilation=(1, 1),
        dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, _NHWC),
        feature_group_count=1,
        precision=precision,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_fast_wgrad(x: Array, w: Array, strides: tuple, padding: tuple, precision: Any) -> Array:
    return _conv(x, w, strides, padding, precision)


def _fwd(x, w, strides, padding, precision):
    return _conv(x, w, strides, padding, precision), (x, w)


def _bwd(strides, padding, precision, res, g):
    x, w = res
    _, vjp_x = jax.vjp(lambda x_: _conv(x_, w, strides, padding, precision), x)
    (dx,) = vjp_x(g)

    def xla_rule(x, g):
        _, vjp_w = jax.vjp(lambda w_: _conv(x, w_, strides, padding, precision), w)
        return vjp_w(g)[0]

    def per_tap(x, g):
        return kernel_grad_per_tap(x, g, w.shape[:2], strides, padding).astype(w.dtype)

    dw = lax.platform_dependent(x, g, cpu=per_tap, default=xla_rule)
    return dx, dw


_conv_fast_wgrad.defvjp(_fwd, _bwd)


def _is_nhwc_hwio(dimension_numbers: Any, lhs: Array, rhs: Array) -> bool:
    if lhs.ndim != 4 or rhs.ndim != 4:
        return False
    if dimension_numbers is None:
        return False
    want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    got = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return got == want


def conv_general_dilated(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> Array:
    """`lax.conv_general_dilated` with the CPU kernel gradient of the module docstring on
    NHWC / HWIO convolutions with explicit padding, no dilation and one group (any other
    call is passed to `lax.conv_general_dilated` as is). Shapes and dtypes as lax's."""

    def plain() -> Array:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )

    if (
        isinstance(padding, str)
        or feature_group_count != 1
        or batch_group_count != 1
        or preferred_element_type is not None
        or tuple(lhs_dilation or (1, 1)) != (1, 1)
        or tuple(rhs_dilation or (1, 1)) != (1, 1)
        or not _is_nhwc_hwio(dimension_numbers, lhs, rhs)
        or lhs.dtype != rhs.dtype
    ):
        return plain()
    strides = tuple(int(s) for s in window_strides)
    pads = tuple((int(a), int(b)) for a, b in padding)
    if len(strides) != 2 or len(pads) != 2:
        return plain()
    return _conv_fast_wgrad(lhs, rhs, strides, pads, precision)
