"""GFL ResNet-50 FPN baseline (mmdetection 2.x `gfl_r50_fpn_1x_coco`), COCO, 1x, single scale.

GFL head (GN towers, reg_max 16, QFL + GIoU 2.0 + DFL 0.25, ATSS top 9), FPN P3..P7 with the
extra convs on the FPN outputs, SGD lr 0.01 for 16 images, linear warm-up 500 iterations,
steps at epochs 8 and 11, no gradient clipping (mmdetection's `schedule_1x`).

Run:    python -m fgd_jax.train --config configs/gfl_r50_baseline.py --workdir workdirs/gfl_r50_1x
Needs:  COCO 2017 under data/coco (mmdetection layout) and the ImageNet ResNet-50 weights
        (--config.train.backbone_init=path/to/resnet50.pth, torchvision layout); or convert
        the released checkpoint: python scripts/convert_torch_teacher.py \\
            --src gfl_r50_fpn_1x_coco_20200629_121244-25944287.pth \\
            --config configs/gfl_r50_baseline.py --out checkpoints/gfl_r50_1x
Should reach: 40.2 bbox mAP on COCO val2017 (mmdetection model zoo, gfl_r50_fpn_1x_coco).
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.gfl_model(depth=50)
    cfg.data = C.coco_data()
    cfg.train = C.schedule_1x(batch_size=16, base_lr=0.01)
    cfg.train.grad_clip_norm = 0.0  # mmdetection's schedule_1x: optimizer_config grad_clip=None
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
