"""The model configs whose built detectors `tests/golden/model_configs.json` records: every
config under configs/ (teacher models included), the factories' defaults and the tests' tiny
models; with the helpers that read a built detector's variable shapes and settings."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgd_jax import config as C
from fgd_jax.models import build_detector

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "golden", "model_configs.json")
CONFIG_ARGS = {"shapes_demo.py": ("fgd", "baseline", "teacher"), "shapes_capacity.py": ("10", "34")}
IMAGE = 64  # variable shapes do not depend on the input size


def _tiny_faster_rcnn() -> C.ConfigDict:  # formerly tests/test_train_detectors.py (still recorded)
    m = C.faster_rcnn_model(
        depth=18,
        num_classes=6,
        fpn_channels=32,
        rpn_feat_channels=32,
        fc_out_channels=64,
        frozen_stages=-1,
        rpn_num=64,
        rcnn_num=64,
    )
    m.train_cfg.rpn_proposal.nms_pre = 200
    m.train_cfg.rpn_proposal.max_per_img = 100
    m.test_cfg.rpn.nms_pre = 200
    m.test_cfg.rpn.max_per_img = 100
    m.backbone.norm_eval = False
    return m


def _tiny_fcos(tricks: bool) -> C.ConfigDict:  # tests/test_fcos.py's FGD models
    return C.fcos_model(
        depth=18,
        num_classes=6,
        tricks=tricks,
        feat_channels=16,
        stacked_convs=2,
        fpn_channels=16,
        num_groups=4,
        frozen_stages=-1,
        style="pytorch",
    )


def _tiny_gfl() -> C.ConfigDict:  # tests/test_train_detectors.py's tiny_gfl_model
    m = C.gfl_model(
        depth=10,
        num_classes=6,
        fpn_channels=16,
        feat_channels=16,
        stacked_convs=1,
        num_groups=4,
        frozen_stages=-1,
    )
    m.backbone.norm_eval = False
    return m


def _tiny_reppoints() -> C.ConfigDict:  # tests/test_train_detectors.py's tiny_reppoints_model
    m = C.reppoints_model(
        depth=10,
        num_classes=6,
        fpn_channels=16,
        feat_channels=16,
        stacked_convs=1,
        num_groups=4,
        frozen_stages=-1,
    )
    m.backbone.norm_eval = False
    return m


def model_cases() -> Iterator[tuple[str, C.ConfigDict]]:
    """(name, model config) for every recorded model."""
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
        base = os.path.basename(path)
        for arg in CONFIG_ARGS.get(base, (None,)):
            cfg = C.load_config(path if arg is None else f"{path}:{arg}")
            name = base if arg is None else f"{base}:{arg}"
            yield name, cfg.model
            if "teacher" in cfg:
                yield f"{name}/teacher", cfg.teacher.model
    from tests._tiny import tiny_config

    for variant in ("baseline", "fgd"):
        cfg = tiny_config("unused", variant)
        yield f"tiny_config:{variant}", cfg.model
        if "teacher" in cfg:
            yield f"tiny_config:{variant}/teacher", cfg.teacher.model
    yield "retinanet_model()", C.retinanet_model()
    yield "fcos_model()", C.fcos_model()
    yield "fcos_model(tricks=True)", C.fcos_model(tricks=True)
    yield "faster_rcnn_model()", C.faster_rcnn_model()
    yield "tiny_faster_rcnn", _tiny_faster_rcnn()
    yield "tiny_fcos", _tiny_fcos(False)
    yield "tiny_fcos(tricks=True)", _tiny_fcos(True)
    yield "gfl_model()", C.gfl_model()
    yield "tiny_gfl", _tiny_gfl()
    yield "reppoints_model()", C.reppoints_model()
    yield "tiny_reppoints", _tiny_reppoints()
    from tests.test_train_detectors import tiny_solo_model

    yield "solo_model()", C.solo_model()
    yield "tiny_solo", tiny_solo_model()


def variable_shapes(model_cfg: C.ConfigDict) -> dict[str, list[int]]:
    """'collection/a/b/leaf' -> shape of the detector's variables (abstract init)."""
    model = build_detector(model_cfg)
    images = jax.ShapeDtypeStruct((1, IMAGE, IMAGE, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): list(leaf.shape) for path, leaf in flat
    }


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, float | int | bool | str) or value is None:
        return value
    return repr(value)


# Properties recorded beside the fields (values derived from fields).
DERIVED = ("anchors_per_cell",)


def module_settings(model_cfg: C.ConfigDict) -> dict[str, Any]:
    """'field' or 'submodule/field' -> value of every non-module field of the built detector
    (and its submodules), leaving out `name`, `parent` and `dtype`."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            if f.name in ("name", "parent", "dtype"):
                continue
            value = getattr(obj, f.name)
            if isinstance(value, nn.Module) or (
                dataclasses.is_dataclass(value) and not isinstance(value, type)
            ):
                walk(value, f"{prefix}{f.name}/")
            else:
                out[prefix + f.name] = _plain(value)
        for prop in DERIVED:
            if hasattr(type(obj), prop):
                out[prefix + prop] = _plain(getattr(obj, prop))

    walk(build_detector(model_cfg), "")
    return out


def _digest(shapes: dict[str, list[int]]) -> str:
    text = json.dumps(shapes, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_record(model_cfg: C.ConfigDict) -> dict[str, Any]:
    """What the golden file keeps of one model: `digest` (sha256 of every variable's path and
    shape), `parts` (the same per top-level part, to show where a difference is),
    `num_leaves`, `num_params` and `settings` (`module_settings`)."""
    shapes = variable_shapes(model_cfg)
    parts: dict[str, dict[str, list[int]]] = {}
    for path, shape in shapes.items():
        parts.setdefault(path.split("/")[1], {})[path] = shape
    return dict(
        digest=_digest(shapes),
        parts={k: _digest(v) for k, v in sorted(parts.items())},
        num_leaves=len(shapes),
        num_params=int(sum(int(np.prod(s)) for s in shapes.values())),
        settings=module_settings(model_cfg),
    )
