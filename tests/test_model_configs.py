"""Every model config (configs/*.py, teachers included, the factories' defaults and the tests'
tiny models) builds the same detector as before issue 16's reshaping. Reference:
tests/golden/model_configs.json, written by tests/golden/make_model_golden.py on main's code
(commit b2b99fa): the variables' paths and shapes (sha256 digests, whole and per part, and
counts) and every setting of the built modules."""

from __future__ import annotations

import json

import pytest

from tests.model_config_cases import OUT, model_cases, model_record

with open(OUT) as _f:
    GOLDEN = json.load(_f)

# Settings whose place in the module tree moved since the golden file was written:
# golden name -> today's name.
_RETINA = {
    **{
        k: f"bbox_head/{k}"
        for k in (
            "strides",
            "octave_base_scale",
            "scales_per_octave",
            "ratios",
            "target_means",
            "target_stds",
            "wh_ratio_clip",
            "focal_gamma",
            "focal_alpha",
            "loss_cls_weight",
            "loss_bbox_weight",
        )
    },
    **{
        k: f"train_cfg/{k}"
        for k in ("pos_iou_thr", "neg_iou_thr", "min_pos_iou", "size_divisor", "loss_norm_group")
    },
    **{
        k: f"test_cfg/{k}"
        for k in ("nms_pre", "score_thr", "iou_threshold", "max_per_img", "max_candidates")
    },
    "num_classes": "bbox_head/num_classes",
    "bbox_head/num_anchors": "bbox_head/anchors_per_cell",
}
_FCOS = {
    **{
        k: f"bbox_head/{k}"
        for k in (
            "num_classes",
            "strides",
            "regress_ranges",
            "half_stride_offset",
            "center_sampling",
            "center_sample_radius",
            "norm_on_bbox",
            "focal_gamma",
            "focal_alpha",
            "loss_cls_weight",
            "loss_bbox_weight",
            "loss_centerness_weight",
        )
    },
    "loss_bbox_type": "bbox_head/loss_bbox",
    "size_divisor": "train_cfg/size_divisor",
    **{
        k: f"test_cfg/{k}"
        for k in (
            "nms_pre",
            "score_thr",
            "iou_threshold",
            "max_per_img",
            "max_candidates",
            "score_style",
        )
    },
}
_FASTER = {
    "num_classes": "roi_head/bbox_head/num_classes",
    "anchor_ratios": "rpn_head/anchor_ratios",
    "anchor_scales": "rpn_head/anchor_scales",
    "anchor_strides": "rpn_head/anchor_strides",
    "rpn_head/num_anchors": "rpn_head/anchors_per_cell",
    "roi_strides": "roi_head/featmap_strides",
    "roi_output_size": "roi_head/output_size",
    "roi_sampling_ratio": "roi_head/sampling_ratio",
    "roi_aligned": "roi_head/aligned",
    "finest_scale": "roi_head/finest_scale",
    "rcnn_target_stds": "roi_head/bbox_head/target_stds",
    **{f"rpn_{k}": f"train_cfg/rpn/{k}" for k in ("pos_iou_thr", "neg_iou_thr", "min_pos_iou")},
    "rpn_num": "train_cfg/rpn/num",
    "rpn_pos_fraction": "train_cfg/rpn/pos_fraction",
    "train_nms_pre": "train_cfg/rpn_proposal/nms_pre",
    "train_max_proposals": "train_cfg/rpn_proposal/max_per_img",
    **{
        f"rcnn_{k}": f"train_cfg/rcnn/{k}"
        for k in ("pos_iou_thr", "neg_iou_thr", "min_pos_iou", "num", "pos_fraction")
    },
    "add_gt_as_proposals": "train_cfg/rcnn/add_gt_as_proposals",
    "size_divisor": "train_cfg/size_divisor",
    "loss_norm_group": "train_cfg/loss_norm_group",
    "test_nms_pre": "test_cfg/rpn/nms_pre",
    "test_max_proposals": "test_cfg/rpn/max_per_img",
    "rpn_iou_threshold": "test_cfg/rpn/iou_threshold",
    "min_bbox_size": "test_cfg/rpn/min_bbox_size",
    **{
        k: f"test_cfg/rcnn/{k}"
        for k in ("score_thr", "iou_threshold", "max_per_img", "max_candidates")
    },
}
RENAMED: dict[str, dict[str, str]] = {"retinanet": _RETINA, "fcos": _FCOS, "faster_rcnn": _FASTER}
# deformable conv2 in the bottlenecks (issue 18), off by default
_NO_DCN = {"dcn": None, "dcn_deform_groups": 1, "stage_with_dcn": [False, False, False, False]}
# the FPN's norm (issue 18, RepPoints' GN neck), off by default
_NO_NECK_NORM = {"neck/norm": None, "neck/num_groups": 32}
# Settings that did not exist as fields before: name -> the value every model of the type
# has ("=other/name": the value of that setting).
ADDED: dict[str, dict[str, object]] = {
    "retinanet": {
        **_NO_NECK_NORM,
        "backbone/remat": False,  # rematerialization switch (issue 24), off by default
        **{f"backbone/{k}": v for k, v in _NO_DCN.items()},
        "bbox_head/prior_prob": 0.01,
        "bbox_head/in_channels": "=neck/out_channels",
        "bbox_head/num_anchors": None,
    },
    "fcos": {
        **_NO_NECK_NORM,
        "backbone/remat": False,
        **{f"backbone/{k}": v for k, v in _NO_DCN.items()},
        "bbox_head/in_channels": "=neck/out_channels",
    },
    "faster_rcnn": {
        **_NO_NECK_NORM,
        "backbone/remat": False,
        **{f"backbone/{k}": v for k, v in _NO_DCN.items()},
        "rpn_head/in_channels": "=neck/out_channels",
        "rpn_head/num_anchors": None,
        # one RPN NMS threshold before (checked equal to the train one), now one per group
        "train_cfg/rpn_proposal/iou_threshold": "=test_cfg/rpn/iou_threshold",
    },
    "features": dict(_NO_NECK_NORM),
    "mask_rcnn": {
        **_NO_NECK_NORM,
        # the mask branch's RoI slot buckets in training (branch maskspeed), same results
        "roi_head/mask_head/train_roi_buckets": [],
    },
    "gfl": dict(_NO_NECK_NORM),
    "solo": dict(_NO_NECK_NORM),  # recorded on a branch beside the GN-neck option
}

# Entries added to the golden file after issue 16's reshaping (recorded with today's setting
# names: RENAMED does not apply; ADDED only re-states values they already hold).
RECORDED_WITH_TODAYS_NAMES = {
    f"{config}{part}"
    for config in (  # issue 18: DCN feature teacher configs, RetinaNet X101 -> R101
        "faster_rcnn_cascade_x101_r50.py",
        "faster_rcnn_cascade_x101_r101.py",
        "retina_x101_r101.py",
        # issue 20: Mask R-CNN configs
        "mask_rcnn_r50_baseline.py",
        "mask_rcnn_r101_baseline.py",
        "mask_rcnn_r101_r50.py",
        "mask_rcnn_cascade_x101_r50.py",
        # issue 19: GFL
        "gfl_r50_baseline.py",
        "gfl_r101_baseline.py",
        "gfl_r101_r50.py",
        "gfl_model()",
        "tiny_gfl",
        # issue 18: RepPoints
        "reppoints_r50_baseline.py",
        "reppoints_r101_baseline.py",
        "reppoints_x101_dcn_baseline.py",
        "reppoints_r101_r50.py",
        "reppoints_x101_r50.py",
        "reppoints_x101_r101.py",
        "reppoints_model()",
        "tiny_reppoints",
    )
    for part in ("", "/teacher")
}

CASES = list(model_cases())


def test_every_recorded_model_is_still_a_case():
    assert sorted(name for name, _ in CASES) == sorted(GOLDEN)


@pytest.mark.parametrize("name,model_cfg", CASES, ids=[n for n, _ in CASES])
def test_config_builds_the_same_model(name, model_cfg):
    want, got = GOLDEN[name], model_record(model_cfg)
    assert got["parts"] == want["parts"]
    assert (got["num_leaves"], got["num_params"]) == (want["num_leaves"], want["num_params"])
    assert got["digest"] == want["digest"]
    kind = model_cfg.type
    renamed = {} if name in RECORDED_WITH_TODAYS_NAMES else RENAMED.get(kind, {})
    settings = {renamed.get(k, k): v for k, v in want["settings"].items()}
    for k, v in ADDED.get(kind, {}).items():
        same_as = isinstance(v, str) and v.startswith("=")
        settings[k] = settings[v[1:]] if same_as else v
    assert got["settings"] == settings
