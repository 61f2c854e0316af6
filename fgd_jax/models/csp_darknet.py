"""CSPDarknet (YOLOX's backbone) with mmdetection 2.x semantics (`mmdet/models/backbones/
csp_darknet.py`, mmdet 2.19-2.28; unchanged in 3.3), NHWC, Flax Linen.

Blocks (parameter names as mmdetection's, so the generic converter rule applies):
- `ConvBNAct`: mmcv `ConvModule(conv_cfg=None, norm_cfg=BN(momentum=0.03, eps=1e-3),
  act_cfg=Swish)`: conv without bias -> BatchNorm -> SiLU; modules `conv`, `bn`.
- `Focus` (`stem`): the four pixel phases (top-left, bottom-left, top-right, bottom-right)
  stacked on channels, then a 3x3 `ConvBNAct` named `conv`.
- `DarknetBottleneck` (`conv1` 1x1, `conv2` 3x3, identity added when in == out channels and
  `add_identity`), `CSPLayer` (`main_conv`, `short_conv`, `blocks_i`, `final_conv`; concat
  order (main, short)), `SPPBottleneck` (`conv1`, max-pools 5/9/13 stride 1 with
  -inf padding k // 2, `conv2`).
- `CSPDarknet` ('P5' arch): `stem`, then `stage{1..4}_{j}` (j = 0: the stride-2 3x3 conv,
  stage 4 j = 1: SPP, last j: CSPLayer). Stage channels (64, 128, 256, 512, 1024) *
  `widen_factor` (`int()`), blocks (3, 9, 9, 3) * `deepen_factor` (Python `round`, at least 1).

BatchNorm follows PyTorch numerics with mmdetection's YOLOX settings: eps 1e-3 and torch
momentum 0.03 (running = 0.97 running + 0.03 batch, the unbiased batch variance; Flax's
`nn.BatchNorm` would call this momentum 0.97). YOLOX trains its BN (`norm_eval=False`);
with `train=True` pass `mutable=['batch_stats']`.

Conv init: mmdetection's `Kaiming(a=sqrt(5), distribution='uniform', mode='fan_in',
nonlinearity='leaky_relu')`, i.e. PyTorch's default conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

Speed on XLA:CPU (same forward, gradients up to float rounding): the 3x3 convs' kernel
gradient is computed per kernel tap (`fgd_jax.ops.conv`), the SPP pools separably and from
each other (`spp_max_pools`); see benchmarks/results/yolox_cpu.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fgd_jax.models.build import build_module
from fgd_jax.models.layers import TorchBatchNorm, max_pool_torch, torch_conv
from fgd_jax.ops import conv as conv_ops

Array = jax.Array

# PyTorch's default Conv2d weight init (kaiming_uniform_(a=sqrt(5))): variance 1 / (3 fan_in).
torch_default_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

BN_MOMENTUM = 0.03  # torch convention (weight of the batch statistics)
BN_EPS = 1e-3

# in channels, out channels, blocks, add_identity, use_spp of each stage (mmdet 'P5').
ARCH_P5 = (
    (64, 128, 3, True, False),
    (128, 256, 9, True, False),
    (256, 512, 9, True, False),
    (512, 1024, 3, False, True),
)


class ConvBNAct(nn.Module):
    """mmcv `ConvModule` with YOLOX's BN (eps 1e-3, momentum 0.03) and Swish (SiLU).

    `x: [B, H, W, Cin]` -> `[B, H', W', features]`; padding `(k - 1) // 2`. `bn_train`: BN on
    batch statistics (and updating the running ones) when called with `train=True`."""

    features: int
    kernel_size: int = 1
    stride: int = 1
    bn_train: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        pad = (self.kernel_size - 1) // 2
        if self.kernel_size == 1:
            conv = torch_conv(
                self.features,
                1,
                self.stride,
                0,
                dtype=self.dtype,
                kernel_init=torch_default_conv_init,
                name="conv",
            )
        else:
            # `torch_conv`'s nn.Conv with the CPU-fast kernel gradient (`fgd_jax.ops.conv`):
            # same parameters, same forward, the kernel gradient up to float rounding.
            conv = nn.Conv(
                self.features,
                (self.kernel_size, self.kernel_size),
                strides=(self.stride, self.stride),
                padding=((pad, pad), (pad, pad)),
                use_bias=False,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=torch_default_conv_init,
                conv_general_dilated=conv_ops.conv_general_dilated,
                name="conv",
            )
        x = conv(x)
        x = TorchBatchNorm(
            use_running_average=not (train and self.bn_train),
            momentum=BN_MOMENTUM,
            epsilon=BN_EPS,
            dtype=self.dtype,
            name="bn",
        )(x)
        return jax.nn.silu(x)


def focus_space_to_depth(x: Array) -> Array:
    """mmdet `Focus`: `[B, H, W, C]` -> `[B, H/2, W/2, 4C]`, channel blocks in the order
    (even rows, even cols), (odd rows, even cols), (even rows, odd cols), (odd rows, odd cols)."""
    return jnp.concatenate(
        [x[:, ::2, ::2], x[:, 1::2, ::2], x[:, ::2, 1::2], x[:, 1::2, 1::2]], axis=-1
    )


class Focus(nn.Module):
    """mmdet `Focus(3, c, kernel_size=3)`: space-to-depth by 2, then `conv` (3x3 ConvBNAct)."""

    features: int
    kernel_size: int = 3
    bn_train: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = focus_space_to_depth(x)
        return ConvBNAct(
            self.features, self.kernel_size, 1, self.bn_train, self.dtype, name="conv"
        )(x, train)


class DarknetBottleneck(nn.Module):
    """mmdet `DarknetBottleneck`: 1x1 `conv1` to `features * expansion`, 3x3 `conv2`, plus the
    input when `add_identity` and the channels match."""

    features: int
    expansion: float = 0.5
    add_identity: bool = True
    bn_train: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        hidden = int(self.features * self.expansion)
        out = ConvBNAct(hidden, 1, 1, self.bn_train, self.dtype, name="conv1")(x, train)
        out = ConvBNAct(self.features, 3, 1, self.bn_train, self.dtype, name="conv2")(out, train)
        if self.add_identity and x.shape[-1] == self.features:
            out = out + x.astype(out.dtype)
        return out


class CSPLayer(nn.Module):
    """mmdet `CSPLayer`: `short_conv` and `main_conv` (1x1 to `features * expand_ratio`),
    `num_blocks` DarknetBottlenecks (expansion 1.0) on the main branch, concat (main, short),
    1x1 `final_conv` to `features`."""

    features: int
    expand_ratio: float = 0.5
    num_blocks: int = 1
    add_identity: bool = True
    bn_train: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        mid = int(self.features * self.expand_ratio)
        short = ConvBNAct(mid, 1, 1, self.bn_train, self.dtype, name="short_conv")(x, train)
        main = ConvBNAct(mid, 1, 1, self.bn_train, self.dtype, name="main_conv")(x, train)
        for i in range(self.num_blocks):
            main = DarknetBottleneck(
                mid, 1.0, self.add_identity, self.bn_train, self.dtype, name=f"blocks_{i}"
            )(main, train)
        x = jnp.concatenate([main, short.astype(main.dtype)], axis=-1)
        return ConvBNAct(self.features, 1, 1, self.bn_train, self.dtype, name="final_conv")(
            x, train
        )


class SPPBottleneck(nn.Module):
    """mmdet `SPPBottleneck`: 1x1 `conv1` to half the input channels, concat with its max-pools
    (stride 1, padding k // 2) for each kernel, 1x1 `conv2` to `features`."""

    features: int
    kernel_sizes: Sequence[int] = (5, 9, 13)
    bn_train: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        mid = x.shape[-1] // 2
        x = ConvBNAct(mid, 1, 1, self.bn_train, self.dtype, name="conv1")(x, train)
        x = jnp.concatenate([x, *spp_max_pools(x, self.kernel_sizes)], -1)
        return ConvBNAct(self.features, 1, 1, self.bn_train, self.dtype, name="conv2")(x, train)


def _max_pool_1d_same(x: Array, k: int, axis: int) -> Array:
    """Max over a window of `k` (odd) along `axis` of NHWC `x`, stride 1, padding `k // 2`
    with -inf on both sides."""
    window = [1] * x.ndim
    window[axis] = k
    pads = [(0, 0)] * x.ndim
    pads[axis] = (k // 2, k // 2)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, (1,) * x.ndim, pads)


def spp_max_pools(x: Array, kernel_sizes: Sequence[int]) -> list[Array]:
    """`F.max_pool2d(x, k, stride=1, padding=k // 2)` (-inf padding) of NHWC `x` for each
    (odd) `k`, in the given order: the same values as `max_pool_torch(x, k, 1, k // 2)`,
    computed as a row max then a column max, and each larger window from the next smaller
    one (stride 1 with -inf padding: a `b` window of an `a` window is the `a + b - 1` window,
    e.g. 9 = 5 of 5, 13 = 5 of 9, as YOLOv5's SPPF). The same maxima; the gradient goes to
    the same element of each window unless a window holds its maximum twice, and is ~7x
    faster than the 2-D `reduce_window`'s on XLA:CPU (the 2-D window's backward carries
    its index per window element)."""
    if any(k % 2 != 1 or k < 1 for k in kernel_sizes):
        return [max_pool_torch(x, k, 1, k // 2) for k in kernel_sizes]
    out: dict[int, Array] = {}
    prev_k, prev = 1, x
    for k in sorted(set(kernel_sizes)):
        step = k - prev_k + 1
        y = _max_pool_1d_same(_max_pool_1d_same(prev, step, 1), step, 2)
        out[k], prev_k, prev = y, k, y
    return [out[k] for k in kernel_sizes]


def csp_stage_settings(
    deepen_factor: float, widen_factor: float
) -> list[tuple[int, int, int, bool, bool]]:
    """`(in, out, num_blocks, add_identity, use_spp)` of each 'P5' stage after the factors
    (mmdet: `int(c * widen)`, `max(round(n * deepen), 1)`, Python's round)."""
    return [
        (int(i * widen_factor), int(o * widen_factor), max(round(n * deepen_factor), 1), a, s)
        for i, o, n, a, s in ARCH_P5
    ]


def csp_darknet_channels(
    widen_factor: float, out_indices: Sequence[int] = (2, 3, 4)
) -> tuple[int, ...]:
    """Channels of the maps `CSPDarknet` returns (index 0: stem, k: stage k)."""
    chans = [int(ARCH_P5[0][0] * widen_factor)] + [
        int(o * widen_factor) for _, o, _, _, _ in ARCH_P5
    ]
    return tuple(chans[i] for i in out_indices)


class CSPDarknet(nn.Module):
    """mmdetection `CSPDarknet(arch='P5')`. `images [B, H, W, 3]` (H, W multiples of 32) ->
    tuple of NHWC maps for `out_indices` (0: stem, stride 2; k: stage k, stride 2^(k+1));
    the default (2, 3, 4) gives strides 8, 16, 32 with `csp_darknet_channels(widen)` channels.

    norm_eval: BN on running statistics even when training (mmdet default False: YOLOX trains
    its BN, also in the neck and head, see `fgd_jax.models.yolox`). frozen_stages: only -1
    (mmdet's YOLOX configs freeze nothing). use_depthwise: not supported (False in YOLOX s/m/l).
    """

    deepen_factor: float = 1.0
    widen_factor: float = 1.0
    out_indices: Sequence[int] = (2, 3, 4)
    spp_kernel_sizes: Sequence[int] = (5, 9, 13)
    norm_eval: bool = False
    frozen_stages: int = -1
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> tuple[Array, ...]:
        if self.frozen_stages != -1:
            raise ValueError(f"CSPDarknet: frozen_stages {self.frozen_stages} not supported (-1)")
        if not all(0 <= i <= 4 for i in self.out_indices):
            raise ValueError(f"CSPDarknet: out_indices {tuple(self.out_indices)} not in 0..4")
        bn = not self.norm_eval
        if self.dtype is not None:
            x = x.astype(self.dtype)
        stages = csp_stage_settings(self.deepen_factor, self.widen_factor)
        x = Focus(stages[0][0], 3, bn, self.dtype, name="stem")(x, train)
        outs = [x] if 0 in self.out_indices else []
        for i, (_, out_ch, n, add_identity, use_spp) in enumerate(stages):
            j = 0
            x = ConvBNAct(out_ch, 3, 2, bn, self.dtype, name=f"stage{i + 1}_{j}")(x, train)
            if use_spp:
                j += 1
                x = SPPBottleneck(
                    out_ch, self.spp_kernel_sizes, bn, self.dtype, name=f"stage{i + 1}_{j}"
                )(x, train)
            j += 1
            x = CSPLayer(
                out_ch,
                num_blocks=n,
                add_identity=add_identity,
                bn_train=bn,
                dtype=self.dtype,
                name=f"stage{i + 1}_{j}",
            )(x, train)
            if i + 1 in self.out_indices:
                outs.append(x)
        return tuple(outs)


def build_csp_darknet(cfg: ml_collections.ConfigDict, dtype: Any = None) -> CSPDarknet:
    """`CSPDarknet` from a backbone config group (its fields; `type` is informative)."""
    return build_module(CSPDarknet, cfg, "backbone", ignore=("type",), dtype=dtype)
