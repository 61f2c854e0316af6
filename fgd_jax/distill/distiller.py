"""The FGD distiller: a frozen teacher, a trained student, one FGD loss per FPN level.

Mirrors the original `DetectionDistiller` (yzd-v/FGD, mmdet/distillation/distillers):
- the teacher runs `extract_feat` in eval mode under `stop_gradient`; its variables live
  outside the trained parameters, so no optimizer state is ever made for them;
- the student runs its normal `forward_train` (detector losses) and exposes its FPN outputs,
  which are exactly the outputs of the hooked `neck.fpn_convs.{i}.conv` modules;
- `loss_fgd_fpn_{i}` compares student level i with teacher level i.

Trained parameters are `{'student': <student params>, 'distill_losses': {'loss_fgd_fpn_i':
...}}`, the same top-level names as the PyTorch distiller's state dict (`student.*`,
`distill_losses.loss_fgd_fpn_i.*`), so its checkpoints convert with the generic rule.

Variants (`DistillLosses.variant`), after the original's branches:
- 'master' (default): the paper's RetinaNet / FCOS / Faster R-CNN code, as above.
- 'yolox': the original's `yolox` branch (config `fgd_yoloxl_distill_yoloxm_coco`): the
  distilled maps are the YOLOX neck's `out_convs.{0,1,2}` (after BN + Swish; what a YOLOX
  detector's `forward_train` returns as features), and every level's `FeatureLoss` gets the
  batch resize factors of YOLOX's multi-scale training, `FeatureLoss(S, T, gt, scale_y,
  scale_x, img_metas)`: boxes mapped with `x / img_w * W / scale_x` and the loss divided by
  `scale_x * scale_y` (`FGDLoss(input_scale=...)`). The factors come from the batch's
  optional `input_scale` [B, 2] (scale_y, scale_x; every row the same, one size per batch as
  the original; the trainer fills it with `train.multiscale_sizes`, see
  `fgd_jax.experiment.resize_batch`); without it they are 1. The branch's other
  differences are settings (`config.yolox_fgd_distill`): its weights, no inheriting
  (`init_student=False`) and the teacher's BatchNorm on batch statistics
  (`teacher_bn='train'`, see `teacher_features`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax.traverse_util import flatten_dict, unflatten_dict

from fgd_jax.distill.fgd import FGDLoss
from fgd_jax.models.build import build_module
from fgd_jax.ops.dtypes import float_dtype

Array = jax.Array
log = logging.getLogger(__name__)

# Top-level detector parts the inheriting strategy does NOT copy from the teacher (the student
# keeps its own backbone; every other part, neck and heads, is copied).
NOT_INHERITED = ("backbone",)
# Keys of a `fgd_distill` config read by the training run, not by `DistillLosses`.
DISTILLER_KEYS = ("init_student", "inherit_allow_missing", "teacher_bn")
# `DistillLosses.variant` values (the original's branches) and `teacher_bn` modes.
VARIANTS = ("master", "yolox")
TEACHER_BN = ("eval", "train")


_FGD = FGDLoss(student_channels=256, teacher_channels=256)  # its field defaults


class DistillLosses(nn.Module):
    """One `FGDLoss` per distilled FPN level (the first `num_levels`), named
    `loss_fgd_fpn_{i}` as in the original; the other fields are `FGDLoss`'s, with its
    defaults (the original `FeatureLoss` defaults). `variant`: 'master' or 'yolox' (the
    module docstring)."""

    num_levels: int = 5
    student_channels: int = _FGD.student_channels
    teacher_channels: int = _FGD.teacher_channels
    temp: float = _FGD.temp
    alpha_fgd: float = _FGD.alpha_fgd
    beta_fgd: float = _FGD.beta_fgd
    gamma_fgd: float = _FGD.gamma_fgd
    lambda_fgd: float = _FGD.lambda_fgd
    box_scale: str = _FGD.box_scale
    variant: str = "master"

    @nn.compact
    def __call__(
        self,
        feats_s: tuple[Array, ...],
        feats_t: tuple[Array, ...],
        batch: Mapping[str, Array],
    ) -> dict[str, Array]:
        """Returns `loss_fgd_fpn_{i}` (weighted total of level i) and its unweighted parts
        `loss_fgd_fpn_{i}/{fg,bg,mask,relation}` for logging."""
        if len(feats_s) < self.num_levels or len(feats_t) < self.num_levels:
            raise ValueError(
                f"FGD distills {self.num_levels} levels but the student gives {len(feats_s)} "
                f"and the teacher {len(feats_t)} feature maps"
            )
        if self.variant not in VARIANTS:
            raise ValueError(f"distill.variant must be one of {VARIANTS}, got {self.variant!r}")
        input_scale = None
        if self.variant == "yolox":
            if "input_scale" in batch:  # one (scale_y, scale_x) for the batch: row 0's
                input_scale = jnp.asarray(batch["input_scale"])[0]
            else:
                input_scale = jnp.ones((2,), jnp.float32)
        out: dict[str, Array] = {}
        for i in range(self.num_levels):
            name = f"loss_fgd_fpn_{i}"
            parts = FGDLoss(
                student_channels=self.student_channels,
                teacher_channels=self.teacher_channels,
                temp=self.temp,
                alpha_fgd=self.alpha_fgd,
                beta_fgd=self.beta_fgd,
                gamma_fgd=self.gamma_fgd,
                lambda_fgd=self.lambda_fgd,
                box_scale=self.box_scale,
                name=name,
            )(
                # FGD in float32 under mixed precision (float64 in a float64 run)
                feats_s[i].astype(float_dtype(feats_s[i])),
                feats_t[i].astype(float_dtype(feats_t[i])),
                batch["boxes"],
                batch["valid"],
                batch["img_shape"],
                batch["pad_shape"],
                **({} if input_scale is None else {"input_scale": input_scale}),
            )
            out[name] = parts["loss"]
            for part in ("fg", "bg", "mask", "relation"):
                out[f"{name}/{part}"] = parts[part]
        return out


class FGDDistiller(nn.Module):
    """Student detector + FGD losses. The teacher's features come in as an argument.

    Attributes:
      student: a detector module (docs/contracts.md API).
      distill: the `fgd_jax.config.fgd_distill` ConfigDict.
    """

    student: nn.Module
    distill: Any

    def setup(self) -> None:
        self.distill_losses = build_distill_losses(self.distill)

    def __call__(
        self, batch: Mapping[str, Array], teacher_feats: tuple[Array, ...], train: bool = True
    ) -> dict[str, Array]:
        """All losses of one distillation step (scalars): the student's detector losses
        (`loss_cls`, `loss_bbox`, ...), `loss_fgd_fpn_{i}` and their parts (names with a `/`,
        logged but not summed)."""
        losses, feats_s = self.student.forward_train(batch, train=train)
        losses = dict(losses)
        losses.update(self.distill_losses(tuple(feats_s), tuple(teacher_feats), batch))
        return losses


def total_loss(losses: Mapping[str, Array]) -> Array:
    """Sum of the loss terms that train: every `loss*` key without a `/` (parts are logs)."""
    terms = [v for k, v in losses.items() if k.startswith("loss") and "/" not in k]
    dt = float_dtype(*terms)
    return jnp.sum(jnp.stack([jnp.asarray(t, dt) for t in terms]))


def teacher_features(
    teacher: nn.Module, teacher_vars: Mapping, images: Array, bn: str = "eval"
) -> tuple[Array, ...]:
    """The frozen teacher's FPN maps, no gradient (the original's `torch.no_grad`).

    `bn` (a config's `distill.teacher_bn`): 'eval' (the master branch: `teacher.eval()` every
    step) runs the teacher in eval mode; 'train' (the `yolox` branch, which never calls
    `teacher.eval()`, so mmcv's `runner.train()` leaves the teacher in train mode) runs it
    with `train=True`: BatchNorm layers that train on batch statistics (e.g. YOLOX's) normalize
    with the statistics of this batch. Those layers' running statistics are not updated
    (`teacher_vars` stays as given): the original's torch BN does update the teacher's
    buffers, but nothing reads them again (the teacher always runs in train mode, evaluation
    runs the student, `pth_transfer.py` drops the teacher), so the training is the same.
    """
    if bn not in TEACHER_BN:
        raise ValueError(f"distill.teacher_bn must be one of {TEACHER_BN}, got {bn!r}")
    if bn == "eval":
        feats = teacher.apply(teacher_vars, images, train=False, method="extract_feat")
    else:
        feats, _ = teacher.apply(
            teacher_vars, images, train=True, method="extract_feat", mutable=["batch_stats"]
        )
    return tuple(jax.lax.stop_gradient(f) for f in feats)


def inherit_from_teacher(
    student_params: Mapping, teacher_params: Mapping, allow_missing: Sequence[str] = ()
) -> tuple[dict, list[str]]:
    r"""The inheriting strategy (`init_student=True`): copy every non-backbone teacher
    parameter (neck, heads) into the student, leaf by leaf.

    Args:
      allow_missing: regexes of '/'-joined student leaf paths that may be absent from the
        teacher and keep their own init (e.g. `r"bbox_head/.*_convs_\d+/conv/bias$"` for an
        FCOS student with tower biases under a plain teacher, which the original loads
        non-strictly). Everything else must match exactly.
    Returns the new student params and the '/'-joined paths copied. Raises ValueError listing
    every student leaf the teacher lacks, every extra teacher leaf and every shape mismatch,
    instead of the silent partial load of PyTorch's non-strict `load_state_dict`.
    """
    patterns = [re.compile(p) for p in allow_missing]
    s_flat = flatten_dict(dict(student_params))
    t_flat = {
        k: v for k, v in flatten_dict(dict(teacher_params)).items() if k[0] not in NOT_INHERITED
    }
    s_rest = {k for k in s_flat if k[0] not in NOT_INHERITED}
    missing_all = sorted("/".join(k) for k in s_rest - t_flat.keys())
    missing = [m for m in missing_all if not any(p.search(m) for p in patterns)]
    extra = sorted("/".join(k) for k in t_flat.keys() - s_rest)
    shape = sorted(
        f"{'/'.join(k)}: student {tuple(s_flat[k].shape)} vs teacher {tuple(t_flat[k].shape)}"
        for k in s_rest & t_flat.keys()
        if tuple(s_flat[k].shape) != tuple(t_flat[k].shape)
    )
    if missing or extra or shape:
        lines = ["inheriting the teacher's neck and heads failed (student and teacher differ):"]
        lines += [f"  missing in teacher: {m}" for m in missing]
        lines += [f"  only in teacher: {e}" for e in extra]
        lines += [f"  shape mismatch: {s}" for s in shape]
        raise ValueError("\n".join(lines))
    copied = sorted(s_rest & t_flat.keys())
    for k in copied:
        # a copy: the student's buffers are donated to the train step, the teacher's are not
        s_flat[k] = jnp.array(t_flat[k], dtype=s_flat[k].dtype, copy=True)
    log.info(
        "inherited %d teacher leaves (neck and heads) into the student; %d kept their init",
        len(copied),
        len(missing_all),
    )
    return unflatten_dict(s_flat), ["/".join(k) for k in copied]


def build_distill_losses(d: ml_collections.ConfigDict) -> DistillLosses:
    """The FGD losses of every distilled level from a `fgd_distill` config (its keys other
    than the distiller's own, `DISTILLER_KEYS`, are `DistillLosses` fields)."""
    return build_module(DistillLosses, d, "distill", ignore=DISTILLER_KEYS)


def build_distiller(student: nn.Module, distill_cfg: ml_collections.ConfigDict) -> FGDDistiller:
    """The trained module of an FGD run."""
    return FGDDistiller(student=student, distill=distill_cfg)
