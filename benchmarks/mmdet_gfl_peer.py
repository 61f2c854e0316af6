"""The mmdetection side of benchmarks/gfl.py: run by the oracle venv's python (mmdetection 3.3,
mmcv 2.1, torch CPU; no JAX, no fgd_jax imports), driven over stdin / stdout.

    <oracle python> benchmarks/mmdet_gfl_peer.py --batch B.npz --state-out S.npz --threads 1

Builds mmdetection's `GFL` R50 detector (`gfl_r50_fpn_1x_coco`: ResNet-50 pytorch style,
frozen_stages 1, norm_eval, FPN P3..P7 `add_extra_convs='on_output'`, `GFLHead` with GN(32),
reg_max 16, QFL / DFL 0.25 / GIoU 2.0, ATSS top 9, test nms_pre 1000, score 0.05, NMS 0.6,
100 per image), seeded random weights (`init_weights`, no download), writes its state dict
(mmdetection names, float32 numpy) to `--state-out` for the other side to convert, prints
`{"ready": true}` and then answers each stdin line with one JSON line:
- `train`: one SGD(lr 0.01, momentum 0.9) step of `model.loss` on the batch's `train_*`
  arrays (images `[B, H, W, 3]` already normalized, boxes xyxy, labels, valid);
  `{"s": seconds}`;
- `infer`: `model.predict(rescale=True)` on `infer_image` under `no_grad`;
  `{"s": seconds, "dets": n}`;
- `quit`: exits.
The process pins itself to the cores given by `--cores` (default: its affinity) and uses
`--threads` torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def gfl_r50_cfg() -> dict:
    """mmdetection's `configs/gfl/gfl_r50_fpn_1x_coco.py` model, without the data
    preprocessor (the images arrive normalized) and the ImageNet init (random weights)."""
    return dict(
        type="GFL",
        backbone=dict(
            type="ResNet",
            depth=50,
            num_stages=4,
            out_indices=(0, 1, 2, 3),
            frozen_stages=1,
            norm_cfg=dict(type="BN", requires_grad=True),
            norm_eval=True,
            style="pytorch",
        ),
        neck=dict(
            type="FPN",
            in_channels=[256, 512, 1024, 2048],
            out_channels=256,
            start_level=1,
            add_extra_convs="on_output",
            num_outs=5,
        ),
        bbox_head=dict(
            type="GFLHead",
            num_classes=80,
            in_channels=256,
            stacked_convs=4,
            feat_channels=256,
            anchor_generator=dict(
                type="AnchorGenerator",
                ratios=[1.0],
                octave_base_scale=8,
                scales_per_octave=1,
                strides=[8, 16, 32, 64, 128],
            ),
            loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
            loss_dfl=dict(type="DistributionFocalLoss", loss_weight=0.25),
            reg_max=16,
            loss_bbox=dict(type="GIoULoss", loss_weight=2.0),
        ),
        train_cfg=dict(
            assigner=dict(type="ATSSAssigner", topk=9),
            allowed_border=-1,
            pos_weight=-1,
            debug=False,
        ),
        test_cfg=dict(
            nms_pre=1000,
            min_bbox_size=0,
            score_thr=0.05,
            nms=dict(type="nms", iou_threshold=0.6),
            max_per_img=100,
        ),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", required=True)
    ap.add_argument("--state-out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cores", type=int, nargs="*", default=None)
    args = ap.parse_args()
    if args.cores:
        os.sched_setaffinity(0, args.cores)
    import torch
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.utils import register_all_modules
    from mmengine.config import ConfigDict
    from mmengine.structures import InstanceData

    torch.set_num_threads(args.threads)
    register_all_modules()
    torch.manual_seed(0)
    model = MODELS.build(ConfigDict(gfl_r50_cfg()))
    model.init_weights()
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    np.savez(args.state_out, **sd)

    data = np.load(args.batch)
    imgs = torch.as_tensor(data["train_image"]).permute(0, 3, 1, 2).contiguous()
    _, _, h, w = imgs.shape
    samples = []
    for i in range(imgs.shape[0]):
        valid = data["train_valid"][i]
        s = DetDataSample(
            metainfo=dict(
                img_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w), ori_shape=(h, w),
                scale_factor=(1.0, 1.0),
            )
        )  # fmt: skip
        s.gt_instances = InstanceData(
            bboxes=torch.as_tensor(data["train_boxes"][i][valid]),
            labels=torch.as_tensor(data["train_labels"][i][valid]).long(),
        )
        samples.append(s)
    img_i = torch.as_tensor(data["infer_image"]).permute(0, 3, 1, 2).contiguous()
    ih, iw = img_i.shape[-2:]
    meta_i = dict(
        img_shape=(ih, iw), pad_shape=(ih, iw), batch_input_shape=(ih, iw), ori_shape=(ih, iw),
        scale_factor=(1.0, 1.0),
    )  # fmt: skip
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    def train() -> dict:
        model.train()
        t0 = time.perf_counter()
        losses = model.loss(imgs, samples)
        loss = sum(v if torch.is_tensor(v) else sum(v) for v in losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"s": time.perf_counter() - t0, "loss": float(loss)}

    def infer() -> dict:
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.predict(img_i, [DetDataSample(metainfo=meta_i)], rescale=True)
        return {"s": time.perf_counter() - t0, "dets": len(out[0].pred_instances.bboxes)}

    print(json.dumps({"ready": True, "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        reply = train() if cmd == "train" else infer() if cmd == "infer" else {"error": cmd}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
