"""Where a split's records come from: a COCO json on disk, the generated shapes set, or tfds.

`load_split` reads the split a `coco_data()` / `shapes_data()` config names (every key it
reads is defined by those factories, `fgd_jax.config.complete_data_config` fills the ones an
older saved config lacks). The records are plain dicts (see `fgd_jax.data.coco`).
"""

from __future__ import annotations

import os
from typing import Any

from fgd_jax.config import complete_data_config
from fgd_jax.data.coco import CocoRecords, load_coco_records

SOURCES = ("coco", "shapes", "tfds")


def load_split(data_cfg: Any, train: bool) -> CocoRecords:
    """Records of the train or val split named by a `coco_data` / `shapes_data` config.

    The shapes dataset is generated on first use (`fgd_jax.data.shapes.make_shapes_dataset`);
    `tfds` reads `coco/2017` through tensorflow-datasets (`fgd_jax.data.tfds_source`).
    """
    cfg = complete_data_config(data_cfg)
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {cfg.source!r}")
    if cfg.source == "tfds":
        if cfg.with_mask:
            raise ValueError("data.with_mask: the tfds source carries no segmentations")
        from fgd_jax.data.tfds_source import load_tfds_records

        return load_tfds_records(cfg, train=train)
    if cfg.source == "shapes":
        ensure_shapes_dataset(cfg)
    root = os.fspath(cfg.root)
    return load_coco_records(
        os.path.join(root, cfg.train_ann if train else cfg.val_ann),
        os.path.join(root, cfg.train_images if train else cfg.val_images),
        filter_empty=train,
        min_size=int(cfg.min_size),
        # mmdetection filter_empty_gt=False (YOLOX): images without GT train too
        keep_empty=not bool(cfg.filter_empty_gt),
        on_bad_image=cfg.on_bad_image,
        on_unknown_category=cfg.on_unknown_category,
        with_mask=bool(cfg.with_mask),
        on_bad_mask=cfg.on_bad_mask,
    )


def ensure_shapes_dataset(data_cfg: Any) -> dict[str, str]:
    """Generate (or reuse) the synthetic set a `shapes_data` config names, under
    `data_cfg.root`: variant, sizes, seed and smallest shape from the config. Returns its
    paths."""
    from fgd_jax.data import shapes

    cfg = complete_data_config(data_cfg)
    image_size = cfg.image_size
    if isinstance(image_size, list | tuple):
        image_size = tuple(image_size)
    return shapes.make_shapes_dataset(
        os.fspath(cfg.root),
        num_train=int(cfg.num_train),
        num_val=int(cfg.num_val),
        image_size=image_size,
        seed=int(cfg.shapes_seed),
        min_size=cfg.shapes_min_size,
        variant=str(cfg.shapes_variant),
    )


def check_num_classes(records: CocoRecords, num_classes: int) -> None:
    """Raise ValueError when the split's category count differs from the model's classes.

    A model with fewer classes than the data would see labels beyond its outputs as
    background (one-hot of an out-of-range label is all zeros): silently wrong training.
    """
    if records.num_classes != int(num_classes):
        raise ValueError(
            f"{records.ann_file}: {records.num_classes} categories "
            f"({', '.join(records.class_names[:12])}"
            f"{', ...' if records.num_classes > 12 else ''}) but model.num_classes="
            f"{int(num_classes)}; set --config.model.num_classes={records.num_classes} or use "
            "the matching annotation file"
        )
