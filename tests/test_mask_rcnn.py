"""Mask R-CNN (fgd_jax.models.mask_rcnn): built from `mask_rcnn_model`, parameters under
mmdetection's names, the mask branch trains on the synthetic shapes' masks (its parts are
checked against mmdetection in test_mask_head.py / test_ops_masks.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fgd_jax import config as C
from fgd_jax import evaluation
from fgd_jax.data.pipeline import build_train_loader
from fgd_jax.models import build_detector, variable_shapes
from fgd_jax.models.mask_rcnn import MaskRCNN, paste_detections


def _tiny_cfg() -> C.ConfigDict:
    m = C.mask_rcnn_model(
        depth=18,
        num_classes=6,
        fpn_channels=16,
        rpn_feat_channels=16,
        fc_out_channels=32,
        mask_channels=16,
        frozen_stages=-1,
        rpn_num=64,
        rcnn_num=64,
    )
    m.train_cfg.rpn_proposal.nms_pre = 100
    m.train_cfg.rpn_proposal.max_per_img = 50
    m.test_cfg.rpn.nms_pre = 100
    m.test_cfg.rpn.max_per_img = 50
    m.test_cfg.rcnn.max_per_img = 10
    return m


def test_built_from_config_with_mmdetection_names():
    model = build_detector(_tiny_cfg())
    assert isinstance(model, MaskRCNN) and model.max_mask_rois == 16
    shapes = variable_shapes(model)["params"]["roi_head"]["mask_head"]
    got = jax.tree.map(lambda s: tuple(s.shape), shapes)
    want = {f"convs_{i}": {"conv": {"kernel": (3, 3, 16, 16), "bias": (16,)}} for i in range(4)}
    want["upsample"] = {"kernel": (2, 2, 16, 16), "bias": (16,)}
    want["conv_logits"] = {"kernel": (1, 1, 16, 6), "bias": (6,)}
    assert got == want
    m = _tiny_cfg()
    del m.roi_head["mask_head"]
    with pytest.raises(ValueError, match="roi_head.mask_head"):
        build_detector(m)


def test_forward_train_needs_the_mask_keys():
    model = build_detector(_tiny_cfg())
    batch = dict(image=jnp.zeros((1, 64, 64, 3)), boxes=jnp.zeros((1, 2, 4)))
    with pytest.raises(KeyError, match="data.with_mask=True"):
        model.apply({}, batch, method=MaskRCNN.forward_train)


@pytest.mark.slow
def test_mask_branch_overfits_a_shapes_batch(tmp_path):
    d = C.shapes_data(root=str(tmp_path / "s"), num_train=6, num_val=2, image_size=64)
    d.with_mask, d.mask_grid, d.num_workers, d.max_boxes = True, 32, 0, 8
    host = next(build_train_loader(d, 2, seed=0, process_index=0, process_count=1))
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    model = build_detector(_tiny_cfg())
    variables = jax.jit(model.init)(jax.random.key(0), batch["image"])
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    def loss_fn(p, key):
        losses, _ = model.apply(
            {"params": p, "batch_stats": stats},
            batch,
            method=MaskRCNN.forward_train,
            rngs={"sampler": key},
        )
        return sum(losses.values()), losses

    @jax.jit
    def step(p, o, key):
        (_, losses), g = jax.value_and_grad(loss_fn, has_aux=True)(p, key)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, losses

    hist = []
    for i in range(25):
        params, opt, losses = step(params, opt, jax.random.key(i))
        hist.append(float(losses["loss_mask"]))
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"}
    assert np.all(np.isfinite(hist)) and np.mean(hist[-5:]) < 0.6 * np.mean(hist[:3]), hist

    # evaluation pastes each detection's mask into its original image, RLE-encodes it and
    # reports the segm metrics beside the bbox ones
    cfg = C.ConfigDict(dict(data=d, eval=dict(batch_size=2)))
    variables = {"params": params, "batch_stats": stats}
    metrics = evaluation.evaluate_variables(model, variables, cfg)
    assert 0.0 <= metrics["segm_AP"] <= 1.0 and 0.0 <= metrics["AP"] <= 1.0
    assert set(metrics["segm_per_class_AP"]) == set(metrics["per_class_AP"])
    results, _ = evaluation.predict_dataset(model, variables, cfg, progress=False)
    if results:  # the RLEs decode to masks of the original image size
        assert results[0]["segmentation"]["size"] == [64, 64]


def test_paste_detections_only_valid_ones():
    det = dict(
        valid=np.array([[True, False, True]]),
        mask_probs=np.ones((1, 3, 28, 28), np.float32),
        boxes=np.array([[[2, 3, 10, 12], [0, 0, 5, 5], [20, 20, 30, 25]]], np.float32),
    )
    m = paste_detections(det, 0, (32, 40))
    assert m.shape == (2, 32, 40)
    assert m[0, 3:12, 2:10].all() and m[0].sum() == 9 * 8 and m[1].sum() == 10 * 5
