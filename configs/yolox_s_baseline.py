"""YOLOX-S baseline (mmdetection 2.x `yolox_s_8x8_300e_coco`), COCO, 300 epochs, batch 64.

Run:    python -m fgd_jax.train --config configs/yolox_s_baseline.py --workdir workdirs/yolox_s
Needs:  COCO 2017 under data/coco (mmdetection layout). YOLOX trains from scratch (no ImageNet
        backbone). Converted mmdetection weights (evaluation / a teacher):
        python scripts/convert_torch_teacher.py --src yolox_s_8x8_300e_coco_20211121_095711-4592a793.pth \
            --config configs/yolox_s_baseline.py --out checkpoints/yolox_s_300e
Should reach: 40.5 bbox mAP on COCO val2017 (mmdetection model zoo, yolox_s_8x8_300e_coco)
        with the recipe below.

The recipe (mmdetection 2.x YOLOX, all of it in this config):
  * data (`config.yolox_coco_data`, `fgd_jax.data.yolox_aug`): Mosaic (4 images, pad 114),
    RandomAffine (scale 0.1-2, border -320, RandomAffine's default rotation 10 and shear 2
    degrees, which the mmdetection config keeps), MixUp (scale 0.8-1.6), HSV jitter, flip,
    resize 640 keep ratio, pad to 640 x 640 with 114, FilterAnnotations (w, h > 1), raw BGR
    0-255 input (no Normalize; evaluation too), images without GT kept; from epoch 285 the
    mode switch (`YOLOXModeSwitchHook`): Mosaic / RandomAffine / MixUp off, L1 loss on.
  * batch multi-scale: every 10 iterations one random size 480..800 (step 32) for the whole
    batch (resized on the device, boxes scaled; 11 compiled steps, kept in the persistent
    compilation cache).
  * SGD 0.01 per 64 images (linearly scaled to `train.batch_size`), momentum 0.9, Nesterov,
    weight decay 5e-4 on neither norm layers nor biases, no gradient clipping; the YOLOX
    schedule (quadratic warm-up 5 epochs, cosine to 0.05 x lr, constant for the last 15).
  * EMA of the weights (`ExpMomentumEMAHook`, momentum 1e-4, BN statistics included):
    evaluation and export use it; checkpoints hold it, so a resumed run continues it.
  * the model (mmdetection 2.x YOLOX, BN on batch statistics: over the global batch here,
    per GPU of 8 images plus SyncNormHook in mmdetection), SimOTA, the losses, 300 epochs,
    test score threshold 0.01, class-wise NMS 0.65.
Known differences (numerics, not steps): image resampling in the augmentations is PIL's,
not cv2's (a grey level; see `fgd_jax.data.yolox_aug`), the random streams are numpy
generators seeded per (seed, epoch, slot) and per 10-step block, not mmdetection's.
"""

from fgd_jax import config as C


def get_config() -> C.ConfigDict:
    cfg = C.ConfigDict()
    cfg.model = C.yolox_model("s")
    cfg.data = C.yolox_coco_data(mode_switch_epoch=300 - 15)
    cfg.train = C.schedule_yolox(batch_size=64, base_lr=0.01)
    cfg.eval = C.eval_settings()
    cfg.seed = 0
    return cfg
