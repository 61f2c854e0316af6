"""ResNet / ResNeXt backbones with mmdetection 2.x semantics, NHWC, Flax Linen.

Parameter names mirror mmdetection (`conv1`, `bn1`, `layer1_0/conv1`, `layer1_0/downsample_0`
(conv), `layer1_0/downsample_1` (BN)), so mmdetection and torchvision checkpoints convert by
name rules (`fgd_jax.convert`).

- `style='pytorch'`: the stride of a bottleneck sits on the 3x3 conv; `'caffe'`: on the first
  1x1 conv. BasicBlock (ResNet-18/34) has no style difference.
- `frozen_stages`: -1 none; 0 the stem; k the stem and stages 1..k. Frozen parts run BN on
  running statistics and their output passes through `jax.lax.stop_gradient`, so their
  gradients are exactly zero; `trainable_mask` gives the matching optimizer mask.
- `norm_eval=True`: every BN uses running statistics, also with `train=True`.
- `dcn='DCN'` / `'DCNv2'` with `stage_with_dcn`: in the chosen stages the bottleneck's 3x3
  `conv2` is mmcv's `DeformConv2dPack` / `ModulatedDeformConv2dPack` (`models/deform.py`: its own
  zero-initialized `conv2/conv_offset`, same stride / dilation, ResNeXt groups), as mmdetection
  2.x's `dcn=dict(type='DCN', deform_groups=dcn_deform_groups, fallback_on_stride=False)`.
  BasicBlock refuses DCN (mmdetection asserts the same).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from fgd_jax.models.build import build_module
from fgd_jax.models.deform import DeformConv2dPack, ModulatedDeformConv2dPack
from fgd_jax.models.layers import kaiming_fan_out, max_pool_torch, torch_batch_norm, torch_conv

Array = jax.Array

# depth -> (block type, blocks per stage). 10 (one BasicBlock per stage, the usual ResNet-10
# body) is not in mmdetection: it is the small end of the family for the synthetic set, where
# it trails R18 clearly (benchmarks/results/shapes_capacity_cpu.md).
ARCH_SETTINGS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STYLES = ("pytorch", "caffe")
DCN_TYPES = {"DCN": DeformConv2dPack, "DCNv2": ModulatedDeformConv2dPack}


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). `[B, H, W, Cin] -> [B, H/s, W/s, planes]`."""

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    use_running_average: bool = True
    dtype: Any = None

    expansion = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        bn = lambda name: torch_batch_norm(self.use_running_average, self.dtype, name)  # noqa: E731
        out = torch_conv(
            self.planes,
            3,
            self.stride,
            dilation=self.dilation,
            dtype=self.dtype,
            name="conv1",
        )(x)
        out = nn.relu(bn("bn1")(out))
        out = torch_conv(self.planes, 3, 1, dtype=self.dtype, name="conv2")(out)
        out = bn("bn2")(out)
        if self.downsample:
            x = torch_conv(self.planes, 1, self.stride, dtype=self.dtype, name="downsample_0")(x)
            x = bn("downsample_1")(x)
        return nn.relu(out + x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (grouped for ResNeXt) -> 1x1 x4. `[B, H, W, Cin] -> [B, H/s, W/s, 4*planes]`.

    Mid width: `planes` for groups == 1, else `floor(planes * base_width / 64) * groups`
    (mmdetection's ResNeXt `Bottleneck`; equals torchvision's for its ResNeXt models).
    """

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    style: str = "pytorch"
    groups: int = 1
    base_width: int = 64
    dcn: str | None = None  # None, 'DCN' or 'DCNv2': conv2 deformable
    dcn_deform_groups: int = 1
    use_running_average: bool = True
    dtype: Any = None

    expansion = 4

    @nn.compact
    def __call__(self, x: Array) -> Array:
        bn = lambda name: torch_batch_norm(self.use_running_average, self.dtype, name)  # noqa: E731
        if self.groups == 1:
            width = self.planes
        else:
            width = math.floor(self.planes * (self.base_width / 64)) * self.groups
        s1, s2 = (1, self.stride) if self.style == "pytorch" else (self.stride, 1)
        out = torch_conv(width, 1, s1, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(bn("bn1")(out))
        if self.dcn is None:
            conv2 = torch_conv(
                width,
                3,
                s2,
                dilation=self.dilation,
                groups=self.groups,
                dtype=self.dtype,
                name="conv2",
            )
        else:
            conv2 = DCN_TYPES[self.dcn](
                width,
                3,
                s2,
                padding=self.dilation,
                dilation=self.dilation,
                groups=self.groups,
                deform_groups=self.dcn_deform_groups,
                use_bias=False,
                dtype=self.dtype,
                kernel_init=kaiming_fan_out,
                name="conv2",
            )
        out = conv2(out)
        out = nn.relu(bn("bn2")(out))
        out = torch_conv(self.planes * 4, 1, 1, dtype=self.dtype, name="conv3")(out)
        out = bn("bn3")(out)
        if self.downsample:
            x = torch_conv(self.planes * 4, 1, self.stride, dtype=self.dtype, name="downsample_0")(
                x
            )
            x = bn("downsample_1")(x)
        return nn.relu(out + x)


class ResNet(nn.Module):
    """mmdetection `ResNet` / `ResNeXt` (groups > 1). NHWC in, tuple of NHWC C2..C5 out.

    Args (attributes):
      depth: 10, 18, 34, 50, 101 or 152.
      groups, base_width: ResNeXt cardinality and width per group (1, 64 for ResNet).
      style: 'pytorch' or 'caffe'.
      out_indices: which of C2..C5 (0..3) to return, in increasing order.
      frozen_stages: -1 (none), 0 (stem), k (stem + stages 1..k).
      norm_eval: BN always on running statistics.
      strides, dilations: per stage (mmdetection defaults (1, 2, 2, 2), (1, 1, 1, 1)).
      dcn: None, 'DCN' (mmcv DeformConv2dPack) or 'DCNv2' (ModulatedDeformConv2dPack) for the
        bottleneck 3x3 convs of the stages flagged in `stage_with_dcn` (C2..C5), with
        `dcn_deform_groups` deform groups.
      dtype: computation dtype (e.g. bfloat16); params stay float32.
    Call: `images: [B, H, W, 3] float` -> `tuple([B, H/4, W/4, C2], ..., [B, H/32, W/32, C5])`
      (those in `out_indices`). With `train=True` and `norm_eval=False`, pass
      `mutable=['batch_stats']`.
    """

    depth: int = 50
    groups: int = 1
    base_width: int = 64
    style: str = "pytorch"
    out_indices: Sequence[int] = (0, 1, 2, 3)
    frozen_stages: int = -1
    norm_eval: bool = True
    strides: Sequence[int] = (1, 2, 2, 2)
    dilations: Sequence[int] = (1, 1, 1, 1)
    dcn: str | None = None
    dcn_deform_groups: int = 1
    stage_with_dcn: Sequence[bool] = (False, False, False, False)
    dtype: Any = None
    # rematerialize each trained block in the backward pass (`nn.remat`): JAX keeps only block
    # inputs for the gradient; same numbers. XLA:CPU's memory plan does not shrink with it
    # (benchmarks/results/train_step_memory_cpu.md); GPU untested
    remat: bool = False

    def _check(self) -> None:
        if self.depth not in ARCH_SETTINGS:
            raise ValueError(
                f"ResNet: invalid depth {self.depth!r}; expected one of {sorted(ARCH_SETTINGS)}"
            )
        if self.style not in STYLES:
            raise ValueError(f"ResNet: invalid style {self.style!r}; expected one of {STYLES}")
        if not all(0 <= i < 4 for i in self.out_indices) or not self.out_indices:
            raise ValueError(f"ResNet: out_indices {tuple(self.out_indices)} must be in 0..3")
        if not -1 <= self.frozen_stages <= 4:
            raise ValueError(f"ResNet: frozen_stages {self.frozen_stages} must be in -1..4")
        if self.groups < 1 or self.base_width < 1:
            raise ValueError(f"ResNet: groups {self.groups} / base_width {self.base_width} < 1")
        if ARCH_SETTINGS[self.depth][0] == "basic" and (self.groups != 1 or self.base_width != 64):
            raise ValueError("ResNet: BasicBlock (depth 18/34) supports only groups=1, width 64")
        if self.dcn is not None and self.dcn not in DCN_TYPES:
            raise ValueError(f"ResNet: dcn {self.dcn!r} must be None or one of {list(DCN_TYPES)}")
        if len(self.stage_with_dcn) != 4:
            raise ValueError(f"ResNet: stage_with_dcn {self.stage_with_dcn} needs 4 flags")
        if self.dcn is not None and ARCH_SETTINGS[self.depth][0] == "basic":
            raise ValueError("ResNet: DCN needs Bottleneck blocks (depth >= 50), as mmdetection")

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> tuple[Array, ...]:
        self._check()
        block_type, stage_blocks = ARCH_SETTINGS[self.depth]

        def running(stage: int) -> bool:  # stage 0 is the stem
            return (not train) or self.norm_eval or stage <= self.frozen_stages

        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = torch_conv(64, 7, 2, 3, dtype=self.dtype, name="conv1")(x)
        x = torch_batch_norm(running(0), self.dtype, name="bn1")(x)
        x = nn.relu(x)
        x = max_pool_torch(x, 3, 2, 1)
        if self.frozen_stages >= 0:
            x = jax.lax.stop_gradient(x)

        outs = []
        in_ch = 64
        for i, n_blocks in enumerate(stage_blocks):
            planes = 64 * 2**i
            for j in range(n_blocks):
                stride = self.strides[i] if j == 0 else 1
                common = dict(
                    planes=planes,
                    stride=stride,
                    dilation=self.dilations[i],
                    use_running_average=running(i + 1),
                    dtype=self.dtype,
                    name=f"layer{i + 1}_{j}",
                )
                out_ch = planes if block_type == "basic" else planes * 4
                down = j == 0 and (stride != 1 or in_ch != out_ch)
                block_cls = BasicBlock if block_type == "basic" else Bottleneck
                if self.remat and train and i + 1 > self.frozen_stages:
                    block_cls = nn.remat(block_cls)
                if block_type == "basic":
                    block = block_cls(downsample=down, **common)
                else:
                    block = block_cls(
                        downsample=down,
                        style=self.style,
                        groups=self.groups,
                        base_width=self.base_width,
                        dcn=self.dcn if self.stage_with_dcn[i] else None,
                        dcn_deform_groups=self.dcn_deform_groups,
                        **common,
                    )
                x = block(x)
                in_ch = out_ch
            if i + 1 <= self.frozen_stages:
                x = jax.lax.stop_gradient(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


def stage_out_channels(depth: int, out_indices: Sequence[int] = (0, 1, 2, 3)) -> tuple[int, ...]:
    """Channels of the returned maps (C2..C5 picked by `out_indices`)."""
    expansion = 1 if ARCH_SETTINGS[depth][0] == "basic" else 4
    return tuple(64 * 2**i * expansion for i in out_indices)


def build_backbone(cfg: ml_collections.ConfigDict, dtype: Any = None) -> ResNet:
    """`ResNet` from `fgd_jax.config.resnet_backbone(...)` (its fields; `norm_requires_grad` is
    the optimizer's business, `backbone_trainable_mask`, and `type` is informative)."""
    return build_module(ResNet, cfg, "backbone", ignore=("type", "norm_requires_grad"), dtype=dtype)


_BN_NAME = re.compile(r"^(bn\d+|downsample_1)$")  # BatchNorm module names (see Bottleneck)


def _frozen_prefixes(frozen_stages: int) -> tuple[str, ...]:
    if frozen_stages < 0:
        return ()
    return ("conv1", "bn1") + tuple(f"layer{i}_" for i in range(1, frozen_stages + 1))


def backbone_trainable_mask(
    backbone_params: Any, frozen_stages: int, norm_requires_grad: bool = True
) -> Any:
    """Pytree of bools shaped like `backbone_params` (the backbone's 'params' subtree):
    False under the frozen stem / stages, and on every BN scale/bias when
    `norm_requires_grad=False`."""
    prefixes = _frozen_prefixes(frozen_stages)

    def frozen(name: str) -> bool:
        return any(name == p or (p.endswith("_") and name.startswith(p)) for p in prefixes)

    def is_norm(path: tuple) -> bool:
        return any(_BN_NAME.match(getattr(k, "key", "")) for k in path)

    out = {}
    for name, sub in backbone_params.items():
        trainable = not frozen(name)
        out[name] = jax.tree_util.tree_map_with_path(
            lambda path, _, t=trainable, n=name: (
                t and (norm_requires_grad or not is_norm((jax.tree_util.DictKey(n), *path)))
            ),
            sub,
        )
    return out
