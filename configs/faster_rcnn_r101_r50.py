"""FGD: Faster R-CNN ResNet-101 teacher -> Faster R-CNN ResNet-50 student, COCO, 2x schedule.

The original's `fgd_faster_rcnn_r101_fpn_2x_distill_faster_rcnn_r50_fpn_2x_coco.py`: FGD on the
four FPN outputs P2..P5 (`neck.fpn_convs.0-3.conv`; P6 is a max-pool and not distilled),
temp 0.5, alpha 5e-5, beta 2.5e-5, gamma 5e-5, lambda 5e-7, SGD lr 0.02 for 16 images,
gradient clipping 35, student initialised from the teacher's neck and heads (init_student).

Run:    python -m fgd_jax.train --config configs/faster_rcnn_r101_r50.py --workdir workdirs/faster_rcnn_r101_r50
Needs:  the teacher converted from mmdetection's faster_rcnn_r101_fpn_2x_coco checkpoint:
        python scripts/convert_torch_teacher.py \
            --src faster_rcnn_r101_fpn_2x_coco_bbox_mAP-0.398_20200504_210455-1d2dac9c.pth \
            --config configs/faster_rcnn_r101_baseline.py --out checkpoints/faster_rcnn_r101_2x
        COCO 2017 under data/coco (mmdetection layout), and the ImageNet ResNet-50 for the
        student's backbone (mmdetection's `torchvision://resnet50`):
            --config.train.backbone_init=checkpoints/resnet50-0676ba61.pth (torchvision layout)
Should reach: the paper's Faster R-CNN result (R50 student 38.4 -> 42.0 bbox mAP) used a
        Cascade Mask R-CNN X101-32x4d-DCN teacher, which fgd-jax does not support yet. For this
        R101 teacher (39.8) the FGD repository publishes no number; expect the student between
        the baseline and about the teacher's level (roughly 39.5-40.5 bbox mAP on val2017).
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.faster_rcnn_model(depth=50)  # the student
    # mmdetection normalizes these losses per GPU of 2 images (samples_per_gpu=2) and
    # averages the GPUs; reproduce that whatever the device count
    cfg.model.train_cfg.loss_norm_group = 2
    cfg.teacher = C.teacher(C.faster_rcnn_model(depth=101), ckpt="checkpoints/faster_rcnn_r101_2x")
    cfg.distill = C.fgd_distill(
        temp=0.5,
        alpha_fgd=0.00005,
        beta_fgd=0.000025,
        gamma_fgd=0.00005,
        lambda_fgd=0.0000005,
        num_levels=4,
        init_student=True,
    )
    cfg.data = C.coco_data()
    cfg.train = C.schedule_2x(batch_size=16, base_lr=0.02)
    cfg.train.grad_clip_norm = 35.0
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
