"""FGD: RepPoints ResNet-101 teacher ->
RepPoints ResNet-50 student, COCO, 2x.

The original's
`configs/distillers/fgd/fgd_reppoints_r101_fpn_distill_reppoints_r50_fpn_2x_coco.py`: the student is
`reppoints_moment_r50_fpn_gn-neck+head_2x_coco` (SGD lr 0.01 for 16 images, 2x), FGD on the 5
FPN levels (`neck.fpn_convs.0..4.conv`: with the GN neck, the conv outputs BEFORE GroupNorm,
what `RepPoints.forward_train` / `extract_feat` return) with temp 0.5, alpha 1.6e-3, beta 8e-4,
gamma 8e-4, lambda 8e-6, the student initialised from the teacher where shapes agree
(`init_student=True`: neck and head), gradient clipping at 35.

Run:    python -m fgd_jax.train --config configs/reppoints_r101_r50.py --workdir workdirs/reppoints_r101_r50
Needs:  the teacher converted from mmdetection's
        reppoints_moment_r101_fpn_gn-neck+head_2x_coco checkpoint:
        python scripts/convert_torch_teacher.py \\
            --src reppoints_moment_r101_fpn_gn-neck+head_2x_coco_20200329-4fbc7310.pth \\
            --config configs/reppoints_r101_baseline.py --out checkpoints/reppoints_r101_2x
        COCO 2017 under data/coco (mmdetection layout), and the ImageNet ResNet-50 for the
        student's backbone (--config.train.backbone_init=checkpoints/resnet50-0676ba61.pth).
Should reach: no paper number for this pair (the paper's RepPoints rows use the X101-DCN
        teacher); expect the student between its baseline (38.6) and the teacher (40.5).
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.reppoints_model(depth=50)  # the student
    # mmdetection normalizes the losses per GPU of 2 images (samples_per_gpu=2) and averages
    # the GPUs; reproduce that whatever the device count
    cfg.model.train_cfg.loss_norm_group = 2
    cfg.teacher = C.teacher(
        C.reppoints_model(depth=101),
        ckpt="checkpoints/reppoints_r101_2x",
    )
    cfg.distill = C.fgd_distill(
        temp=0.5,
        alpha_fgd=0.0016,
        beta_fgd=0.0008,
        gamma_fgd=0.0008,
        lambda_fgd=0.000008,
        num_levels=5,
        init_student=True,
    )
    cfg.data = C.coco_data()
    cfg.train = C.schedule_2x(batch_size=16, base_lr=0.01)
    cfg.train.grad_clip_norm = 35.0
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
