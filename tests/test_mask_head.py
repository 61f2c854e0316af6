"""FCNMaskHead (converted from mmdetection's state dict by the generic rule), its loss and
mask pasting vs real mmdetection (tests/golden/masks/masks.npz,
scripts/oracles/make_mask_golden.py): forward at 1e-5, loss at 1e-6 relative, pasted masks
equal (mmdetection's CPU path, `skip_empty=True`); the GPU path (whole image) against
PyTorch's `grid_sample` directly."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fgd_jax.convert.core import convert_state_dict, export_state_dict
from fgd_jax.data.masks import decode_segmentation, encode_rle
from fgd_jax.models.mask_head import FCNMaskHead, mask_loss
from fgd_jax.ops.masks import paste_masks, paste_masks_np

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "masks", "masks.npz")


@pytest.fixture(scope="module")
def g():
    return dict(np.load(GOLDEN))


def _params(g, head, feats) -> dict:
    """mmdetection's state dict through the converter's generic rule (convs OIHW -> HWIO; the
    ConvTranspose2d weight [I, O, 2, 2] lands on our [2, 2, O, I] kernel by the same rule)."""
    sd = {k.split("/", 1)[1]: v for k, v in g.items() if k.startswith("head_state/")}
    target = jax.eval_shape(head.init, jax.random.key(0), feats)
    params = convert_state_dict(sd, target)["params"]
    back = export_state_dict({"params": params})  # and back, as the export does
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    return jax.tree.map(jnp.asarray, params)


def test_head_forward_and_loss_match_mmdetection(g):
    ml = jax.jit(mask_loss, static_argnames="loss_norm_group")
    head = FCNMaskHead(num_classes=3, conv_out_channels=8)
    feats = jnp.asarray(g["head_feats"].transpose(0, 2, 3, 1))
    params = _params(g, head, feats)
    out = jax.jit(head.apply)({"params": params}, feats)
    ref = g["head_preds"].transpose(0, 2, 3, 1)
    assert out.shape == ref.shape == (len(ref), 28, 28, 3)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())

    n = len(ref)
    loss = ml(jnp.asarray(ref), jnp.asarray(g["img0_targets"], jnp.float32),
                     jnp.asarray(g["loss_labels"]), jnp.ones((n,), bool))  # fmt: skip
    np.testing.assert_allclose(float(loss), float(g["loss_mask"]), rtol=1e-6)
    # padded / negative RoIs do not count; no positive gives 0
    pad = jnp.concatenate([jnp.asarray(ref), jnp.full_like(jnp.asarray(ref[:2]), 9.0)])
    tgt = jnp.concatenate([jnp.asarray(g["img0_targets"], jnp.float32), jnp.zeros((2, 28, 28))])
    lab = jnp.concatenate([jnp.asarray(g["loss_labels"]), jnp.array([-1, 5])])
    valid = jnp.arange(n + 2) < n
    np.testing.assert_allclose(float(ml(pad, tgt, lab, valid)), float(loss), rtol=1e-6)
    assert float(ml(pad, tgt, lab, jnp.zeros((n + 2,), bool))) == 0.0
    # a batch axis: one group = the flattened mean; groups of one image = mean of images
    k = (n + 2) // 3  # golden: 7 RoIs + 2 padded = 3 images of 3
    b_args = (pad.reshape(3, k, 28, 28, 3), tgt.reshape(3, k, 28, 28), lab.reshape(3, k))
    bv = valid.reshape(3, k)
    np.testing.assert_allclose(float(ml(*b_args, bv)), float(loss), rtol=1e-6)
    sl = [slice(k * i, k * i + k) for i in range(3)]
    per_img = [float(ml(pad[s], tgt[s], lab[s], valid[s])) for s in sl]
    np.testing.assert_allclose(
        float(ml(*b_args, bv, loss_norm_group=1)), np.mean(per_img), rtol=1e-6
    )


def _grid_sample_reference(probs, boxes, hw):
    """mmdetection `_do_paste_mask(skip_empty=False)` written with PyTorch's grid_sample."""
    h, w = hw
    m = torch.from_numpy(probs).float()[:, None]
    b = torch.from_numpy(boxes).float()
    x0, y0, x1, y1 = torch.split(b, 1, dim=1)
    iy = (torch.arange(h).float() + 0.5 - y0) / (y1 - y0) * 2 - 1
    ix = (torch.arange(w).float() + 0.5 - x0) / (x1 - x0) * 2 - 1
    n = len(m)
    grid = torch.stack([ix[:, None, :].expand(n, h, w), iy[:, :, None].expand(n, h, w)], 3)
    return F.grid_sample(m, grid, align_corners=False)[:, 0].numpy() >= 0.5


def test_paste_matches_mmdetection(g):
    preds = torch.from_numpy(g["head_preds"]).sigmoid().numpy()
    labels = g["paste_labels"]
    probs = preds[np.arange(len(preds)), labels]
    sw, sh = g["paste_scale"]
    boxes = g["paste_boxes"] / np.array([sw, sh, sw, sh], np.float32)
    hw = tuple(int(v) for v in g["paste_ori_hw"])
    cpu = np.asarray(paste_masks(jnp.asarray(probs), jnp.asarray(boxes), hw, skip_empty=True))
    assert cpu.shape == g["paste_masks"].shape
    np.testing.assert_array_equal(cpu, g["paste_masks"])
    full = np.asarray(paste_masks(jnp.asarray(probs), jnp.asarray(boxes), hw))
    np.testing.assert_array_equal(full, _grid_sample_reference(probs, boxes, hw))
    np.testing.assert_array_equal(paste_masks_np(probs, boxes, hw), full)

    rles = encode_rle(full)  # evaluation's encoding round-trips through pycocotools
    assert len(rles) == len(full)
    for m, r in zip(full, rles, strict=True):
        np.testing.assert_array_equal(decode_segmentation(r, hw), m)
