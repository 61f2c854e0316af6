"""Mask R-CNN ResNet-101 FPN (mmdetection 2.x `mask_rcnn_r101_fpn_2x_coco`), COCO, 2x.

The teacher of `configs/mask_rcnn_r101_r50.py`. Usually converted from mmdetection's
checkpoint instead of trained:
        python scripts/convert_torch_teacher.py \
            --src mask_rcnn_r101_fpn_2x_coco_*.pth (mmdetection model zoo) \
            --config configs/mask_rcnn_r101_baseline.py --out checkpoints/mask_rcnn_r101_2x
Run:    python -m fgd_jax.train --config configs/mask_rcnn_r101_baseline.py --workdir workdirs/mask_rcnn_r101_2x
Needs:  COCO 2017 under data/coco (instance masks) and the ImageNet ResNet-101 weights
        (train.backbone_init).
Should reach: 40.8 bbox / 36.6 mask mAP on COCO val2017 (mmdetection model zoo,
        mask_rcnn_r101_fpn_2x_coco).
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.mask_rcnn_model(depth=101)
    # mmdetection normalizes these losses per GPU of 2 images (samples_per_gpu=2) and
    # averages the GPUs; reproduce that whatever the device count
    cfg.model.train_cfg.loss_norm_group = 2
    cfg.data = C.coco_data()
    cfg.data.with_mask = True  # LoadAnnotations(with_mask=True, poly2mask=True)
    cfg.train = C.schedule_2x(batch_size=16, base_lr=0.02)
    cfg.train.grad_clip_norm = 0.0  # mmdetection's Mask R-CNN configs: grad_clip=None
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
