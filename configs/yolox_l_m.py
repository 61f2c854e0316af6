"""FGD: YOLOX-l teacher -> YOLOX-m student, COCO, 300 epochs, batch 64 (the paper's last row).

The original's `yolox` branch, config `fgd_yoloxl_distill_yoloxm_coco`, through the YOLOX
variant of FGD (`config.yolox_fgd_distill`, `distill.variant='yolox'`): the neck's
`out_convs.{0,1,2}` (after BN + Swish), student 192 -> teacher 256 channels through `align`,
temp 0.5, alpha 2e-3, beta 1e-3, gamma 1e-3, lambda 1e-5, no inheriting
(`init_student=False`), boxes mapped with the batch resize factors and the loss divided by
them (factor 1 here: no batch resize yet, see NOT YET).

Teacher BatchNorm: `distill.teacher_bn='train'` (the default of the variant, what the paper's
46.6 was trained with: the branch never puts the teacher in eval mode, so its BN normalizes
with each batch's statistics); `--config.distill.teacher_bn=eval` uses its stored statistics.

Run:    python -m fgd_jax.train --config configs/yolox_l_m.py --workdir workdirs/yolox_l_m
Needs:  the teacher converted from mmdetection's yolox_l_8x8_300e_coco checkpoint:
        python scripts/convert_torch_teacher.py \
            --src yolox_l_8x8_300e_coco_20211126_140236-d3bd2b23.pth \
            --config configs/yolox_l_baseline.py --out checkpoints/yolox_l_300e
        COCO 2017 under data/coco (mmdetection layout).
Should reach: 46.6 bbox mAP on COCO val2017 (FGD README: YOLOX-m 45.9 -> 46.6 with a
        YOLOX-l teacher) with the full recipe. This config does not have the full recipe yet:

NOT YET (the trainer cannot do these; this config runs the stand-in named, so its numbers are
NOT the recipe's -- do not compare them with the published mAP):
  * data: Mosaic (4 images, pad 114), RandomAffine (scale 0.1-2, border -320), MixUp (scale
    0.8-1.6), HSV jitter, raw BGR 0-255 input (no Normalize), padding with 114, mmdetection's
    box filtering. Stand-in: the COCO pipeline's resize (keep ratio, 640) + flip, 'pytorch'
    normalized RGB pixels, zero padding.
  * YOLOXModeSwitchHook (last 15 epochs: mosaic / mixup off, L1 loss on). Stand-in: L1 never
    on (`model.train_cfg.use_l1=False`; set it True by hand for a second, 15-epoch stage).
  * batch multi-scale (every 10 iterations one random size 480..800, step 32, per batch).
    Stand-in: always 640 x 640.
  * YOLOX schedule (exponential warm-up 5 epochs, cosine to 0.05 x lr, constant for the last
    15). Stand-in (`config.schedule_yolox`): linear warm-up over 5 epochs, constant 0.01,
    x0.05 from epoch 285.
  * no weight decay on norm layers (`norm_decay_mult=0`; conv biases: done). Stand-in: norm
    scales and biases decay.
  * EMA of the weights (`ExpMomentumEMAHook`, momentum 1e-4) for evaluation and export.
    Stand-in: the raw weights.
Done as the recipe: the model (mmdetection 2.x YOLOX, BN trained on batch statistics: over the
global batch here, per GPU of 8 images in mmdetection), SimOTA, the losses, SGD 0.01 per 64
images (linearly scaled to `train.batch_size`), momentum 0.9, Nesterov, weight decay 5e-4,
no gradient clipping, 300 epochs, test score threshold 0.01, class-wise NMS 0.65.
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.yolox_model("m")  # the student
    cfg.teacher = C.teacher(C.yolox_model("l"), ckpt="checkpoints/yolox_l_300e")
    cfg.distill = C.yolox_fgd_distill(student_channels=192, teacher_channels=256)
    cfg.data = C.coco_data(img_scale=(640, 640), canvases=((640, 640),))
    cfg.train = C.schedule_yolox(batch_size=64, base_lr=0.01)
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
