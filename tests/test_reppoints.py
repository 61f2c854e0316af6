"""RepPoints against real mmdetection (golden file from scripts/oracles/make_reppoints_golden.py:
mmdetection 3.3 set to 2.11's rules, see that script's docstring): the GN FPN's distilled
(pre-norm) maps and outputs, the head's outputs (float32 1e-4 relative, float64 1e-9), both
stages' assignments, the refine targets, the three losses for given GT (a padded GT slot and
an image without GT) and the final detections; plus the detector's build and API."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgd_jax import config as C
from fgd_jax.convert import export_torch_state_dict, import_torch_checkpoint
from fgd_jax.convert.core import convert_state_dict
from fgd_jax.models import INIT_COMPILER_OPTIONS, build_detector
from fgd_jax.models.dense_heads import flatten_levels, point_valid_flags
from fgd_jax.models.fpn import FPN
from fgd_jax.models.reppoints import (
    RepPointsHead,
    init_boxes,
    points_to_boxes,
    reppoints_loss,
    reppoints_points,
    reppoints_postprocess,
    reppoints_targets,
)
from fgd_jax.ops import assign as assign_ops

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "reppoints", "reppoints.npz")
STRIDES = (8, 16, 32, 64, 128)
NUM_CLASSES = 4
RTOL = 1e-4
# XLA at optimization level 0: these functions run once on tiny inputs, compiling dominates
_jit = functools.partial(jax.jit, compiler_options=INIT_COMPILER_OPTIONS)


@pytest.fixture(scope="module")
def gold():
    with np.load(GOLDEN) as f:
        return {k: f[k] for k in f.files}


def _levels(gold, key, suffix=""):
    return tuple(jnp.asarray(gold[f"{key}_{i}{suffix}"]) for i in range(len(STRIDES)))


def _close(actual, desired, what, rtol=RTOL):
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    scale = max(np.max(np.abs(desired)), 1e-12) if desired.size else 1.0
    err = np.max(np.abs(actual - desired)) / scale if desired.size else 0.0
    assert err <= rtol, f"{what}: max |diff| / max |ref| = {err:.2e} > {rtol:.0e}"
    return err


def _modules():
    neck = FPN(
        in_channels=(8, 16, 32, 64),
        out_channels=16,
        num_outs=5,
        start_level=1,
        add_extra_convs="on_input",
        norm="gn",
        num_groups=4,
    )
    head = RepPointsHead(
        num_classes=NUM_CLASSES,
        in_channels=16,
        feat_channels=16,
        point_feat_channels=16,
        num_groups=4,
    )
    return neck, head


def _variables(gold, module, args, prefix):
    target = jax.eval_shape(module.init, jax.random.key(0), args)
    sd = {k[3:]: v for k, v in gold.items() if k.startswith("sd/")}
    # strict: every key under the prefix maps by the generic rule
    return convert_state_dict(sd, target, prefix=prefix)


def _run(gold, dtype=jnp.float32):
    neck, head = _modules()
    cs = tuple(jnp.asarray(gold[f"c{i}"], dtype) for i in range(4))
    nv = _variables(gold, neck, cs, "neck.")
    outs, pre = _jit(functools.partial(neck.apply, with_pre_norm=True))(
        jax.tree.map(lambda v: jnp.asarray(v, dtype), nv), cs
    )
    hv = _variables(gold, head, outs, "bbox_head.")
    res = _jit(head.apply)(jax.tree.map(lambda v: jnp.asarray(v, dtype), hv), outs)
    return pre, outs, res


def test_gn_neck_and_head_match_mmdetection(gold):
    pre, outs, (cls, init, refine, moment) = _run(gold)
    for lvl in range(len(STRIDES)):
        _close(pre[lvl], gold[f"pre{lvl}"], f"fpn_convs.{lvl}.conv (pre-norm) level {lvl}")
        _close(outs[lvl], gold[f"p{lvl}"], f"FPN output level {lvl}")
        _close(cls[lvl], gold[f"cls_{lvl}"], f"cls level {lvl}")
        _close(init[lvl], gold[f"init_{lvl}"], f"pts_init level {lvl}")
        _close(refine[lvl], gold[f"refine_{lvl}"], f"pts_refine level {lvl}")
    np.testing.assert_allclose(moment, [0.1, -0.2], rtol=1e-6)
    # the distilled maps are not the outputs (GN in between)
    assert not np.allclose(pre[0], outs[0], atol=1e-2)


def test_head_matches_mmdetection_float64(gold):
    with jax.enable_x64(True):
        pre, _, (cls, init, refine, _) = _run(gold, jnp.float64)
        assert cls[0].dtype == jnp.float64 and refine[0].dtype == jnp.float64
        for lvl in range(len(STRIDES)):
            _close(pre[lvl], gold[f"pre{lvl}_f64"], f"f64 pre-norm {lvl}", rtol=1e-9)
            _close(cls[lvl], gold[f"cls_{lvl}_f64"], f"f64 cls {lvl}", rtol=1e-9)
            _close(init[lvl], gold[f"init_{lvl}_f64"], f"f64 pts_init {lvl}", rtol=1e-9)
            _close(refine[lvl], gold[f"refine_{lvl}_f64"], f"f64 pts_refine {lvl}", rtol=1e-9)


def _points(gold):
    shapes = [gold[f"cls_{i}"].shape[1:3] for i in range(len(STRIDES))]
    points, strides = reppoints_points(shapes, STRIDES)
    valid = point_valid_flags(shapes, STRIDES, gold["img_shape"], 32)
    return points, strides, valid


def _flat(gold, key):
    last = gold[f"{key}_0"].shape[-1]
    return flatten_levels(_levels(gold, key), last)


def test_assignments_and_targets_match_mmdetection(gold):
    points, strides, valid = _points(gold)
    moment = jnp.asarray([0.1, -0.2])
    proposals = init_boxes(_flat(gold, "init"), moment, points, strides)
    t = _jit(
        jax.vmap(functools.partial(reppoints_targets, points, strides, num_classes=NUM_CLASSES))
    )(proposals, valid, gold["gt_boxes"], gold["gt_labels"], gold["gt_valid"])
    for stage in ("init", "refine"):
        got = np.asarray(assign_ops.to_mmdet_encoding(t[f"assigned_{stage}"]))
        np.testing.assert_array_equal(got, gold[f"assign_{stage}"], err_msg=stage)
        # the padded GT slot (index 4 in image 0) is never assigned; image 2 has no GT
        assert not np.any(got[0] == 5) and not np.any(got[2] > 0)
    np.testing.assert_array_equal(t["labels"], gold["refine_labels"])
    np.testing.assert_array_equal(t["label_weights"], gold["refine_label_weights"])
    # the 3x4 px GT 3 of image 0 (level below P3, clamped) has its init positive on P3
    assert np.sum(np.asarray(t["assigned_init"][0]) == 3) == 1
    assert np.flatnonzero(np.asarray(t["assigned_init"][0]) == 3)[0] < 8 * 12


def test_losses_match_mmdetection(gold):
    points, strides, valid = _points(gold)
    loss = _jit(functools.partial(reppoints_loss, num_classes=NUM_CLASSES))(
        _flat(gold, "cls"),
        _flat(gold, "init"),
        _flat(gold, "refine"),
        jnp.asarray([0.1, -0.2]),
        points,
        strides,
        valid,
        jnp.asarray(gold["gt_boxes"]),
        jnp.asarray(gold["gt_labels"]),
        jnp.asarray(gold["gt_valid"]),
    )
    for key in ("loss_cls", "loss_pts_init", "loss_pts_refine"):
        _close(loss[key], gold[key], key)


def test_loss_and_postprocess_keep_float64(gold):
    """In a float64 run the losses and the detections stay float64 (abstract evaluation:
    dtypes only, nothing compiled)."""
    with jax.enable_x64(True):
        points, strides, valid = _points(gold)
        f64 = lambda key: jax.ShapeDtypeStruct(_flat(gold, key).shape, jnp.float64)  # noqa: E731
        loss = jax.eval_shape(
            functools.partial(reppoints_loss, num_classes=NUM_CLASSES),
            f64("cls"),
            f64("init"),
            f64("refine"),
            jax.ShapeDtypeStruct((2,), jnp.float64),
            points,
            strides,
            valid,
            jax.ShapeDtypeStruct(gold["gt_boxes"].shape, jnp.float64),
            jnp.asarray(gold["gt_labels"]),
            jnp.asarray(gold["gt_valid"]),
        )
        assert all(v.dtype == jnp.float64 for v in loss.values())
        levels = lambda key: tuple(  # noqa: E731
            jax.ShapeDtypeStruct(x.shape, jnp.float64) for x in _levels(gold, key)
        )
        dets = jax.eval_shape(
            functools.partial(
                reppoints_postprocess, strides=STRIDES, num_classes=NUM_CLASSES, nms_pre=10
            ),
            levels("cls"),
            levels("refine"),
            jax.ShapeDtypeStruct((2,), jnp.float64),
            img_shape=jnp.asarray(gold["img_shape"]),
            scale_factor=jax.ShapeDtypeStruct((3, 4), jnp.float64),
        )
        assert dets["boxes"].dtype == jnp.float64 and dets["scores"].dtype == jnp.float64


# (nms_pre, every (point, class) pair kept: 129 points or 10 + 10 + 6 + 2 + 1, x 4 classes)
@pytest.mark.parametrize("nms_pre, pairs", [(1000, 516), (10, 116)])
def test_detections_match_mmdetection(gold, nms_pre, pairs):
    post = _jit(
        functools.partial(
            reppoints_postprocess,
            strides=STRIDES,
            num_classes=NUM_CLASSES,
            nms_pre=nms_pre,
            max_candidates=pairs,
        )
    )
    dets = post(
        _levels(gold, "cls"),
        _levels(gold, "refine"),
        jnp.asarray([0.1, -0.2]),
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


def test_moment_transform_formula():
    """`points_to_boxes` against the moment formula in numpy (float64): mean -/+ unbiased
    std * exp(transfer); `(y, x)` vs `(x, y)` layouts; a zero-spread set has a finite
    gradient."""
    rng = np.random.default_rng(0)
    pts = rng.normal(0, 3, (5, 18))
    mt = np.array([0.3, -0.1])
    y, x = pts[:, 0::2], pts[:, 1::2]
    want = np.stack(
        [
            x.mean(1) - x.std(1, ddof=1) * np.exp(mt[0]),
            y.mean(1) - y.std(1, ddof=1) * np.exp(mt[1]),
            x.mean(1) + x.std(1, ddof=1) * np.exp(mt[0]),
            y.mean(1) + y.std(1, ddof=1) * np.exp(mt[1]),
        ],
        1,
    )
    with jax.enable_x64(True):
        got = points_to_boxes(jnp.asarray(pts), jnp.asarray(mt))
        np.testing.assert_allclose(got, want, rtol=1e-12)
        swapped = pts.reshape(5, 9, 2)[..., ::-1].reshape(5, 18)
        got_xy = points_to_boxes(jnp.asarray(swapped), jnp.asarray(mt), y_first=False)
        np.testing.assert_allclose(got_xy, want, rtol=1e-12)
    g = jax.grad(lambda p: points_to_boxes(p, jnp.zeros(2)).sum())(jnp.ones((1, 18)))
    assert np.all(np.isfinite(g))


def test_detector_builds_from_config():
    """The tiny RepPoints detector from `reppoints_model`, abstractly (nothing computed; the
    forward + backward pass trains in tests/test_train_detectors.py): a GN neck, the head's
    output shapes, the distilled features' shapes, the loss names and the detections'
    shapes."""
    cfg = C.reppoints_model(
        depth=10, num_classes=3, fpn_channels=16, feat_channels=16, stacked_convs=1, num_groups=4
    )
    det = build_detector(cfg)
    assert det.neck.norm == "gn" and det.test_cfg.iou_threshold == 0.5
    assert det.bbox_head.smooth_l1_beta == 0.11 and det.train_cfg.init_pos_num == 1
    batch = dict(
        image=jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32),
        boxes=jax.ShapeDtypeStruct((2, 2, 4), jnp.float32),
        labels=jax.ShapeDtypeStruct((2, 2), jnp.int32),
        valid=jax.ShapeDtypeStruct((2, 2), bool),
        img_shape=jax.ShapeDtypeStruct((2, 2), jnp.int32),
        scale_factor=jax.ShapeDtypeStruct((2, 4), jnp.float32),
    )
    variables = jax.eval_shape(det.init, jax.random.key(0), batch["image"])
    assert variables["params"]["bbox_head"]["moment_transfer"].shape == (2,)
    assert variables["params"]["bbox_head"]["reppoints_cls_conv"]["kernel"].shape == (3, 3, 16, 16)
    assert "bias" not in variables["params"]["neck"]["fpn_convs_0"]["conv"]
    outs = jax.eval_shape(det.apply, variables, batch["image"])
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    assert [c.shape for c in outs["pts_refine"]] == [(2, h, w, 18) for h, w in sizes]
    assert [c.shape for c in outs["features"]] == [(2, h, w, 16) for h, w in sizes]
    losses, feats = jax.eval_shape(
        functools.partial(det.apply, method="forward_train"), variables, batch
    )
    assert set(losses) == {"loss_cls", "loss_pts_init", "loss_pts_refine"} and len(feats) == 5
    dets = jax.eval_shape(
        functools.partial(det.apply, method="predict"),
        variables,
        batch["image"],
        batch["img_shape"],
        batch["scale_factor"],
    )
    assert dets["boxes"].shape == (2, 100, 4) and dets["labels"].dtype == jnp.int32


@pytest.mark.slow
def test_mmdetection_x101_dcn_checkpoint_keys_convert():
    """The real `reppoints_moment_x101_fpn_dconv_c3-c5_gn-neck+head_2x_coco` state dict's keys
    and shapes (tests/golden/reppoints/reppoints_x101_dcn_keys.npz) convert strictly into
    `reppoints_model(depth=101, groups=32, base_width=4, dcn='DCN')`: every key used, every
    leaf filled (GN neck, DCN offsets, the head's deformable convs and `moment_transfer`); the
    export gives back exactly those keys and shapes."""
    g = np.load(os.path.join(os.path.dirname(GOLDEN), "reppoints_x101_dcn_keys.npz"))
    sd, pos = {}, 0
    for key, nd in zip(g["keys"], g["ndims"], strict=True):
        shape = tuple(int(d) for d in g["shapes"][pos : pos + nd])
        pos += nd
        sd[str(key)] = np.broadcast_to(np.float32(0), shape)  # shapes only, no memory
    cfg = C.reppoints_model(depth=101, groups=32, base_width=4, dcn="DCN")
    variables, report = import_torch_checkpoint(sd, cfg, return_report=True)
    assert not report.missing and not report.unexpected and not report.mismatched
    assert not report.dropped
    # and back: the export writes exactly mmdetection's keys and shapes
    out = export_torch_state_dict(variables, cfg)
    real = {k: v.shape for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert {k: v.shape for k, v in out.items()} == real
    assert "bbox_head.moment_transfer" in report.loaded
    assert "neck.fpn_convs.4.gn.weight" in report.loaded
    assert sum("conv_offset" in k for k in report.loaded) == 2 * (4 + 23 + 3)


def _teacher_golden(dtype):
    """The X101-DCN + GN FPN golden (scripts/oracles/make_reppoints_teacher_golden.py): its
    weights regenerated from the oracle scripts' numpy seeds, converted into a feature teacher
    of the same layout; returns (golden, model, variables, image)."""
    import importlib.util

    path = os.path.join(
        os.path.dirname(__file__), "..", "scripts", "oracles", "make_reppoints_teacher_golden.py"
    )
    spec = importlib.util.spec_from_file_location("make_reppoints_teacher_golden", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)  # numpy only at import
    dcn = gen.dcn_script()
    g = np.load(os.path.join(os.path.dirname(GOLDEN), "x101_dcn_gn_fpn.npz"))
    sd, pos = {}, 0
    for key, nd in zip(g["keys"], g["ndims"], strict=True):
        key, shape = str(key), tuple(int(d) for d in g["shapes"][pos : pos + nd])
        pos += nd
        fn = dcn.seeded_tensor if key.startswith("backbone.") else gen.seeded_neck_tensor
        sd[key] = fn(key.split(".", 1)[1], shape)
    sums = np.array([sd[str(k)].astype(np.float64).sum() for k in g["keys"]])
    np.testing.assert_allclose(sums, g["sums"], rtol=1e-12)  # the oracle's weights
    cfg = C.feature_teacher_model(
        depth=50,
        groups=4,
        base_width=4,
        fpn_channels=16,
        start_level=1,
        add_extra_convs="on_input",
        num_outs=5,
    )
    cfg.neck.update(norm="gn", num_groups=4)
    model = build_detector(cfg)
    variables = import_torch_checkpoint(sd, cfg)  # strict
    variables = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)
    x = jnp.asarray(g["x"].transpose(0, 2, 3, 1), dtype)
    return g, model, variables, x


@pytest.mark.slow
def test_x101_dcn_gn_fpn_teacher_features_match_mmdetection():
    """The RepPoints X101-DCN teacher's distilled maps (ResNeXt with DCN in c3-c5 + GN FPN,
    tiny widths): the `fpn_convs.{l}.conv` outputs before GN, float32 within 1e-4 of each
    level's scale, float64 within 1e-9."""
    g, model, variables, x = _teacher_golden(jnp.float32)
    feats = _jit(functools.partial(model.apply, method="extract_feat"))(variables, x)
    for lvl in range(5):
        _close(feats[lvl], g[f"pre{lvl}"], f"teacher pre-norm P{lvl + 3}")
    with jax.enable_x64(True):
        g, model, variables, x = _teacher_golden(jnp.float64)
        feats = _jit(functools.partial(model.apply, method="extract_feat"))(variables, x)
        for lvl in range(5):
            _close(feats[lvl], g[f"pre{lvl}_f64"], f"f64 teacher P{lvl + 3}", rtol=1e-9)
