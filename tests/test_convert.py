"""Weight converter: strict errors, safe .pth loading, exact round trips, torchvision layouts.

References: torch state dicts of torchvision models (ResNet-18 classification, a torchvision
`BackboneWithFPN` detection backbone run by torch as the output reference, 1e-4 relative),
torch's own `load_state_dict` for exported dicts, and exact equality for round trips.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from fgd_jax import config as C
from fgd_jax.convert import (
    UnsafeCheckpointError,
    convert_state_dict,
    detect_layout,
    detector_variable_shapes,
    export_torch_state_dict,
    import_torch_checkpoint,
    load_torch_file,
    torchvision_rules,
)
from fgd_jax.convert.torchvision_backbone import CLASSIFICATION_BACKBONE_RULES
from fgd_jax.models import init_module
from fgd_jax.models.fpn import FPN
from fgd_jax.models.resnet import ResNet

X = np.random.RandomState(0).randn(1, 32, 32, 3).astype(np.float32)


def _random_like(shapes, seed=0):
    rs = np.random.RandomState(seed)
    return jax.tree_util.tree_map(
        lambda s: rs.randn(*s.shape).astype(np.float32) if s.shape else np.float32(rs.randn()),
        shapes,
    )


def _r18_shapes():
    return jax.eval_shape(ResNet(depth=18).init, jax.random.key(0), X)


def _tv_r18_state_dict():
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


# ------------------------------------------------------------------------------ strictness
def test_strict_errors_name_every_bad_key():
    sd = {k: v for k, v in _tv_r18_state_dict().items() if not k.startswith("fc.")}
    shapes = _r18_shapes()
    convert_state_dict(sd, shapes)  # exact match loads

    missing = dict(sd)
    del missing["layer2.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"missing.*\n.*batch_stats/layer2_1/bn2/var \[128\]"):
        convert_state_dict(missing, shapes)

    extra = dict(sd, **{"layer9.0.conv1.weight": torch.zeros(3, 3, 1, 1)})
    with pytest.raises(ValueError, match=r"unexpected.*\n.*layer9\.0\.conv1\.weight \[3, 3, 1, 1"):
        convert_state_dict(extra, shapes)

    wrong = dict(sd, **{"layer3.0.conv2.weight": torch.zeros(256, 256, 1, 1)})
    with pytest.raises(
        ValueError,
        match=r"wrong shape.*\n.*layer3\.0\.conv2\.weight: checkpoint \[256, 256, 1, 1\] -> "
        r"params/layer3_0/conv2/kernel expects \[3, 3, 256, 256\]",
    ):
        convert_state_dict(wrong, shapes)

    # All problems at once, in one error.
    both = dict(extra, **{"layer3.0.conv2.weight": torch.zeros(1)})
    del both["bn1.bias"]
    with pytest.raises(ValueError) as info:
        convert_state_dict(both, shapes)
    msg = str(info.value)
    assert "params/bn1/bias" in msg and "layer9.0.conv1.weight" in msg
    assert "layer3.0.conv2.weight" in msg

    # A whole wrong architecture: counts for each kind, at most 12 keys each (not a 260-line
    # wall); the report keeps every key for code that wants them.
    many = {f"extra.{i}.weight": torch.zeros(1) for i in range(30)}
    with pytest.raises(ValueError) as info:
        convert_state_dict(dict(sd, **many), shapes)
    msg = str(info.value)
    assert "unexpected in the checkpoint (30):" in msg and "... and 18 more" in msg
    assert msg.count("extra.") == 12

    # Non-strict: missing / unexpected reported, shape errors still raised.
    _, report = convert_state_dict(extra, shapes, strict=False, return_report=True)
    assert report.unexpected == ["layer9.0.conv1.weight [3, 3, 1, 1]"] and not report.missing
    with pytest.raises(ValueError, match="layer3.0.conv2.weight"):
        convert_state_dict(wrong, shapes, strict=False)


def test_generic_leaf_rules_linear_layernorm_scale():
    """Linear [out,in] -> kernel [in,out]; LayerNorm weight [C,1,1] -> scale [C]; a learnable
    scalar `scales.0.scale` -> `scales_0/scale`; num_batches_tracked ignored."""
    target = {
        "params": {
            "fc": {"kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32), "bias": np.zeros(4)},
            "ln": {"scale": np.zeros(4, np.float32), "bias": np.zeros(4, np.float32)},
            "scales_0": {"scale": np.float32(0)},
        },
        "batch_stats": {"bn": {"mean": np.zeros(2, np.float32), "var": np.zeros(2, np.float32)}},
    }
    rs = np.random.RandomState(0)
    f32 = lambda *s: rs.randn(*s).astype(np.float32)  # noqa: E731
    sd = {
        "fc.weight": f32(4, 3),
        "fc.bias": f32(4),
        "ln.weight": f32(4, 1, 1),
        "ln.bias": f32(4),
        "scales.0.scale": np.array(1.5, np.float32),
        "bn.running_mean": f32(2),
        "bn.running_var": f32(2),
        "bn.num_batches_tracked": np.array(7),
    }
    out = convert_state_dict(sd, target)
    np.testing.assert_array_equal(out["params"]["fc"]["kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(out["params"]["ln"]["scale"], sd["ln.weight"][:, 0, 0])
    assert out["params"]["scales_0"]["scale"] == np.float32(1.5)
    np.testing.assert_array_equal(out["batch_stats"]["bn"]["var"], sd["bn.running_var"])
    assert out["params"]["fc"]["kernel"].dtype == np.float32


def test_converted_leaves_own_their_memory():
    """Training the source torch module after conversion (BN running stats update in place)
    must not change the converted variables: no leaf may be a view of a torch tensor."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    out = convert_state_dict(tv.state_dict(), _r18_shapes(), rename=[(r"^fc\.", None)])
    before = jax.tree_util.tree_map(np.copy, out)
    sd = tv.state_dict()
    for leaf in jax.tree_util.tree_leaves(out):
        assert not any(np.shares_memory(leaf, t.numpy()) for t in sd.values())
    tv.train()
    tv(torch.randn(2, 3, 32, 32))  # updates every running_mean / running_var in place
    assert not np.allclose(tv.bn1.running_mean.numpy(), before["batch_stats"]["bn1"]["mean"])
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)


def test_rename_and_prefix_options():
    sd = {f"student.{k}": v for k, v in _tv_r18_state_dict().items() if not k.startswith("fc.")}
    sd["teacher.conv1.weight"] = torch.zeros(1)
    out = convert_state_dict(sd, _r18_shapes(), prefix="student.")
    renamed = convert_state_dict(
        sd, _r18_shapes(), rename=lambda k: k.removeprefix("student."), prefix="student."
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, out, renamed)
    with pytest.raises(ValueError, match="bad regular expression"):
        convert_state_dict(sd, _r18_shapes(), rename=[("(", "x")])


# ---------------------------------------------------------------------------- round trips
def _backbone_neck_init(backbone, neck):
    def init(x):
        bv = init_module(backbone, jax.random.key(0), x)
        nv = init_module(neck, jax.random.key(1), backbone.apply(bv, x))
        return {
            "params": {"backbone": bv["params"], "neck": nv["params"]},
            "batch_stats": {"backbone": bv["batch_stats"]},
        }

    return init


def test_export_import_round_trip_exact_and_torch_loads_export():
    neck = FPN((64, 128, 256, 512), 16, 5, 1, add_extra_convs="on_input")
    init = _backbone_neck_init(ResNet(depth=18), neck)
    shapes = jax.eval_shape(init, X)
    variables = _random_like(shapes)
    sd = export_torch_state_dict(variables)
    assert "neck.fpn_convs.4.conv.weight" in sd and "backbone.layer1.0.bn1.running_var" in sd
    back = convert_state_dict(sd, shapes)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)

    # torch accepts the exported backbone in its own layout and orientation.
    tv = torchvision.models.resnet18()
    backbone_sd = {
        k.removeprefix("backbone."): torch.from_numpy(v)
        for k, v in sd.items()
        if k.startswith("backbone.")
    }
    result = tv.load_state_dict(backbone_sd, strict=False)
    # (BatchNorm fills a missing num_batches_tracked itself)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"}
    assert not result.unexpected_keys
    np.testing.assert_array_equal(
        tv.layer2[0].conv2.weight.detach().numpy(),
        np.transpose(variables["params"]["backbone"]["layer2_0"]["conv2"]["kernel"], (3, 2, 0, 1)),
    )


def _retina_cfg():
    pytest.importorskip("fgd_jax.models.retinanet")
    cfg = C.retinanet_model(depth=18, num_classes=3, feat_channels=16, stacked_convs=1)
    return cfg


def test_import_torch_checkpoint_mmdet_file_with_prefix(tmp_path):
    cfg = _retina_cfg()
    from fgd_jax.convert import torchvision_retinanet

    assert set(torchvision_retinanet.RENAME_RULES) <= set(torchvision_rules(cfg))
    variables = _random_like(detector_variable_shapes(cfg), seed=3)
    sd = export_torch_state_dict(variables, cfg)
    path = tmp_path / "distill.pth"
    torch.save(
        {
            "meta": {"epoch": np.int64(24), "CLASSES": ("a", "b", "c")},
            "state_dict": {f"student.{k}": torch.from_numpy(v) for k, v in sd.items()},
        },
        path,
    )
    back = import_torch_checkpoint(path, cfg, prefix="student.")
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)
    with pytest.raises(ValueError, match="no key under the prefix 'teacher.'"):
        import_torch_checkpoint(path, cfg, prefix="teacher.")


def test_torchvision_classification_checkpoint_into_detector_backbone(tmp_path):
    """A torchvision resnet50 ImageNet .pth into a detector: fc dropped, neck/head kept."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(tv.state_dict(), path)
    sd = load_torch_file(path)
    assert detect_layout(sd) == "classification"
    x = np.zeros((1, 64, 64, 3), np.float32)
    init = _backbone_neck_init(
        ResNet(depth=50), FPN((256, 512, 1024, 2048), 8, 5, 1, add_extra_convs="on_input")
    )
    init_vars = _random_like(jax.eval_shape(init, x), seed=5)  # stands in for an init
    out, report = convert_state_dict(
        sd,
        init_vars,
        rename=CLASSIFICATION_BACKBONE_RULES,
        strict=False,
        return_report=True,
    )
    assert sorted(report.dropped) == ["fc.bias", "fc.weight"]
    assert report.missing and all(m.startswith("params/neck/") for m in report.missing)
    assert not report.unexpected
    np.testing.assert_array_equal(
        out["params"]["backbone"]["conv1"]["kernel"],
        tv.conv1.weight.detach().numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        out["batch_stats"]["backbone"]["layer4_2"]["bn3"]["mean"],
        tv.layer4[2].bn3.running_mean.numpy(),
    )
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, out["params"]["neck"], init_vars["params"]["neck"]
    )
    with pytest.raises(ValueError, match="missing in the checkpoint"):
        convert_state_dict(sd, init_vars, rename=CLASSIFICATION_BACKBONE_RULES)


def test_torchvision_detection_backbone_fpn_layout_matches_torch():
    """torchvision `BackboneWithFPN` (ResNet-18, C3..C5, LastLevelP6P7 on P5) converted by the
    layout rules; backbone+FPN outputs equal torch's."""
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18()
    for m in r18.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean = torch.randn(m.num_features) * 0.1
            m.running_var = torch.rand(m.num_features) + 0.5
    body = _resnet_fpn_extractor(
        r18, 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(16, 16)
    )
    body.fpn = torchvision.ops.FeaturePyramidNetwork([128, 256, 512], 16, LastLevelP6P7(16, 16))
    body.eval()
    sd = {f"backbone.{k}": v for k, v in body.state_dict().items()}
    sd["head.something.weight"] = torch.zeros(1)  # a head key: not this test's business
    assert detect_layout(sd) == "torchvision"

    cfg = C.ConfigDict(
        dict(
            type="none",
            neck=C.fpn_neck((64, 128, 256, 512), 16, 1, "on_output", 5, True),
        )
    )
    backbone = ResNet(depth=18)
    neck = FPN(
        (64, 128, 256, 512), 16, 5, 1, add_extra_convs="on_output", relu_before_extra_convs=True
    )
    x = np.random.RandomState(0).randn(1, 64, 64, 3).astype(np.float32)
    shapes = jax.eval_shape(_backbone_neck_init(backbone, neck), x)
    rules = torchvision_rules(cfg)
    assert ("^backbone\\.fpn\\.extra_blocks\\.p7\\.", "neck.fpn_convs.4.conv.") in rules
    v, report = convert_state_dict(
        sd, shapes, rename=torchvision_rules(cfg), strict=False, return_report=True
    )
    assert report.unexpected == ["head.something.weight [1]"] and not report.missing

    def forward(v, x):
        feats = backbone.apply(
            {"params": v["params"]["backbone"], "batch_stats": v["batch_stats"]["backbone"]}, x
        )
        return neck.apply({"params": v["params"]["neck"]}, feats)

    got = jax.jit(forward)(v, x)
    with torch.no_grad():
        want = list(body(torch.from_numpy(x).permute(0, 3, 1, 2)).values())
    assert len(got) == len(want) == 5
    for g, w in zip(got, want, strict=True):
        w = w.permute(0, 2, 3, 1).numpy()
        assert np.max(np.abs(np.asarray(g) - w)) <= 1e-4 * np.max(np.abs(w))


# ------------------------------------------------------------------------------ file safety
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_checkpoint_refused_and_never_runs(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save(
        {"state_dict": {"a": torch.zeros(2)}, "meta": _Evil(marker)},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth.*(posix|os)\.system"):
        load_torch_file(path)
    assert not marker.exists()


def test_load_torch_file_formats_and_errors(tmp_path):
    sd = {"conv.weight": torch.randn(2, 3, 1, 1), "bn.num_batches_tracked": torch.tensor(5)}
    meta = {"epoch": np.int64(12), "hist": np.arange(3.0), "dt": np.dtype("float32")}
    for name, obj, zip_format in [
        ("raw.pth", sd, True),
        ("mmdet.pth", {"meta": meta, "state_dict": sd, "optimizer": {}}, True),
        ("tv_old.pth", {"model": sd}, False),
    ]:
        torch.save(obj, tmp_path / name, _use_new_zipfile_serialization=zip_format)
        got = load_torch_file(tmp_path / name)
        assert set(got) == set(sd)
        np.testing.assert_array_equal(got["conv.weight"], sd["conv.weight"].numpy())
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_torch_file(tmp_path / "nothing.pth")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pth.*not a .*PyTorch checkpoint"):
        load_torch_file(tmp_path / "notes.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth.*expected a state dict"):
        load_torch_file(tmp_path / "list.pth")


def test_import_backbone_weights_strict_on_the_backbone_only(tmp_path):
    """ImageNet init (`train.backbone_init`): torchvision ResNet-18 classification weights,
    saved from DataParallel (`module.` prefix), fill every backbone leaf exactly (reference:
    the torch tensors) and keep the neck/head leaves; a file without the backbone is refused
    naming the file, not loaded as a silent no-op."""
    from fgd_jax.convert import import_backbone_weights

    model = C.retinanet_model(depth=18, num_classes=3)
    model.neck.out_channels = model.head.in_channels = model.head.feat_channels = 16
    from fgd_jax.models import build_detector

    init = init_module(build_detector(model), jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    sd = _tv_r18_state_dict()
    path = tmp_path / "r18_dp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    out = import_backbone_weights(str(path), model, init)
    np.testing.assert_array_equal(
        out["params"]["backbone"]["layer2_0"]["conv1"]["kernel"],
        sd["layer2.0.conv1.weight"].numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        out["batch_stats"]["backbone"]["bn1"]["var"], sd["bn1.running_var"].numpy()
    )
    jax.tree.map(np.testing.assert_array_equal, out["params"]["neck"], init["params"]["neck"])

    partial = {k: v for k, v in sd.items() if not k.startswith("layer4.")}
    with pytest.raises(ValueError, match=r"(?s)partial\.pth: backbone weights not found.*layer4_0"):
        torch.save(partial, tmp_path / "partial.pth")
        import_backbone_weights(str(tmp_path / "partial.pth"), model, init)
    with pytest.raises(ValueError, match="backbone weights not found"):
        import_backbone_weights({"encoder.conv.weight": torch.zeros(1)}, model, init)
