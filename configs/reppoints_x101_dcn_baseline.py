"""RepPoints ResNeXt-101 32x4d with DCN in c3-c5 (mmdetection 2.x
`reppoints_moment_x101_fpn_dconv_c3-c5_gn-neck+head_2x_coco`), COCO, 2x: the teacher of the FGD
paper's RepPoints rows (`reppoints_x101_r50.py`, `reppoints_x101_r101.py`).

Backbone `ResNeXt(depth=101, groups=32, base_width=4, dcn=dict(type='DCN', deform_groups=1,
fallback_on_stride=False), stage_with_dcn=(False, True, True, True))`; the rest as
`reppoints_r50_baseline.py`.

Run:    python -m fgd_jax.train --config configs/reppoints_x101_dcn_baseline.py --workdir workdirs/reppoints_x101_dcn_2x
Needs:  COCO 2017 and the ImageNet ResNeXt-101 32x4d (`open-mmlab://resnext101_32x4d`); or
        convert the released checkpoint (what the FGD runs use):
        python scripts/convert_torch_teacher.py \\
            --src reppoints_moment_x101_fpn_dconv_c3-c5_gn-neck+head_2x_coco_20200329-f87da1ea.pth \\
            --config configs/reppoints_x101_dcn_baseline.py --out checkpoints/reppoints_x101_dcn_2x
Should reach: 44.2 bbox mAP on COCO val2017 (mmdetection model zoo metafile,
        `reppoints_moment_x101_fpn_dconv_c3-c5_gn-neck+head_2x_coco`).
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.reppoints_model(depth=101, groups=32, base_width=4, dcn="DCN")
    cfg.model.train_cfg.loss_norm_group = 2
    cfg.data = C.coco_data()
    cfg.train = C.schedule_2x(batch_size=16, base_lr=0.01)
    cfg.train.grad_clip_norm = 0.0  # mmdetection's schedule_2x: optimizer_config grad_clip=None
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
