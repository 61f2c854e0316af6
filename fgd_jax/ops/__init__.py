"""Pure `jnp` detection ops (no Flax, no configs), mmdetection 2.x semantics, static shapes.

Modules: `boxes` (IoU/IoF/GIoU, delta xywh coder, distance coder, clip/rescale), `anchors`
(AnchorGenerator layout, FCOS points), `assign` (MaxIoUAssigner), `sampling` (RandomSampler),
`nms` (tiled static-shape NMS), `losses` (focal, CE, L1, IoU/GIoU), `roi_align`, `dtypes`
(the float dtype ops compute in: float32, or float64 for float64 inputs under x64).
Import the modules, e.g. `from fgd_jax.ops import boxes, nms`.
"""

from fgd_jax.ops import anchors, assign, boxes, dtypes, losses, nms, roi_align, sampling

__all__ = ["anchors", "assign", "boxes", "dtypes", "losses", "nms", "roi_align", "sampling"]
