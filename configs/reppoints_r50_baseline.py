"""RepPoints ResNet-50 baseline (mmdetection 2.x `reppoints_moment_r50_fpn_gn-neck+head_2x_coco`),
COCO, 2x, single scale: the FGD paper's RepPoints R50 student.

FPN P3..P7 with GroupNorm (extra convs on C5), RepPoints head (GN towers, 9 points, moment
transform, PointAssigner / MaxIoUAssigner, focal + smooth L1 0.5 / 1.0), SGD lr 0.01 for 16
images, linear warm-up 500 iterations, steps at epochs 16 and 22, no gradient clipping
(mmdetection's `schedule_2x`: `grad_clip=None`).

Run:    python -m fgd_jax.train --config configs/reppoints_r50_baseline.py --workdir workdirs/reppoints_r50_2x
Needs:  COCO 2017 under data/coco (mmdetection layout) and the ImageNet ResNet-50 weights
        (--config.train.backbone_init=path/to/resnet50.pth, torchvision layout); or convert
        the released checkpoint: python scripts/convert_torch_teacher.py \\
            --src reppoints_moment_r50_fpn_gn-neck+head_2x_coco_20200329-91babaa2.pth \\
            --config configs/reppoints_r50_baseline.py --out checkpoints/reppoints_r50_2x
Should reach: 38.6 bbox mAP on COCO val2017 (the FGD paper's RepPoints R50 baseline).
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.reppoints_model(depth=50)
    # mmdetection normalizes the losses per GPU of 2 images and averages the GPUs
    cfg.model.train_cfg.loss_norm_group = 2
    cfg.data = C.coco_data()
    cfg.train = C.schedule_2x(batch_size=16, base_lr=0.01)
    cfg.train.grad_clip_norm = 0.0  # mmdetection's schedule_2x: optimizer_config grad_clip=None
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
