"""Static-shape, tiled non-maximum suppression (torchvision / mmcv semantics).

Greedy NMS in descending score order (stable: equal scores keep the lower index first); a box is
suppressed by a kept, higher-ranked box when IoU > iou_threshold (strict); IoU uses no "+1" and a
zero union gives IoU 0. Entries with `valid=False` are never kept.

Algorithm ("padded NMS", as TF-models / axlearn): sort once, then walk the sorted boxes in tiles
of `tile_size` under `lax.while_loop`. Inside a tile the greedy result is the unique fixed point
of `keep_k = alive_k & ~any_{j<k}(keep_j & iou_jk > thr)`, reached by iteration (at most
`tile_size` rounds, usually a few); the tile's kept boxes then suppress every later box with one
`[tile, N]` IoU block. Memory is O(tile * N), never N x N; the loop stops as soon as
`max_output` boxes are kept or no tile with a valid entry is left (the same result).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array, lax

from fgd_jax.ops.dtypes import float_dtype


def _pair_iou(a: Array, b: Array) -> Array:
    """IoU `[T, 4] x [M, 4] -> [T, M]`, torchvision's nms kernel formula (0 where union <= 0)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = jnp.maximum(
        jnp.minimum(a[:, None, 2], b[None, :, 2]) - jnp.maximum(a[:, None, 0], b[None, :, 0]), 0.0
    )
    h = jnp.maximum(
        jnp.minimum(a[:, None, 3], b[None, :, 3]) - jnp.maximum(a[:, None, 1], b[None, :, 1]), 0.0
    )
    inter = w * h
    union = area_a[:, None] + area_b[None, :] - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def nms(
    boxes: Array,
    scores: Array,
    iou_threshold: float | Array,
    max_output: int,
    score_valid: Array | None = None,
    tile_size: int = 256,
) -> tuple[Array, Array]:
    """Greedy NMS with static shapes.

    Args:
      boxes: `[N, 4]` float32 xyxy. scores: `[N]` float32.
      iou_threshold: suppress when IoU > threshold (may be traced).
      max_output: static number of output slots.
      score_valid: optional `[N]` bool; False entries are never kept nor suppress anything.
      tile_size: static tile length (256-512 is a good choice on CPU and GPU).
    Returns:
      indices: `[max_output]` int32 indices into `boxes`, kept boxes in descending score order;
        padded slots hold 0. valid: `[max_output]` bool, True for the kept slots.
    """
    boxes = jnp.asarray(boxes, float_dtype(boxes))
    scores = jnp.asarray(scores, float_dtype(scores))
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"fgd_jax.ops.nms.nms: expected boxes [N, 4] and scores [N]; got {boxes.shape}, "
            f"{scores.shape}"
        )
    n = boxes.shape[0]
    if score_valid is None:
        score_valid = jnp.ones((n,), bool)
    score_valid = jnp.asarray(score_valid, bool)
    if n == 0:
        return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)

    # Stable descending sort; invalid entries go last.
    order = jnp.argsort(jnp.where(score_valid, -scores, jnp.inf), stable=True).astype(jnp.int32)
    t = min(tile_size, n)
    num_tiles = -(-n // t)
    npad = num_tiles * t
    sboxes = jnp.zeros((npad, 4), boxes.dtype).at[:n].set(boxes[order])
    alive = jnp.zeros((npad,), bool).at[:n].set(score_valid[order])
    pos = jnp.arange(npad)
    lower = jnp.arange(t)[:, None] < jnp.arange(t)[None, :]  # [j, k]: j ranks before k

    def tile_body(state):
        i, alive, count = state
        start = i * t
        tb = lax.dynamic_slice(sboxes, (start, jnp.int32(0)), (t, 4))
        ta = lax.dynamic_slice(alive, (start,), (t,))
        sup_tt = (_pair_iou(tb, tb) > iou_threshold) & lower

        def fp_body(c):
            keep, _ = c
            new = ta & ~jnp.any(sup_tt & keep[:, None], axis=0)
            return new, keep

        keep, _ = lax.while_loop(lambda c: jnp.any(c[0] != c[1]), fp_body, fp_body((ta, ta)))
        alive = lax.dynamic_update_slice(alive, keep, (start,))
        later = pos >= start + t
        sup = jnp.any(keep[:, None] & (_pair_iou(tb, sboxes) > iou_threshold), axis=0)
        alive = alive & ~(sup & later)
        return i + 1, alive, count + jnp.sum(keep, dtype=jnp.int32)

    # the valid entries come first in `order`: tiles past them hold nothing to keep
    n_valid = jnp.sum(score_valid, dtype=jnp.int32)

    def tile_cond(state):
        i, _, count = state
        return (i < num_tiles) & (i * t < n_valid) & (count < max_output)

    i_end, alive, count = lax.while_loop(tile_cond, tile_body, (jnp.int32(0), alive, jnp.int32(0)))
    keep = alive & (pos < i_end * t)  # tiles after an early stop were never finalized
    (kept_pos,) = jnp.nonzero(keep, size=max_output, fill_value=0)
    out_valid = jnp.arange(max_output) < jnp.minimum(count, max_output)
    idx = jnp.where(out_valid, order[jnp.minimum(kept_pos, n - 1)], 0)
    return idx.astype(jnp.int32), out_valid


def batched_nms(
    boxes: Array,
    scores: Array,
    labels: Array,
    valid: Array | None,
    iou_threshold: float | Array,
    max_output: int,
    class_agnostic: bool = False,
    tile_size: int = 256,
) -> tuple[Array, Array]:
    """Class-wise NMS via the coordinate-offset trick (torchvision `batched_nms`, mmcv).

    Each box is shifted by `label * (max_coordinate + 1)` (max over valid boxes), so boxes of
    different classes never overlap; then one `nms`. Args as `nms`, plus `labels [N]` int.
    Returns `(indices [max_output] int32, valid [max_output] bool)` in descending score order.
    """
    boxes = jnp.asarray(boxes, float_dtype(boxes))
    n = boxes.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
    if class_agnostic:
        shifted = boxes
    else:
        max_coord = jnp.max(jnp.where(valid[:, None], boxes, -jnp.inf), initial=-jnp.inf)
        max_coord = jnp.where(jnp.isfinite(max_coord), max_coord, 0.0)
        offsets = jnp.asarray(labels).astype(boxes.dtype) * (max_coord + 1.0)
        shifted = boxes + offsets[:, None]
    return nms(shifted, scores, iou_threshold, max_output, valid, tile_size)


def nms_padded_batch(
    boxes: Array,
    scores: Array,
    labels: Array,
    valid: Array,
    iou_threshold: float,
    max_output: int,
    class_agnostic: bool = False,
    tile_size: int = 256,
) -> tuple[Array, Array]:
    """`batched_nms` vmapped over a leading batch dim: `[B, N, 4]`, `[B, N]`, `[B, N]`, `[B, N]`
    -> `([B, max_output] int32, [B, max_output] bool)`."""
    fn = lambda b, s, lab, v: batched_nms(  # noqa: E731
        b, s, lab, v, iou_threshold, max_output, class_agnostic, tile_size
    )
    return jax.vmap(fn)(boxes, scores, labels, valid)


def multiclass_nms(
    boxes: Array,
    scores: Array,
    valid: Array | None,
    score_thr: float,
    iou_threshold: float,
    max_num: int,
    max_candidates: int | None = None,
    tile_size: int = 256,
) -> dict[str, Array]:
    """mmdet `multiclass_nms`: every (box, class) pair with score > score_thr is a candidate,
    class-wise NMS, then the `max_num` best detections.

    Args:
      boxes: `[N, 4]` (shared by all classes) or `[N, C, 4]` (class-specific) xyxy.
      scores: `[N, C]` class scores, no background column. valid: optional `[N]` bool.
      max_candidates: static cap on the candidates that enter NMS (the highest-scoring ones;
        default all N * C). The result equals uncapped NMS whenever `max_num` detections are
        found among them or no more than `max_candidates` pairs pass `score_thr`.
    Returns dict: boxes `[max_num, 4]`, scores `[max_num]`, labels `[max_num]` int32,
      index `[max_num]` int32 (row in `boxes`), valid `[max_num]` bool; descending score.
    """
    scores = jnp.asarray(scores, float_dtype(scores))
    boxes = jnp.asarray(boxes, float_dtype(boxes))
    n, c = scores.shape
    valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
    flat = scores.reshape(-1)  # index = row * C + class
    cand = (flat > score_thr) & jnp.repeat(valid, c)
    k = n * c if max_candidates is None else min(max_candidates, n * c)
    if k < n * c:
        _, pick = lax.top_k(jnp.where(cand, flat, -jnp.inf), k)
    else:
        pick = jnp.arange(n * c)
    row, label = pick // c, pick % c
    cand_boxes = boxes[row] if boxes.ndim == 2 else boxes[row, label]
    keep, kv = batched_nms(
        cand_boxes, flat[pick], label, cand[pick], iou_threshold, max_num, tile_size=tile_size
    )
    return dict(
        boxes=jnp.where(kv[:, None], cand_boxes[keep], 0.0),
        scores=jnp.where(kv, flat[pick][keep], 0.0),
        labels=jnp.where(kv, label[keep], -1).astype(jnp.int32),
        index=jnp.where(kv, row[keep], 0).astype(jnp.int32),
        valid=kv,
    )
