"""Which images go in which batch: aspect-ratio canvases and the per-epoch batch schedule.

Every global batch has one canvas (all hosts agree on it: SPMD needs equal shapes). Training
follows mmdetection's `DistributedGroupSampler`: shuffle each canvas group, pad it by
wrapping around to a multiple of the global batch, chunk, shuffle the batch order, with
`default_rng([seed, epoch])`. Evaluation keeps json order within a group and pads the last
batch with -1 (no image). All functions are pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fgd_jax.data import transforms as T


def choose_canvas(resized_hw: tuple[int, int], canvases: Sequence[tuple[int, int]]) -> int:
    """Index of the canvas for an image of resized size (h, w).

    Among the canvases the image fits, the smallest; ties go to the canvas of the same
    orientation (landscape is w > h; a square image counts as portrait, as mmdetection's
    `flag = w / h > 1`). Raises ValueError when none fits.
    """
    h, w = resized_hw
    fits = [i for i, (ch, cw) in enumerate(canvases) if h <= ch and w <= cw]
    if not fits:
        raise ValueError(f"resized image {(h, w)} fits none of the canvases {list(canvases)}")
    landscape = w > h

    def key(i):
        ch, cw = canvases[i]
        return (ch * cw, (cw > ch) != landscape, i)

    return min(fits, key=key)


def max_resized_hw(
    orig_hw: tuple[int, int], img_scale: Sequence[int], multiscale_short: Sequence[int] = ()
) -> tuple[int, int]:
    """Largest resized (h, w) an image can get (multi-scale: at the largest short side)."""
    scale = (max(img_scale), max(multiscale_short)) if multiscale_short else tuple(img_scale)
    return T.rescale_size(orig_hw, scale)[0]


def group_by_canvas(
    records: Sequence[dict], img_scale, canvases, multiscale_short=()
) -> np.ndarray:
    """`[N] int32` canvas index of every record (see `choose_canvas`)."""
    out = np.empty(len(records), np.int32)
    for i, r in enumerate(records):
        try:
            hw = max_resized_hw(r["orig_shape"], img_scale, multiscale_short)
            out[i] = choose_canvas(hw, canvases)
        except ValueError as e:
            raise ValueError(f"{r.get('file_name', r.get('image_id'))}: {e}") from None
    return out


def epoch_schedule(
    groups: np.ndarray, num_canvases: int, global_batch: int, seed: int, epoch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Global batches of one training epoch: `(indices [S, global_batch] int64, canvas [S])`.

    mmdetection `DistributedGroupSampler`: shuffle each group, pad it by wrapping around to a
    multiple of the global batch, chunk, shuffle the batch order. `S` is the same every epoch.
    """
    rng = np.random.default_rng([seed, epoch])
    batches, canvas = [], []
    for g in range(num_canvases):
        idx = np.flatnonzero(groups == g)
        if idx.size == 0:
            continue
        idx = idx[rng.permutation(idx.size)]
        n = -(-idx.size // global_batch) * global_batch
        idx = np.resize(idx, n)  # wraps around
        batches.append(idx.reshape(-1, global_batch))
        canvas.append(np.full(n // global_batch, g, np.int32))
    batches, canvas = np.concatenate(batches), np.concatenate(canvas)
    order = rng.permutation(len(batches))
    return batches[order].astype(np.int64), canvas[order]


def eval_schedule(groups: np.ndarray, num_canvases: int, global_batch: int):
    """Eval batches: each canvas group in image order, its last batch padded with -1."""
    batches, canvas = [], []
    for g in range(num_canvases):
        idx = np.flatnonzero(groups == g)
        if idx.size == 0:
            continue
        n = -(-idx.size // global_batch) * global_batch
        idx = np.concatenate([idx, np.full(n - idx.size, -1, np.int64)])
        batches.append(idx.reshape(-1, global_batch))
        canvas.append(np.full(n // global_batch, g, np.int32))
    return np.concatenate(batches).astype(np.int64), np.concatenate(canvas)
