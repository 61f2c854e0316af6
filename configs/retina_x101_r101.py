"""FGD: RetinaNet ResNeXt-101 64x4d teacher -> RetinaNet ResNet-101 student (the paper's table).

Run:    python -m fgd_jax.train --config configs/retina_x101_r101.py --workdir workdirs/retina_x101_r101
Needs:  the teacher converted from mmdetection's retinanet_x101_64x4d_fpn_2x_coco checkpoint:
        python scripts/convert_torch_teacher.py --src retinanet_x101_64x4d_fpn_2x_coco.pth \
            --config configs/retinanet_x101_64x4d_baseline.py --out checkpoints/retinanet_x101_64x4d_2x
        and the ImageNet ResNet-101 for the student's backbone (`torchvision://resnet101`):
            --config.train.backbone_init=checkpoints/resnet101-63fe2227.pth (torchvision layout)
Should reach: 41.7 bbox mAP on COCO val2017 (FGD paper's table; the R101 baseline is 38.9).
Settings: those of the R50 student's config (configs/retina_x101_r50.py, the original's
`fgd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py`), the student's depth aside.
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.retinanet_model(depth=101)
    # mmdetection normalizes these losses per GPU of 2 images (samples_per_gpu=2) and
    # averages the GPUs; reproduce that whatever the device count
    cfg.model.train_cfg.loss_norm_group = 2
    cfg.teacher = C.teacher(
        C.retinanet_model(depth=101, groups=64, base_width=4),
        ckpt="checkpoints/retinanet_x101_64x4d_2x",
    )
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
    cfg.train = C.schedule_2x(batch_size=16, base_lr=0.01)
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
