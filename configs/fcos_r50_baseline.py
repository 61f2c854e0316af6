"""FCOS ResNet-50 baseline for configs/fcos_r101_r50.py: the FGD student's exact model
(`fcos_center-normbbox-giou_r50_caffe_fpn_gn-head`: centre sampling, regression / stride, GIoU,
tower conv bias, NMS 0.6), data and 2x schedule, without the teacher, COCO.

Caffe-style ResNet-50 with frozen BN, BGR input minus the mean (103.53, 116.28, 123.675), std 1
(the student config's `img_norm_cfg`), multi-scale training with the short side 640 or 800
(`multiscale_mode='value'`, long side <= 1333), SGD lr 0.01 for 16 images with bias lr x2 and
no bias decay, linear warm-up from 1/3 over 500 iterations, steps at epochs 16 and 22, no
gradient clipping (the student's mmdetection config sets `grad_clip=None`; the FGD config turns
clipping at 35 back on).

Run:    python -m fgd_jax.train --config configs/fcos_r50_baseline.py --workdir workdirs/fcos_r50_2x
Needs:  COCO 2017 under data/coco and the caffe ImageNet ResNet-50
        (--config.train.backbone_init=resnet50_caffe.pth, open-mmlab://detectron/resnet50_caffe).
Should reach: about 38.5 bbox mAP on COCO val2017, the FCOS R50 baseline of the FGD paper
        (mmdetection's plain fcos_r50_caffe_fpn_gn-head_mstrain_640-800_2x reaches 38.5; the
        centre-sampling/GIoU variant is typically somewhat higher).
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    # pixel_mean defaults to the student config's (103.53, 116.28, 123.675)
    cfg.model = C.fcos_model(depth=50, tricks=True)
    cfg.data = C.coco_data(pixel_style="caffe")
    cfg.data.multiscale_short = (640, 800)
    cfg.data.multiscale_mode = "value"  # 640 or 800, mmdetection's multiscale_mode='value'
    cfg.train = C.schedule_2x(batch_size=16, base_lr=0.01)
    cfg.train.warmup = "linear"
    cfg.train.warmup_iters = 500
    cfg.train.warmup_ratio = 1.0 / 3
    cfg.train.bias_lr_mult = 2.0
    cfg.train.bias_decay_mult = 0.0
    cfg.train.grad_clip_norm = 0.0  # disabled, as the original student config
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
