"""RepPoints ResNet-101 baseline (mmdetection 2.x `reppoints_moment_r101_fpn_gn-neck+head_2x_coco`),
COCO, 2x: the FGD paper's RepPoints R101 student, and the teacher of `reppoints_r101_r50.py`.

Settings as `reppoints_r50_baseline.py`, the depth aside.

Run:    python -m fgd_jax.train --config configs/reppoints_r101_baseline.py --workdir workdirs/reppoints_r101_2x
Needs:  COCO 2017 and the ImageNet ResNet-101 weights; or convert the released checkpoint:
        python scripts/convert_torch_teacher.py \\
            --src reppoints_moment_r101_fpn_gn-neck+head_2x_coco_20200329-4fbc7310.pth \\
            --config configs/reppoints_r101_baseline.py --out checkpoints/reppoints_r101_2x
Should reach: 40.5 bbox mAP on COCO val2017 (the FGD paper's RepPoints R101 baseline).
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.reppoints_model(depth=101)
    cfg.model.train_cfg.loss_norm_group = 2
    cfg.data = C.coco_data()
    cfg.train = C.schedule_2x(batch_size=16, base_lr=0.01)
    cfg.train.grad_clip_norm = 0.0  # mmdetection's schedule_2x: optimizer_config grad_clip=None
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
