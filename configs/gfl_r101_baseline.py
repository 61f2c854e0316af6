"""GFL ResNet-101 FPN, multi-scale 480-800, 2x (mmdetection 2.x
`gfl_r101_fpn_mstrain_2x_coco`), COCO. The teacher of configs/gfl_r101_r50.py.

As configs/gfl_r50_baseline.py with a ResNet-101, training short side drawn uniformly from
480..800 (`multiscale_mode='range'`, long side <= 1333), steps at epochs 16 and 22 of 24, no
gradient clipping.

Run:    python -m fgd_jax.train --config configs/gfl_r101_baseline.py --workdir workdirs/gfl_r101_2x
Needs:  COCO 2017 under data/coco and the ImageNet ResNet-101
        (--config.train.backbone_init=resnet101.pth, torchvision layout); or convert the
        released mmdetection checkpoint instead of training:
        python scripts/convert_torch_teacher.py \\
            --src gfl_r101_fpn_mstrain_2x_coco_20200629_200126-dd12f847.pth \\
            --config configs/gfl_r101_baseline.py --out checkpoints/gfl_r101_2x
Should reach: 44.7 bbox mAP on COCO val2017 (mmdetection model zoo).
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.gfl_model(depth=101)
    cfg.data = C.coco_data()
    cfg.data.multiscale_short = (480, 800)
    cfg.data.multiscale_mode = "range"  # uniform in [480, 800], mmdetection's 'range'
    cfg.train = C.schedule_2x(batch_size=16, base_lr=0.01)
    cfg.train.grad_clip_norm = 0.0  # mmdetection's schedule_2x: optimizer_config grad_clip=None
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
