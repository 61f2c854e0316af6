"""A PyTorch FGD distiller checkpoint (yzd-v/FGD `DetectionDistiller`) -> our variables.

The original saves one state dict with `student.*` (the student detector, mmdetection names),
`teacher.*` (the frozen teacher, when it was not excluded) and
`distill_losses.loss_fgd_fpn_{i}.*` (the FGD modules' convs and LayerNorms). Each part is
converted strictly with the generic mmdetection rule, so a run started in PyTorch can be
evaluated here (`student`), continued (`student` + `distill_losses` as the trained
parameters, `teacher` as the frozen one), or its teacher reused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fgd_jax.convert import convert_state_dict, import_torch_checkpoint, load_torch_file


def _fgd_target(distill_cfg: ml_collections.ConfigDict) -> Any:
    """Shapes of the FGD parameters (they do not depend on the feature map size)."""
    from fgd_jax.distill.distiller import build_distill_losses

    n, cs, ct = distill_cfg.num_levels, distill_cfg.student_channels, distill_cfg.teacher_channels
    fs = tuple(jax.ShapeDtypeStruct((1, 4, 4, cs), jnp.float32) for _ in range(n))
    ft = tuple(jax.ShapeDtypeStruct((1, 4, 4, ct), jnp.float32) for _ in range(n))
    batch = dict(
        boxes=jax.ShapeDtypeStruct((1, 1, 4), jnp.float32),
        valid=jax.ShapeDtypeStruct((1, 1), jnp.bool_),
        img_shape=jax.ShapeDtypeStruct((1, 2), jnp.int32),
        pad_shape=jax.ShapeDtypeStruct((1, 2), jnp.int32),
    )
    module = build_distill_losses(distill_cfg)
    return jax.eval_shape(lambda a, b, c: module.init(jax.random.key(0), a, b, c), fs, ft, batch)


def import_distiller_checkpoint(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any], cfg: ml_collections.ConfigDict
) -> dict:
    """Variables of every part of a PyTorch FGD distiller checkpoint.

    Args:
      path_or_state_dict: the `.pth` (read without running code) or its state dict.
      cfg: an FGD config (`model` = student, `teacher.model`, `distill`).
    Returns:
      `{'student': variables, 'distill_losses': params, 'teacher': variables or None}`; the
      first two together are the `params` of our distillation train state.
    Raises:
      ValueError naming the part and its missing / unexpected / wrongly shaped keys.
    """
    sd = (
        dict(path_or_state_dict)
        if isinstance(path_or_state_dict, Mapping)
        else load_torch_file(path_or_state_dict)
    )
    if not any(k.startswith("student.") for k in sd):
        raise ValueError("not an FGD distiller checkpoint: no 'student.*' keys")
    out: dict[str, Any] = {}
    try:
        out["student"] = import_torch_checkpoint(sd, cfg.model, prefix="student.")
    except ValueError as e:
        raise ValueError(f"student part: {e}") from e
    if any(k.startswith("teacher.") for k in sd):
        try:
            out["teacher"] = import_torch_checkpoint(sd, cfg.teacher.model, prefix="teacher.")
        except ValueError as e:
            raise ValueError(f"teacher part: {e}") from e
    else:
        out["teacher"] = None
    try:
        fgd = convert_state_dict(sd, _fgd_target(cfg.distill), prefix="distill_losses.")
    except ValueError as e:
        raise ValueError(f"distill_losses part: {e}") from e
    out["distill_losses"] = fgd["params"]
    return out
