"""YOLOX (CSPDarknet, YOLOXPAFPN, YOLOXHead, SimOTA, losses, detections) against real
mmdetection: golden files of `scripts/oracles/make_yolox_golden.py` (mmdet 3.3.0, whose YOLOX
code paths compute what 2.x does, see that script's docstring) in tests/golden/yolox/.

Tolerances: float64 forward 1e-9 relative (to each tensor's max), float32 forward 1e-4;
loss / assignment / detections on mmdet's own float32 head outputs: 1e-5 (losses, IoUs,
boxes), exact (assigned GT per prior, labels, number of detections), gradients 1e-4.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgd_jax import config as C
from fgd_jax.convert import import_torch_checkpoint, module_path
from fgd_jax.models import build_detector
from fgd_jax.models import yolox as Y
from fgd_jax.ops import simota

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "yolox")
# The model-sized graphs here compile ~3x faster at XLA's backend optimization level 0 (14 s
# -> 4 s for the float64 forward on the CPU); the values differ by rounding only (checked:
# float64 agrees to 1e-9 either way), far inside every tolerance below.
_FAST = {"xla_backend_optimization_level": 0}
NUM_CLASSES = 3


def _load(name: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(GOLDEN, f"{name}.npz")) as f:
        return {k: f[k] for k in f.files}


def _cfg():
    return C.yolox_model("s", num_classes=NUM_CLASSES, deepen_factor=0.33, widen_factor=0.0625)


def _close(actual, desired, rtol: float, what: str) -> None:
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, (what, actual.shape, desired.shape)
    scale = max(float(np.max(np.abs(desired))), 1e-12)
    err = float(np.max(np.abs(actual - desired))) / scale
    assert err <= rtol, f"{what}: max abs diff / max |golden| = {err:.3g} > {rtol}"


def _variables(dtype):
    cfg = _cfg()
    state = {k: v.astype(np.float32) for k, v in _load("weights").items()}
    variables = import_torch_checkpoint(state, cfg)
    return cfg, jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), variables)


def _with_backbone(det, v, x) -> tuple[tuple, dict]:
    """The eval-mode outputs and the backbone's maps from the same forward pass (one model
    in the compiled graph instead of two)."""
    out, inter = det.apply(
        v,
        x,
        capture_intermediates=lambda m, method: m.name == "backbone" and method == "__call__",
        mutable=["intermediates"],
    )
    return inter["intermediates"]["backbone"]["__call__"][0], out


def _check_eval(backbone, out, fwd, rtol: float) -> None:
    for i in range(3):
        _close(backbone[i], fwd[f"backbone_{i}"], rtol, f"backbone {i}")
        _close(out["features"][i], fwd[f"neck_{i}"], rtol, f"neck {i}")
        _close(out["cls_scores"][i], fwd[f"cls_{i}"], rtol, f"cls {i}")
        _close(out["bbox_preds"][i], fwd[f"reg_{i}"], rtol, f"reg {i}")
        _close(out["objectnesses"][i], fwd[f"obj_{i}"], rtol, f"obj {i}")


@pytest.mark.slow
def test_forward_matches_mmdet() -> None:
    """float32: eval-mode backbone, neck and head outputs (converted mmdet weights through the
    generic converter rule) vs mmdetection's (computed in float64), 1e-4 relative; the
    detector API's `predict` shapes."""
    fwd = _load("forward")
    cfg, variables = _variables(jnp.float32)
    det = build_detector(cfg)

    def run(v, x):
        backbone, out = _with_backbone(det, v, x)
        return backbone, out, det.apply(v, out, *pred_args, method="postprocess")

    image = jnp.asarray(fwd["image"], jnp.float32)
    pred_args = (jnp.array([[64, 96]] * 2), jnp.ones((2, 4)))
    backbone, out, pred = jax.jit(run, compiler_options=_FAST)(variables, image)
    _check_eval(backbone, out, fwd, 1e-4)
    # `predict` (= `postprocess` of `__call__`): its shapes, traced only (no second compile)
    shapes = jax.eval_shape(
        lambda v, x: det.apply(v, x, *pred_args, method="predict"), variables, image
    )
    assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes) == jax.tree.map(
        lambda a: (a.shape, a.dtype), pred
    )
    assert pred["boxes"].shape == (2, 1000, 4) and pred["labels"].dtype == jnp.int32
    assert pred["scores"].shape == pred["valid"].shape == (2, 1000)
    assert int(pred["valid"].sum()) > 0


@pytest.mark.slow
def test_float64_forward_and_train_batchnorm_match_mmdet() -> None:
    """float64, 1e-9 relative: the eval-mode outputs, and train mode: BN on batch statistics
    (neck outputs) and the running statistics after one step (momentum 0.03, unbiased
    variance) of BN layers in the backbone, neck and head."""
    fwd = _load("forward")
    with jax.enable_x64(True):
        cfg, variables = _variables(jnp.float64)
        det = build_detector(cfg)

        def run(v, x):
            backbone, out = _with_backbone(det, v, x)
            train_out, state = det.apply(v, x, train=True, mutable=["batch_stats"])
            return backbone, out, train_out["features"], state["batch_stats"]

        backbone, out, train_feats, stats = jax.jit(run, compiler_options=_FAST)(
            variables, jnp.asarray(fwd["image"])
        )
        _check_eval(backbone, out, fwd, 1e-9)
        for i in range(3):
            _close(train_feats[i], fwd[f"train_neck_{i}"], 1e-9, f"train-mode neck {i}")
        for key in [k for k in fwd if k.startswith("stats_mean:")]:
            name = key.split(":", 1)[1]
            node = stats
            for part in module_path(name):
                node = node[part]
            _close(node["mean"], fwd[key], 1e-9, f"running mean {name}")
            _close(node["var"], fwd[f"stats_var:{name}"], 1e-9, f"running var {name}")


def _flat_head(d: dict[str, np.ndarray]):
    def flat(prefix, last):
        return np.concatenate([d[f"{prefix}_{i}"].reshape(2, -1, last) for i in range(3)], 1)

    shapes = [d[f"cls_{i}"].shape[1:3] for i in range(3)]
    return flat("cls", NUM_CLASSES), flat("reg", 4), flat("obj", 1)[..., 0], shapes


def _padded_gt(loss: dict[str, np.ndarray], extra: int):
    """The golden GT plus `extra` padded slots holding garbage boxes (valid False)."""
    b, g = loss["gt_labels"].shape
    boxes = np.concatenate(
        [loss["gt_boxes"], np.tile([[[8.0, 8.0, 60.0, 50.0]]], (b, extra, 1))], 1
    )
    labels = np.concatenate([loss["gt_labels"], np.zeros((b, extra), np.int64)], 1)
    valid = np.concatenate([loss["gt_valid"], np.zeros((b, extra), bool)], 1)
    return boxes.astype(np.float32), labels, valid


@pytest.mark.slow
def test_simota_and_losses_match_mmdet() -> None:
    """SimOTA assignment (GT per prior, IoU of the positives), the four losses (use_l1) and
    their gradients w.r.t. the head outputs, on mmdet's float32 head outputs; padded GT
    slots (valid False, overlapping real boxes) change nothing."""
    loss = _load("loss")
    cls, reg, obj, shapes = _flat_head(loss)
    priors = Y.yolox_priors(shapes, (8, 16, 32))
    boxes, labels, valid = _padded_gt(loss, 2)
    assigned, iou = jax.jit(Y.yolox_targets, compiler_options=_FAST)(
        cls, reg, obj, priors, boxes, labels, valid
    )
    np.testing.assert_array_equal(np.asarray(assigned), loss["assigned"])
    pos = loss["assigned"] >= 0
    _close(np.asarray(iou)[pos], loss["max_overlaps"][pos], 1e-5, "IoU of the positives")
    assert float(np.abs(np.asarray(iou)[~pos]).max()) == 0.0

    cfg = Y.YOLOXTrainCfg(use_l1=True)

    def total(c, r, o):
        out = Y.yolox_loss(c, r, o, priors, boxes, labels, valid, cfg)
        return sum(out.values()), out

    (_, out), grads = jax.jit(
        jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True), compiler_options=_FAST
    )(cls, reg, obj)
    assert sorted(out) == ["loss_bbox", "loss_cls", "loss_l1", "loss_obj"]
    for k, v in out.items():
        _close(v, loss[k], 1e-5, k)
    g_cls, g_reg, g_obj, _ = _flat_head(
        {f"{n}_{i}": loss[f"grad_{n}_{i}"] for n in ("cls", "reg", "obj") for i in range(3)}
    )
    _close(grads[0], g_cls, 1e-4, "d loss / d cls")
    _close(grads[1], g_reg, 1e-4, "d loss / d reg")
    _close(grads[2], g_obj, 1e-4, "d loss / d obj")


def test_l1_runtime_switch() -> None:
    """`yolox_loss(l1_on=...)` (the data recipe's `use_l1` batch key, mmdet's
    `YOLOXModeSwitchHook` without a recompile): off gives `loss_l1` 0 and the other losses
    unchanged, on gives mmdet's `loss_l1`; one compiled function serves both."""
    loss = _load("loss")
    cls, reg, obj, shapes = _flat_head(loss)
    priors = Y.yolox_priors(shapes, (8, 16, 32))
    boxes, labels, valid = _padded_gt(loss, 1)
    fn = jax.jit(
        lambda on: Y.yolox_loss(cls, reg, obj, priors, boxes, labels, valid, l1_on=on),
        compiler_options=_FAST,
    )
    off, on = fn(jnp.asarray(False)), fn(jnp.asarray(True))
    assert float(off["loss_l1"]) == 0.0
    _close(on["loss_l1"], loss["loss_l1"], 1e-5, "loss_l1")
    for k in ("loss_cls", "loss_bbox", "loss_obj"):
        assert float(off[k]) == float(on[k])
        _close(on[k], loss[k], 1e-5, k)
    assert fn._cache_size() == 1


def test_simota_static_rules() -> None:
    """Hand-made cases: dynamic k from the top IoUs, the min-cost rule for a prior two GTs
    take, no candidate outside every region, padded GTs never assigned, no GT at all."""
    # priors at x = 0..9 (stride 1) on the line y = 0, predicting 5x3 boxes centred on them
    n = 10
    x = jnp.arange(n, dtype=jnp.float32)
    priors = jnp.stack([x + 0.5, jnp.full(n, 0.5), jnp.ones(n), jnp.ones(n)], -1)
    decoded = jnp.stack([x - 2.0, jnp.full(n, -1.0), x + 3.0, jnp.full(n, 2.0)], -1)
    scores = jnp.tile(jnp.array([[0.6, 0.4]]), (n, 1))
    gt = jnp.array([[0.0, -1.0, 5.0, 2.0], [2.0, -1.0, 7.0, 2.0], [0.0, 0.0, 9.0, 9.0]])
    labels = jnp.array([0, 1, 0])
    valid = jnp.array([True, True, False])
    cost, ious, _ = jax.jit(simota.simota_cost)(scores, priors, decoded, gt, labels, valid)
    assert np.all(np.isinf(np.asarray(cost)[:, 2])) and np.all(np.asarray(ious)[:, 2] == 0)
    assign = jax.jit(simota.simota_assign)
    assigned, miou = assign(scores, priors, decoded, gt, labels, valid)
    a = np.asarray(assigned)
    assert not np.any(a == 2)
    # reference: the module docstring's rules in numpy
    c, iu = np.asarray(cost)[:, :2], np.asarray(ious)[:, :2]
    k = np.maximum(np.floor(np.sort(iu, 0)[::-1][:10].sum(0)).astype(int), 1)
    match = np.zeros_like(c, bool)
    for g in range(2):
        match[np.argsort(c[:, g], kind="stable")[: k[g]], g] = True
    multi = match.sum(1) > 1
    match[multi] = np.eye(2, dtype=bool)[np.argmin(c[multi], 1)]
    want = np.where(match.any(1), match.argmax(1), -1)
    np.testing.assert_array_equal(a, want)
    assert np.any(multi), "the case must exercise a prior taken by both GTs"
    _close(
        np.asarray(miou), np.where(want >= 0, iu[np.arange(n), np.maximum(want, 0)], 0), 1e-6, "iou"
    )
    none, _ = assign(scores, priors, decoded, gt, labels, jnp.zeros(3, bool))
    assert np.all(np.asarray(none) == -1)


def test_detections_match_mmdet() -> None:
    """`yolox_postprocess` (score >= 0.01 on max-class * obj, class-wise NMS 0.65, rescale)
    vs mmdet `predict_by_feat(rescale=True)` on the same float32 head outputs."""
    dets = _load("dets")
    cls, reg, obj, shapes = _flat_head(dets)
    priors = Y.yolox_priors(shapes, (8, 16, 32))
    out = jax.jit(Y.yolox_postprocess, compiler_options=_FAST)(
        cls, reg, obj, priors, dets["scale_factor"]
    )
    for i in range(2):
        v = np.asarray(out["valid"][i])
        n = len(dets[f"scores_{i}"])
        assert int(v.sum()) == n and v[:n].all()
        _close(np.asarray(out["scores"][i])[:n], dets[f"scores_{i}"], 1e-5, f"scores {i}")
        _close(np.asarray(out["boxes"][i])[:n], dets[f"boxes_{i}"], 1e-5, f"boxes {i}")
        np.testing.assert_array_equal(np.asarray(out["labels"][i])[:n], dets[f"labels_{i}"])


def test_model_config_sizes() -> None:
    """s / m / l channels and depths as mmdetection's yolox_{s,m,l}_8x8_300e_coco."""
    for size, chans, blocks in (("s", 128, 1), ("m", 192, 2), ("l", 256, 3)):
        m = C.yolox_model(size)
        assert m.neck.out_channels == chans == m.head.in_channels == m.head.feat_channels
        assert m.neck.num_csp_blocks == blocks
        assert tuple(m.neck.in_channels) == (chans, 2 * chans, 4 * chans)
    with pytest.raises(ValueError, match="size"):
        C.yolox_model("x")


def test_convert_drops_ema_buffers() -> None:
    """An mmdetection 2.x YOLOX checkpoint also holds `ema_*` buffers (ExpMomentumEMAHook):
    they are dropped, the plain (EMA-swapped) keys convert strictly."""
    state = {k: v.astype(np.float32) for k, v in _load("weights").items()}
    with_ema = dict(state)
    for k, v in state.items():
        with_ema["ema_" + k.replace(".", "_")] = v + 1.0
    cfg = _cfg()
    out, report = import_torch_checkpoint(with_ema, cfg, return_report=True)
    assert len(report.dropped) == len(state) and not report.unexpected
    ref = import_torch_checkpoint(state, cfg)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref), strict=True):
        np.testing.assert_array_equal(a, b)
