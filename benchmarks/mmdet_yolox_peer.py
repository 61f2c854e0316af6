"""The mmdetection side of benchmarks/yolox.py: run by the oracle venv's python (mmdetection 3.3,
mmcv 2.1, torch CPU; no JAX, no fgd_jax imports), driven over stdin / stdout with the protocol
of `mmdet_gfl_peer.py`.

    <oracle python> benchmarks/mmdet_yolox_peer.py --batch B.npz --state-out S.npz --threads 1

Builds mmdetection's `YOLOX` detector at size s (`yolox_s_8xb8-300e_coco`'s model: CSPDarknet
deepen 0.33 / widen 0.5, SPP 5/9/13, BN momentum 0.03 eps 1e-3, Swish; YOLOXPAFPN 128
channels, 1 CSP block; YOLOXHead 128 channels, 2 stacked convs, strides 8/16/32; SimOTA
centre radius 2.5; test score 0.01, NMS 0.65, no per-image cap), without its data
preprocessor (the images arrive as the raw 0-255 pixels YOLOX feeds, already padded; the
batch-level random resize is the data preprocessor's and is not run). Seeded random weights
(`init_weights`: mmdetection's own init, no download); `--score-bias B` then sets every
classification and objectness conv bias to B (default: leave mmdetection's init, -4.6).
Writes the state dict (mmdetection names, float32 numpy) to `--state-out` for the other side
to convert, prints
`{"ready": true, ...}` and answers each stdin line with one JSON line:
- `train`: one SGD(lr 0.01, momentum 0.9) step of `model.loss` (backbone + neck + head in
  train mode, BatchNorm on batch statistics, SimOTA, the three YOLOX losses; L1 off as in
  the first 285 epochs) on the batch's `train_*` arrays (images `[B, H, W, 3]`, boxes xyxy,
  labels, valid) and `backward()`; `{"s": seconds, "loss": total, "gnorm": the gradient's
  global norm (untimed)}`;
- `infer`: `model.predict(rescale=True)` on `infer_image` under `no_grad` (eval mode:
  running statistics); `{"s": seconds, "dets": n, "candidates": priors over score_thr}`;
- `quit`: exits.
The process pins itself to the cores given by `--cores` and uses `--threads` torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def yolox_s_cfg() -> dict:
    """mmdetection 3.3's `configs/yolox/yolox_s_8xb8-300e_coco.py` model without the data
    preprocessor."""
    bn = dict(type="BN", momentum=0.03, eps=0.001)
    act = dict(type="Swish")
    return dict(
        type="YOLOX",
        backbone=dict(
            type="CSPDarknet",
            deepen_factor=0.33,
            widen_factor=0.5,
            out_indices=(2, 3, 4),
            use_depthwise=False,
            spp_kernal_sizes=(5, 9, 13),
            norm_cfg=bn,
            act_cfg=act,
        ),
        neck=dict(
            type="YOLOXPAFPN",
            in_channels=[128, 256, 512],
            out_channels=128,
            num_csp_blocks=1,
            use_depthwise=False,
            upsample_cfg=dict(scale_factor=2, mode="nearest"),
            norm_cfg=bn,
            act_cfg=act,
        ),
        bbox_head=dict(
            type="YOLOXHead",
            num_classes=80,
            in_channels=128,
            feat_channels=128,
            stacked_convs=2,
            strides=(8, 16, 32),
            use_depthwise=False,
            norm_cfg=bn,
            act_cfg=act,
            loss_cls=dict(
                type="CrossEntropyLoss", use_sigmoid=True, reduction="sum", loss_weight=1.0
            ),
            loss_bbox=dict(
                type="IoULoss", mode="square", eps=1e-16, reduction="sum", loss_weight=5.0
            ),
            loss_obj=dict(
                type="CrossEntropyLoss", use_sigmoid=True, reduction="sum", loss_weight=1.0
            ),
            loss_l1=dict(type="L1Loss", reduction="sum", loss_weight=1.0),
        ),
        train_cfg=dict(assigner=dict(type="SimOTAAssigner", center_radius=2.5)),
        test_cfg=dict(score_thr=0.01, nms=dict(type="nms", iou_threshold=0.65)),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", required=True)
    ap.add_argument("--state-out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cores", type=int, nargs="*", default=None)
    ap.add_argument("--score-bias", type=float, default=None)
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
    model = MODELS.build(ConfigDict(yolox_s_cfg()))
    model.init_weights()
    if args.score_bias is not None:
        head = model.bbox_head
        with torch.no_grad():
            for conv in [*head.multi_level_conv_cls, *head.multi_level_conv_obj]:
                conv.bias.fill_(args.score_bias)
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    np.savez(args.state_out, **sd)

    data = np.load(args.batch)
    imgs = torch.as_tensor(data["train_image"]).permute(0, 3, 1, 2).contiguous()
    _, _, h, w = imgs.shape
    meta = dict(
        img_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w), ori_shape=(h, w),
        scale_factor=(1.0, 1.0),
    )  # fmt: skip
    samples = []
    for i in range(imgs.shape[0]):
        valid = data["train_valid"][i]
        s = DetDataSample(metainfo=meta)
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
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    score_thr = model.bbox_head.test_cfg.score_thr

    def train() -> dict:
        model.train()
        t0 = time.perf_counter()
        losses = model.loss(imgs, samples)
        loss = sum(v if torch.is_tensor(v) else sum(v) for v in losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        s = time.perf_counter() - t0
        with torch.no_grad():  # untimed: the gradient's global norm (a parity check)
            grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
            gnorm = torch.sqrt(sum((g**2).sum() for g in grads))
        return {"s": s, "loss": float(loss), "gnorm": float(gnorm)}

    def infer() -> dict:
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.predict(img_i, [DetDataSample(metainfo=meta_i)], rescale=True)
        s = time.perf_counter() - t0
        with torch.no_grad():  # untimed: how many priors reach the NMS
            cls, _, obj = model.bbox_head(model.extract_feat(img_i))
            score = torch.cat(
                [
                    (c.sigmoid().amax(1) * o.sigmoid()[:, 0]).flatten()
                    for c, o in zip(cls, obj, strict=True)
                ]
            )
        n_cand = int((score >= score_thr).sum())
        return {"s": s, "dets": len(out[0].pred_instances.bboxes), "candidates": n_cand}

    import mmdet

    info = {"ready": True, "torch": torch.__version__, "mmdet": mmdet.__version__}
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        reply = train() if cmd == "train" else infer() if cmd == "infer" else {"error": cmd}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
