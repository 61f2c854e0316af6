"""Modules from config groups (`fgd_jax.models.build`): only declared fields pass, unknown keys
are refused naming them and the module, nested settings groups replace their defaults, and a
config factory's groups list every field at the module's default."""

from __future__ import annotations

import dataclasses

import pytest

from fgd_jax import config as C
from fgd_jax.models import build_detector
from fgd_jax.models.build import build_module, config_fields, module_config
from fgd_jax.models.dense_heads import DenseTestCfg
from fgd_jax.models.faster_rcnn import FasterRCNNTrainCfg
from fgd_jax.models.retinanet import RetinaHead, RetinaTrainCfg


@dataclasses.dataclass(frozen=True)
class _Inner:
    a: int = 1
    b: float = 2.0


@dataclasses.dataclass(frozen=True)
class _Outer:
    inner: _Inner = _Inner(a=5)
    c: tuple[int, ...] = (1, 2)


def test_build_module_passes_fields_and_refuses_unknown_keys():
    out = build_module(_Outer, {"inner": {"b": 3.0}, "c": [4, 5]}, "grp")
    assert out == _Outer(inner=_Inner(a=5, b=3.0), c=(4, 5))  # nested default kept, list -> tuple
    assert build_module(_Outer, None) == _Outer()
    with pytest.raises(ValueError, match=r"model config grp: unknown keys \['d'\] for _Outer"):
        build_module(_Outer, {"c": (1,), "d": 1}, "grp")
    with pytest.raises(ValueError, match=r"grp.inner: unknown keys \['z'\] for _Inner"):
        build_module(_Outer, {"inner": {"z": 1}}, "grp")
    with pytest.raises(ValueError, match=r"unknown keys \['c'\]"):  # set by the caller
        build_module(_Outer, {"c": (1,)}, c=(2,))


def test_module_config_lists_every_field_at_its_default():
    cfg = module_config(_Outer, c=(9,))
    assert cfg.to_dict() == {"inner": {"a": 5, "b": 2.0}, "c": (9,)}
    with pytest.raises(ValueError, match=r"_Outer has no configurable fields \['x'\]"):
        module_config(_Outer, x=1)


def test_factories_list_every_field_with_the_module_defaults():
    cfg = C.retinanet_model()
    assert set(cfg.head) == set(config_fields(RetinaHead)) - {"num_classes", "num_anchors"}
    assert cfg.train_cfg.to_dict() == dataclasses.asdict(RetinaTrainCfg())
    assert cfg.test_cfg.to_dict() == dataclasses.asdict(DenseTestCfg())
    frcnn = C.faster_rcnn_model(rpn_num=64)
    want = dataclasses.asdict(FasterRCNNTrainCfg())
    want["rpn"]["num"] = 64
    assert frcnn.train_cfg.to_dict() == want


@pytest.mark.parametrize(
    "factory, group, key, owner",
    [
        (C.retinanet_model, "head", "feat_chanels", "RetinaHead"),
        (C.retinanet_model, "train_cfg", "neg_iou", "RetinaTrainCfg"),
        (C.fcos_model, "test_cfg", "nms", "FCOSTestCfg"),
        (C.faster_rcnn_model, "roi_head", "fc_out", "StandardRoIHead"),
        (C.faster_rcnn_model, "train_cfg.rpn", "nmu", "RPNTrainCfg"),
        (C.faster_rcnn_model, "backbone", "depht", "ResNet"),
        (C.faster_rcnn_model, "neck", "num_out", "FPN"),
    ],
)
def test_detector_config_refuses_unknown_keys(factory, group, key, owner):
    cfg = factory()
    node = cfg
    for part in group.split("."):
        node = node[part]
    node[key] = 1
    with pytest.raises(ValueError, match=rf"{group}: unknown keys \['{key}'\] for {owner}"):
        build_detector(cfg)


def test_a_config_without_the_new_keys_builds_the_same_detector():
    """Configs saved before every field was listed (old checkpoints) take the defaults."""
    cfg = C.retinanet_model()
    old = C.retinanet_model()
    for key in ("prior_prob", "wh_ratio_clip", "in_channels"):
        del old.head[key]
    del old.test_cfg["max_candidates"]
    del old.train_cfg["size_divisor"]
    new_model, old_model = build_detector(cfg), build_detector(old)
    assert old_model.train_cfg == new_model.train_cfg
    assert old_model.test_cfg == new_model.test_cfg
    assert old_model.bbox_head.wh_ratio_clip == new_model.bbox_head.wh_ratio_clip
