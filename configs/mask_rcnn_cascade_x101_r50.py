"""FGD: Cascade Mask R-CNN ResNeXt-101 32x4d DCN teacher (features only) -> Mask R-CNN R50.

The paper's Mask R-CNN row (R50 student 39.2 -> 42.1 bbox mAP, 35.4 -> 37.8 mask mAP), the
original's `fgd_cascade_mask_rcnn_rx101_32x4d_distill_mask_rcnn_r50_fpn_2x_coco.py`: FGD on the
four FPN outputs P2..P5, temp 0.5, alpha 5e-5, beta 2.5e-5, gamma 5e-5, lambda 5e-7, SGD lr
0.02 for 16 images, gradient clipping 35, 2x schedule, and NO inheriting (the teacher's heads
are cascade heads, unlike the student's). The teacher is only its backbone + FPN (model type
'features'): FGD runs nothing else of it.

Run:    python -m fgd_jax.train --config configs/mask_rcnn_cascade_x101_r50.py \
            --workdir workdirs/mask_rcnn_cascade_x101_r50
Needs:  the teacher's backbone + neck converted from mmdetection's
        cascade_mask_rcnn_x101_32x4d_fpn_dconv_c3-c5_1x_coco checkpoint (its heads are dropped
        and counted by the converter):
        python scripts/convert_torch_teacher.py \
            --src cascade_mask_rcnn_x101_32x4d_fpn_dconv_c3-c5_1x_coco_20200606_183737-1d2dac9c.pth \
            --config configs/mask_rcnn_cascade_x101_r50.py --out checkpoints/cascade_x101_dcn_features
        COCO 2017 under data/coco (instance masks), and the ImageNet ResNet-50 for the
        student's backbone: --config.train.backbone_init=checkpoints/resnet50-0676ba61.pth
Should reach: 42.1 bbox / 37.8 mask mAP on COCO val2017 (FGD paper; the R50 baseline is
        39.2 / 35.4).
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.mask_rcnn_model(depth=50)  # the student
    # mmdetection normalizes these losses per GPU of 2 images (samples_per_gpu=2) and
    # averages the GPUs; reproduce that whatever the device count
    cfg.model.train_cfg.loss_norm_group = 2
    cfg.teacher = C.teacher(C.feature_teacher_model(), ckpt="checkpoints/cascade_x101_dcn_features")
    cfg.distill = C.fgd_distill(
        temp=0.5,
        alpha_fgd=0.00005,
        beta_fgd=0.000025,
        gamma_fgd=0.00005,
        lambda_fgd=0.0000005,
        num_levels=4,
        init_student=False,
    )
    cfg.data = C.coco_data()
    cfg.data.with_mask = True  # LoadAnnotations(with_mask=True, poly2mask=True)
    cfg.train = C.schedule_2x(batch_size=16, base_lr=0.02)
    cfg.train.grad_clip_norm = 35.0
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
