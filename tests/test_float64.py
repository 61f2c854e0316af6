"""Every detector runs end to end in float64 when x64 is on (`jax.enable_x64`): init,
forward_train (finite losses) and predict (finite detections with the API's dtypes). The NMS
`while_loop` once carried int32 in and int64 out under x64 and failed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgd_jax import config as C
from fgd_jax.models import build_detector

from ._tiny import overfit_batch


def _models() -> dict[str, C.ConfigDict]:
    faster = C.faster_rcnn_model(
        depth=18,
        num_classes=3,
        fpn_channels=16,
        rpn_feat_channels=16,
        fc_out_channels=32,
        rpn_num=64,
        rcnn_num=32,
    )
    faster.train_cfg.rpn_proposal.nms_pre = 200
    faster.train_cfg.rpn_proposal.max_per_img = 64
    faster.test_cfg.rpn.nms_pre = 200
    faster.test_cfg.rpn.max_per_img = 64
    small = dict(depth=18, num_classes=3, feat_channels=16, fpn_channels=16, stacked_convs=1)
    return {
        "retinanet": C.retinanet_model(**small),
        "fcos": C.fcos_model(tricks=True, num_groups=4, **small),
        "faster_rcnn": faster,
    }


MODELS = _models()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_detector_runs_in_float64(name):
    with jax.enable_x64(True):
        model = build_detector(MODELS[name], dtype=jnp.float64)
        batch = {
            k: (v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v)
            for k, v in overfit_batch().items()
        }
        variables = model.init(jax.random.key(0), batch["image"])
        variables = jax.tree.map(lambda v: v.astype(jnp.float64), variables)
        rngs = {"sampler": jax.random.key(1)}
        losses, feats = jax.jit(
            lambda v, b: model.apply(v, b, train=False, rngs=rngs, method="forward_train")
        )(variables, batch)
        assert all(f.dtype == jnp.float64 for f in feats)
        assert losses and all(np.isfinite(float(v)) for v in losses.values())
        det = jax.jit(
            lambda v, b: model.apply(
                v, b["image"], b["img_shape"], b["scale_factor"], method="predict"
            )
        )(variables, batch)
        assert det["boxes"].shape == (2, 100, 4) and det["labels"].dtype == jnp.int32
        assert det["valid"].dtype == jnp.bool_
        assert np.isfinite(np.asarray(det["boxes"])).all()
        assert np.isfinite(np.asarray(det["scores"])).all()
