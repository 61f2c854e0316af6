"""mmdetection's SOLO R50 side of `benchmarks/solo.py`, run by it as a subprocess with the
oracle venv's python (mmdetection 3.3, mmcv 2.1, CPU; its SOLO is 2.x's code). Not imported
by the project: it needs mmdetection, which the project's environment does not have.

    <oracle python> benchmarks/solo_mmdet_peer.py --batch IN.npz --state OUT.pth \
        --threads 1 --iters 3 --json RESULT.json

Reads the synthetic batch (`image` NHWC normalised, `bitmaps [B, G, H, W]`, `boxes`,
`labels`, `valid`), builds `solo_r50_fpn_1x_coco`'s model (80 classes, mmdetection's own
init, no pretrained weights), saves its state dict for the JAX side, then times
- `infer`: `extract_feat` + `mask_head.predict` (forward, local maxima, matrix NMS, masks
  upsampled to the image) under `torch.no_grad`;
- `train`: `mask_head.loss` (targets, Dice, focal) and `backward()`.
First call alone, then the median of `--iters` calls; writes seconds to `--json`.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", required=True)
    ap.add_argument("--state", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.structures import InstanceData

    register_all_modules()
    import mmdet

    cfg = Config.fromfile(f"{mmdet.__path__[0]}/.mim/configs/solo/solo_r50_fpn_1x_coco.py")
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    torch.save(model.state_dict(), args.state)

    b = dict(np.load(args.batch))
    img = torch.from_numpy(b["image"].transpose(0, 3, 1, 2).copy())
    n, _, h, w = img.shape
    samples = []
    for i in range(n):
        v = b["valid"][i]
        s = DetDataSample(
            metainfo=dict(
                img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w),
                scale_factor=(1.0, 1.0),
            )
        )  # fmt: skip
        gt = InstanceData()
        gt.bboxes = torch.from_numpy(b["boxes"][i][v])
        gt.labels = torch.from_numpy(b["labels"][i][v].astype(np.int64))
        gt.masks = BitmapMasks(b["bitmaps"][i][v], h, w)
        s.gt_instances = gt
        samples.append(s)

    def infer():
        model.eval()
        with torch.no_grad():
            feats = model.extract_feat(img)
            return model.mask_head.predict(feats, samples, rescale=True)

    def train():
        model.train()
        model.zero_grad()
        feats = model.extract_feat(img)
        losses = model.mask_head.loss(feats, samples)
        total = sum(v for v in losses.values())
        total.backward()
        return float(total)

    out = {}
    for name, fn in (("infer", infer), ("train", train)):
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = dict(first=first, step=float(np.median(times)))
    out["torch"] = torch.__version__
    out["mmdet"] = mmdet.__version__
    with open(args.json, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
