"""SOLO ResNet-50 FPN baseline (mmdetection 2.x `solo_r50_fpn_1x_coco`), COCO, 1x, single scale.

The FGD student of configs/solo_r101_r50.py. FPN P2..P6 (start_level 0, P6 by max-pool),
`SOLOHead` (7 GN convs per branch, CoordConv, num_grids 40/36/24/16/12, Dice 3.0 + focal loss),
matrix NMS; SGD lr 0.01 for 16 images, linear warm-up 500 iterations, steps at epochs 8 and 11,
no gradient clipping (mmdetection's `schedule_1x`); losses normalised per 2 images (2.x's
samples_per_gpu=2). Trains on the instance masks (`data.with_mask`); the GT masks at the mask
strides are rebuilt from 56 x 56 grids (mean IoU 0.995 with mmdetection's;
`--config.data.mask_grid=112`: 0.999 for 4x the grid memory, benchmarks/results/
solo_targets_cpu.md).

Run:    python -m fgd_jax.train --config configs/solo_r50_baseline.py --workdir workdirs/solo_r50_1x
Needs:  COCO 2017 under data/coco (instance masks) and the ImageNet ResNet-50 weights
        (--config.train.backbone_init=path/to/resnet50.pth, torchvision layout); or convert
        mmdetection's checkpoint: python scripts/convert_torch_teacher.py \\
            --src solo_r50_fpn_1x_coco_20210821_035055-2290a6b8.pth \\
            --config configs/solo_r50_baseline.py --out checkpoints/solo_r50_1x
Should reach: 33.1 mask mAP on COCO val2017 (mmdetection model zoo, solo_r50_fpn_1x_coco; the
        FGD paper's SOLO baseline). Its bbox metrics are of the masks' boxes (mmdetection's
        SOLO reports none).
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.solo_model(depth=50)
    cfg.model.train_cfg.loss_norm_group = 2  # mmdetection: per GPU of 2 images
    cfg.data = C.coco_data()
    cfg.data.with_mask = True  # LoadAnnotations(with_mask=True)
    cfg.train = C.schedule_1x(batch_size=16, base_lr=0.01)
    cfg.train.grad_clip_norm = 0.0  # mmdetection's schedule_1x: optimizer_config grad_clip=None
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
