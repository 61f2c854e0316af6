"""PyTorch checkpoints <-> Flax variables (mmdetection and torchvision layouts).

- `import_torch_checkpoint(path_or_state_dict, model_cfg)`: a detector's variables.
- `convert_state_dict(state_dict, target)`: any module, given its target shapes.
- `export_torch_state_dict(variables)`: mmdetection-named numpy state dict (exact inverse).

Layouts: 'mmdet' (`backbone.*`, `neck.*`, heads), 'torchvision' detection models
(`backbone.body.*`, `backbone.fpn.*`, heads renamed by `fgd_jax.convert.torchvision_<type>`'s
`RENAME_RULES`), and 'classification' (ImageNet backbone checkpoints with top-level `conv1`,
`layer1.0...`, `fc.*`; load these with `strict=False`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from fgd_jax.convert.core import (
    ConversionReport,
    Rename,
    RenameRules,
    convert_state_dict,
    export_state_dict,
    make_renamer,
    module_path,
    torch_module_name,
)
from fgd_jax.convert.torch_io import UnsafeCheckpointError, load_torch_file
from fgd_jax.convert.torchvision_backbone import (
    CLASSIFICATION_BACKBONE_RULES,
    DETECTION_BACKBONE_RULES,
    fpn_rules,
)

__all__ = [
    "ConversionReport",
    "UnsafeCheckpointError",
    "convert_state_dict",
    "detect_layout",
    "detector_variable_shapes",
    "export_torch_state_dict",
    "import_backbone_weights",
    "import_torch_checkpoint",
    "load_torch_file",
    "make_renamer",
    "module_path",
    "torch_module_name",
    "torchvision_rules",
]


# A feature teacher (model type 'features': backbone + FPN of any mmdetection detector) takes
# `backbone.*` and `neck.*` strictly; every other key (heads, e.g. a Cascade Mask R-CNN's
# `rpn_head.*`, `roi_head.*`) is dropped by name and listed in the report's `dropped`.
FEATURE_TEACHER_RULES: RenameRules = ((r"^(?!backbone\.|neck\.)", None),)


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """'torchvision' (detection), 'classification' (top-level ResNet) or 'mmdet'."""
    keys = list(state_dict)
    if any(k.startswith("backbone.body.") for k in keys):
        return "torchvision"
    if any(k.startswith(("conv1.", "layer1.")) for k in keys):
        return "classification"
    return "mmdet"


def torchvision_rules(model_cfg: ml_collections.ConfigDict) -> RenameRules:
    """Backbone + FPN rules, plus `fgd_jax.convert.torchvision_<model_cfg.type>.RENAME_RULES`
    for the heads when that module exists."""
    rules = list(DETECTION_BACKBONE_RULES)
    neck = model_cfg.get("neck")
    if neck is not None:
        n_levels = len(neck.in_channels) - int(neck.get("start_level", 0))
        rules += fpn_rules(n_levels)
    name = f"fgd_jax.convert.torchvision_{model_cfg.type}"
    try:
        head = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
    else:
        rules += list(head.RENAME_RULES)
    return tuple(rules)


def detector_variable_shapes(model_cfg: ml_collections.ConfigDict) -> Any:
    """The variables' shapes and dtypes of `build_detector(model_cfg)` (nothing is computed):
    `fgd_jax.models.variable_shapes`."""
    from fgd_jax.models import build_detector, variable_shapes

    return variable_shapes(build_detector(model_cfg))


def _torchvision_module_attr(model_cfg: ml_collections.ConfigDict, name: str) -> Any:
    """`fgd_jax.convert.torchvision_<type>.<name>` if that module and attribute exist."""
    try:
        module = importlib.import_module(f"fgd_jax.convert.torchvision_{model_cfg.type}")
    except ModuleNotFoundError:
        return None
    return getattr(module, name, None)


def _mmdet_rules(model_cfg: ml_collections.ConfigDict) -> RenameRules | None:
    """`fgd_jax.convert.mmdet_<type>.RENAME_RULES` for an mmdetection checkpoint of a detector
    whose checkpoints carry keys the generic rule does not map (YOLOX's EMA buffers); None
    (the generic rule alone) for the others."""
    name = f"fgd_jax.convert.mmdet_{model_cfg.get('type')}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        return None
    return tuple(module.RENAME_RULES)


def import_torch_checkpoint(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    model_cfg: ml_collections.ConfigDict,
    *,
    prefix: str | None = None,
    strict: bool = True,
    rename: Rename = None,
    init_variables: Any = None,
    return_report: bool = False,
) -> dict | tuple[dict, ConversionReport]:
    """Detector variables `{'params': ..., 'batch_stats': ...}` from a torch checkpoint.

    Args:
      path_or_state_dict: a `.pth` path (read safely, see `load_torch_file`) or a state dict.
      model_cfg: the detector config (`build_detector(model_cfg)` gives the target shapes).
      prefix: take only keys under it (e.g. 'student.'); removed before matching.
      strict: see `convert_state_dict`. Use `strict=False` for ImageNet backbone weights, with
        `init_variables` (initialized detector variables) to keep the leaves not loaded.
      rename: extra rules/callable; default: chosen by the detected layout (and, for an
        mmdetection checkpoint into a 'features' model, `FEATURE_TEACHER_RULES`).
    """
    if isinstance(path_or_state_dict, Mapping):
        state_dict = dict(path_or_state_dict)
    else:
        state_dict = load_torch_file(path_or_state_dict)
    state_dict = strip_data_parallel_prefix(state_dict)
    if prefix:
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise ValueError(f"checkpoint has no key under the prefix {prefix!r}")
    if rename is None:
        layout = detect_layout(state_dict)
        if layout == "torchvision":
            rename = torchvision_rules(model_cfg)
            # Some torchvision heads need array surgery before renaming (Faster R-CNN's
            # background-first classifier): `torchvision_<type>.prepare_state_dict`.
            prepare = _torchvision_module_attr(model_cfg, "prepare_state_dict")
            if prepare is not None:
                state_dict = prepare(state_dict)
        elif layout == "classification":
            rename = CLASSIFICATION_BACKBONE_RULES
        elif model_cfg.get("type") == "features":
            rename = FEATURE_TEACHER_RULES
        else:
            rename = _mmdet_rules(model_cfg)
    target = init_variables if init_variables is not None else detector_variable_shapes(model_cfg)
    return convert_state_dict(
        state_dict, target, rename=rename, strict=strict, return_report=return_report
    )


def strip_data_parallel_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the `module.` every key carries when saved from `nn.DataParallel` /
    `DistributedDataParallel` (only when *every* key has it)."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def import_backbone_weights(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    model_cfg: ml_collections.ConfigDict,
    init_variables: Any,
) -> dict:
    """Detector variables with the backbone from a pretrained checkpoint (an ImageNet
    classification ResNet, or a whole detector) and every other leaf from `init_variables`.

    Strict where it matters: every backbone leaf (`params/backbone/...`,
    `batch_stats/backbone/...`) must be filled from the file, else ValueError naming the file
    and the leaves; keys outside the backbone (`fc.*`, a detector's neck and heads) are
    skipped. (A loose load that fills nothing would train from scratch without a word.)
    """
    out, report = import_torch_checkpoint(
        path_or_state_dict,
        model_cfg,
        strict=False,
        init_variables=init_variables,
        return_report=True,
    )
    is_path = isinstance(path_or_state_dict, str | os.PathLike)
    where = path_or_state_dict if is_path else "state dict"
    missing = [k for k in report.missing if k.split("/")[1:2] == ["backbone"]]
    if missing:
        listed = ConversionReport(missing=missing).problems(strict=True)  # capped per kind
        raise ValueError(
            f"{os.fspath(where)}: backbone weights not found for {len(missing)} of the "
            f"backbone's leaves ({len(report.loaded)} keys loaded; is it a ResNet of the config's "
            f"depth/groups, in the torchvision, mmdetection or classification layout?):\n"
            + "\n".join(listed)
        )
    return out


def export_torch_state_dict(
    variables: Mapping, model_cfg: ml_collections.ConfigDict | None = None
) -> dict[str, np.ndarray]:
    """mmdetection-named `{key: np.ndarray}`; with `model_cfg`, first checks that `variables`
    have exactly the detector's leaves and shapes (clear error otherwise)."""
    out = export_state_dict(variables)
    if model_cfg is not None:
        convert_state_dict(out, detector_variable_shapes(model_cfg), strict=True)
        if model_cfg.get("type") == "gfl":
            # GFL's `Integral` buffer (bins 0..reg_max), which mmdetection's state dict holds
            reg_max = int(model_cfg.head.reg_max)
            out["bbox_head.integral.project"] = np.arange(reg_max + 1, dtype=np.float32)
    return out
