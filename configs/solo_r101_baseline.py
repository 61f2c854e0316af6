"""SOLO ResNet-101 FPN, multi-scale, 3x (the original FGD repository's
`configs/solo/solo_r101_fpn_3x_coco.py` = mmdetection 2.x `solo_r50_fpn_3x_coco` with a
ResNet-101), COCO. The teacher of configs/solo_r101_r50.py.

As configs/solo_r50_baseline.py with a ResNet-101, training short side one of 800, 768, 736,
704, 672, 640 (`multiscale_mode='value'`, long side <= 1333), 36 epochs with steps at 27 and
33, linear warm-up over 500 iterations from 1/3 of the rate, no gradient clipping.

Run:    python -m fgd_jax.train --config configs/solo_r101_baseline.py --workdir workdirs/solo_r101_3x
Needs:  COCO 2017 under data/coco (instance masks) and the ImageNet ResNet-101
        (--config.train.backbone_init=resnet101.pth, torchvision layout). The FGD authors'
        teacher checkpoint (`Solo_r101_3x.pth`) was never published and mmdetection's model
        zoo has no SOLO R101: train this config, or convert any mmdetection SOLO R101
        checkpoint: python scripts/convert_torch_teacher.py --src <solo_r101>.pth \\
            --config configs/solo_r101_baseline.py --out checkpoints/solo_r101_3x
Should reach: no published number (mmdetection's solo_r50_fpn_3x_coco reaches 35.9 mask mAP;
        R101 should be above it).
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.solo_model(depth=101)
    cfg.model.train_cfg.loss_norm_group = 2  # mmdetection: per GPU of 2 images
    cfg.data = C.coco_data()
    cfg.data.with_mask = True
    cfg.data.multiscale_short = (800, 768, 736, 704, 672, 640)
    cfg.data.multiscale_mode = "value"  # one of the listed short sides per image
    cfg.train = C.schedule_1x(batch_size=16, base_lr=0.01)
    cfg.train.num_epochs = 36
    cfg.train.decay_epochs = (27, 33)
    cfg.train.warmup_ratio = 1.0 / 3
    cfg.train.grad_clip_norm = 0.0  # grad_clip=None
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
