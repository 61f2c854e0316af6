"""FGD: FCOS ResNet-101 teacher -> FCOS ResNet-50 student (the paper's anchor-free row), COCO, 2x.

The original's `fgd_fcos_r101_distill_fcos_r50_2x_coco.py`: student
`fcos_center-normbbox-giou_r50_caffe_fpn_gn-head_mstrain_1x_coco` (centre sampling, regression
/ stride, GIoU, tower conv bias, NMS 0.6; caffe ResNet-50, BGR input, mean only), teacher
`fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco` (plain FCOS head), FGD on all five FPN
outputs (`neck.fpn_convs.0-4.conv`) with temp 0.8, alpha 1.6e-3, beta 8e-4, gamma 8e-4,
lambda 8e-6, student neck + head initialised from the teacher (init_student), multi-scale
training with short side 640-800, 24 epochs (steps at 16 and 22), SGD lr 0.01 for 16 images with
bias lr x2 and no bias decay, linear warm-up from 1/3 over 500 iterations (the student config
sets `warmup='linear'` over the FCOS base's constant 1/3), gradient clipping at 35.
Differences: mmdetection's `multiscale_mode='value'` picks 640 or 800; our pipeline samples the
short side uniformly in [640, 800] (`multiscale_mode='range'`).

Run:    python -m fgd_jax.train --config configs/fcos_r101_r50.py --workdir workdirs/fcos_r101_r50
Needs:  the teacher converted from mmdetection's checkpoint:
        python scripts/convert_torch_teacher.py \
            --src fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco-511424d6.pth \
            --config configs/fcos_r101_baseline.py --out checkpoints/fcos_r101_2x
        the caffe ImageNet ResNet-50 is not needed (init_student copies the teacher's neck and
        head; the student backbone starts from --config.train.backbone_init=resnet50_caffe.pth,
        open-mmlab://detectron/resnet50_caffe) and COCO 2017 under data/coco.
Should reach: 42.7 bbox mAP on COCO val2017 (FGD paper; the FCOS R50 baseline is 38.5).
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.fcos_model(depth=50, tricks=True)  # the student
    cfg.teacher = C.teacher(C.fcos_model(depth=101, tricks=False), ckpt="checkpoints/fcos_r101_2x")
    cfg.distill = C.fgd_distill(
        temp=0.8,
        alpha_fgd=0.0016,
        beta_fgd=0.0008,
        gamma_fgd=0.0008,
        lambda_fgd=0.000008,
        num_levels=5,
        init_student=True,
        # The student's towers have conv biases the plain R101 teacher lacks; the original
        # loads the teacher non-strictly, so those biases keep their init. Nothing else may.
        inherit_allow_missing=(r"^bbox_head/(cls|reg)_convs_\d+/conv/bias$",),
    )
    cfg.data = C.coco_data(pixel_style="caffe")
    cfg.data.multiscale_short = (640, 800)
    cfg.train = C.schedule_2x(batch_size=16, base_lr=0.01)
    cfg.train.warmup = "linear"
    cfg.train.warmup_iters = 500
    cfg.train.warmup_ratio = 1.0 / 3
    cfg.train.bias_lr_mult = 2.0
    cfg.train.bias_decay_mult = 0.0
    cfg.train.grad_clip_norm = 35.0
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
