"""Parity of fgd_jax.ops.nms with torchvision.ops.nms / batched_nms (identical kept lists).

Tie-break: ours keeps equal scores in index order (stable sort). torchvision's CPU sort is not
guaranteed stable, so the reference `_tv_nms_stable` ranks the boxes with numpy's stable argsort
and passes strictly decreasing surrogate scores to torchvision (greedy NMS depends only on the
order). Without ties we also call torchvision directly. Invalid entries are removed before the
torchvision call and indices mapped back. Small `tile_size` values exercise many tiles.
"""

import jax
import numpy as np
import pytest
import torch
import torchvision

from fgd_jax.ops import nms as N

# One compilation per (shapes, max_output, tile_size); the IoU threshold is traced.
_nms = jax.jit(N.nms, static_argnames=("max_output", "tile_size"))
_bnms = jax.jit(N.batched_nms, static_argnames=("max_output", "class_agnostic", "tile_size"))


def _tv_nms_stable(boxes, scores, thr, valid=None, labels=None):
    idx = np.arange(len(boxes)) if valid is None else np.nonzero(valid)[0]
    order = idx[np.argsort(-scores[idx], kind="stable")]
    surrogate = torch.arange(len(order), 0, -1, dtype=torch.float32)
    b = torch.from_numpy(boxes[order])
    if labels is None:
        kept = torchvision.ops.nms(b, surrogate, thr)
    else:
        kept = torchvision.ops.batched_nms(b, surrogate, torch.from_numpy(labels[order]), thr)
    return order[kept.numpy()]


def _clustered(rng, n, k=12, size=300.0):
    centers = rng.uniform(0, size, (k, 2))
    c = centers[rng.integers(0, k, n)] + rng.normal(0, 6, (n, 2))
    wh = rng.uniform(10, 60, (n, 2))
    return np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32)


def _check(idx, valid, ref, max_output):
    idx, valid = np.asarray(idx), np.asarray(valid)
    k = min(len(ref), max_output)
    assert valid.sum() == k and valid[:k].all()
    np.testing.assert_array_equal(idx[:k], ref[:k])
    assert (idx[~valid] == 0).all()


@pytest.mark.parametrize("tile", [16, 256])
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_random_clustered_vs_torchvision(tile, thr):
    rng = np.random.default_rng(int(thr * 10) + tile)
    boxes = _clustered(rng, 300)
    scores = rng.uniform(0, 1, 300).astype(np.float32)
    ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).numpy()
    np.testing.assert_array_equal(ref, _tv_nms_stable(boxes, scores, thr))
    idx, valid = _nms(boxes, scores, thr, max_output=300, tile_size=tile)
    _check(idx, valid, ref, 300)


def test_ties_identical_zero_area_and_invalid():
    rng = np.random.default_rng(7)
    boxes = _clustered(rng, 200)
    scores = np.round(rng.uniform(0, 1, 200), 1).astype(np.float32)  # many exact ties
    boxes[10:20] = boxes[5]  # identical boxes (IoU 1)
    scores[10:20] = scores[5]
    boxes[30:35, 2:] = boxes[30:35, :2]  # zero-area boxes: IoU 0 with everything, never suppress
    boxes[35:38] = boxes[30]  # identical zero-area boxes
    valid = rng.uniform(0, 1, 200) > 0.2
    valid[5] = False  # the first of a set of identical boxes invalid: the next one survives
    for thr in (0.0, 0.5):
        ref = _tv_nms_stable(boxes, scores, thr, valid)
        for tile in (8, 512):
            _check(*_nms(boxes, scores, thr, 200, valid, tile_size=tile), ref, 200)
    ref = _tv_nms_stable(boxes, scores, 0.5, valid)
    assert set(range(30, 38)) & set(np.nonzero(valid)[0]) <= set(ref.tolist())


@pytest.mark.slow
def test_max_output_smaller_all_invalid_and_jit():
    rng = np.random.default_rng(3)
    boxes = _clustered(rng, 500, k=40, size=600)
    scores = rng.uniform(0, 1, 500).astype(np.float32)
    ref = _tv_nms_stable(boxes, scores, 0.5)
    assert len(ref) > 30
    fn = jax.jit(lambda b, s, v: N.nms(b, s, 0.5, 30, v, tile_size=32))
    _check(*fn(boxes, scores, np.ones(500, bool)), ref, 30)  # early stop after 30 kept
    idx, valid = fn(boxes, scores, np.zeros(500, bool))
    assert not np.asarray(valid).any() and (np.asarray(idx) == 0).all()
    # more slots than boxes kept
    _check(
        *N.nms(boxes[:20], scores[:20], 0.5, 50), _tv_nms_stable(boxes[:20], scores[:20], 0.5), 50
    )
    idx, valid = N.nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5, 5)
    assert idx.shape == (5,) and not np.asarray(valid).any()
    with pytest.raises(ValueError, match="nms"):
        N.nms(boxes[None], scores, 0.5, 10)


@pytest.mark.slow
def test_batched_nms_vs_torchvision_and_vmap():
    rng = np.random.default_rng(11)
    boxes = _clustered(rng, 400, k=10)
    scores = rng.uniform(0, 1, 400).astype(np.float32)
    labels = rng.integers(0, 5, 400)
    valid = rng.uniform(0, 1, 400) > 0.1
    bt, st, lt = torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels)
    ref_all = torchvision.ops.batched_nms(bt, st, lt, 0.5).numpy()
    _check(*_bnms(boxes, scores, labels, np.ones(400, bool), 0.5, 400, tile_size=64), ref_all, 400)
    ref = _tv_nms_stable(boxes, scores, 0.5, valid, labels)
    got = _bnms(boxes, scores, labels, valid, 0.5, 400, tile_size=64)
    _check(*got, ref, 400)
    assert len(ref) > len(_tv_nms_stable(boxes, scores, 0.5, valid))  # classes do not suppress
    agn = _bnms(boxes, scores, labels, valid, 0.5, 400, class_agnostic=True, tile_size=64)
    _check(*agn, _tv_nms_stable(boxes, scores, 0.5, valid), 400)
    # vmapped over a batch of 2 (first 150 candidates)
    boxes, scores, labels, valid = boxes[:150], scores[:150], labels[:150], valid[:150]
    ref = _tv_nms_stable(boxes, scores, 0.5, valid, labels)
    b2 = np.stack([boxes, boxes[::-1]])
    s2, l2, v2 = (
        np.stack([scores, scores[::-1]]),
        np.stack([labels, labels[::-1]]),
        np.stack([valid, valid[::-1]]),
    )
    idx, vv = jax.jit(lambda *a: N.nms_padded_batch(*a, 0.5, 100, tile_size=64))(b2, s2, l2, v2)
    _check(idx[0], vv[0], ref, 100)
    _check(idx[1], vv[1], _tv_nms_stable(b2[1], s2[1], 0.5, v2[1], l2[1]), 100)


@pytest.mark.slow
def test_5000_candidates_default_tile():
    rng = np.random.default_rng(5)
    boxes = _clustered(rng, 5000, k=200, size=1000)
    scores = rng.uniform(0, 1, 5000).astype(np.float32)
    ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy()
    _check(*jax.jit(lambda b, s: N.nms(b, s, 0.5, 1000))(boxes, scores), ref, 1000)


def _mmdet_multiclass_nms(boxes, scores, score_thr, thr, max_num):
    """mmdet 2.x multiclass_nms (torch): expand boxes over classes, threshold, batched_nms.
    Ties are avoided in the data, so torchvision's own sort order is unambiguous."""
    n, c = scores.shape
    b = torch.from_numpy(boxes)
    b = b[:, None].expand(n, c, 4) if b.ndim == 2 else b
    s = torch.from_numpy(scores)
    labels = torch.arange(c).view(1, -1).expand_as(s)
    b, s, labels = b.reshape(-1, 4), s.reshape(-1), labels.reshape(-1)
    m = s > score_thr
    b, s, labels = b[m], s[m], labels[m]
    keep = torchvision.ops.batched_nms(b, s, labels, thr)[:max_num]
    return b[keep].numpy(), s[keep].numpy(), labels[keep].numpy()


@pytest.mark.parametrize("class_specific", [False, True])
def test_multiclass_nms_vs_mmdet_transcription(class_specific):
    rng = np.random.default_rng(21)
    n, c = 120, 4
    boxes = _clustered(rng, n, k=8)
    if class_specific:
        boxes = np.stack([boxes + rng.normal(0, 2, boxes.shape) for _ in range(c)], 1)
        boxes = boxes.astype(np.float32)
    scores = rng.permutation(n * c).reshape(n, c).astype(np.float32) / (n * c)  # no ties
    rb, rs, rl = _mmdet_multiclass_nms(boxes, scores, 0.3, 0.5, 50)
    fn = jax.jit(
        lambda b, s, v: N.multiclass_nms(b, s, v, 0.3, 0.5, 50, max_candidates=300, tile_size=64)
    )
    out = {k: np.asarray(v) for k, v in fn(boxes, scores, np.ones(n, bool)).items()}
    k = len(rs)
    assert k == 50 and (scores > 0.3).sum() > 300  # the candidate cap is exercised
    assert out["valid"].sum() == k
    np.testing.assert_array_equal(out["scores"][:k], rs)
    np.testing.assert_array_equal(out["labels"][:k], rl)
    np.testing.assert_array_equal(out["boxes"][:k], rb)
    if not class_specific:
        np.testing.assert_array_equal(boxes[out["index"][:k]], rb)
