"""Mask R-CNN's bucketed mask branch (`MaskRoIHead.mask_train_loss`): running the mask head on
the first k slots per image (the smallest bucket holding the batch's largest positive count)
gives the loss and gradients (mask head parameters and FPN maps) of the full positive quota,
in float64: with no positive, with the largest count in each bucket, with positives not first
in their slots (each image normalised by its own positives: `loss_norm_group=1`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgd_jax.models.mask_head import FCNMaskHead
from fgd_jax.models.mask_rcnn import MaskRoIHead, mask_roi_buckets
from fgd_jax.models.roi_head import Shared2FCBBoxHead

B, P, C, S, G, CANVAS = 2, 8, 4, 4, 3, 64  # images, quota, channels, RoI size, GTs, pixels
STRIDES = (4, 8)


def _head(buckets: tuple[int, ...]) -> MaskRoIHead:
    mask = _mask_head().clone(train_roi_buckets=buckets)
    box = Shared2FCBBoxHead(num_classes=3, fc_out_channels=8)
    return MaskRoIHead(box, featmap_strides=STRIDES, mask_head=mask)


def _mask_head() -> FCNMaskHead:
    return FCNMaskHead(num_classes=3, num_convs=1, conv_out_channels=6, roi_feat_size=S)


def _inputs(rng: np.random.Generator, counts: tuple[int, int], scatter: bool):
    feats = tuple(jnp.asarray(rng.normal(size=(B, CANVAS // s, CANVAS // s, C))) for s in STRIDES)
    xy = rng.uniform(0, 40, (B, P, 2))
    rois = jnp.asarray(np.concatenate([xy, xy + rng.uniform(4, 24, (B, P, 2))], -1))
    pos = np.zeros((B, P), bool)
    for i, n in enumerate(counts):
        slots = rng.permutation(P)[:n] if scatter else np.arange(n)
        pos[i, slots] = True
    gt_inds = jnp.asarray(rng.integers(0, G, (B, P)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, 3, (B, P)), jnp.int32)
    masks = jnp.asarray(rng.integers(0, 256, (B, G, 8, 8)), jnp.uint8)
    gxy = rng.uniform(0, 30, (B, G, 2))
    regions = jnp.asarray(np.concatenate([gxy, gxy + rng.uniform(10, 30, (B, G, 2))], -1))
    return feats, rois, jnp.asarray(pos), gt_inds, labels, masks, regions


def test_bucket_list():
    assert mask_roi_buckets((16, 32, 64), 128) == (16, 32, 64, 128)
    assert mask_roi_buckets((64, 16, 16, 200), 128) == (16, 64, 128)
    assert mask_roi_buckets((), 16) == mask_roi_buckets((16, 32, 64), 16) == (16,)
    with pytest.raises(ValueError, match="positive"):
        mask_roi_buckets((0, 8), 16)


@pytest.mark.slow  # compiles the full path and 2 buckets (RoIAlign, head, targets, grads)
def test_bucketed_mask_loss_and_grads_equal_the_full_quota():
    rng = np.random.default_rng(0)
    # largest positive count per batch: 0, in the bucket of 4 (positives first / scattered),
    # above it (the quota's branch)
    cases = [((0, 0), False), ((1, 0), False), ((4, 2), True), ((5, 8), True)]
    with jax.enable_x64(True):
        zeros = jnp.zeros((1, S, S, C), jnp.float64)
        params = _mask_head().init(jax.random.key(0), zeros)["params"]
        params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
        variables = {"params": {"mask_head": params}}

        def loss_fn(buckets):
            head = _head(buckets)

            def f(v, feats, *rest):
                return head.apply(
                    v, feats, *rest, jnp.asarray([CANVAS, CANVAS]), loss_norm_group=1,
                    method=MaskRoIHead.mask_train_loss,
                )  # fmt: skip

            return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

        full, bucketed = loss_fn(()), loss_fn((4,))
        for counts, scatter in cases:
            args = _inputs(rng, counts, scatter)
            (l_full, g_full), (l_b, g_b) = full(variables, *args), bucketed(variables, *args)
            if max(counts) == 0:
                assert float(l_full) == float(l_b) == 0.0
            else:
                assert float(l_full) > 0.0
            np.testing.assert_allclose(float(l_b), float(l_full), rtol=1e-12, atol=0)
            for a, b in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_full), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-14)
            nonzero = [float(jnp.abs(x).max()) for x in jax.tree.leaves(g_full)]
            assert (max(nonzero) > 0) == (max(counts) > 0)
