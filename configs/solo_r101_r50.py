"""FGD: SOLO ResNet-101 (multi-scale 3x) teacher -> SOLO ResNet-50 student, COCO, 1x.

The original's `configs/distillers/fgd/fgd_solo_r101_ms_distill_solo_r50_coco.py`: the student
is `solo_r50_fpn_1x_coco` (single scale, 1x, SGD lr 0.01 for 16 images), FGD on P2..P5
(`neck.fpn_convs.0..3`; P6 is a max-pool and not distilled) with temp 0.5, alpha 1e-3,
beta 5e-4, gamma 5e-4, lambda 5e-6, the student initialised from the teacher where shapes
agree (`init_student`), gradient clipping at 35.

Run:    python -m fgd_jax.train --config configs/solo_r101_r50.py --workdir workdirs/solo_r101_r50
Needs:  a SOLO R101 teacher at checkpoints/solo_r101_3x. The original's teacher
        (`Solo_r101_3x.pth`) was never published: train configs/solo_r101_baseline.py and
        export it, or convert any mmdetection SOLO R101 checkpoint:
        python scripts/convert_torch_teacher.py --src <solo_r101>.pth \\
            --config configs/solo_r101_baseline.py --out checkpoints/solo_r101_3x
        COCO 2017 under data/coco (instance masks), and the ImageNet ResNet-50 for the
        student's backbone (--config.train.backbone_init=checkpoints/resnet50-0676ba61.pth).
Should reach: the FGD paper's SOLO row: student 33.1 -> 36.0 mask mAP on COCO val2017 with
        the authors' teacher.
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.solo_model(depth=50)  # the student
    cfg.model.train_cfg.loss_norm_group = 2  # mmdetection: per GPU of 2 images
    teacher = C.solo_model(depth=101)
    teacher.train_cfg.loss_norm_group = 2
    cfg.teacher = C.teacher(teacher, ckpt="checkpoints/solo_r101_3x")
    cfg.distill = C.fgd_distill(
        temp=0.5,
        alpha_fgd=0.001,
        beta_fgd=0.0005,
        gamma_fgd=0.0005,
        lambda_fgd=0.000005,
        num_levels=4,
        init_student=True,
    )
    cfg.data = C.coco_data()
    cfg.data.with_mask = True
    cfg.train = C.schedule_1x(batch_size=16, base_lr=0.01)
    cfg.train.grad_clip_norm = 35.0
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
