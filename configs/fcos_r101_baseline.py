"""FCOS ResNet-101 caffe FPN GN-head, multi-scale 640-800, 2x (mmdetection 2.x
`fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco`), COCO. The teacher of
configs/fcos_r101_r50.py.

Plain FCOS head (exp regression, IoU loss, centerness on the cls tower, NMS 0.5), caffe-style
ResNet-101 with frozen BN, BGR input minus the mean (102.9801, 115.9465, 122.7717), std 1 (the
plain FCOS configs' `img_norm_cfg`; the data pipeline subtracts (103.53, 116.28, 123.675) and
the model adds the difference back inside each image, see `fcos_model(pixel_mean=...)`),
multi-scale training with the short side 640 or 800 (`multiscale_mode='value'`, long side
<= 1333), SGD lr 0.01 for 16 images with bias lr x2 and no bias decay, constant warm-up 1/3 for
500 iterations, steps at epochs 16 and 22, gradient clip 35.

Run:    python -m fgd_jax.train --config configs/fcos_r101_baseline.py --workdir workdirs/fcos_r101_2x
Needs:  COCO 2017 under data/coco and the caffe ImageNet ResNet-101
        (--config.train.backbone_init=resnet101_caffe.pth, open-mmlab://detectron/resnet101_caffe);
        or convert the released mmdetection checkpoint instead of training:
        python scripts/convert_torch_teacher.py \
            --src fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco-511424d6.pth \
            --config configs/fcos_r101_baseline.py --out checkpoints/fcos_r101_2x
Should reach: 40.8 bbox mAP on COCO val2017 (mmdetection model zoo).
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    # pixel_mean defaults to the plain FCOS mean (102.9801, 115.9465, 122.7717)
    cfg.model = C.fcos_model(depth=101, tricks=False)
    cfg.data = C.coco_data(pixel_style="caffe")
    cfg.data.multiscale_short = (640, 800)
    cfg.data.multiscale_mode = "value"  # 640 or 800, mmdetection's multiscale_mode='value'
    cfg.train = C.schedule_2x(batch_size=16, base_lr=0.01)
    cfg.train.warmup = "constant"
    cfg.train.warmup_iters = 500
    cfg.train.warmup_ratio = 1.0 / 3
    cfg.train.bias_lr_mult = 2.0
    cfg.train.bias_decay_mult = 0.0
    cfg.train.grad_clip_norm = 35.0
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
