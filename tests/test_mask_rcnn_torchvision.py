"""Mask R-CNN's mask branch against torchvision's, with torchvision's weights converted.

Reference: a tiny torchvision `MaskRCNN` (ResNet-18 body, FPN of 32 channels, the mask head
`MaskRCNNHeads` + `MaskRCNNPredictor` of the real `maskrcnn_resnet50_fpn`, narrower), random
weights and BN statistics, eval mode, converted by `fgd_jax.convert.import_torch_checkpoint`
(layout detected as torchvision; `torchvision_mask_rcnn.prepare_state_dict` +
`RENAME_RULES`). Our model in torchvision-semantics mode: the RoI extraction of the mask
branch set to torchvision's `MultiScaleRoIAlign` (`aligned=False`, `sampling_ratio=2`; its
level `floor(4 + log2(sqrt(wh) / 224))` is our `floor(log2(sqrt(wh) / 56 + 1e-6))` but for
the epsilon's place). On given boxes (several FPN levels):
- FPN maps: rel. error < 1e-4;
- mask logits of every foreground class (torchvision's channel 0 is the background's,
  dropped by the converter): rel. error < 1e-4;
- pasted masks: by design not bit-equal. torchvision's `paste_masks_in_image` resizes the
  28 x 28 mask padded by one cell onto the integer box expanded by 30 / 28 (bilinear,
  `align_corners=False`), mmdetection's `_do_paste_mask` (ours, `paste_masks_np`) samples
  the grid at each pixel center of the float box: they may differ only along the mask's
  contours: every differing pixel is within 2 px of a contour of ours; IoU of the two >= 0.98
  for boxes of 64 px and more (measured 0.984-0.993; a 40 px box 0.947, a 12 px box 0.75).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from scipy.ndimage import maximum_filter, minimum_filter
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNN as TVMaskRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from fgd_jax import config as C
from fgd_jax.convert import import_torch_checkpoint
from fgd_jax.convert import torchvision_mask_rcnn as tvm
from fgd_jax.models import build_detector
from fgd_jax.ops.masks import paste_masks_np

NUM_CLASSES = 3  # foreground; torchvision counts the background too
CH = 32


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _tiny_torchvision() -> TVMaskRCNN:
    torch.manual_seed(0)
    body = torchvision.models.resnet18()
    fpn = BackboneWithFPN(
        body,
        {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        [64, 128, 256, 512],
        CH,
        extra_blocks=LastLevelMaxPool(),
    )
    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    model = TVMaskRCNN(
        fpn,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(CH, 3),
        box_head=TwoMLPHead(CH * 7 * 7, 64),
        box_predictor=FastRCNNPredictor(64, NUM_CLASSES + 1),
        mask_head=MaskRCNNHeads(CH, (CH,) * 4, 1),
        mask_predictor=MaskRCNNPredictor(CH, CH, NUM_CLASSES + 1),
    ).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        # the mask branch's biases (0 at init) random too, weights kaiming as torchvision's
        heads = (model.roi_heads.mask_head, model.roi_heads.mask_predictor)
        for name, p in (kv for m in heads for kv in m.named_parameters()):
            if name.endswith("bias"):
                p.normal_(0, 0.1, generator=g)
    return model


def _our_cfg() -> C.ConfigDict:
    cfg = C.mask_rcnn_model(
        depth=18, num_classes=NUM_CLASSES, fpn_channels=CH, rpn_feat_channels=CH,
        fc_out_channels=64, mask_channels=CH,
    )  # fmt: skip
    cfg.roi_head.aligned, cfg.roi_head.sampling_ratio = False, 2  # torchvision's pooler
    return cfg


def test_prepare_state_dict_drops_background_and_renames_old_keys():
    sd = {
        "roi_heads.box_predictor.cls_score.weight": np.zeros((4, 8)),
        "roi_heads.box_predictor.cls_score.bias": np.zeros(4),
        "roi_heads.box_predictor.bbox_pred.weight": np.zeros((16, 8)),
        "roi_heads.box_predictor.bbox_pred.bias": np.zeros(16),
        "roi_heads.mask_head.mask_fcn1.weight": np.ones((2, 2, 3, 3)),
        "roi_heads.mask_head.mask_fcn4.bias": np.ones(2),
        "roi_heads.mask_predictor.mask_fcn_logits.weight": np.arange(4.0)[:, None, None, None],
        "roi_heads.mask_predictor.mask_fcn_logits.bias": np.arange(4.0),
    }
    out = tvm.prepare_state_dict(sd)
    assert "roi_heads.mask_head.0.0.weight" in out and "roi_heads.mask_head.3.0.bias" in out
    assert not any("mask_fcn1" in k or "mask_fcn4" in k for k in out)
    np.testing.assert_array_equal(out["roi_heads.mask_predictor.mask_fcn_logits.bias"], [1, 2, 3])
    bad = dict(sd, **{"roi_heads.mask_predictor.mask_fcn_logits.bias": np.zeros(5)})
    with pytest.raises(ValueError, match="mask_fcn_logits"):
        tvm.prepare_state_dict(bad)


@pytest.mark.slow
def test_mask_logits_and_pasted_masks_match_torchvision():
    tv = _tiny_torchvision()
    cfg = _our_cfg()
    model = build_detector(cfg)
    variables = import_torch_checkpoint(tv.state_dict(), cfg)  # strict: every key mapped

    h, w = 256, 384
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    rng = np.random.default_rng(0)
    # boxes on three levels (sqrt area 12 .. 250 px: < 112, < 224, >= 224), float corners
    size = np.array([12, 40, 90, 120, 160, 200, 230, 250], np.float32)
    ctr = np.array([w / 2, h / 2]) + rng.uniform(-40, 40, (len(size), 2)).astype(np.float32)
    ar = rng.uniform(1.2, 1.45, len(size)).astype(np.float32)
    half = np.stack([size * ar, size / ar], 1) / 2
    boxes = np.concatenate([ctr - half, ctr + half], 1).clip(0, [w, h, w, h]).astype(np.float32)
    with torch.no_grad():
        feats_t = tv.backbone(x)
        rois = [torch.as_tensor(boxes)]
        pooled = tv.roi_heads.mask_roi_pool(feats_t, rois, [(h, w)])
        logits_t = tv.roi_heads.mask_predictor(tv.roi_heads.mask_head(pooled)).numpy()
    levels = tv.roi_heads.mask_roi_pool.map_levels(rois).numpy()
    assert len(np.unique(levels)) >= 3  # the boxes cover several FPN levels

    feats = jax.jit(lambda v, im: model.apply(v, im)["features"])(
        variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy())
    )
    for o, r in zip(feats, feats_t.values(), strict=True):
        assert rel_err(o, r.permute(0, 2, 3, 1).numpy()) < 1e-4

    def mask_logits(mdl, fs, rb):
        return mdl.roi_head.masks(mdl.roi_head.mask_feats(fs, rb))

    logits = jax.jit(lambda v, fs, rb: model.apply(v, fs, rb, method=mask_logits))(
        variables, feats, jnp.asarray(boxes)[None]
    )
    ours = np.asarray(logits[0]).transpose(0, 3, 1, 2)  # [R, C, 28, 28]
    ref = logits_t[:, 1:]  # torchvision: channel 0 is the background's
    assert ours.shape == ref.shape == (len(boxes), NUM_CLASSES, 28, 28)
    err = rel_err(ours, ref)
    assert err < 1e-4, err

    # pasted masks: smooth given masks (random-weight logits are speckle, whose every pixel
    # is a contour), blobs of several centers, radii and sharpness, one per box
    yy, xx = (np.mgrid[0:28, 0:28] + 0.5) / 28
    c = rng.uniform(0.35, 0.65, (len(boxes), 2, 1, 1))
    r = rng.uniform(0.2, 0.45, (len(boxes), 1, 1))
    k = rng.uniform(4, 12, (len(boxes), 1, 1))
    d2 = ((xx - c[:, 0]) ** 2 + (yy - c[:, 1]) ** 2) / r**2
    probs = (1 / (1 + np.exp(-k * (1 - d2)))).astype(np.float32)
    ours_img = paste_masks_np(probs, boxes, (h, w))
    ref_img = paste_masks_in_image(torch.as_tensor(probs)[:, None], torch.as_tensor(boxes), (h, w))
    ref_img = ref_img[:, 0].numpy() >= 0.5
    inter = (ours_img & ref_img).sum((1, 2))
    union = (ours_img | ref_img).sum((1, 2))
    assert union.min() > 20  # every box has a real mask
    iou = inter / union
    assert iou[size >= 64].min() >= 0.98, iou  # (12 / 40 px boxes: 0.75 / 0.95: rims matter)
    # every pixel where they differ lies within 2 px of a contour of ours (both values in its
    # 5 x 5 neighbourhood)
    near = maximum_filter(ours_img, size=(1, 5, 5)) & ~minimum_filter(ours_img, size=(1, 5, 5))
    assert not np.any((ours_img != ref_img) & ~near)
    print(f"mask logits rel err {err:.2e}; pasted-mask IoU {np.round(iou, 3)}")
