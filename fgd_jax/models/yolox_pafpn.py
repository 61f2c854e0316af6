"""YOLOXPAFPN with mmdetection 2.x semantics (`mmdet/models/necks/yolox_pafpn.py`, unchanged in
3.3), NHWC, Flax Linen.

For inputs C3, C4, C5 (`in_channels`, finest first):
- top-down, from the coarsest: `reduce_layers_{k}` (1x1 ConvBNAct to the next finer input's
  channels) replaces the running top map, which is upsampled x2 (nearest) and concatenated
  (upsampled, finer input) into `top_down_blocks_{k}` (CSPLayer, no identity);
- bottom-up: `downsamples_{k}` (3x3 stride-2 ConvBNAct) of the last output, concatenated
  (downsampled, top-down map of the next level) into `bottom_up_blocks_{k}`;
- `out_convs_{i}`: 1x1 ConvBNAct to `out_channels` per level (the maps FGD distills in the
  original's YOLOX branch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fgd_jax.models.build import build_module
from fgd_jax.models.csp_darknet import ConvBNAct, CSPLayer

Array = jax.Array


def upsample_nearest_2x(x: Array) -> Array:
    """`nn.Upsample(scale_factor=2, mode='nearest')` on NHWC: each pixel repeated 2x2."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class YOLOXPAFPN(nn.Module):
    """mmdetection `YOLOXPAFPN`. `feats`: tuple of NHWC maps with `in_channels` channels,
    finest first, each level half the size of the previous -> tuple of `[B, H_l, W_l,
    out_channels]`, same levels. `bn_train`: the BN layers use batch statistics when called
    with `train=True` (YOLOX's default; the detector sets it from `backbone.norm_eval`)."""

    in_channels: Sequence[int] = (256, 512, 1024)
    out_channels: int = 256
    num_csp_blocks: int = 3
    bn_train: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, feats: Sequence[Array], train: bool = False) -> tuple[Array, ...]:
        n = len(self.in_channels)
        if len(feats) != n:
            raise ValueError(f"YOLOXPAFPN: {len(feats)} inputs for in_channels {self.in_channels}")
        bn, dt = self.bn_train, self.dtype
        inner = [feats[-1]]
        for idx in range(n - 1, 0, -1):
            k = n - 1 - idx
            high = ConvBNAct(self.in_channels[idx - 1], 1, 1, bn, dt, name=f"reduce_layers_{k}")(
                inner[0], train
            )
            inner[0] = high
            up = upsample_nearest_2x(high)
            low = feats[idx - 1].astype(up.dtype)
            inner.insert(
                0,
                CSPLayer(
                    self.in_channels[idx - 1],
                    num_blocks=self.num_csp_blocks,
                    add_identity=False,
                    bn_train=bn,
                    dtype=dt,
                    name=f"top_down_blocks_{k}",
                )(jnp.concatenate([up, low], axis=-1), train),
            )
        outs = [inner[0]]
        for idx in range(n - 1):
            down = ConvBNAct(self.in_channels[idx], 3, 2, bn, dt, name=f"downsamples_{idx}")(
                outs[-1], train
            )
            outs.append(
                CSPLayer(
                    self.in_channels[idx + 1],
                    num_blocks=self.num_csp_blocks,
                    add_identity=False,
                    bn_train=bn,
                    dtype=dt,
                    name=f"bottom_up_blocks_{idx}",
                )(jnp.concatenate([down, inner[idx + 1].astype(down.dtype)], axis=-1), train)
            )
        return tuple(
            ConvBNAct(self.out_channels, 1, 1, bn, dt, name=f"out_convs_{i}")(o, train)
            for i, o in enumerate(outs)
        )


def build_yolox_pafpn(
    cfg: ml_collections.ConfigDict, dtype: Any = None, bn_train: bool = True
) -> YOLOXPAFPN:
    """`YOLOXPAFPN` from a neck config group (its fields; `type` is informative)."""
    return build_module(YOLOXPAFPN, cfg, "neck", ignore=("type",), dtype=dtype, bn_train=bn_train)
