"""Mask R-CNN R50-FPN speed: fgd-jax (Flax, jit) vs torchvision `maskrcnn_resnet50_fpn`, one
process, same device, the SAME weights (torchvision's, converted by
`fgd_jax.convert.import_torch_checkpoint`: `fgd_jax/convert/torchvision_mask_rcnn.py`).

- peer: torchvision's Mask R-CNN R50-FPN as `maskrcnn_resnet50_fpn` builds it for fine-tuning
  from ImageNet weights (FrozenBatchNorm2d, conv1 + layer1 frozen: mmdetection's
  `frozen_stages=1`, `norm_eval=True`), random weights. The box classifier's weights are
  redrawn wider (std 0.05, on both sides through the conversion) so that detections pass the
  0.05 score threshold and the mask branch runs on a full 100 at inference.
- train step: forward + RPN / RoI / mask losses + backward + SGD(momentum 0.9) update, batch
  2, 8 random GT boxes per image, each with an elliptic mask inside its box. torchvision
  reads the full-canvas masks `[G, H, W]`; fgd-jax the batch's mask grids (`masks [G, 56, 56]`
  uint8 + `mask_regions`, `fgd_jax.data.masks.mask_grid`, built once on the host, outside
  the timing).
- inference: batch 1, forward + post-processing + masks pasted into the image (fgd-jax
  `predict`, then `paste_detections` on the host, thresholded at 0.5; torchvision's eval
  call, which pastes the probabilities without thresholding), with the resize set to the
  input size and torchvision's normalization to identity (both read the same normalized
  image).
By design the two are not the same arithmetic (see `torchvision_mask_rcnn`'s docstring):
torchvision pools RoIs with `aligned=False, sampling_ratio=2` (fgd-jax: mmdetection's
adaptive, aligned RoIAlign, more sample points), keeps 2000 proposals per image in training
(mmdetection 1000), samples 512 RoIs per image (same) and pastes masks per box with
`F.interpolate` (fgd-jax: one whole-image bilinear sample per detection). Timed calls
alternate between the sides (`benchmarks/common.py`).

Memory of the mask targets: see the report's last lines (this script's batch, and
benchmarks/results/mask_targets_cpu.md for 100 padded GTs at 800x1344).

    python -m benchmarks.mask_rcnn --threads 1 --iters 3 --train-size 512 \
        --infer-size 800 1344 --out benchmarks/results/mask_rcnn_cpu.md
    python -m benchmarks.mask_rcnn --gpu --iters 20 --train-size 800 \
        --infer-size 800 1344 --out benchmarks/results/mask_rcnn_gpu.md
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import common

GRID = 56  # data.mask_grid default
MAX_BOXES = 100  # data.max_boxes default (the padded GTs a real batch carries)


def ellipse_masks(boxes: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """`[G, H, W] uint8` 0 / 1: the ellipse inscribed in each box (xyxy pixels)."""
    yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]] + 0.5
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    rx, ry = (boxes[:, 2] - boxes[:, 0]) / 2, (boxes[:, 3] - boxes[:, 1]) / 2
    d = ((xx[None] - cx[:, None, None]) / rx[:, None, None]) ** 2 + (
        (yy[None] - cy[:, None, None]) / ry[:, None, None]
    ) ** 2
    return (d <= 1.0).astype(np.uint8)


def with_masks(batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """The batch plus fgd-jax's `masks` / `mask_regions` (contracts.md) and the full-canvas
    bitmaps per image (torchvision's targets)."""
    from fgd_jax.data.masks import mask_grid

    _, h, w, _ = batch["image"].shape
    full, grids, regions = [], [], []
    for boxes in batch["boxes"]:
        bm = ellipse_masks(boxes, (h, w))
        full.append(bm)
        gr = [mask_grid(m, b, (h, w), (h, w), False, GRID) for m, b in zip(bm, boxes, strict=True)]
        grids.append(np.stack([g for g, _ in gr]))
        regions.append(np.stack([r for _, r in gr]))
    out = dict(batch, masks=np.stack(grids), mask_regions=np.stack(regions).astype(np.float32))
    return out, full


def build_peer(num_classes: int = 80) -> Any:
    """torchvision Mask R-CNN R50-FPN, random weights, as built for ImageNet fine-tuning."""
    import torch
    import torchvision
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.mask_rcnn import MaskRCNN
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    peer = MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=num_classes + 1)
    with torch.no_grad():
        peer.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.05)
    return peer


def sides(
    args: argparse.Namespace, device: str, peer: Any
) -> tuple[dict[str, Callable[[], None]], dict[str, Callable[[], None]], dict[str, Any]]:
    """Timed calls `({'jax','torch'} train, {'jax','torch'} infer, info)` (module docstring);
    `info`: number of detections per side at inference, mask-target bytes per image."""
    import torch

    from fgd_jax import config as C
    from fgd_jax.convert import import_torch_checkpoint
    from fgd_jax.models import build_detector
    from fgd_jax.models.mask_rcnn import paste_detections

    ts, (ih, iw) = args.train_size, args.infer_size
    tb, full = with_masks(common.synthetic_batch(2, ts, ts))
    ib = common.synthetic_batch(1, ih, iw)

    cfg = C.mask_rcnn_model(depth=50)
    model = build_detector(cfg)
    variables = import_torch_checkpoint(peer.state_dict(), cfg)
    lr = 0.02
    info: dict[str, Any] = {}

    def paste(det: Any) -> None:
        info["jax_dets"] = len(paste_detections(det, 0, (ih, iw)))

    jax_train, jax_infer = common.jax_detector_calls(model, variables, tb, ib, lr, paste)
    train = {"jax": jax_train}
    if args.buckets:  # the mask branch on RoI slot buckets (nn.switch), not the full quota
        cfg_b = C.mask_rcnn_model(depth=50)
        cfg_b.roi_head.mask_head.train_roi_buckets = (16, 32, 64)
        train["jax_buckets"], _ = common.jax_detector_calls(
            build_detector(cfg_b), variables, tb, ib, lr
        )

    peer = peer.to(device)
    opt = torch.optim.SGD([p for p in peer.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    imgs = [torch.as_tensor(x).permute(2, 0, 1).to(device) for x in tb["image"]]
    targets = [
        dict(
            boxes=torch.as_tensor(b).to(device),
            labels=(torch.as_tensor(lab).long() + 1).to(device),  # background first
            masks=torch.as_tensor(m).to(device),
        )
        for b, lab, m in zip(tb["boxes"], tb["labels"], full, strict=True)
    ]
    img_t = [torch.as_tensor(ib["image"][0]).permute(2, 0, 1).to(device)]

    def torch_train() -> None:
        peer.train()
        peer.transform.min_size, peer.transform.max_size = (ts,), ts
        peer.transform.image_mean, peer.transform.image_std = [0.0] * 3, [1.0] * 3
        loss = sum(peer(imgs, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        common.torch_sync(device)

    def torch_infer() -> None:
        peer.eval()
        peer.transform.min_size, peer.transform.max_size = (min(ih, iw),), max(ih, iw)
        peer.transform.image_mean, peer.transform.image_std = [0.0] * 3, [1.0] * 3
        with torch.no_grad():
            out = peer(img_t)
        common.torch_sync(device)
        info["torch_dets"] = len(out[0]["masks"])

    g = tb["boxes"].shape[1]
    info["grid_bytes"] = tb["masks"][0].nbytes + tb["mask_regions"][0].nbytes
    info["full_bytes"] = full[0].nbytes
    info["g"] = g
    train["torch"] = torch_train
    return train, {"jax": jax_infer, "torch": torch_infer}, info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """`common.detector_args`' flags plus `--buckets`."""
    ap = common.detector_parser(__doc__)
    ap.add_argument(
        "--buckets",
        action="store_true",
        help="also time fgd-jax's train step with mask_head.train_roi_buckets=(16, 32, 64) "
        "(the mask branch on the smallest bucket holding the positives, nn.switch)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = common.setup(args)

    peer = build_peer()
    train, infer, info = sides(args, device, peer)
    title = "Mask R-CNN R50-FPN, fgd-jax vs torchvision (same weights)"
    lines = common.header(title, args, device)
    # inference first: both sides still hold the same (converted) weights
    t_infer = common.time_interleaved(infer, args.iters)
    t_train = common.time_interleaved(train, args.iters)
    ts, (ih, iw) = args.train_size, args.infer_size
    rows = [
        (f"train step, batch 2, {ts}x{ts}", 2 / t_train["jax"], 2 / t_train["torch"]),
        (f"inference + paste, batch 1, {ih}x{iw}", 1 / t_infer["jax"], 1 / t_infer["torch"]),
    ]
    if "jax_buckets" in t_train:
        rows.insert(
            1,
            (
                f"train step, batch 2, {ts}x{ts}, mask RoI buckets 16/32/64 (nn.switch)",
                2 / t_train["jax_buckets"],
                2 / t_train["torch"],
            ),
        )
    lines += common.table(rows, "torchvision")
    jax_dev, torch_dev = common.peak_device_gib(device)
    lines.append("")
    lines.append(
        f"Detections (masks pasted) per image at inference: fgd-jax {info['jax_dets']}, "
        f"torchvision {info['torch_dets']}."
    )
    if jax_dev is not None:
        lines.append(f"Peak device memory: fgd-jax {jax_dev:.2f} GiB, torch {torch_dev:.2f} GiB.")
    lines.append(f"Peak RSS of the process (both sides): {common.peak_rss_gib():.2f} GiB.")
    g = info["g"]
    per_gt = GRID * GRID + 16
    lines += [
        "",
        f"Mask targets per image of this batch ({g} GTs at {ts}x{ts}): fgd-jax mask grids "
        f"{info['grid_bytes'] / 1e3:.1f} KB ({g} x ({GRID}x{GRID} uint8 + 16 B region)), "
        f"torchvision full-canvas masks {info['full_bytes'] / 1e6:.2f} MB ({g} x {ts}x{ts} uint8).",
        f"For a real batch (`data.max_boxes` = {MAX_BOXES} padded GTs, 800x1344 canvas): "
        f"{MAX_BOXES * per_gt / 1e3:.0f} KB per image against {MAX_BOXES * 800 * 1344 / 1e6:.1f} "
        "MB of full-canvas bitmaps (mmdetection's, and torchvision's targets); their accuracy "
        "(mean IoU 0.9941 of the 28x28 targets): benchmarks/results/mask_targets_cpu.md.",
    ]
    common.write_report(lines, args.out)


if __name__ == "__main__":
    main()
