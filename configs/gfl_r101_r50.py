"""FGD: GFL ResNet-101 (multi-scale 2x) teacher -> GFL ResNet-50 student, COCO, 1x.

The original's `configs/distillers/fgd/fgd_gfl_r101_distill_gfl_r50_fpn_1x_coco.py`: the
student is `gfl_r50_fpn_1x_coco` (single scale, 1x, SGD lr 0.01 for 16 images), FGD on the 5
FPN outputs (`neck.fpn_convs.0..4`) with temp 0.5, alpha 1e-3, beta 5e-4, gamma 5e-4,
lambda 5e-6, the student initialised from the teacher where shapes agree (`init_student`),
gradient clipping at 35.

Run:    python -m fgd_jax.train --config configs/gfl_r101_r50.py --workdir workdirs/gfl_r101_r50
Needs:  the teacher converted from mmdetection's gfl_r101_fpn_mstrain_2x_coco checkpoint:
        python scripts/convert_torch_teacher.py \\
            --src gfl_r101_fpn_mstrain_2x_coco_20200629_200126-dd12f847.pth \\
            --config configs/gfl_r101_baseline.py --out checkpoints/gfl_r101_2x
        COCO 2017 under data/coco (mmdetection layout), and the ImageNet ResNet-50 for the
        student's backbone (--config.train.backbone_init=checkpoints/resnet50-0676ba61.pth).
Should reach: issue 19 quotes the FGD paper's GFL row: student 40.2 -> 43.5 bbox mAP on COCO
        val2017 with this teacher.
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.gfl_model(depth=50)  # the student
    cfg.teacher = C.teacher(C.gfl_model(depth=101), ckpt="checkpoints/gfl_r101_2x")
    cfg.distill = C.fgd_distill(
        temp=0.5,
        alpha_fgd=0.001,
        beta_fgd=0.0005,
        gamma_fgd=0.0005,
        lambda_fgd=0.000005,
        num_levels=5,
        init_student=True,
    )
    cfg.data = C.coco_data()
    cfg.train = C.schedule_1x(batch_size=16, base_lr=0.01)
    cfg.train.grad_clip_norm = 35.0
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
