"""Configs: plain factory functions for the pieces, and `load_config` for files + overrides.

A config file under `configs/` defines `get_config() -> ml_collections.ConfigDict` and builds it
from the factories below (no inheritance chains, no string registries: every value a run uses
is visible by reading the file and the one factory it calls). One override mechanism for
everything: `load_config(path, overrides)` / `apply_overrides(cfg, overrides)` with dotted
keys (`["train.batch_size=8"]` or `{"train.batch_size": 8}`). Every command (train, eval,
export, demo) takes them as `--config.KEY=VALUE` (`split_overrides`, `OVERRIDE_HELP`).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

ConfigDict = ml_collections.ConfigDict

# ImageNet statistics in 0-255 pixel units, as mmdetection's img_norm_cfg.
PYTORCH_PIXEL_MEAN = (123.675, 116.28, 103.53)
PYTORCH_PIXEL_STD = (58.395, 57.12, 57.375)
CAFFE_PIXEL_MEAN = (103.530, 116.280, 123.675)  # BGR
CAFFE_PIXEL_STD = (1.0, 1.0, 1.0)


# ----------------------------------------------------------------------------------- models
def resnet_backbone(
    depth: int = 50,
    groups: int = 1,
    base_width: int = 64,
    style: str = "pytorch",
    frozen_stages: int = 1,
    norm_eval: bool = True,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    norm_requires_grad: bool = True,
    remat: bool = False,
) -> ConfigDict:
    """ResNet / ResNeXt backbone (mmdetection `ResNet` / `ResNeXt` arguments).

    ResNeXt-101 32x4d is `depth=101, groups=32, base_width=4`; 64x4d is `groups=64`.
    `norm_requires_grad=False` is mmdetection's `norm_cfg=dict(type='BN', requires_grad=False)`
    (the caffe FCOS backbones): every BN scale/bias stays fixed (no update, no decay).
    `remat=True` recomputes each trained block in the backward pass instead of keeping its
    activations (mmdetection's `with_cp`): same numbers; JAX then saves block inputs only, but
    XLA:CPU's memory plan does not shrink (benchmarks/results/train_step_memory_cpu.md).
    """
    return ConfigDict(
        dict(
            depth=depth,
            groups=groups,
            base_width=base_width,
            style=style,
            frozen_stages=frozen_stages,
            norm_eval=norm_eval,
            out_indices=tuple(out_indices),
            norm_requires_grad=norm_requires_grad,
            remat=remat,
        )
    )


def backbone_out_channels(backbone: ConfigDict) -> tuple[int, ...]:
    """Channels of C2..C5 (those in `out_indices`) for a backbone config (the model's own
    table: BasicBlock depths 64..512, bottleneck ones 256..2048)."""
    from fgd_jax.models.resnet import ARCH_SETTINGS, stage_out_channels

    if backbone.depth not in ARCH_SETTINGS:
        raise ValueError(
            f"backbone.depth={backbone.depth!r}: expected one of {sorted(ARCH_SETTINGS)}"
        )
    return stage_out_channels(backbone.depth, backbone.out_indices)


def fpn_neck(
    in_channels: Sequence[int] = (256, 512, 1024, 2048),
    out_channels: int = 256,
    start_level: int = 1,
    add_extra_convs: str | bool = "on_input",
    num_outs: int = 5,
    relu_before_extra_convs: bool = False,
    norm: str | None = None,
    num_groups: int = 32,
) -> ConfigDict:
    """FPN neck (mmdetection `FPN` arguments). `add_extra_convs`: False (max-pool P6),
    'on_input', 'on_lateral' or 'on_output'. `norm='gn'`: GroupNorm(`num_groups`) after every
    conv (mmdetection's `norm_cfg=dict(type='GN', num_groups=32)`; the keys are only written
    when set, so the configs without a norm keep the keys they always had)."""
    cfg = ConfigDict(
        dict(
            in_channels=tuple(in_channels),
            out_channels=out_channels,
            start_level=start_level,
            add_extra_convs=add_extra_convs,
            num_outs=num_outs,
            relu_before_extra_convs=relu_before_extra_convs,
        )
    )
    if norm is not None:
        cfg.update(norm=norm, num_groups=num_groups)
    return cfg


def retinanet_model(
    depth: int = 50,
    groups: int = 1,
    base_width: int = 64,
    num_classes: int = 80,
    feat_channels: int = 256,
    stacked_convs: int = 4,
    fpn_channels: int = 256,
    frozen_stages: int = 1,
) -> ConfigDict:
    """mmdetection 2.x `retinanet_r50_fpn` (and R101 / X101 by `depth`, `groups`).

    `fpn_channels`, `feat_channels`, `stacked_convs` shrink it for the synthetic demo and tests.
    Every other setting is the default of its module (`RetinaHead`, `RetinaTrainCfg`,
    `DenseTestCfg` in `fgd_jax.models`), listed in the config so it can be overridden.
    """
    from fgd_jax.models.build import module_config
    from fgd_jax.models.dense_heads import DenseTestCfg
    from fgd_jax.models.retinanet import RetinaHead, RetinaTrainCfg

    backbone = resnet_backbone(
        depth=depth, groups=groups, base_width=base_width, frozen_stages=frozen_stages
    )
    return ConfigDict(
        dict(
            type="retinanet",
            num_classes=num_classes,
            backbone=backbone,
            neck=fpn_neck(
                in_channels=backbone_out_channels(backbone),
                out_channels=fpn_channels,
                start_level=1,
                add_extra_convs="on_input",
                num_outs=5,
            ),
            head=module_config(
                RetinaHead,
                skip=("num_classes", "num_anchors"),
                in_channels=fpn_channels,
                feat_channels=feat_channels,
                stacked_convs=stacked_convs,
            ),
            train_cfg=module_config(RetinaTrainCfg),
            test_cfg=module_config(DenseTestCfg),
        )
    )


# ----------------------------------------------------------------------------- distillation
# The four FGD loss weights of `fgd_distill` (focal fg, focal bg, attention, relation).
FGD_WEIGHT_KEYS = ("alpha_fgd", "beta_fgd", "gamma_fgd", "lambda_fgd")


def fgd_distill(
    init_student: bool = True, inherit_allow_missing: Sequence[str] = (), **differs: Any
) -> ConfigDict:
    """FGD hyper-parameters: the fields of `fgd_jax.distill.distiller.DistillLosses` (one
    `FGDLoss` per FPN level, named `loss_fgd_fpn_{i}`: `temp`, `alpha_fgd`, `beta_fgd`,
    `gamma_fgd`, `lambda_fgd`, `num_levels`, `student_channels`, `teacher_channels`,
    `box_scale` 'img_shape' (original) or 'pad_shape') at the FGD RetinaNet config's values
    (the original `FeatureLoss` defaults but `gamma_fgd` 0.0005), `differs` on top; plus the
    inheriting strategy (`init_student`) and `inherit_allow_missing`: regexes of student
    leaves that may lack a teacher counterpart when inheriting."""
    from fgd_jax.distill.distiller import DistillLosses
    from fgd_jax.models.build import module_config

    cfg = module_config(DistillLosses, **{"gamma_fgd": 0.0005, **differs})
    cfg.init_student = init_student
    cfg.inherit_allow_missing = tuple(inherit_allow_missing)
    return cfg


def yolox_fgd_distill(
    student_channels: int = 192, teacher_channels: int = 256, **differs: Any
) -> ConfigDict:
    """FGD as the original's `yolox` branch (`fgd_yoloxl_distill_yoloxm_coco`): `variant`
    'yolox' (the batch resize factors in the box mapping and the loss, see
    `fgd_jax.distill.distiller`), the 3 YOLOX neck levels (`neck.out_convs.{0,1,2}`), student
    192 -> teacher 256 channels (YOLOX-m -> YOLOX-l) through `align`, temp 0.5, alpha 2e-3,
    beta 1e-3, gamma 1e-3, lambda 1e-5, no inheriting (`init_student=False`) and
    `teacher_bn='train'` (the branch never puts the teacher in eval mode: its BatchNorm runs
    on batch statistics; 'eval' is the alternative). `differs` on top."""
    cfg = fgd_distill(
        init_student=False,
        **{
            "variant": "yolox",
            "num_levels": 3,
            "student_channels": student_channels,
            "teacher_channels": teacher_channels,
            "temp": 0.5,
            "alpha_fgd": 0.002,
            "beta_fgd": 0.001,
            "gamma_fgd": 0.001,
            "lambda_fgd": 0.00001,
            **differs,
        },
    )
    cfg.teacher_bn = "train"
    return cfg


# ------------------------------------------------------------------------------------- data
def coco_data(
    root: str = "data/coco",
    img_scale: tuple[int, int] = (1333, 800),
    canvases: Sequence[tuple[int, int]] = ((800, 1344), (1344, 800)),
    pixel_style: str = "pytorch",
    max_boxes: int = 100,
) -> ConfigDict:
    """COCO 2017 in mmdetection's layout. `img_scale` is (long, short) edge limits;
    `canvases` are the padded (h, w) sizes batches are grouped into by aspect ratio."""
    return ConfigDict(
        dict(
            source="coco",
            root=root,
            train_ann="annotations/instances_train2017.json",
            train_images="train2017",
            val_ann="annotations/instances_val2017.json",
            val_images="val2017",
            img_scale=tuple(img_scale),
            # multi-scale training: short-side limits, e.g. (640, 800) for FCOS; 'value' picks
            # one of them per image (mmdetection multiscale_mode='value', FGD's FCOS config),
            # 'range' an integer uniform in [min, max]
            multiscale_short=(),
            multiscale_mode="value",
            canvases=tuple(tuple(c) for c in canvases),
            pixel_style=pixel_style,
            flip_prob=0.5,
            max_boxes=max_boxes,
            max_ignore=32,
            # training keeps images whose short side is >= min_size px (mmdetection's
            # filter_empty_gt / min_size=32); evaluation keeps every image
            min_size=32,
            # False: images without GT train too (mmdetection filter_empty_gt=False, YOLOX)
            filter_empty_gt=True,
            # the canvas padding's value in network-input units (YOLOX: 114 on raw pixels)
            pad_value=0.0,
            # training augmentation: 'standard' (resize, flip) or 'yolox' (Mosaic,
            # RandomAffine, MixUp, HSV, flip, resize, pad: fgd_jax.data.yolox_aug, settings
            # in `yolox`)
            augment="standard",
            yolox=_yolox_aug_defaults(),
            num_workers=2,  # loader worker processes; 0 decodes in the training process
            read_threads=0,  # grain read threads; 0: 1 with workers, 2 without
            prefetch_batches=2,  # batches grain reads ahead of the consumer
            on_bad_image="error",  # or 'skip'
            # annotations whose category_id is not in `categories`: 'warn' (skip them, one
            # warning per id with its count) or 'error' (refuse the json)
            on_unknown_category="warn",
            num_classes=80,
            # label -> (category id, name) table, ((id, name), ...) in label order; empty: not
            # recorded yet. Runs record it from the annotation json (fgd_jax.data.classes)
            # and save it with checkpoints and exports; when set, a dataset whose table
            # differs is refused. A category id of -1 means unknown (mmdetection's
            # meta['CLASSES'] holds names only).
            classes=(),
            # instance masks (mmdetection LoadAnnotations(with_mask=True, poly2mask=True)):
            # batches get `masks` [G, mask_grid, mask_grid] uint8 and `mask_regions` [G, 4]
            # (fgd_jax.data.masks; docs/contracts.md). Off for box-only detectors.
            with_mask=False,
            mask_grid=56,  # cells per side of a GT's mask grid (accuracy vs memory: benchmarks)
            on_bad_mask="error",  # malformed segmentation: 'error' or 'skip' (counted)
            tfds_name="coco/2017",  # source='tfds': the tensorflow-datasets name
            tfds_data_dir="",  # source='tfds': its data_dir ('' = the tfds default)
        )
    )


def _yolox_aug_defaults() -> dict:
    """`fgd_jax.data.yolox_aug.YOLOXAugCfg`'s defaults as a plain dict (tuples kept)."""
    import dataclasses

    from fgd_jax.data.yolox_aug import YOLOXAugCfg

    return dataclasses.asdict(YOLOXAugCfg())


def yolox_coco_data(
    root: str = "data/coco", mode_switch_epoch: int = 285, max_boxes: int = 100
) -> ConfigDict:
    """COCO 2017 with mmdetection 2.x YOLOX's data recipe (`fgd_jax.data.yolox_aug`):
    Mosaic, RandomAffine, MixUp, HSV, flip, resize 640 keep ratio, pad to 640 x 640 with
    114, raw BGR 0-255 pixels (no Normalize; evaluation too), images without GT kept
    (`filter_empty_gt=False`), and from `mode_switch_epoch` (300 - 15) Mosaic / Affine /
    MixUp off and the L1 loss on (`YOLOXModeSwitchHook`)."""
    cfg = coco_data(
        root=root,
        img_scale=(640, 640),
        canvases=((640, 640),),
        pixel_style="raw_bgr",
        max_boxes=max_boxes,
    )
    cfg.pad_value = 114.0
    cfg.filter_empty_gt = False
    cfg.augment = "yolox"
    cfg.yolox.mode_switch_epoch = int(mode_switch_epoch)
    return cfg


def complete_data_config(data_cfg: Any) -> ConfigDict:
    """A copy of `data_cfg` with every key its factory defines filled in where missing (a
    config saved by an older version), so readers need no defaults of their own.

    `source='shapes'` configs are completed from `shapes_data()`, others from `coco_data()`;
    keys already set are kept as they are."""
    cfg = ConfigDict(data_cfg.to_dict() if isinstance(data_cfg, ConfigDict) else dict(data_cfg))
    source = cfg.get("source", "coco")
    if source == "shapes":
        ref = shapes_data(variant=cfg.get("shapes_variant", "basic"))
    else:
        ref = coco_data()
    for key, value in ref.items():
        if key not in cfg:
            cfg[key] = value
    return cfg


def shapes_data(
    root: str = ".cache/shapes",
    num_train: int = 512,
    num_val: int = 128,
    image_size: int = 128,
    pixel_style: str = "pytorch",
    max_boxes: int = 16,
    variant: str = "basic",
    min_size: int | None = None,
) -> ConfigDict:
    """The embedded synthetic dataset (`fgd_jax.data.shapes`), generated on first use.

    `variant`: 'basic' (6 classes) or 'lookalike' (10); `min_size`: smallest shape extent,
    px (None: the variant's default). `num_classes` follows the variant; a model config must
    use the same (train and eval refuse a mismatch)."""
    cfg = coco_data(
        root=root,
        img_scale=(image_size, image_size),
        canvases=((image_size, image_size),),
        pixel_style=pixel_style,
        max_boxes=max_boxes,
    )
    cfg.source = "shapes"
    cfg.train_ann = "annotations/instances_train.json"
    cfg.train_images = "train"
    cfg.val_ann = "annotations/instances_val.json"
    cfg.val_images = "val"
    cfg.num_train = num_train
    cfg.num_val = num_val
    cfg.image_size = image_size
    cfg.max_ignore = 4
    from fgd_jax.data import shapes

    cfg.shapes_variant = variant
    cfg.num_classes = len(shapes.class_names(variant))
    cfg.shapes_seed = 0
    cfg.shapes_min_size = shapes.default_min_size(variant) if min_size is None else min_size
    return cfg


# -------------------------------------------------------------------------------- training
def schedule_2x(batch_size: int = 16, base_lr: float = 0.01) -> ConfigDict:
    """mmdetection's 2x schedule: SGD, linear warm-up, x0.1 at epochs 16 and 22 of 24.

    `base_lr` is the rate for `reference_batch_size`; the trainer scales it linearly to
    `batch_size` (the global batch over all devices and hosts)."""
    return ConfigDict(
        dict(
            batch_size=batch_size,
            reference_batch_size=16,
            num_epochs=24,
            num_steps=-1,  # > 0 overrides num_epochs
            base_lr=base_lr,
            optimizer="sgd",  # 'sgd' (mmdetection) or 'adamw' (toy from-scratch runs)
            momentum=0.9,
            weight_decay=1e-4,
            grad_clip_norm=35.0,  # <= 0 disables clipping
            warmup="linear",  # 'linear' | 'constant' | 'none'
            warmup_iters=500,
            warmup_ratio=0.001,
            decay_epochs=(16, 22),
            decay_steps=(),  # used instead of decay_epochs when num_steps > 0
            decay_factor=0.1,
            bias_lr_mult=1.0,
            bias_decay_mult=1.0,
            dtype="float32",  # 'bfloat16' for mixed precision compute on GPUs
            log_every=50,
            ckpt_every=1000,
            keep_ckpts=3,
            eval_every=-1,  # steps; -1: once per epoch; 0: only at the end
            backbone_init="",  # ImageNet .pth for the student backbone (torchvision/mmdet)
            # True: the recipe trains from random weights (YOLOX): no ImageNet warning, and
            # backbone_init must stay empty
            from_scratch=False,
        )
    )


# COCO train2017 images (mmdetection's YOLOX keeps the images without boxes) per epoch at 64.
YOLOX_STEPS_PER_EPOCH = 1849  # ceil(118287 / 64)

# `train.precompile` (batch multi-scale only): 'parallel' compiles the train step of every size
# the run will use ahead of time, before the first step, in `train.precompile_threads` threads
# (0: the CPU count, capped by the number of sizes); 'lazy' compiles each size at its first use.
# Both read and write the persistent compilation cache (`parallel.enable_compilation_cache`).
PRECOMPILE_MODES = ("parallel", "lazy")
PRECOMPILE_DEFAULT = "parallel"


def schedule_yolox(batch_size: int = 64, base_lr: float = 0.01) -> ConfigDict:
    """mmdetection 2.x YOLOX's optimizer, schedule and training hooks: 300 epochs, SGD
    `base_lr` per 64 images (linear scaling to `batch_size`), momentum 0.9, Nesterov, weight
    decay 5e-4 on neither norm layers nor conv biases (`paramwise_cfg=dict(norm_decay_mult=0,
    bias_decay_mult=0)`), no gradient clipping; the YOLOX schedule (`lr_policy='yolox'`:
    quadratic 'exp' warm-up over 5 epochs, cosine to 0.05 x lr, constant for the last 15
    epochs; `optim.make_yolox_lr_schedule`); the EMA of the weights (`ExpMomentumEMAHook`,
    momentum 1e-4, ramp over 2000 iterations) for evaluation and export; batch multi-scale
    (every 10 iterations one size of 480..800 step 32 for the whole batch,
    `experiment.batch_input_size`); evaluation every 10 epochs. The mode switch of the last 15
    epochs is the data's (`yolox_coco_data(mode_switch_epoch=285)`). The multi-scale sizes'
    train steps are compiled ahead of time, in parallel, before the first step
    (`precompile='parallel'`, `precompile_threads=0`: one per CPU; 'lazy': each at its first
    use; see `PRECOMPILE_MODES`)."""
    cfg = schedule_2x(batch_size=batch_size, base_lr=base_lr)
    cfg.update(
        reference_batch_size=64,
        num_epochs=300,
        nesterov=True,
        weight_decay=5e-4,
        bias_decay_mult=0.0,
        norm_decay_mult=0.0,
        grad_clip_norm=0.0,
        lr_policy="yolox",
        warmup="exp",
        warmup_epochs=5,
        warmup_iters=5 * YOLOX_STEPS_PER_EPOCH,  # used only when warmup_epochs is 0
        warmup_ratio=1.0,
        last_epochs=15,
        min_lr_ratio=0.05,
        decay_epochs=(),
        ema_momentum=1e-4,
        ema_total_iter=2000,
        from_scratch=True,  # mmdetection's YOLOX config loads no ImageNet weights
        multiscale_sizes=tuple(range(480, 801, 32)),
        multiscale_interval=10,
        precompile=PRECOMPILE_DEFAULT,
        precompile_threads=0,
        eval_every=10 * YOLOX_STEPS_PER_EPOCH,
    )
    return cfg


# --------------------------------------------------------------------------------- loading
def schedule_1x(batch_size: int = 16, base_lr: float = 0.01) -> ConfigDict:
    """mmdetection's 1x schedule: `schedule_2x` with 12 epochs, x0.1 at epochs 8 and 11."""
    cfg = schedule_2x(batch_size=batch_size, base_lr=base_lr)
    cfg.num_epochs = 12
    cfg.decay_epochs = (8, 11)
    return cfg


def load_config(
    path: str | os.PathLike, overrides: Sequence[str] | dict | None = None
) -> ConfigDict:
    """Load `get_config()` from a Python config file and apply dotted overrides.

    Args:
      path: a `.py` file defining `get_config()`; `file.py:arg` calls `get_config("arg")`
        (the ml_collections `config_flags` convention, e.g. `shapes_demo.py:teacher`).
      overrides: `["train.batch_size=8", ...]` (values parsed as Python literals, falling
        back to strings) or a dict `{"train.batch_size": 8}`.
    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file has no `get_config`, or an override names an unknown key.
      TypeError: an override value has the wrong type for its key.
    """
    path = os.fspath(path)
    arg = None
    if not os.path.isfile(path) and ":" in path:
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location("_fgd_jax_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: a config file must define get_config()")
    cfg = module.get_config() if arg is None else module.get_config(arg)
    if not isinstance(cfg, ConfigDict):
        raise TypeError(f"{path}: get_config() returned {type(cfg).__name__}, not a ConfigDict")
    apply_overrides(cfg, overrides or [], source=path)
    return cfg


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# Keys whose value may be a bool or a string (mmdetection's own unions).
_BOOL_OR_STR_KEYS = frozenset({"add_extra_convs"})


def _checked_value(old: Any, value: Any, key: str, source: str) -> Any:
    """`value` coerced to the type of `old` where lossless, else a TypeError naming `key`."""

    def fail(expected: str) -> None:
        raise TypeError(
            f"{source}: config key {key!r} expects {expected} (current {old!r}), "
            f"got {type(value).__name__} {value!r}"
        )

    if old is None:
        return value
    if isinstance(old, ConfigDict):
        fail("a group of keys; set its fields one by one, e.g. " + key + ".<field>=...")
    if isinstance(old, tuple):
        if isinstance(value, list):
            value = tuple(value)
        if not isinstance(value, tuple):
            value = (value,)
        kinds = {type(v) for v in old}
        if len(kinds) == 1 and old:
            (kind,) = kinds
            items = []
            for v in value:
                if kind is float and isinstance(v, int) and not isinstance(v, bool):
                    v = float(v)
                if type(v) is not kind:
                    fail(f"a tuple of {kind.__name__}")
                items.append(v)
            value = tuple(items)
        return value
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is type(old):
        return value
    leaf = key.rsplit(".", 1)[-1]
    if leaf in _BOOL_OR_STR_KEYS and isinstance(value, bool | str):
        return value
    fail(type(old).__name__)
    return value


def apply_overrides(
    cfg: ConfigDict, overrides: Sequence[str] | dict, source: str = "config"
) -> None:
    """Set dotted keys in place with a clear error for unknown keys and wrong types.

    `overrides`: `["train.batch_size=8", ...]` (a leading `config.` is dropped; values are
    Python literals, text where they are not one, `true` / `false` also for a bool key) or a
    dict `{"train.batch_size": 8}` (values used as given)."""
    if isinstance(overrides, dict):
        items = [(key, value, None) for key, value in overrides.items()]
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form key=value")
            key, text = item.split("=", 1)
            text = text.strip()
            items.append((key.strip().removeprefix("config."), _parse_value(text), text))
    for key, value, text in items:
        parts = key.split(".")
        node = cfg
        for i, part in enumerate(parts):
            if not isinstance(node, ConfigDict) or part not in node:
                known = list(node.keys()) if isinstance(node, ConfigDict) else []
                near = difflib.get_close_matches(part, known, n=3)
                hint = (
                    f" Did you mean {', '.join('.'.join(parts[:i] + [n]) for n in near)}?"
                    if near
                    else ""
                )
                raise ValueError(f"{source}: unknown config key {key!r}.{hint}")
            if i < len(parts) - 1:
                node = node[part]
        old = node[parts[-1]]
        if text is not None:
            value = _text_for_key(old, value, text)
        value = _checked_value(old, value, key, source)
        with cfg.ignore_type():
            node[parts[-1]] = value


def _text_for_key(old: Any, parsed: Any, text: str) -> Any:
    """A command-line value read for a key whose current value is `old`: a bool key also takes
    `true` / `false` (absl's spelling); anything else is the parsed literal (a number or bool
    given for a string key is refused, not turned into text: quote it)."""
    if isinstance(old, bool) and text.lower() in ("true", "false"):
        return text.lower() == "true"
    return parsed


OVERRIDE_HELP = (
    "config overrides: --config.KEY=VALUE sets one dotted key of the config (repeat as needed), "
    "e.g. --config.train.batch_size=8 --config.data.root=/data/coco "
    "--config.train.decay_steps='(8, 11)'. VALUE is a Python literal, or text where it is not "
    "one (quote text that reads as a number); an unknown key or a wrong type is refused, "
    "naming the key."
)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Take the `--config.KEY=VALUE` (or `--config.KEY VALUE`) arguments out of `argv`.

    Returns `(the other arguments, ["KEY=VALUE", ...])`, the second for `load_config` /
    `apply_overrides`. Raises ValueError for a `--config.KEY` without a value."""
    rest: list[str] = []
    overrides: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--config."):
            key, eq, value = a[len("--config.") :].partition("=")
            if not eq:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise ValueError(f"{a}: an override needs a value ({a}=VALUE)")
                value = args[i + 1]
                i += 1
            overrides.append(f"{key}={value}")
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def parse_command_line(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[argparse.Namespace, list[str]]:
    """A command's arguments: `(parser's namespace, ["KEY=VALUE", ...])`, the overrides taken
    out first (`split_overrides`); a malformed override exits through `parser.error`."""
    try:
        rest, overrides = split_overrides(argv)
    except ValueError as e:
        parser.error(str(e))
    return parser.parse_args(rest), overrides


def eval_settings(batch_size: int = 8) -> ConfigDict:
    """Evaluation: global batch size over all devices (the last batch is padded)."""
    return ConfigDict(dict(batch_size=batch_size))


def teacher(model: ConfigDict, ckpt: str) -> ConfigDict:
    """A frozen teacher: its detector config and the orbax checkpoint made by
    `scripts/convert_torch_teacher.py` (or by a baseline training run's export)."""
    return ConfigDict(dict(model=model, ckpt=ckpt))


def fcos_model(
    depth: int = 50,
    num_classes: int = 80,
    tricks: bool = False,
    feat_channels: int = 256,
    stacked_convs: int = 4,
    fpn_channels: int = 256,
    num_groups: int = 32,
    frozen_stages: int = 1,
    style: str = "caffe",
    pixel_mean: Sequence[float] | None = None,
) -> ConfigDict:
    """mmdetection 2.x FCOS, `fcos_r50_caffe_fpn_gn-head` (`tricks=False`: exp regression, IoU
    loss, centerness on the cls tower, NMS 0.5) or the FGD student's
    `fcos_center-normbbox-giou_r50_caffe_fpn_gn-head` (`tricks=True`: centre sampling 1.5,
    regression / stride with ReLU, GIoU loss, bias in the tower convs, NMS 0.6; centerness
    stays on the cls tower, `centerness_on_reg=False` in that config). `depth=101` for the
    teacher. `fpn_channels`, `feat_channels`, `num_groups` shrink it for tests.

    `pixel_mean` (style 'caffe' only): the BGR mean in 0-255 units (std 1) the weights expect,
    mmdetection's `img_norm_cfg.mean`. Default by variant, as mmdetection 2.11's configs: plain
    (102.9801, 115.9465, 122.7717), tricks (103.53, 116.28, 123.675). The data pipeline's
    'caffe' style subtracts `CAFFE_PIXEL_MEAN` (= the tricks mean); the model adds
    `data_pixel_mean - pixel_mean` inside each image (see `fgd_jax.models.fcos`).
    Every other setting is the default of its module (`FCOSHead`, `FCOSTrainCfg`,
    `FCOSTestCfg` in `fgd_jax.models.fcos`)."""
    from fgd_jax.models.build import module_config
    from fgd_jax.models.fcos import FCOSHead, FCOSTestCfg, FCOSTrainCfg

    if style == "caffe":
        if pixel_mean is None:
            pixel_mean = CAFFE_PIXEL_MEAN if tricks else (102.9801, 115.9465, 122.7717)
        pixel_mean = tuple(float(v) for v in pixel_mean)
        data_pixel_mean = tuple(CAFFE_PIXEL_MEAN)
    elif pixel_mean is not None:
        raise ValueError(f"fcos_model: pixel_mean is for style 'caffe' (std 1), not {style!r}")
    else:
        data_pixel_mean = None
    # mmdetection's FCOS: `norm_cfg=dict(type='BN', requires_grad=False)` in the backbone
    backbone = resnet_backbone(
        depth=depth, style=style, frozen_stages=frozen_stages, norm_requires_grad=False
    )
    return ConfigDict(
        dict(
            type="fcos",
            num_classes=num_classes,
            backbone=backbone,
            neck=fpn_neck(
                in_channels=backbone_out_channels(backbone),
                out_channels=fpn_channels,
                start_level=1,
                add_extra_convs="on_output",
                num_outs=5,
                relu_before_extra_convs=True,
            ),
            head=module_config(
                FCOSHead,
                skip=("num_classes",),
                in_channels=fpn_channels,
                feat_channels=feat_channels,
                stacked_convs=stacked_convs,
                num_groups=num_groups,
                conv_bias=tricks,
                center_sampling=tricks,
                norm_on_bbox=tricks,
                loss_bbox="giou" if tricks else "iou",
            ),
            pixel_mean=pixel_mean,
            data_pixel_mean=data_pixel_mean,
            train_cfg=module_config(FCOSTrainCfg),
            test_cfg=module_config(FCOSTestCfg, iou_threshold=0.6 if tricks else 0.5),
        )
    )


def faster_rcnn_model(
    depth: int = 50,
    groups: int = 1,
    base_width: int = 64,
    num_classes: int = 80,
    fpn_channels: int = 256,
    rpn_feat_channels: int = 256,
    fc_out_channels: int = 1024,
    frozen_stages: int = 1,
    rpn_num: int = 256,
    rcnn_num: int = 512,
) -> ConfigDict:
    """mmdetection 2.x `faster_rcnn_r50_fpn` (R101 / X101 by `depth`, `groups`): FPN P2..P6
    (P6 by max-pool), RPN (scale 8, ratios 0.5/1/2, strides 4..64), RoIAlign 7x7 on P2..P5,
    Shared2FC head. `fpn_channels`, `rpn_feat_channels`, `fc_out_channels`, `rpn_num`,
    `rcnn_num` (sampler sizes) shrink it for the synthetic demo and tests. Every other setting
    is the default of its module (`RPNHead`, `StandardRoIHead` + `Shared2FCBBoxHead`,
    `FasterRCNNTrainCfg`, `FasterRCNNTestCfg` in `fgd_jax.models.faster_rcnn`)."""
    from fgd_jax.models.build import module_config
    from fgd_jax.models.faster_rcnn import (
        FasterRCNNTestCfg,
        FasterRCNNTrainCfg,
        RPNHead,
        Shared2FCBBoxHead,
        StandardRoIHead,
    )

    backbone = resnet_backbone(
        depth=depth, groups=groups, base_width=base_width, frozen_stages=frozen_stages
    )
    cfg = ConfigDict(
        dict(
            type="faster_rcnn",
            num_classes=num_classes,
            backbone=backbone,
            neck=fpn_neck(
                in_channels=backbone_out_channels(backbone),
                out_channels=fpn_channels,
                start_level=0,
                add_extra_convs=False,
                num_outs=5,
            ),
            rpn_head=module_config(
                RPNHead,
                skip=("num_anchors",),
                in_channels=fpn_channels,
                feat_channels=rpn_feat_channels,
            ),
            roi_head=module_config(StandardRoIHead, skip=("bbox_head",)),
            train_cfg=module_config(FasterRCNNTrainCfg),
            test_cfg=module_config(FasterRCNNTestCfg),
        )
    )
    cfg.roi_head.update(
        module_config(Shared2FCBBoxHead, skip=("num_classes",), fc_out_channels=fc_out_channels)
    )
    cfg.train_cfg.rpn.num = rpn_num
    cfg.train_cfg.rcnn.num = rcnn_num
    return cfg


def feature_teacher_model(
    depth: int = 101,
    groups: int = 32,
    base_width: int = 4,
    dcn: str | None = "DCN",
    stage_with_dcn: Sequence[bool] = (False, True, True, True),
    dcn_deform_groups: int = 1,
    fpn_channels: int = 256,
    start_level: int = 0,
    add_extra_convs: str | bool = False,
    num_outs: int = 5,
) -> ConfigDict:
    """A teacher that is only the backbone + FPN of an mmdetection detector (model type
    'features', `fgd_jax.models.feature_teacher`): FGD runs nothing else of the teacher. The
    defaults are `cascade_mask_rcnn_x101_32x4d_fpn_dconv_c3-c5_1x_coco`'s: ResNeXt-101 32x4d,
    `dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False)` in c3-c5, FPN P2..P6 (P6
    by max-pool)."""
    backbone = resnet_backbone(depth=depth, groups=groups, base_width=base_width)
    if dcn is not None:  # only then: a config without DCN keeps the keys it always had
        backbone.update(
            dcn=dcn, dcn_deform_groups=dcn_deform_groups, stage_with_dcn=tuple(stage_with_dcn)
        )
    return ConfigDict(
        dict(
            type="features",
            backbone=backbone,
            neck=fpn_neck(
                in_channels=backbone_out_channels(backbone),
                out_channels=fpn_channels,
                start_level=start_level,
                add_extra_convs=add_extra_convs,
                num_outs=num_outs,
            ),
        )
    )


def mask_rcnn_model(
    depth: int = 50,
    groups: int = 1,
    base_width: int = 64,
    num_classes: int = 80,
    fpn_channels: int = 256,
    rpn_feat_channels: int = 256,
    fc_out_channels: int = 1024,
    mask_channels: int = 256,
    frozen_stages: int = 1,
    rpn_num: int = 256,
    rcnn_num: int = 512,
) -> ConfigDict:
    """mmdetection 2.x `mask_rcnn_r50_fpn`: `faster_rcnn_model` plus `roi_head.mask_head`
    (`FCNMaskHead`: 4 conv3x3 of `mask_channels`, deconv x2, 28x28 per class; RoIAlign 14x14
    on P2..P5). Train with `data.with_mask=True` (the batch's mask grids)."""
    from fgd_jax.models.build import module_config
    from fgd_jax.models.mask_head import FCNMaskHead

    cfg = faster_rcnn_model(
        depth=depth,
        groups=groups,
        base_width=base_width,
        num_classes=num_classes,
        fpn_channels=fpn_channels,
        rpn_feat_channels=rpn_feat_channels,
        fc_out_channels=fc_out_channels,
        frozen_stages=frozen_stages,
        rpn_num=rpn_num,
        rcnn_num=rcnn_num,
    )
    cfg.type = "mask_rcnn"
    cfg.roi_head.mask_head = module_config(
        FCNMaskHead, skip=("num_classes",), conv_out_channels=mask_channels
    )
    return cfg


def gfl_model(
    depth: int = 50,
    num_classes: int = 80,
    feat_channels: int = 256,
    stacked_convs: int = 4,
    fpn_channels: int = 256,
    num_groups: int = 32,
    frozen_stages: int = 1,
) -> ConfigDict:
    """mmdetection 2.x `gfl_r50_fpn_1x_coco` (R101 by `depth`): pytorch-style ResNet, FPN
    P3..P7 with the extra convs on the FPN outputs (no ReLU), `GFLHead` (GN towers, reg_max
    16, QFL + GIoU 2.0 + DFL 0.25), ATSS top 9, NMS 0.6. `fpn_channels`, `feat_channels`,
    `stacked_convs`, `num_groups` shrink it for tests. Every other setting is the default of
    its module (`GFLHead`, `GFLTrainCfg`, `GFLTestCfg` in `fgd_jax.models.gfl`)."""
    from fgd_jax.models.build import module_config
    from fgd_jax.models.gfl import GFLHead, GFLTestCfg, GFLTrainCfg

    backbone = resnet_backbone(depth=depth, frozen_stages=frozen_stages)
    return ConfigDict(
        dict(
            type="gfl",
            num_classes=num_classes,
            backbone=backbone,
            neck=fpn_neck(
                in_channels=backbone_out_channels(backbone),
                out_channels=fpn_channels,
                start_level=1,
                add_extra_convs="on_output",
                num_outs=5,
            ),
            head=module_config(
                GFLHead,
                skip=("num_classes",),
                in_channels=fpn_channels,
                feat_channels=feat_channels,
                stacked_convs=stacked_convs,
                num_groups=num_groups,
            ),
            train_cfg=module_config(GFLTrainCfg),
            test_cfg=module_config(GFLTestCfg),
        )
    )


# YOLOX sizes: (deepen_factor, widen_factor), mmdetection's yolox_{s,m,l}_8x8_300e_coco.
YOLOX_SIZES = {"s": (0.33, 0.5), "m": (0.67, 0.75), "l": (1.0, 1.0)}


def yolox_model(
    size: str = "s",
    num_classes: int = 80,
    deepen_factor: float | None = None,
    widen_factor: float | None = None,
) -> ConfigDict:
    """mmdetection 2.x YOLOX (`yolox_{s,m,l}_8x8_300e_coco`): CSPDarknet, YOLOXPAFPN and
    YOLOXHead at `size` 's' (deepen 0.33, widen 0.5: neck 128 channels), 'm' (0.67 / 0.75:
    192) or 'l' (1.0 / 1.0: 256). `deepen_factor` / `widen_factor` override the size's (tiny
    test models). The neck's inputs are the backbone's C3..C5 channels, its output and the
    head's channels `int(256 * widen)`, its CSP blocks `round(3 * deepen)`. Every other setting
    is the default of its module (`CSPDarknet`, `YOLOXPAFPN`, `YOLOXHead`, `YOLOXTrainCfg`,
    `YOLOXTestCfg` in `fgd_jax.models`)."""
    from fgd_jax.models.build import module_config
    from fgd_jax.models.csp_darknet import CSPDarknet, csp_darknet_channels
    from fgd_jax.models.yolox import YOLOXHead, YOLOXTestCfg, YOLOXTrainCfg
    from fgd_jax.models.yolox_pafpn import YOLOXPAFPN

    if size not in YOLOX_SIZES:
        raise ValueError(f"yolox_model: size {size!r} not in {sorted(YOLOX_SIZES)}")
    deepen, widen = YOLOX_SIZES[size]
    deepen = deepen if deepen_factor is None else float(deepen_factor)
    widen = widen if widen_factor is None else float(widen_factor)
    backbone = module_config(CSPDarknet, deepen_factor=deepen, widen_factor=widen)
    backbone.type = "CSPDarknet"
    channels = int(256 * widen)
    return ConfigDict(
        dict(
            type="yolox",
            num_classes=num_classes,
            backbone=backbone,
            neck=module_config(
                YOLOXPAFPN,
                skip=("bn_train",),
                in_channels=csp_darknet_channels(widen, backbone.out_indices),
                out_channels=channels,
                num_csp_blocks=max(round(3 * deepen), 1),
            ),
            head=module_config(
                YOLOXHead,
                skip=("num_classes", "bn_train"),
                in_channels=channels,
                feat_channels=channels,
            ),
            train_cfg=module_config(YOLOXTrainCfg),
            test_cfg=module_config(YOLOXTestCfg),
        )
    )


def reppoints_model(
    depth: int = 50,
    num_classes: int = 80,
    groups: int = 1,
    base_width: int = 64,
    dcn: str | None = None,
    stage_with_dcn: Sequence[bool] = (False, True, True, True),
    feat_channels: int = 256,
    stacked_convs: int = 3,
    fpn_channels: int = 256,
    num_groups: int = 32,
    frozen_stages: int = 1,
) -> ConfigDict:
    """mmdetection 2.x `reppoints_moment_r50_fpn_gn-neck+head_2x_coco` (R101 by `depth`;
    `reppoints_moment_x101_fpn_dconv_c3-c5_gn-neck+head_2x_coco` with `depth=101, groups=32,
    base_width=4, dcn='DCN'`): pytorch-style ResNet / ResNeXt, FPN P3..P7 with GroupNorm
    (extra convs on the last backbone map), `RepPointsHead` (GN towers, 9 points, moment
    transform), PointAssigner / MaxIoUAssigner, NMS 0.5. `fpn_channels`, `feat_channels`,
    `stacked_convs`, `num_groups` shrink it for tests. Every other setting is the default of
    its module (`RepPointsHead`, `RepPointsTrainCfg` in `fgd_jax.models.reppoints`,
    `dense_heads.DenseTestCfg`)."""
    from fgd_jax.models.build import module_config
    from fgd_jax.models.dense_heads import DenseTestCfg
    from fgd_jax.models.reppoints import RepPointsHead, RepPointsTrainCfg

    backbone = resnet_backbone(
        depth=depth, groups=groups, base_width=base_width, frozen_stages=frozen_stages
    )
    if dcn is not None:
        backbone.update(dcn=dcn, dcn_deform_groups=1, stage_with_dcn=tuple(stage_with_dcn))
    return ConfigDict(
        dict(
            type="reppoints",
            num_classes=num_classes,
            backbone=backbone,
            neck=fpn_neck(
                in_channels=backbone_out_channels(backbone),
                out_channels=fpn_channels,
                start_level=1,
                add_extra_convs="on_input",
                num_outs=5,
                norm="gn",
                num_groups=num_groups,
            ),
            head=module_config(
                RepPointsHead,
                skip=("num_classes",),
                in_channels=fpn_channels,
                feat_channels=feat_channels,
                point_feat_channels=feat_channels,
                stacked_convs=stacked_convs,
                num_groups=num_groups,
            ),
            train_cfg=module_config(RepPointsTrainCfg),
            test_cfg=module_config(DenseTestCfg),
        )
    )


def solo_model(
    depth: int = 50,
    num_classes: int = 80,
    feat_channels: int = 256,
    stacked_convs: int = 7,
    fpn_channels: int = 256,
    num_groups: int = 32,
    frozen_stages: int = 1,
    num_grids: Sequence[int] = (40, 36, 24, 16, 12),
) -> ConfigDict:
    """mmdetection 2.x `solo_r50_fpn_1x_coco` (R101 by `depth`): pytorch-style ResNet, FPN
    P2..P6 (start_level 0, P6 by max-pool), `SOLOHead` (7 GN convs per branch, CoordConv,
    num_grids 40/36/24/16/12, Dice 3.0 + focal loss), matrix NMS. Train with
    `data.with_mask=True`. `fpn_channels`, `feat_channels`, `stacked_convs`, `num_groups`,
    `num_grids` shrink it for tests. Every other setting is the default of its module
    (`SOLOHead`, `SOLOTrainCfg`, `SOLOTestCfg` in `fgd_jax.models.solo`)."""
    from fgd_jax.models.build import module_config
    from fgd_jax.models.solo import SOLOHead, SOLOTestCfg, SOLOTrainCfg

    backbone = resnet_backbone(depth=depth, frozen_stages=frozen_stages)
    return ConfigDict(
        dict(
            type="solo",
            num_classes=num_classes,
            backbone=backbone,
            neck=fpn_neck(
                in_channels=backbone_out_channels(backbone),
                out_channels=fpn_channels,
                start_level=0,
                add_extra_convs=False,
                num_outs=5,
            ),
            head=module_config(
                SOLOHead,
                skip=("num_classes",),
                in_channels=fpn_channels,
                feat_channels=feat_channels,
                stacked_convs=stacked_convs,
                num_groups=num_groups,
                num_grids=tuple(num_grids),
            ),
            train_cfg=module_config(SOLOTrainCfg),
            test_cfg=module_config(SOLOTestCfg),
        )
    )
