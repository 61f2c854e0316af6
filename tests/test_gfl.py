"""GFL against real mmdetection (golden files from scripts/oracles/make_gfl_golden.py:
mmdetection 3.3 set to 2.11's rules, see that script's docstring): the head's outputs, the ATSS
assignment (with and without crowd boxes), the QFL / GIoU / DFL losses for given GT boxes
(with a padded GT slot and an image without GT) and the final detections, float32, 1e-4
relative; plus the detector's build and API on a tiny model."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgd_jax import config as C
from fgd_jax.convert.core import convert_state_dict
from fgd_jax.models import build_detector
from fgd_jax.models.dense_heads import anchor_valid_flags, flatten_levels
from fgd_jax.models.gfl import GFLHead, gfl_anchors, gfl_loss, gfl_postprocess
from fgd_jax.ops import assign as assign_ops
from fgd_jax.ops import boxes as box_ops
from fgd_jax.ops import losses as loss_ops

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "gfl", "gfl_head.npz")
STRIDES = (8, 16, 32, 64, 128)
NUM_CLASSES = 4
RTOL = 1e-4


@pytest.fixture(scope="module")
def gold():
    with np.load(GOLDEN) as f:
        return {k: f[k] for k in f.files}


def _levels(gold, key):
    return tuple(jnp.asarray(gold[f"{key}_{i}"]) for i in range(len(STRIDES)))


def _close(actual, desired, what, rtol=RTOL):
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    scale = max(np.max(np.abs(desired)), 1e-12)
    err = np.max(np.abs(actual - desired)) / scale if desired.size else 0.0
    assert err <= rtol, f"{what}: max |diff| / max |ref| = {err:.2e} > {rtol:.0e}"
    return err


def _anchors(gold):
    shapes = [gold[f"cls_{i}"].shape[1:3] for i in range(len(STRIDES))]
    anchors = gfl_anchors(shapes, STRIDES)
    return shapes, anchors


def test_head_outputs_match_mmdetection(gold):
    head = GFLHead(num_classes=NUM_CLASSES, in_channels=16, feat_channels=16, num_groups=4)
    feats = _levels(gold, "feat")
    target = jax.eval_shape(head.init, jax.random.key(0), feats)
    sd = {k[3:]: v for k, v in gold.items() if k.startswith("sd/")}
    variables = convert_state_dict(sd, target)  # strict: every name maps by the generic rule
    cls, reg = jax.jit(head.apply)(variables, feats)
    for lvl in range(len(STRIDES)):
        _close(cls[lvl], gold[f"cls_{lvl}"], f"cls level {lvl}")
        _close(reg[lvl], gold[f"reg_{lvl}"], f"reg level {lvl}")


@pytest.mark.parametrize("tag, thr", [("cfg", -1.0), ("ign", 0.5)])
def test_atss_assignment_matches_mmdetection(gold, tag, thr):
    shapes, anchors = _anchors(gold)
    counts = tuple(int(h * w) for h, w in shapes)
    valid = anchor_valid_flags(shapes, STRIDES, 1, gold["img_shape"], 32)
    got = jax.jit(
        jax.vmap(
            lambda v, b, gv, ib, iv: assign_ops.atss_assign(
                jnp.concatenate(anchors),
                counts,
                b,
                gv,
                topk=9,
                anchor_valid=v,
                ignore_boxes=ib,
                ignore_valid=iv,
                ignore_iof_thr=thr,
            )
        )
    )(valid, gold["gt_boxes"], gold["gt_valid"], gold["ignore_boxes"], gold["ignore_valid"])
    got = np.asarray(assign_ops.to_mmdet_encoding(got))
    np.testing.assert_array_equal(got, gold[f"assign_{tag}"])
    # the padded GT slot (index 3 in image 0) is never assigned; image 2 has no GT
    assert not np.any(got[0] == 4) and np.all(got[2][np.asarray(valid[2])] == 0)
    assert (np.sum(got > 0, axis=1) == gold[f"{tag}_num_pos"]).all()


@pytest.mark.parametrize("tag, thr", [("cfg", -1.0), ("ign", 0.5)])
def test_losses_match_mmdetection(gold, tag, thr):
    shapes, anchors = _anchors(gold)
    counts = [int(h * w) for h, w in shapes]
    strides = jnp.concatenate(
        [jnp.full((n,), s, jnp.float32) for n, s in zip(counts, STRIDES, strict=True)]
    )
    loss_fn = jax.jit(
        functools.partial(gfl_loss, num_level_anchors=counts, num_classes=NUM_CLASSES),
        static_argnames="ignore_iof_thr",
    )
    losses = loss_fn(
        flatten_levels(_levels(gold, "cls"), NUM_CLASSES),
        flatten_levels(_levels(gold, "reg"), 68),
        jnp.concatenate(anchors),
        strides,
        anchor_valid=anchor_valid_flags(shapes, STRIDES, 1, gold["img_shape"], 32),
        gt_boxes=jnp.asarray(gold["gt_boxes"]),
        gt_labels=jnp.asarray(gold["gt_labels"]),
        gt_valid=jnp.asarray(gold["gt_valid"]),
        ignore_boxes=jnp.asarray(gold["ignore_boxes"]),
        ignore_valid=jnp.asarray(gold["ignore_valid"]),
        ignore_iof_thr=thr,
    )
    for key in ("loss_cls", "loss_bbox", "loss_dfl"):
        _close(losses[key], gold[f"{tag}_{key}"], f"{tag} {key}")


@pytest.mark.parametrize("nms_pre", [1000, 20])
def test_detections_match_mmdetection(gold, nms_pre):
    shapes, anchors = _anchors(gold)
    post = jax.jit(
        functools.partial(
            gfl_postprocess,
            strides=STRIDES,
            num_classes=NUM_CLASSES,
            nms_pre=nms_pre,
            iou_threshold=0.6,
            max_candidates=400,
        )
    )
    dets = post(
        _levels(gold, "cls"),
        _levels(gold, "reg"),
        anchors,
        img_shape=jnp.asarray(gold["img_shape"]),
        scale_factor=jnp.asarray(gold["scale_factor"]),
    )
    for i in range(3):
        ok = np.asarray(dets["valid"][i])
        n = len(gold[f"det{nms_pre}_scores_{i}"])
        assert ok.sum() == n and ok[:n].all()
        _close(dets["scores"][i][:n], gold[f"det{nms_pre}_scores_{i}"], f"scores {i}")
        _close(dets["boxes"][i][:n], gold[f"det{nms_pre}_boxes_{i}"], f"boxes {i}")
        np.testing.assert_array_equal(dets["labels"][i][:n], gold[f"det{nms_pre}_labels_{i}"])


def test_quality_and_distribution_focal_loss_formulas():
    """QFL / DFL against the GFL paper's formulas written out in numpy (float64)."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, (5, 3))
    labels = np.array([0, 2, 3, 1, -1])  # 3 and -1: background
    q = rng.uniform(0, 1, 5)
    p = 1 / (1 + np.exp(-x))
    want = np.zeros(5)
    for i in range(5):
        for c in range(3):
            if c == labels[i]:
                want[i] += (
                    -(q[i] * np.log(p[i, c]) + (1 - q[i]) * np.log(1 - p[i, c]))
                    * abs(q[i] - p[i, c]) ** 2
                )
            else:
                want[i] += -np.log(1 - p[i, c]) * p[i, c] ** 2
    got = loss_ops.quality_focal_loss(jnp.asarray(x), jnp.asarray(labels), jnp.asarray(q))
    np.testing.assert_allclose(got, want, rtol=1e-5)

    logits = rng.normal(0, 1, (4, 17))
    t = np.array([0.0, 3.25, 15.9, 7.5])
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    lo = np.floor(t).astype(int)
    want = -(logp[np.arange(4), lo] * (lo + 1 - t) + logp[np.arange(4), lo + 1] * (t - lo))
    got = loss_ops.distribution_focal_loss(jnp.asarray(logits), jnp.asarray(t))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # the integral of a one-hot distribution is its bin
    onehot = jnp.asarray(np.eye(17)[[0, 5, 16, 9]].reshape(1, 68) * 50.0)
    np.testing.assert_allclose(box_ops.distribution_integral(onehot), [[0, 5, 16, 9]], atol=1e-5)


@pytest.mark.slow
def test_detector_builds_trains_and_predicts():
    """The tiny GFL detector from `gfl_model`: its output shapes (abstract evaluation), and
    its `loss` / `postprocess` on random head outputs (a padded GT and an image without GT):
    finite positive losses whose gradients w.r.t. the head outputs are finite and reach the
    distribution logits, and the detections' shapes. (The whole forward + backward pass
    trains in tests/test_train_detectors.py.)"""
    cfg = C.gfl_model(
        depth=10, num_classes=3, fpn_channels=16, feat_channels=16, stacked_convs=1, num_groups=4
    )
    det = build_detector(cfg)
    assert det.test_cfg.iou_threshold == 0.6 and det.bbox_head.reg_max == 16
    image = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: det.init_with_output(jax.random.key(0), x)[0], image)
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    assert [c.shape for c in shapes["bbox_preds"]] == [(2, h, w, 68) for h, w in sizes]
    assert [c.shape for c in shapes["cls_scores"]] == [(2, h, w, 3) for h, w in sizes]
    rng = np.random.default_rng(0)
    outs = {
        k: tuple(jnp.asarray(rng.normal(0, 1, c.shape), jnp.float32) for c in shapes[k])
        for k in ("cls_scores", "bbox_preds")
    }
    batch = dict(
        boxes=jnp.asarray([[[4.5, 6, 30, 40], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]]),
        labels=jnp.asarray([[1, -1], [-1, -1]], jnp.int32),
        valid=jnp.asarray([[True, False], [False, False]]),
        img_shape=jnp.asarray([[64, 64], [50, 60]], jnp.int32),
        scale_factor=jnp.ones((2, 4), jnp.float32),
    )

    def total(heads):
        losses = det.apply({}, heads, batch, method="loss")
        return sum(losses.values()), losses

    grads, losses = jax.jit(jax.grad(total, has_aux=True))(outs)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_dfl"}
    assert all(np.isfinite(float(x)) and float(x) > 0 for x in losses.values())
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    assert np.abs(np.asarray(grads["bbox_preds"][0])).sum() > 0
    post = jax.jit(lambda o, *a: det.apply({}, o, *a, method="postprocess"))
    out = post(outs, batch["img_shape"], batch["scale_factor"])
    assert out["boxes"].shape == (2, 100, 4) and out["labels"].dtype == jnp.int32
    assert np.asarray(out["valid"]).any()


def test_mmdetection_state_dict_round_trip():
    """Export to mmdetection names (with GFL's `integral.project` bins, as mmdetection's GFL
    checkpoints hold them) and import back, strictly: every leaf by the generic rule."""
    from fgd_jax.convert import export_torch_state_dict, import_torch_checkpoint
    from fgd_jax.models import variable_shapes

    cfg = C.gfl_model(
        depth=10, num_classes=3, fpn_channels=16, feat_channels=16, stacked_convs=1, num_groups=4
    )
    shapes = variable_shapes(build_detector(cfg))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(lambda s: rng.normal(0, 1, s.shape).astype(s.dtype), shapes)
    sd = export_torch_state_dict(variables, cfg)
    assert "bbox_head.scales.4.scale" in sd and "bbox_head.gfl_reg.weight" in sd
    assert "bbox_head.cls_convs.0.gn.weight" in sd
    np.testing.assert_array_equal(sd["bbox_head.integral.project"], np.arange(17))
    back = import_torch_checkpoint(sd, cfg)
    for a, b in zip(
        jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    sd["bbox_head.integral.project"] = np.arange(17, dtype=np.float32) * 2
    with pytest.raises(ValueError, match="integral.project"):
        import_torch_checkpoint(sd, cfg)
