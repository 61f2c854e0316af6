"""Mask R-CNN ResNet-50 FPN baseline (mmdetection 2.x `mask_rcnn_r50_fpn_2x_coco`), COCO, 2x.

Run:    python -m fgd_jax.train --config configs/mask_rcnn_r50_baseline.py --workdir workdirs/mask_rcnn_r50_2x
Needs:  COCO 2017 under data/coco (mmdetection layout, instance masks: data.with_mask) and the
        ImageNet ResNet-50 weights (--config.train.backbone_init=path/to/resnet50.pth,
        torchvision layout).
Should reach: 39.2 bbox / 35.4 mask mAP on COCO val2017 (mmdetection model zoo,
        mask_rcnn_r50_fpn_2x_coco; the student baseline of the FGD paper's Mask R-CNN row).
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.mask_rcnn_model(depth=50)
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
