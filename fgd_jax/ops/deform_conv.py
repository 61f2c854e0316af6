"""Deformable convolution v1 and modulated v2 (torchvision / mmcv semantics), NHWC, static shapes.

`deform_conv2d(x, offset, weight, mask=None, ...)` computes what
`torchvision.ops.deform_conv2d` (= mmcv `DeformConv2d` without a mask, mmcv
`ModulatedDeformConv2d` with one) computes, transposed to NHWC:

- output position `(oy, ox)`, kernel point `(i, j)` (`k = i * kw + j`), deform group `g`
  (input channels `g * C/dg .. (g+1) * C/dg - 1`) samples the input at
  `y = oy * stride_h - pad_h + i * dil_h + offset[b, oy, ox, 2 * (g * kh * kw + k)]`,
  `x = ox * stride_w - pad_w + j * dil_w + offset[b, oy, ox, 2 * (g * kh * kw + k) + 1]`
  (so the offset channels are `(dy, dx)` pairs, deform group major, kernel point minor);
- bilinear interpolation with the boundary rule of torchvision's `bilinear_interpolate`: a
  sample with `y <= -1`, `y >= H`, `x <= -1` or `x >= W` is 0; otherwise each of the four
  corners `(floor(y) + {0,1}, floor(x) + {0,1})` contributes its bilinear weight times its
  value if it lies inside the image and 0 if not. A sample at `-1 < y < 0` therefore still gets
  `(1 + y)` of row 0, and one at `H - 1 < y < H` gets `(H - y)` of row `H - 1`. This equals
  bilinear interpolation of the image zero-padded by one pixel, which is how it is computed here
  (also for the gradients w.r.t. the offsets, which torchvision derives from the same corners);
- v2: the sampled value is multiplied by `mask[b, oy, ox, g * kh * kw + k]` (the mask AFTER the
  sigmoid; the caller applies it);
- then a grouped convolution: `out[b, oy, ox, o] = sum_{k, c in group(o)} col[k, c] * W[k, c, o]
  (+ bias[o])`, `groups` splitting input and output channels as `torch.nn.Conv2d` does.

mmcv's `DeformConv2d.forward` zero-pads inputs smaller than the kernel on the bottom / right and
crops the output back; the values are the same as without that padding (the pad is zeros), so
nothing here corresponds to it.

Formulation (no Python loop over pixels or kernel points): the sample positions and the four
bilinear corner weights (out-of-image corners zeroed, times the mask) for every output position,
kernel point and deform group, then one `einsum` over kernel points and the input channels of
each group. The samples themselves are gathered in two ways, chosen per pass by a `custom_vjp`:
- forward (what a frozen teacher runs): four gathers of single points (all `C/dg` channels),
  weighted and summed in one fusion; 1.5-1.7x faster than the patch gather on XLA:CPU;
- gradient: the VJP of the same computation with ONE `lax.gather` of the 2x2 corner patch per
  sample (its transpose is one scatter-add into the input instead of four; the four-gather VJP
  was 2x slower). Differentiable in `x`, `offset`, `mask`, `weight` and `bias` (reverse mode
  only: `jax.jvp` of a `custom_vjp` function is refused).
Both are checked against torchvision (tests/test_ops_deform_conv.py); they agree to float
rounding. Timings: benchmarks/results/deform_conv_cpu.md.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import Array, lax

from fgd_jax.ops.dtypes import float_dtype

IntOr2 = int | Sequence[int]


def _pair(v: IntOr2, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    t = tuple(int(a) for a in v)
    if len(t) != 2:
        raise ValueError(f"deform_conv2d: {name} must be an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def output_size(
    size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1
) -> int:
    """Output length of a (deformable) conv along one axis (`torch.nn.Conv2d`'s formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _axis_corners(pos: Array, size: int) -> tuple[Array, Array, Array]:
    """Along one axis: start index into the one-pixel-padded input (2 samples from there),
    and the bilinear weights of the low / high corner with out-of-image corners zeroed."""
    low = jnp.floor(pos)
    frac = pos - low
    w_low = jnp.where((low >= 0) & (low <= size - 1), 1.0 - frac, 0.0)
    w_high = jnp.where((low >= -1) & (low <= size - 2), frac, 0.0)
    # padded row `low + 1` holds original row `low`; clipping only moves samples whose two
    # corners are both outside (weights 0) onto the padding
    start = jnp.clip(low, -1, size - 1).astype(jnp.int32) + 1
    return start, w_low.astype(pos.dtype), w_high.astype(pos.dtype)


def deform_conv2d(
    x: Array,
    offset: Array,
    weight: Array,
    mask: Array | None = None,
    bias: Array | None = None,
    *,
    stride: IntOr2 = 1,
    padding: IntOr2 = 0,
    dilation: IntOr2 = 1,
    groups: int = 1,
    deform_groups: int | None = None,
    precision: lax.Precision | str | None = None,
) -> Array:
    """Deformable convolution (v1; modulated v2 when `mask` is given), NHWC.

    Args:
      x: `[B, H, W, C]` input.
      offset: `[B, H', W', 2 * dg * kh * kw]`, `(dy, dx)` in input pixels per deform group and
        kernel point (layout in the module docstring; torchvision's NCHW offset transposed).
      weight: `[kh, kw, C / groups, Cout]` (HWIO, a Flax conv kernel; torch's OIHW transposed
        `(2, 3, 1, 0)`).
      mask: `[B, H', W', dg * kh * kw]` modulation scalars (after the sigmoid), or None (v1).
      bias: `[Cout]` or None.
      stride, padding, dilation: ints or `(h, w)` pairs, as `torch.nn.Conv2d`.
      groups: conv groups (C and Cout divisible by it).
      deform_groups: `dg`; None infers it from `offset.shape[-1]`. C divisible by it.
      precision: of the final contraction (`jnp.einsum`'s argument).
    Returns:
      `[B, H', W', Cout]` with `H' = (H + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1`
      (same for W'); dtype `result_type(x, weight)`.
    """
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    b, h, w, c = x.shape
    kh, kw, cin_g, cout = weight.shape
    n_k = kh * kw
    if groups < 1 or c % groups or cout % groups or cin_g * groups != c:
        raise ValueError(
            f"deform_conv2d: weight {tuple(weight.shape)} does not fit input channels {c} "
            f"with groups={groups}"
        )
    if deform_groups is None:
        deform_groups = offset.shape[-1] // (2 * n_k)
    dg = deform_groups
    ho = output_size(h, kh, sh, ph, dh)
    wo = output_size(w, kw, sw, pw, dw)
    if dg < 1 or c % dg:
        raise ValueError(f"deform_conv2d: {c} input channels not divisible by deform_groups {dg}")
    if offset.shape != (b, ho, wo, 2 * dg * n_k):
        raise ValueError(
            f"deform_conv2d: offset {tuple(offset.shape)} != expected {(b, ho, wo, 2 * dg * n_k)}"
        )
    if mask is not None and mask.shape != (b, ho, wo, dg * n_k):
        raise ValueError(
            f"deform_conv2d: mask {tuple(mask.shape)} != expected {(b, ho, wo, dg * n_k)}"
        )
    geom = (sh, sw, ph, pw, dh, dw, groups, dg, precision)
    return _deform_conv(geom, x, offset, weight, mask, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _deform_conv(geom, x, offset, weight, mask, bias):
    return _impl(geom, x, offset, weight, mask, bias, point_gathers=True)


def _deform_conv_fwd(geom, x, offset, weight, mask, bias):
    fn = functools.partial(_impl, geom, point_gathers=False)
    out, vjp = jax.vjp(fn, x, offset, weight, mask, bias)
    return out, vjp  # the vjp function is a pytree of its residuals


def _deform_conv_bwd(geom, vjp, g):
    return vjp(g)


_deform_conv.defvjp(_deform_conv_fwd, _deform_conv_bwd)


def _impl(geom, x, offset, weight, mask, bias, point_gathers):
    """The computation (inputs already checked). `point_gathers`: four gathers of single
    points, weighted and summed in one fusion (the faster forward on XLA:CPU); else one gather
    of 2x2 patches (the faster gradient: one scatter-add instead of four)."""
    sh, sw, ph, pw, dh, dw, groups, dg, precision = geom
    b, h, w, c = x.shape
    kh, kw, cin_g, cout = weight.shape
    n_k = kh * kw
    ho, wo = offset.shape[1:3]
    cg = c // dg
    ct = jnp.result_type(x, weight)
    pt = float_dtype(x, offset, weight)  # sampling positions: float32 (float64 under x64)

    off = offset.astype(pt).reshape(b, ho, wo, dg, n_k, 2)
    ki = jnp.repeat(jnp.arange(kh), kw)  # kernel row of point k
    kj = jnp.tile(jnp.arange(kw), kh)
    base_y = jnp.arange(ho)[:, None] * sh - ph + ki[None, :] * dh  # [H', K]
    base_x = jnp.arange(wo)[:, None] * sw - pw + kj[None, :] * dw  # [W', K]
    py = base_y.astype(pt)[None, :, None, None, :] + off[..., 0]  # [B, H', W', dg, K]
    px = base_x.astype(pt)[None, None, :, None, :] + off[..., 1]
    y0, wy0, wy1 = _axis_corners(py, h)
    x0, wx0, wx1 = _axis_corners(px, w)
    if mask is not None:
        m = mask.astype(pt).reshape(b, ho, wo, dg, n_k)
        wy0, wy1 = wy0 * m, wy1 * m
    corner_w = [wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1]  # each [B, H', W', dg, K]

    xp = jnp.pad(x.astype(ct), ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(b, h + 2, w + 2, dg, cg)
    if point_gathers:
        # rows of cg channels of [B, dg, H+2, W+2] flattened: one index per corner
        n_px = (h + 2) * (w + 2)
        flat = jnp.moveaxis(xp, 3, 1).reshape(b * dg * n_px, cg)
        img = (jnp.arange(b)[:, None, None, None, None] * dg + jnp.arange(dg)[:, None]) * n_px
        at = img + y0 * (w + 2) + x0  # top-left corner, [B, H', W', dg, K]
        corners = [at, at + 1, at + w + 2, at + w + 3]
        cols = sum(
            flat.at[i].get(mode="promise_in_bounds") * cw.astype(ct)[..., None]
            for i, cw in zip(corners, corner_w, strict=True)
        )  # [B, H', W', dg, K, cg]
    else:
        cols = _patch_cols(xp, y0, x0, corner_w, ct)
    cols = jnp.swapaxes(cols, 3, 4)  # [B, H', W', K, dg, cg]: channel c = g * cg + i
    if groups == 1:  # a plain contraction over (K, C): no group axis for XLA to transpose to
        wk = weight.astype(ct).reshape(n_k * c, cout)
        out = jnp.dot(cols.reshape(b, ho, wo, n_k * c), wk, precision=precision)
    else:
        cols = cols.reshape(b, ho, wo, n_k, groups, cin_g)
        wk = weight.astype(ct).reshape(n_k, cin_g, groups, cout // groups)
        out = jnp.einsum("bhwkgc,kcgo->bhwgo", cols, wk, precision=precision)
        out = out.reshape(b, ho, wo, cout)
    if bias is not None:
        out = out + bias.astype(ct)
    return out


def _patch_cols(xp: Array, y0: Array, x0: Array, corner_w: list[Array], ct) -> Array:
    """Bilinear samples `[B, H', W', dg, K, cg]` from one gather of 2x2 patches of the padded
    input `xp [B, H+2, W+2, dg, cg]` at the top-left corners `y0, x0 [B, H', W', dg, K]`."""
    b, dg, cg = xp.shape[0], xp.shape[3], xp.shape[4]
    # the four products stacked, not an outer product of two stacked [..., 2] vectors: XLA:CPU
    # (jaxlib 0.10.2) segfaults compiling the latter's gradient under jit
    bil = jnp.stack(corner_w, -1).reshape(*y0.shape, 2, 2).astype(ct)
    bidx = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None, None, None, None], y0.shape)
    gidx = jnp.broadcast_to(jnp.arange(dg, dtype=jnp.int32)[:, None], y0.shape)
    starts = jnp.stack([bidx, y0, x0, gidx], -1)  # [B, H', W', dg, K, 4]
    dnums = lax.GatherDimensionNumbers(
        offset_dims=(5, 6, 7), collapsed_slice_dims=(0, 3), start_index_map=(0, 1, 2, 3)
    )
    patches = lax.gather(  # [B, H', W', dg, K, 2, 2, cg]
        xp, starts, dnums, slice_sizes=(1, 2, 2, 1, cg), mode=lax.GatherScatterMode.CLIP
    )
    return jnp.einsum("bhwgkyxc,bhwgkyx->bhwgkc", patches, bil)
