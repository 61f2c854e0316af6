"""Data helpers for the analysis notebooks (`notebooks/*.ipynb`): no plotting here.

- training logs: `metric_series`, `loss_groups`, `read_eval_metrics`;
- a run's full train state (student, FGD params) and one example of its data:
  `load_train_state`, `example_batch` (or any image file: `image_file_batch`);
- the maps FGD works with on one level: `fgd_level_maps` (masks, attentions, per-cell feature
  gap, GcBlock context weights), from the public pure parts of `fgd_jax.distill.fgd`;
- instance masks blended into an image for display: `mask_overlay` (Mask R-CNN predictions,
  notebooks/mask_predictions.ipynb).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fgd_jax.distill.fgd import BOX_SCALES, Conv1x1, fg_bg_masks, spatial_channel_attention

_FGD_LEVEL = re.compile(r"^loss_fgd_fpn_(\d+)$")
FGD_PARTS = ("fg", "bg", "mask", "relation")


# ----------------------------------------------------------------------------- training logs
def metric_series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """One metric over training from `logging_utils.read_metrics` records.

    Records without `key` (e.g. eval records among train records) are skipped.
    Returns `(steps [n] int64, values [n] float64)` in record order (steps ascending for one
    run; a resumed run may log a step twice, both entries are kept).
    """
    steps, values = [], []
    for r in records:
        if key in r and r[key] is not None:
            steps.append(int(r["step"]))
            values.append(float(r[key]))
    return np.asarray(steps, np.int64), np.asarray(values, np.float64)


def loss_groups(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The loss keys present in `records`, grouped for plotting.

    Returns a dict:
      `detector`: detector losses (`loss_cls`, `loss_bbox`, ...: `loss*` keys that are neither
        FGD terms nor parts (no `/`) and not the total `loss`), sorted;
      `fgd_levels`: `loss_fgd_fpn_{i}` (weighted FGD total of level i), by level;
      `fgd_parts`: `{part: [loss_fgd_fpn_{i}/{part} by level]}` for fg, bg, mask, relation
        (unweighted parts; only parts present);
      `total`: `['loss']` if present (the summed training loss).
    """
    keys = set()
    for r in records:
        keys.update(k for k in r if k.startswith("loss"))
    levels = sorted((int(m.group(1)), k) for k in keys if (m := _FGD_LEVEL.match(k)) is not None)
    fgd_levels = [k for _, k in levels]
    parts: dict[str, list[str]] = {}
    for part in FGD_PARTS:
        found = sorted(
            (int(m.group(1)), k)
            for k in keys
            if (m := re.match(rf"^loss_fgd_fpn_(\d+)/{part}$", k)) is not None
        )
        if found:
            parts[part] = [k for _, k in found]
    detector = sorted(
        k for k in keys if k != "loss" and "/" not in k and not k.startswith("loss_fgd_")
    )
    return dict(
        detector=detector,
        fgd_levels=fgd_levels,
        fgd_parts=parts,
        total=["loss"] if "loss" in keys else [],
    )


def read_eval_metrics(workdir: str | os.PathLike) -> dict:
    """`workdir/eval/metrics.json` (written by `fgd_jax.eval` / the end of training): AP,
    AP50, ... as fractions and `per_class_AP` ({class name: AP})."""
    path = os.path.join(os.fspath(workdir), "eval", "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no eval metrics (the run has not finished evaluating)")
    with open(path) as f:
        out = json.load(f)
    if not isinstance(out, dict) or "AP" not in out:
        raise ValueError(f"{path}: not a metrics file (no 'AP' key)")
    return out


# ------------------------------------------------------------------------ runs and examples
def load_train_state(
    workdir: str | os.PathLike, step: int | None = None
) -> tuple[Any, dict, ml_collections.ConfigDict, int]:
    """The full train state of a run, on the host: `(params, model_state, cfg, step)`.

    Unlike `fgd_jax.experiment.load_model` (the student only), `params` holds everything
    trained: for an FGD run `{'student': ..., 'distill_losses': {'loss_fgd_fpn_i': ...}}`.
    `step` defaults to the latest checkpoint. Raises FileNotFoundError naming the workdir.
    (`fgd_jax.experiment.restore_train_state` with the state unpacked.)
    """
    from fgd_jax.experiment import restore_train_state

    state, cfg, step = restore_train_state(workdir, step)
    return state.params, dict(state.model_state), cfg, step


def example_batch(
    data_cfg: ml_collections.ConfigDict,
    index: int,
    train: bool = False,
    canvas_hw: tuple[int, int] | None = None,
    img_scale: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Example `index` of the val (or train) split as a batch of one (docs/contracts.md keys).

    No flip, no multi-scale: the eval transform. By default the image is resized at the
    config's `img_scale` and padded to the canvas the loaders would choose; pass `canvas_hw`
    and/or a smaller `img_scale` to get an image whose `img_shape` is smaller than its
    `pad_shape` (the case where FGD's `box_scale` matters). Raises IndexError naming the split.
    """
    from fgd_jax.data import pipeline

    records = pipeline.load_split(data_cfg, train=train).records
    if not 0 <= index < len(records):
        split = "train" if train else "val"
        raise IndexError(f"example_batch: index {index} outside the {len(records)} {split} images")
    return _eval_batch(data_cfg, records[index], canvas_hw, img_scale)


def _eval_batch(
    data_cfg: ml_collections.ConfigDict,
    record: dict,
    canvas_hw: tuple[int, int] | None,
    img_scale: Sequence[int] | None,
) -> dict[str, np.ndarray]:
    """`record` through the eval transform, as a batch of one (canvas chosen as the loaders
    do unless given)."""
    from fgd_jax.data import pipeline

    scale = tuple(int(v) for v in (img_scale if img_scale is not None else data_cfg.img_scale))
    if canvas_hw is None:
        canvases = [tuple(int(v) for v in c) for c in data_cfg.canvases]
        hw = pipeline.max_resized_hw(record["orig_shape"], scale)
        canvas_hw = canvases[pipeline.choose_canvas(hw, canvases)]
    ex = pipeline.make_example(
        record,
        tuple(int(v) for v in canvas_hw),
        scale,
        data_cfg.get("pixel_style", "pytorch"),
        int(data_cfg.max_boxes),
        int(data_cfg.get("max_ignore", 32)),
    )
    return {k: np.asarray(v)[None] for k, v in ex.items()}


def image_file_batch(
    data_cfg: ml_collections.ConfigDict,
    path: str | os.PathLike,
    boxes: Sequence[Sequence[float]] = (),
    labels: Sequence[int] | None = None,
    canvas_hw: tuple[int, int] | None = None,
    img_scale: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Any image file as a batch of one, through the eval transform of `data_cfg` (as
    `example_batch`): for looking at FGD's maps on the user's own image.

    Args:
      path: an image file (any PIL format; EXIF orientation applied).
      boxes: `[G, 4]` xyxy in the file's own pixels (the FGD foreground); none is allowed
        (the foreground mask is then empty and the background covers every cell).
      labels: `[G]` class indices (default 0), only used for display.
    Raises:
      transforms.BadImageError: the file is missing or unreadable (named in the message).
      ValueError: `boxes` is not `[G, 4]`, or `labels` does not match it.
    """
    from fgd_jax.data.transforms import decode_image

    box_arr = np.asarray(boxes, np.float32).reshape(-1, 4) if len(boxes) else np.zeros((0, 4))
    if len(boxes) and np.asarray(boxes).shape[-1] != 4:
        raise ValueError(f"image_file_batch: boxes must be [G, 4] xyxy, got {np.shape(boxes)}")
    lab = np.zeros(len(box_arr), np.int32) if labels is None else np.asarray(labels, np.int32)
    if lab.shape != (len(box_arr),):
        raise ValueError(f"image_file_batch: {len(box_arr)} boxes but labels {lab.shape}")
    h, w = decode_image(path).shape[:2]
    record = dict(
        file_name=os.fspath(path),
        image_id=0,
        orig_shape=(h, w),
        boxes=box_arr.astype(np.float32),
        labels=lab,
        ignore_boxes=np.zeros((0, 4), np.float32),
    )
    return _eval_batch(data_cfg, record, canvas_hw, img_scale)


def denormalize(image: np.ndarray, pixel_style: str = "pytorch") -> np.ndarray:
    """Undo the pipeline's normalization for display: `[H, W, 3] float32` normalized (RGB for
    'pytorch', BGR for 'caffe') -> `[H, W, 3] uint8 RGB`. The zero padding comes back as the
    mean colour."""
    from fgd_jax.data.transforms import pixel_stats

    mean, std, to_bgr = pixel_stats(pixel_style)
    x = np.asarray(image, np.float32) * std + mean
    if to_bgr:
        x = x[..., ::-1]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- FGD level maps
def fgd_level_maps(
    level_params: Mapping[str, Any],
    feat_s: jax.Array,
    feat_t: jax.Array,
    batch: Mapping[str, Any],
    temp: float,
    box_scale: str = "img_shape",
) -> dict[str, np.ndarray]:
    """What the FGD loss of one level sees, as numpy maps (float32).

    Args:
      level_params: the `FGDLoss` params of the level (`params['distill_losses']
        ['loss_fgd_fpn_i']`): `align` (only when the channel counts differ), `conv_mask_s`,
        `conv_mask_t`, ...
      feat_s: [B, H, W, Cs] student features; feat_t: [B, H, W, Ct] teacher features.
      batch: `boxes`, `valid`, `img_shape`, `pad_shape` (docs/contracts.md).
      temp: the attention temperature (`distill.temp`).
      box_scale: 'img_shape' (original) | 'pad_shape'.
    Returns:
      `fg`, `bg`: [B, H, W] masks; `spatial_s`, `spatial_t`: [B, H, W] spatial attention
      (mean 1); `channel_s`, `channel_t`: [B, C] channel attention (mean 1); `gap`: [B, H, W]
      `sum_c (S' - T)^2` with S' the aligned student; `fg_term`, `bg_term`: [B, H, W] the
      cells' contributions to the unweighted fg / bg losses (`sum_c (S' - T)^2 A_c(T)`
      `* A_s(T) * M`; their sums divided by B are `FGDLoss`'s `fg` / `bg`); `context_s`,
      `context_t`: [B, H, W] GcBlock attention-pooling weights (softmax over H*W of the
      1x1 `conv_mask_{s,t}`, sum 1 per image).
    """
    if box_scale not in BOX_SCALES:
        raise ValueError(
            f"fgd_level_maps: box_scale must be one of {BOX_SCALES}, got {box_scale!r}"
        )
    for key in ("conv_mask_s", "conv_mask_t"):
        if key not in level_params:
            raise KeyError(f"fgd_level_maps: level_params has no {key!r} (not FGDLoss params?)")
    s = jnp.asarray(feat_s, jnp.float32)
    t = jnp.asarray(feat_t, jnp.float32)
    if s.ndim != 4 or t.ndim != 4 or s.shape[:3] != t.shape[:3]:
        raise ValueError(
            f"fgd_level_maps: features must be [B, H, W, C] with equal B, H, W; got student "
            f"{s.shape} and teacher {t.shape}"
        )
    if "align" in level_params:
        s = _conv1x1(level_params["align"], s)
    elif s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"fgd_level_maps: student has {s.shape[-1]} channels, teacher {t.shape[-1]}, and "
            "level_params has no 'align' conv"
        )
    b, h, w, _ = t.shape
    spatial_t, channel_t = spatial_channel_attention(t, temp)
    spatial_s, channel_s = spatial_channel_attention(s, temp)
    fg, bg = fg_bg_masks(
        jnp.asarray(batch["boxes"]),
        jnp.asarray(batch["valid"]),
        jnp.asarray(batch["img_shape"]),
        jnp.asarray(batch["pad_shape"]),
        (h, w),
        box_scale,
    )
    diff2 = (s - t) ** 2
    gap = jnp.sum(diff2, axis=-1)
    weighted = jnp.sum(diff2 * channel_t[:, None, None, :], axis=-1) * spatial_t

    def context(params, x):
        logits = _conv1x1(params, x)[..., 0].reshape(b, h * w)
        return jax.nn.softmax(logits, axis=-1).reshape(b, h, w)

    out = dict(
        fg=fg,
        bg=bg,
        spatial_s=spatial_s,
        spatial_t=spatial_t,
        channel_s=channel_s,
        channel_t=channel_t,
        gap=gap,
        fg_term=weighted * fg,
        bg_term=weighted * bg,
        context_s=context(level_params["conv_mask_s"], s),
        context_t=context(level_params["conv_mask_t"], t),
    )
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _conv1x1(params: Mapping[str, Any], x: jax.Array) -> jax.Array:
    """Apply a trained `Conv1x1` (kernel [1, 1, I, O], bias [O]) to [..., I]."""
    kernel = jnp.asarray(params["kernel"])
    module = Conv1x1(
        kernel.shape[-1],
        kernel_init=jax.nn.initializers.zeros,
        bias_init=jax.nn.initializers.zeros,
    )
    return module.apply({"params": {"kernel": kernel, "bias": jnp.asarray(params["bias"])}}, x)


# ------------------------------------------------------------------------ instance masks
# tab10's colours (RGB 0..255): instance k gets MASK_COLORS[k % 10]
MASK_COLORS = np.array(
    [
        [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
        [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207],
    ],
    np.float32,
)  # fmt: skip


def mask_overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """`image [H, W, 3] uint8 RGB` with each of `masks [N, H, W] bool` blended in its colour
    (`MASK_COLORS[k % 10]`, weight `alpha`; a later mask over an earlier one): `[H, W, 3]
    uint8`. Raises ValueError when the masks' size is not the image's."""
    image = np.asarray(image)
    masks = np.asarray(masks, bool)
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"mask_overlay: masks {masks.shape} do not fit the image {image.shape}")
    out = image.astype(np.float32)
    for k, m in enumerate(masks):
        out[m] = (1.0 - alpha) * out[m] + alpha * MASK_COLORS[k % len(MASK_COLORS)]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
