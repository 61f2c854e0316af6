"""SOLO against real mmdetection (tests/golden/solo/solo.npz, scripts/oracles/make_solo_golden.py):
head outputs (train and eval mode), the cell targets and mask targets, Dice + focal losses,
matrix NMS, the final masks, and the state dict layout of a full mmdetection SOLO; plus the
targets rebuilt from the batch's mask grids (the data path) against mmdetection's bitmaps."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgd_jax import config as C
from fgd_jax.convert import import_torch_checkpoint
from fgd_jax.convert.core import convert_state_dict, export_state_dict
from fgd_jax.data.masks import mask_grid
from fgd_jax.models import build_detector, variable_shapes
from fgd_jax.models.solo import (
    SOLOHead,
    SOLOTestCfg,
    local_max_scores,
    paste_masks_np,
    solo_cell_targets,
    solo_loss,
    solo_postprocess,
    solo_targets,
)
from fgd_jax.ops import solo as solo_ops

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "solo", "solo.npz")
STRIDES = (8, 8, 16, 32, 32)
NUM_GRIDS = (8, 7, 5, 4, 3)
SCALE_RANGES = ((1, 24), (12, 48), (24, 96), (48, 192), (96, 384))
TEST_CFG = SOLOTestCfg(nms_pre=20, max_per_img=10)
HEAD = SOLOHead(
    num_classes=3,
    in_channels=8,
    feat_channels=8,
    stacked_convs=2,
    num_groups=4,
    strides=STRIDES,
    scale_ranges=SCALE_RANGES,
    num_grids=NUM_GRIDS,
)


@pytest.fixture(scope="module")
def g():
    return dict(np.load(GOLDEN))


def nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _close(actual, desired, what, rtol=1e-5):
    desired = np.asarray(desired)
    atol = rtol * max(float(np.abs(desired).max()), 1e-6)
    np.testing.assert_allclose(np.asarray(actual), desired, rtol=rtol, atol=atol, err_msg=what)


def _train_outs(g):
    masks = tuple(nhwc(g[f"train_mask{lvl}"]) for lvl in range(5))
    cls = tuple(nhwc(g[f"train_cls{lvl}"]) for lvl in range(5))
    return masks, cls


@pytest.mark.slow
def test_head_outputs_match_mmdetection(g):
    feats = tuple(nhwc(g[f"feat{lvl}"]) for lvl in range(5))
    sd = {k.split("/", 1)[1]: v for k, v in g.items() if k.startswith("state/")}
    target = jax.eval_shape(HEAD.init, jax.random.key(0), feats)
    params = jax.tree.map(jnp.asarray, convert_state_dict(sd, target)["params"])
    assert set(export_state_dict({"params": params})) == set(sd)
    masks, cls = jax.jit(HEAD.apply)({"params": params}, feats)
    for lvl in range(5):
        _close(masks[lvl], g[f"train_mask{lvl}"].transpose(0, 2, 3, 1), f"mask level {lvl}")
        _close(cls[lvl], g[f"train_cls{lvl}"].transpose(0, 2, 3, 1), f"cls level {lvl}")
    # eval mode: local maxima of the scores, masks at stride 4
    ref_masks, ref_cls = _train_outs(g)
    out_hw = ref_masks[0].shape[1:3]

    @jax.jit
    def eval_outs(m, c):
        up = [solo_ops.resize_bilinear(jax.nn.sigmoid(x[:1]), out_hw) for x in m]
        return up, [local_max_scores(x[:1]) for x in c]

    up, scores = eval_outs(ref_masks, ref_cls)
    for lvl in range(5):
        _close(scores[lvl], g[f"test_cls{lvl}"].transpose(0, 2, 3, 1), f"eval cls level {lvl}")
        if lvl >= 2:
            _close(up[lvl], g[f"test_mask{lvl}"].transpose(0, 2, 3, 1), f"eval mask level {lvl}")


_cell_targets = jax.jit(
    lambda *a: solo_cell_targets(*a, (64.0, 96.0), 3, SCALE_RANGES, NUM_GRIDS, 0.2)
)


def _exact_targets(g, i):
    """Our cell targets from mmdetection's own centres and rescaled bitmaps."""
    boxes, labels = g[f"img{i}_boxes"], g[f"img{i}_labels"]
    ok = g[f"img{i}_bitmaps"].sum((1, 2)) > 0
    center = g[f"img{i}_center"]
    t = _cell_targets(
        jnp.asarray(boxes), jnp.asarray(labels), jnp.asarray(ok), jnp.asarray(center[:, 0]),
        jnp.asarray(center[:, 1]),
    )  # fmt: skip
    shapes = [(16, 24), (16, 24), (8, 12), (4, 6), (4, 6)]
    t["masks"] = []
    for stride, (h, w) in zip(STRIDES, shapes, strict=True):
        r = g[f"img{i}_rescaled_s{stride // 2}"]
        m = np.zeros((len(boxes), h, w), np.float32)
        m[:, : r.shape[1], : r.shape[2]] = r[:, :h, :w]
        t["masks"].append(jnp.asarray(m))
    return t


@pytest.mark.parametrize("i", [0, 1])
def test_cell_and_mask_targets_match_mmdetection(g, i):
    t = _exact_targets(g, i)
    for lvl in range(5):
        np.testing.assert_array_equal(np.asarray(t["pos"][lvl]), g[f"img{i}_pos{lvl}"])
        np.testing.assert_array_equal(
            np.asarray(t["labels"][lvl]), g[f"img{i}_labels{lvl}"].reshape(-1)
        )
        pos = np.asarray(t["pos"][lvl])
        ind = np.asarray(t["gt_ind"][lvl])[pos]
        np.testing.assert_array_equal(
            np.asarray(t["masks"][lvl])[ind], g[f"img{i}_tmasks{lvl}"], err_msg=f"level {lvl}"
        )


def _batched_exact_targets(g):
    ts = [_exact_targets(g, i) for i in range(2)]
    pad = max(len(g[f"img{i}_boxes"]) for i in range(2))

    def stack(key, lvl):
        parts = []
        for t in ts:
            a = np.asarray(t[key][lvl])
            if key == "masks":
                a = np.concatenate([a, np.zeros((pad - len(a), *a.shape[1:]), a.dtype)])
            parts.append(a)
        return jnp.asarray(np.stack(parts))

    return {k: [stack(k, lvl) for lvl in range(5)] for k in ("labels", "pos", "gt_ind", "masks")}


@pytest.mark.slow
def test_losses_match_mmdetection(g):
    masks, cls = _train_outs(g)
    t = _batched_exact_targets(g)

    @jax.jit
    def all_losses(m, c, t):
        whole = solo_loss(m, c, t, 3)
        grouped = solo_loss(m, c, t, 3, loss_norm_group=1)
        per = [
            solo_loss(
                tuple(x[i : i + 1] for x in m),
                tuple(x[i : i + 1] for x in c),
                {k: [a[i : i + 1] for a in v] for k, v in t.items()},
                3,
            )
            for i in range(2)
        ]
        return whole, grouped, per

    losses, grouped, per = all_losses(masks, cls, t)
    _close(losses["loss_mask"], g["loss_mask"], "loss_mask", rtol=1e-5)
    _close(losses["loss_cls"], g["loss_cls"], "loss_cls", rtol=1e-5)
    # per image groups (mmdetection with one image per GPU): the mean of the two images
    for k in ("loss_mask", "loss_cls"):
        _close(grouped[k], (per[0][k] + per[1][k]) / 2, k, rtol=1e-6)


@pytest.mark.parametrize("tag,kernel", [("mnms", "gaussian"), ("mnms_lin", "linear")])
def test_matrix_nms_matches_mmdetection(g, tag, kernel):
    scores = jnp.asarray(g["mnms_scores"])
    n = len(scores)
    order = jnp.argsort(-scores)[:20]  # nms_pre = 20: the caller passes the best 20
    masks = jnp.asarray(g["mnms_masks"])[order]
    nms = jax.jit(
        lambda m, lab, s, v: solo_ops.matrix_nms(
            m, lab, s, v, kernel=kernel, sigma=2.0, filter_thr=0.05, max_num=8
        )
    )
    res = nms(masks, jnp.asarray(g["mnms_labels"])[order], scores[order], jnp.ones((20,), bool))
    k = len(g[f"{tag}_out_scores"])
    assert int(res["valid"].sum()) == k and n == 30
    _close(res["scores"][:k], g[f"{tag}_out_scores"], "scores", rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(res["labels"][:k]), g[f"{tag}_out_labels"])
    np.testing.assert_array_equal(np.asarray(order[res["index"][:k]]), g[f"{tag}_out_keep"])
    # padding never changes the result
    pad = nms(
        jnp.concatenate([masks, jnp.ones_like(masks[:5])]),
        jnp.concatenate([jnp.asarray(g["mnms_labels"])[order], jnp.zeros((5,), jnp.int32)]),
        jnp.concatenate([scores[order], jnp.full((5,), 0.99)]),
        jnp.arange(25) < 20,
    )
    for key in ("scores", "labels", "index", "valid"):
        np.testing.assert_array_equal(np.asarray(pad[key]), np.asarray(res[key]), err_msg=key)


@pytest.mark.slow
def test_final_masks_match_mmdetection(g):
    masks, cls = _train_outs(g)
    det = jax.jit(
        lambda m, c: solo_postprocess(
            m, c, jnp.array([[60, 90]]), jnp.full((1, 4), 1.5), 3, STRIDES, TEST_CFG
        )
    )(tuple(m[:1] for m in masks), tuple(c[:1] for c in cls))
    k = len(g["res_scores"])
    assert int(det["valid"].sum()) == k
    _close(det["scores"][0, :k], g["res_scores"], "scores", rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(det["labels"][0, :k]), g["res_labels"])
    pasted = paste_masks_np(np.asarray(det["mask_probs_canvas"][0, :k]), (60, 90), (40, 60))
    ref = g["res_masks"]
    assert pasted.shape == ref.shape
    assert np.mean(pasted != ref) < 1e-4, np.mean(pasted != ref)
    boxes = np.asarray(det["boxes"][0, :k])
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] <= 60 / 1.5 + 1e-4)


_grid_targets = jax.jit(
    lambda *a: solo_targets(
        *a, ((16, 24), (16, 24), (8, 12), (4, 6), (4, 6)), 3, STRIDES, SCALE_RANGES, NUM_GRIDS
    )
)


@pytest.mark.slow
def test_targets_from_mask_grids_close_to_mmdetection(g):
    """The data path's grids (56 x 56 over each mask's region) instead of the bitmaps: same
    cells and labels here; the masks at the mask strides: every IoU 1 here (measured; mean
    IoU 0.994 on COCO-like polygons, benchmarks/results/solo_targets_cpu.md), asserted with
    slack: mean > 0.99."""
    ious = []
    for i in range(2):
        bitmaps, boxes = g[f"img{i}_bitmaps"], g[f"img{i}_boxes"]
        grids, regions = zip(
            *[
                mask_grid(b, bx, (64, 96), (64, 96), False, 56)
                for b, bx in zip(bitmaps, boxes, strict=True)
            ],
            strict=True,
        )
        t = _grid_targets(
            jnp.asarray(boxes), jnp.asarray(g[f"img{i}_labels"]), jnp.ones(len(boxes), bool),
            jnp.asarray(np.stack(grids)), jnp.asarray(np.stack(regions)),
        )  # fmt: skip
        ex = _exact_targets(g, i)
        for lvl in range(5):
            np.testing.assert_array_equal(np.asarray(t["pos"][lvl]), np.asarray(ex["pos"][lvl]))
            np.testing.assert_array_equal(
                np.asarray(t["labels"][lvl]), np.asarray(ex["labels"][lvl])
            )
        for lvl in (0, 2, 3):
            a, b = np.asarray(t["masks"][lvl]) > 0, np.asarray(ex["masks"][lvl]) > 0
            for k in range(len(a)):
                if b[k].sum():
                    ious.append((a[k] & b[k]).sum() / (a[k] | b[k]).sum())
    print("mask IoU grid path vs mmdetection:", np.round(ious, 3))
    assert np.mean(ious) > 0.99, ious


def test_state_dict_layout_matches_mmdetection_solo(g):
    cfg = C.solo_model(
        depth=18, num_classes=3, feat_channels=8, stacked_convs=2, fpn_channels=8,
        num_groups=4, num_grids=NUM_GRIDS,
    )  # fmt: skip
    cfg.head.strides = STRIDES
    model = build_detector(cfg)
    shapes = variable_shapes(model)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    ours = export_state_dict(zeros)
    ref = json.loads(str(g["det_shapes"]))
    assert sorted(ours) == sorted(ref) == sorted(g["det_keys"].tolist())
    for k, v in ours.items():
        assert list(v.shape) == ref[k], k
    # and an mmdetection-shaped state dict imports strictly (the teacher-conversion path)
    sd = {k: np.full(s, 0.5, np.float32) for k, s in ref.items()}
    back = import_torch_checkpoint(sd, cfg)
    assert set(back) == {"params", "batch_stats"}
    assert all(np.all(np.asarray(x) == 0.5) for x in jax.tree.leaves(back))
