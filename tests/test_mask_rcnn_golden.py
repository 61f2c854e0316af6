"""A whole small Mask R-CNN against real mmdetection (tests/golden/mask_rcnn, written by
scripts/oracles/make_mask_rcnn_golden.py; its docstring lists the model and the 3.3 / 2.11
differences).

The checkpoint file `mask_rcnn.pth` is the one mmdetection's `save_checkpoint` wrote for the
real module (`meta` + `state_dict`, backbone convs stored as views of one pool): converted by
`import_torch_checkpoint` (mmdetection layout, strict: every key maps, every leaf filled).
Then our `predict` on the same normalized 64x96 input (scale factor 0.5, original 128x192)
(the golden file also holds mmdetection's RPN proposals, for diagnosis; one forward less):
- detections: the same 100 (sorted scores within 1e-4 relative, measured 1.5e-5; per class,
  each box of mmdetection's with a score clear of the 100th has ours within 1e-2 px and its
  score within 1e-4 relative);
- masks of the top 30 detections (on our own detected boxes, 4.4e-4 px from mmdetection's):
  their 28x28 class probabilities within 5e-4 (measured 1.4e-4), the pasted 128x192 masks
  (`paste_detections`, threshold 0.5) equal but for at most 20 pixels whose interpolated
  probability is that close to 0.5 (measured 3 of 737280).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from fgd_jax import config as C
from fgd_jax.convert import import_torch_checkpoint
from fgd_jax.models import build_detector
from fgd_jax.models.mask_rcnn import paste_detections

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "mask_rcnn")
PROB_TOL = 5e-4  # the masks of our own detected boxes (BOX_TOL from mmdetection's)
BOX_TOL = 1e-2  # px in the 128x192 original image: 1e-4 of its size (float32 through R18)


def _cfg() -> C.ConfigDict:
    return C.mask_rcnn_model(
        depth=18, num_classes=3, fpn_channels=16, rpn_feat_channels=16, fc_out_channels=32,
        mask_channels=16,
    )  # fmt: skip


def _match(ours: np.ndarray, ref: np.ndarray, tol: float) -> np.ndarray:
    """Index into `ours` of each `ref` box (L-inf < tol, one-to-one); asserts."""
    d = np.abs(ref[:, None, :] - ours[None, :, :]).max(-1)
    j = d.argmin(1)
    assert np.all(d[np.arange(len(j)), j] < tol), np.max(d.min(1))
    assert len(np.unique(j)) == len(j)
    return j


@pytest.mark.slow
def test_whole_mask_rcnn_matches_mmdetection_checkpoint():
    g = dict(np.load(os.path.join(GOLDEN, "mask_rcnn.npz")))
    cfg = _cfg()
    variables = import_torch_checkpoint(os.path.join(GOLDEN, "mask_rcnn.pth"), cfg)
    model = build_detector(cfg)
    image, img_shape = g["image"], g["img_shape"][None]
    sf = g["scale_factor"][None]

    det = jax.jit(lambda v, im: model.apply(v, im, img_shape, sf, method="predict"))(
        variables, image
    )
    # 1. detections (original-image pixels)
    det = jax.device_get(det)
    n = int(det["valid"][0].sum())
    assert n == len(g["scores"]) == 100
    ours = {k: np.asarray(v[0])[:n] for k, v in det.items()}
    np.testing.assert_allclose(ours["scores"], g["scores"], rtol=1e-4, atol=1e-6)
    safe = g["scores"] > g["scores"][-1] + 1e-4
    assert safe.sum() > 80
    for c in range(3):
        ref = safe & (g["labels"] == c)
        mine = np.flatnonzero(ours["labels"] == c)
        assert ref.sum() > 10
        j = mine[_match(ours["boxes"][mine], g["boxes"][ref], BOX_TOL)]
        np.testing.assert_allclose(ours["scores"][j], g["scores"][ref], rtol=1e-4, atol=1e-6)

    # 2. masks of the top detections: probabilities and pasted masks
    keep = len(g["mask_probs"])
    assert safe[:keep].all()
    j = _match(ours["boxes"], g["boxes"][:keep], BOX_TOL)
    assert np.all(ours["labels"][j] == g["labels"][:keep])
    box_err = float(np.abs(ours["boxes"][j] - g["boxes"][:keep]).max())
    prob_err = float(np.abs(ours["mask_probs"][j] - g["mask_probs"]).max())
    print(f"top {keep}: box error {box_err:.2e} px, mask probability error {prob_err:.2e}")
    np.testing.assert_allclose(ours["mask_probs"][j], g["mask_probs"], atol=PROB_TOL)
    ori = tuple(int(v) for v in g["ori_hw"])
    pasted = paste_detections(det, 0, ori)[j]
    ref_masks = np.unpackbits(g["masks"], axis=-1, count=ori[1]).astype(bool)
    assert ref_masks.sum() > 10_000
    diff = int((pasted != ref_masks).sum())
    print(f"pasted mask pixels differing: {diff} of {ref_masks.size}")
    assert diff <= 20  # of 737280: pixels where a probability within PROB_TOL of 0.5
