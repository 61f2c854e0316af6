"""Data: COCO / tfds / synthetic shapes sources, mmdetection transforms, grain loaders.

Batches follow docs/contracts.md; see `pipeline` for the design.
"""

from fgd_jax.data.coco import CocoRecords, load_coco_records, read_coco_json
from fgd_jax.data.masks import BadMaskError
from fgd_jax.data.pipeline import (
    DetectionLoader,
    build_eval_loader,
    build_train_loader,
    load_split,
)
from fgd_jax.data.shapes import CLASS_NAMES as SHAPES_CLASS_NAMES
from fgd_jax.data.shapes import make_shapes_dataset
from fgd_jax.data.transforms import BadImageError

__all__ = [
    "BadImageError",
    "BadMaskError",
    "CocoRecords",
    "DetectionLoader",
    "SHAPES_CLASS_NAMES",
    "build_eval_loader",
    "build_train_loader",
    "load_coco_records",
    "load_split",
    "make_shapes_dataset",
    "read_coco_json",
]
