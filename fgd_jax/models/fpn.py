"""Feature Pyramid Network with mmdetection 2.x `FPN` semantics, NHWC, Flax Linen.

Names: `lateral_convs_{i}/conv`, `fpn_convs_{i}/conv`; extra stride-2 convs continue the
`fpn_convs` numbering (RetinaNet R50: `fpn_convs_3` = P6, `fpn_convs_4` = P7). With a norm
(`norm='gn'`, mmdetection's `norm_cfg=dict(type='GN', num_groups=32)`, the RepPoints
`fpn_gn-neck` configs) every conv is mmcv `ConvModule` conv (no bias) -> GroupNorm (`.../gn`).

Distilled features: FGD hooks `neck.fpn_convs.{i}.conv`, the conv's output, which for a neck
with a norm is the map BEFORE the norm. `FPN(..., with_pre_norm=True)` returns those maps
beside the outputs (equal to the outputs without a norm).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from fgd_jax.models.build import build_module
from fgd_jax.models.layers import ConvModule, max_pool_torch, resize_nearest_to

Array = jax.Array
EXTRA_CONVS = ("on_input", "on_lateral", "on_output")


class FPN(nn.Module):
    """mmdetection `FPN` (no activation in its convs, nearest top-down upsampling; no norm
    or GroupNorm in every conv).

    Attributes:
      in_channels: channels of every backbone map passed in (e.g. (256, 512, 1024, 2048)).
      out_channels: channels of every output level.
      num_outs: number of outputs.
      start_level: first backbone map used (1: C3 for RetinaNet).
      end_level: last backbone map used, inclusive; -1 the last one.
      add_extra_convs: False (extra levels by max-pool k1 s2 of the last output), True
        (== 'on_input'), 'on_input' (first extra conv on the last used backbone map),
        'on_lateral' (on the last lateral), 'on_output' (on the last FPN output).
      relu_before_extra_convs: ReLU before each extra conv after the first.
      norm: None or 'gn' (GroupNorm of `num_groups` after every conv, lateral and fpn ones;
        the convs then have no bias, mmcv's `bias='auto'`).
      dtype: computation dtype.
    Call: tuple of NHWC maps `[B, H_i, W_i, in_channels[i]]` -> tuple of `num_outs` NHWC maps
      `[B, h_l, w_l, out_channels]`, finest first. Any spatial sizes (odd too): the top-down
      path resizes to each lateral's exact shape like `F.interpolate(size=..., 'nearest')`.
      `with_pre_norm=True`: `(outputs, conv_outputs)`, the second the `fpn_convs_{l}/conv`
      outputs before their norm (the maps FGD distills; the outputs themselves without norm).
    """

    in_channels: Sequence[int]
    out_channels: int
    num_outs: int
    start_level: int = 0
    end_level: int = -1
    add_extra_convs: bool | str = False
    relu_before_extra_convs: bool = False
    norm: str | None = None
    num_groups: int = 32
    dtype: Any = None

    def _mode(self) -> str | bool:
        mode = self.add_extra_convs
        if mode is True:
            return "on_input"
        if mode is not False and mode not in EXTRA_CONVS:
            raise ValueError(
                f"FPN: add_extra_convs {mode!r} must be False, True or one of {EXTRA_CONVS}"
            )
        return mode

    def _end(self) -> int:
        n = len(self.in_channels)
        end = n if self.end_level == -1 else self.end_level + 1
        if not 0 <= self.start_level < end <= n:
            raise ValueError(
                f"FPN: start_level {self.start_level} / end_level {self.end_level} do not fit "
                f"{n} inputs"
            )
        if self.end_level == -1 and self.num_outs < n - self.start_level:
            raise ValueError(
                f"FPN: num_outs {self.num_outs} < {n - self.start_level} used input levels"
            )
        if self.end_level != -1 and self.num_outs != end - self.start_level:
            raise ValueError("FPN: with an explicit end_level, num_outs must equal the levels used")
        return end

    @nn.compact
    def __call__(
        self, inputs: Sequence[Array], with_pre_norm: bool = False
    ) -> tuple[Array, ...] | tuple[tuple[Array, ...], tuple[Array, ...]]:
        mode = self._mode()
        end = self._end()
        if len(inputs) != len(self.in_channels):
            raise ValueError(
                f"FPN: got {len(inputs)} inputs, in_channels has {len(self.in_channels)}"
            )
        for i, (x, c) in enumerate(zip(inputs, self.in_channels, strict=True)):
            if x.ndim != 4 or x.shape[-1] != c:
                raise ValueError(f"FPN: input {i} has shape {x.shape}, expected [B, H, W, {c}]")
        if self.norm not in (None, "gn"):
            raise ValueError(f"FPN: norm {self.norm!r} must be None or 'gn'")
        conv = lambda name, k, s=1: ConvModule(  # noqa: E731
            self.out_channels,
            k,
            s,
            norm=self.norm,
            num_groups=self.num_groups,
            dtype=self.dtype,
            name=name,
        )
        pre: list[Array] = []

        def fpn_conv(name: str, s: int, x: Array) -> Array:
            out, conv_out = conv(name, 3, s)(x, with_pre_norm=True)
            pre.append(conv_out)
            return out

        used = end - self.start_level
        laterals = [
            conv(f"lateral_convs_{i}", 1)(inputs[i + self.start_level]) for i in range(used)
        ]
        for i in range(used - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_nearest_to(
                laterals[i], laterals[i - 1].shape[1:3]
            )
        outs = [fpn_conv(f"fpn_convs_{i}", 1, laterals[i]) for i in range(used)]

        if self.num_outs > used:
            if mode is False:
                for _ in range(self.num_outs - used):
                    outs.append(max_pool_torch(outs[-1], 1, 2))
                    pre.append(outs[-1])  # no conv: the pooled map is what a student sees
            else:
                if mode == "on_input":
                    source = inputs[end - 1]
                elif mode == "on_lateral":
                    source = laterals[-1]
                else:
                    source = outs[-1]
                outs.append(fpn_conv(f"fpn_convs_{used}", 2, source))
                for i in range(used + 1, self.num_outs):
                    x = nn.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(fpn_conv(f"fpn_convs_{i}", 2, x))
        if with_pre_norm:
            return tuple(outs), tuple(pre)
        return tuple(outs)


def build_neck(cfg: ml_collections.ConfigDict, dtype: Any = None) -> FPN:
    """`FPN` from `fgd_jax.config.fpn_neck(...)` (its fields; `type` is informative)."""
    return build_module(FPN, cfg, "neck", ignore=("type",), dtype=dtype)
