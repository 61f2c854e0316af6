"""Flax models: backbones, necks, detectors, and the trainable-parameter mask.

`build_detector(model_cfg)` dispatches on `model_cfg.type` ('retinanet', 'fcos',
'faster_rcnn', 'gfl'); the detector modules are imported lazily. Each detector builds its parts from
the model config's groups with `fgd_jax.models.build.build_module`: the defaults are the
fields of its modules (heads) and settings dataclasses (`train_cfg`, `test_cfg`).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from fgd_jax.models.fpn import FPN, build_neck
from fgd_jax.models.resnet import ResNet, backbone_trainable_mask, build_backbone

# model type -> (module, class); each class has `from_config(model_cfg)`.
DETECTORS: dict[str, tuple[str, str]] = {
    "retinanet": ("fgd_jax.models.retinanet", "RetinaNet"),
    "fcos": ("fgd_jax.models.fcos", "FCOS"),
    "faster_rcnn": ("fgd_jax.models.faster_rcnn", "FasterRCNN"),
    # backbone + FPN only: a feature teacher for FGD (no heads, no predict)
    "features": ("fgd_jax.models.feature_teacher", "FeatureTeacher"),
    "mask_rcnn": ("fgd_jax.models.mask_rcnn", "MaskRCNN"),
    "gfl": ("fgd_jax.models.gfl", "GFL"),
    "yolox": ("fgd_jax.models.yolox", "YOLOX"),
    "reppoints": ("fgd_jax.models.reppoints", "RepPoints"),
    "solo": ("fgd_jax.models.solo", "SOLO"),
}

__all__ = [
    "DETECTORS",
    "FPN",
    "INIT_COMPILER_OPTIONS",
    "ResNet",
    "build_backbone",
    "build_detector",
    "build_neck",
    "init_module",
    "trainable_mask",
    "variable_shapes",
]

# Side of the square image `variable_shapes` initializes on: a multiple of the largest FPN
# stride (128), so every level has at least one cell. Variable shapes do not depend on it.
SHAPE_IMAGE_SIZE = 128


def build_detector(model_cfg: ml_collections.ConfigDict, dtype: Any = None) -> nn.Module:
    """The detector module for `model_cfg` (e.g. `fgd_jax.config.retinanet_model()`).

    `dtype`: compute dtype (e.g. `jnp.bfloat16` for mixed precision on GPUs); parameters stay
    float32 and the heads return float32 outputs, so losses are computed in float32."""
    kind = model_cfg.get("type") if hasattr(model_cfg, "get") else None
    if kind not in DETECTORS:
        raise ValueError(
            f"model config: unknown detector type {kind!r}; expected one of {sorted(DETECTORS)}"
        )
    module_name, cls_name = DETECTORS[kind]
    module = importlib.import_module(module_name)
    return getattr(module, cls_name).from_config(model_cfg, dtype=dtype)


def variable_shapes(module: nn.Module) -> Any:
    """Shapes and dtypes (`jax.ShapeDtypeStruct`) of every variable of a detector `module`
    (`{'params': ..., 'batch_stats': ...}`), from `jax.eval_shape` of its init on one
    `[1, SHAPE_IMAGE_SIZE, SHAPE_IMAGE_SIZE, 3]` float32 image; nothing is computed. The one
    place the converter, the export check and the teacher loading get expected shapes from."""
    image = jax.ShapeDtypeStruct((1, SHAPE_IMAGE_SIZE, SHAPE_IMAGE_SIZE, 3), jax.numpy.float32)
    return jax.eval_shape(lambda x: module.init(jax.random.key(0), x), image)


# XLA options for compiling a module's `init`: the LLVM backend at optimization level 0. An
# init runs once and is mostly random-number code (threefry), whose compile dominates: a tiny
# RetinaNet R18's init compiles in ~4 s instead of ~20 s on a CPU core, with the same values
# to float rounding (the normal/uniform transforms may round differently, as eager vs jit do).
INIT_COMPILER_OPTIONS: dict[str, Any] = {"xla_backend_optimization_level": 0}


def init_module(module: nn.Module, rng: jax.Array, *args: Any, **kwargs: Any) -> Any:
    """`module.init(rng, *args, **kwargs)`, jitted and compiled for a one-off call
    (`INIT_COMPILER_OPTIONS`): the fast way to initialize a detector, head or loss module.
    Keyword arguments are static (e.g. `train=False`); positional ones are traced. Called
    under a trace (`jax.eval_shape`, an outer `jit`), it is a plain `module.init`: the outer
    computation is compiled as a whole, and XLA takes compiler options only at the top."""
    if _tracing(rng, *args):
        return module.init(rng, *args, **kwargs)
    fn = functools.partial(module.init, **kwargs)
    return jax.jit(fn, compiler_options=INIT_COMPILER_OPTIONS)(rng, *args)


def _tracing(*args: Any) -> bool:
    """True inside a JAX transformation (eval_shape, jit, grad, ...) or for traced inputs."""
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
        return True
    try:
        from jax._src import core as jax_core  # no public API says "a trace is active"

        return not jax_core.trace_state_clean()
    except (ImportError, AttributeError):  # pragma: no cover - a later JAX moved it
        return False


def _frozen_stages(cfg: ml_collections.ConfigDict | int | None) -> int:
    if cfg is None:
        return -1
    if isinstance(cfg, int):
        return cfg
    if "backbone" in cfg:
        return int(cfg.backbone.frozen_stages)
    if "frozen_stages" in cfg:
        return int(cfg.frozen_stages)
    raise ValueError("trainable_mask: config has neither backbone.frozen_stages nor frozen_stages")


def trainable_mask(params: Any, cfg: ml_collections.ConfigDict | int | None) -> Any:
    """Pytree of bools shaped like `params`: False for leaves the optimizer must not move.

    Args:
      params: a detector's 'params' collection (frozen leaves under `params['backbone']`) or
        a bare backbone's params (top-level `conv1`, `layer1_0`, ...).
      cfg: a model config (uses `backbone.frozen_stages` and `backbone.norm_requires_grad`),
        a backbone config, or an int (frozen stages).
    Use with e.g. `optax.masked(optax.add_decayed_weights(wd), mask)` and
    `optax.masked(sgd, mask)` / zeroed updates, so neither the gradient nor weight decay
    moves frozen parameters.
    """
    frozen = _frozen_stages(cfg)
    bb_cfg = cfg.get("backbone", cfg) if isinstance(cfg, ml_collections.ConfigDict) else None
    norm_grad = bool(bb_cfg.get("norm_requires_grad", True)) if bb_cfg is not None else True
    if "params" in params and "backbone" not in params and "conv1" not in params:
        raise ValueError("trainable_mask: pass the 'params' collection, not the variables dict")
    if "backbone" in params:
        return {
            k: (
                backbone_trainable_mask(v, frozen, norm_grad)
                if k == "backbone"
                else jax.tree_util.tree_map(lambda _: True, v)
            )
            for k, v in params.items()
        }
    return backbone_trainable_mask(params, frozen, norm_grad)
