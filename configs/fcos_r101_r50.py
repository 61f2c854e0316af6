"""FGD: FCOS ResNet-101 teacher -> FCOS ResNet-50 student (the paper's anchor-free row), COCO, 2x.

Run:    python -m fgd_jax.train --config configs/fcos_r101_r50.py --workdir workdirs/fcos_r101_r50 \
            --config.train.backbone_init=resnet50_caffe.pth
Should reach: 42.7 bbox mAP on COCO val2017 (FGD paper; the FCOS R50 baseline is 38.5).
Needs:  the teacher converted from mmdetection's checkpoint:
        python scripts/convert_torch_teacher.py \
            --src fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco-511424d6.pth \
            --config configs/fcos_r101_baseline.py --out checkpoints/fcos_r101_2x
        the caffe ImageNet ResNet-50 (open-mmlab://detectron/resnet50_caffe, saved as
        resnet50_caffe.pth) for the student backbone, as the original's student; init_student
        then copies the teacher's neck and head; and COCO 2017 under data/coco.

The original (yzd-v/FGD, mmdetection 2.11) `configs/distillers/fgd/
fgd_fcos_r101_distill_fcos_r50_2x_coco.py`, value by value:
- student `fcos_center-normbbox-giou_r50_caffe_fpn_gn-head_mstrain_1x_coco` (centre sampling,
  regression / stride, GIoU, tower conv bias, centerness on the cls tower, NMS 0.6; caffe
  ResNet-50 with frozen BN); teacher `fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco`
  (plain FCOS head), loaded from its released checkpoint.
- FGD on all five FPN outputs (`neck.fpn_convs.0-4.conv`): temp 0.8, alpha 1.6e-3, beta 8e-4,
  gamma 8e-4, lambda 8e-6; `init_student=True` (student neck + head from the teacher).
- data: the distill config's `_base_` is the student config, so its pipeline is used: short
  side 640 or 800 (`multiscale_mode='value'`, long side <= 1333), flip 0.5, BGR minus
  (103.53, 116.28, 123.675), std 1, pad to 32, 2 images x 8 GPUs.
- ONE normalised image feeds both networks (the distiller hooks the teacher's FPN on the
  student's `img`), so the teacher also sees the student's mean, not the
  (102.9801, 115.9465, 122.7717) it was trained with: the teacher model here has
  `pixel_mean` = the student's (no input shift), as the original.
- schedule: 24 epochs, x0.1 at 16 and 22; SGD lr 0.01 for 16 images, momentum 0.9, weight decay
  1e-4, bias lr x2 and no bias decay (the FCOS base's `paramwise_cfg`); warm-up linear from
  1/3 over 500 iterations (the student config sets `warmup='linear'` over the FCOS base's
  constant 1/3, and the distill config only changes `step`); gradient clipping at 35 (the
  distill config turns it back on after the student config's `grad_clip=None`).
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.fcos_model(depth=50, tricks=True)  # the student, mean (103.53, 116.28, 123.675)
    # The teacher runs on the student's normalised image (see above): its input mean is the
    # student's, so the model must not shift it towards its own training mean.
    teacher_model = C.fcos_model(depth=101, tricks=False, pixel_mean=C.CAFFE_PIXEL_MEAN)
    cfg.teacher = C.teacher(teacher_model, ckpt="checkpoints/fcos_r101_2x")
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
    cfg.data.multiscale_mode = "value"  # 640 or 800, mmdetection's multiscale_mode='value'
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
