"""A feature teacher (model type 'features': backbone + FPN of any mmdetection detector).

- Its variables are exactly the backbone + neck of the detector it stands for (a Faster R-CNN
  with the same backbone and FPN), and `extract_feat` gives maps of the same shapes.
- The converter takes an mmdetection checkpoint's `backbone.*` / `neck.*` keys strictly and
  drops every other key by name, listing them in the report; a missing backbone key still fails.
- The default config is the Cascade Mask R-CNN X101-32x4d DCN c3-c5 teacher's backbone + FPN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgd_jax import config as C
from fgd_jax.convert import export_torch_state_dict, import_torch_checkpoint
from fgd_jax.models import build_detector, variable_shapes


def _tiny() -> C.ConfigDict:
    cfg = C.feature_teacher_model(depth=18, groups=1, base_width=64, dcn=None, fpn_channels=8)
    return cfg


def test_same_variables_and_features_as_the_detector_it_stands_for():
    feat_cfg = _tiny()
    det_cfg = C.faster_rcnn_model(depth=18, fpn_channels=8, rpn_feat_channels=8)
    teacher, det = build_detector(feat_cfg), build_detector(det_cfg)
    shapes = variable_shapes(teacher)
    det_shapes = variable_shapes(det)
    for col in ("params", "batch_stats"):
        assert set(shapes[col]) == {"backbone", "neck"} & set(det_shapes[col])
        for part in shapes[col]:
            same = jax.tree.map(lambda a, b: a.shape == b.shape, shapes[col][part],
                                det_shapes[col][part])  # fmt: skip
            assert all(jax.tree.leaves(same))
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    feats = jax.eval_shape(lambda v, x: teacher.apply(v, x, method="extract_feat"), shapes, x)
    det_feats = jax.eval_shape(lambda v, x: det.apply(v, x, method="extract_feat"), det_shapes, x)
    assert [f.shape for f in feats] == [f.shape for f in det_feats]
    assert [f.shape for f in feats][::4] == [(1, 16, 16, 8), (1, 1, 1, 8)]  # P2..P6 (P6 pooled)


def test_converter_keeps_backbone_and_neck_and_reports_the_rest():
    cfg = _tiny()
    rng = np.random.default_rng(1)
    variables = jax.tree.map(
        lambda s: rng.normal(size=s.shape).astype(np.float32),
        variable_shapes(build_detector(cfg)),
    )
    sd = export_torch_state_dict(variables)
    heads = {
        "rpn_head.rpn_conv.weight": np.zeros((8, 8, 3, 3), np.float32),
        "roi_head.bbox_head.0.fc_cls.weight": np.zeros((81, 16), np.float32),
        "roi_head.mask_head.2.conv_logits.bias": np.zeros((80,), np.float32),
    }
    out, report = import_torch_checkpoint({**sd, **heads}, cfg, return_report=True)
    assert sorted(report.dropped) == sorted(heads)
    assert not report.missing and not report.unexpected
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), out, variables)
    assert all(jax.tree.leaves(same))
    missing = dict(sd)
    del missing["backbone.layer2.0.conv1.weight"]
    with pytest.raises(ValueError, match="layer2_0"):
        import_torch_checkpoint({**missing, **heads}, cfg)


def test_default_is_the_cascade_x101_dcn_teacher():
    cfg = C.feature_teacher_model()
    b = cfg.backbone
    assert (b.depth, b.groups, b.base_width) == (101, 32, 4)
    assert b.dcn == "DCN" and b.dcn_deform_groups == 1
    assert tuple(b.stage_with_dcn) == (False, True, True, True)
    assert (cfg.neck.start_level, cfg.neck.add_extra_convs, cfg.neck.num_outs) == (0, False, 5)
    params = variable_shapes(build_detector(cfg))["params"]["backbone"]
    assert "conv_offset" in params["layer4_2"]["conv2"]
    assert params["layer2_0"]["conv2"]["conv_offset"]["kernel"].shape == (3, 3, 256, 18)
    assert "conv_offset" not in params["layer1_0"]["conv2"]


@pytest.mark.slow
def test_the_distiller_takes_a_feature_teacher(tmp_path):
    """The tiny FGD RetinaNet of the other tests with its teacher reduced to backbone + FPN (no
    inheriting): the experiment builds, and its loss and gradients trace (`jax.eval_shape`: no
    compilation; the distiller's numbers themselves are tests/test_distiller.py's) with one FGD
    loss per level and gradients for each FGD module."""
    from fgd_jax.distill import distiller as D
    from fgd_jax.experiment import Experiment, dummy_batch, init_train_state
    from tests._tiny import tiny_config

    cfg = tiny_config(str(tmp_path / "data"), "fgd")
    full = cfg.teacher.model
    cfg.teacher.model = C.ConfigDict(dict(type="features", backbone=full.backbone, neck=full.neck))
    cfg.distill.init_student = False
    exp = Experiment(cfg)
    batch = {k: jnp.asarray(v) for k, v in dummy_batch(cfg.data, 2).items()}
    tvars = variable_shapes(exp.teacher)
    state = jax.eval_shape(lambda: init_train_state(exp, dummy_batch(cfg.data), 10)[0])

    def total(p, model_state, t):
        ls, _ = exp.apply_losses(p, model_state, t, batch, jax.random.PRNGKey(0))
        return D.total_loss(ls), ls

    (loss, losses), grads = jax.eval_shape(
        jax.value_and_grad(total, has_aux=True), state.params, state.model_state, tvars
    )
    assert loss.shape == ()
    assert {f"loss_fgd_fpn_{i}" for i in range(5)} <= set(losses)
    assert set(grads["distill_losses"]) == {f"loss_fgd_fpn_{i}" for i in range(5)}


@pytest.mark.slow
def test_converts_the_real_cascade_x101_dcn_teacher_key_set():
    """The key set (and shapes) of mmdetection's cascade_mask_rcnn_x101_32x4d_fpn_dconv_c3-c5
    state dict (tests/golden/dcn/cascade_x101_dcn_keys.npz, scripts/oracles/make_dcn_golden.py)
    converts strictly into `feature_teacher_model()`; exactly the head keys are dropped."""
    import os

    g = np.load(
        os.path.join(os.path.dirname(__file__), "golden", "dcn", "cascade_x101_dcn_keys.npz")
    )
    sd, pos = {}, 0
    for key, nd in zip(g["keys"], g["ndims"], strict=True):
        shape = tuple(int(d) for d in g["shapes"][pos : pos + nd])
        pos += nd
        sd[str(key)] = np.broadcast_to(np.float32(0), shape)  # shapes only, no memory
    _, report = import_torch_checkpoint(sd, C.feature_teacher_model(), return_report=True)
    heads = sorted(k for k in sd if not k.startswith(("backbone.", "neck.")))
    assert sorted(report.dropped) == heads and len(heads) == 66
    assert any(k.startswith("roi_head.mask_head") for k in heads)
    assert not report.missing and not report.unexpected and not report.mismatched
    assert sum("conv_offset" in k for k in report.loaded) == 2 * (4 + 23 + 3)
