"""COCO bbox (and segm) evaluation: a detector over the val set -> COCO results json -> AP table.

- `evaluate_variables(module, variables, cfg)`: jitted inference over the val set
  (`predict_dataset`, data-parallel over the mesh) and pycocotools' metrics; what training's
  periodic evaluation, `python -m fgd_jax.eval` and the demo call. It takes a module and its
  variables, never a trainer.
- host-side pieces: `detections_to_coco` (numpy detections, boxes xyxy in ORIGINAL image
  pixels as the detectors' `predict` returns them), `coco_evaluate` (what
  `pycocotools.cocoeval.COCOeval` reports, plus per-class AP), `format_table`, `write_json`.
- instance masks: a detector whose `predict` returns `mask_probs` (Mask R-CNN) gets each
  detection's mask pasted into its original image on the host
  (`fgd_jax.models.mask_rcnn.paste_detections`, mmdetection's `_do_paste_mask`, >= 0.5;
  SOLO's `mask_probs_canvas`: `fgd_jax.models.solo.paste_detections`),
  RLE-encoded (`fgd_jax.data.masks.encode_rle`) into the result's `segmentation`, and
  `evaluate_variables` adds the `segm` metrics as `segm_AP`, ..., `segm_per_class_AP`
  (mmdetection 2.x: the segm results carry no `bbox`, so pycocotools' area ranges use the
  mask areas).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pycocotools.coco import COCO

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from fgd_jax import parallel
from fgd_jax.data import pipeline

log = logging.getLogger("fgd_jax.evaluation")

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detections_to_coco(
    image_ids: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    valid: np.ndarray,
    cat_ids: Sequence[int],
    segmentations: Sequence[Sequence[dict]] | None = None,
) -> list[dict]:
    """Convert a batch of padded detections to COCO result dicts.

    Args:
      image_ids: [B] int; entries < 0 are padding examples and are skipped.
      boxes: [B, K, 4] float xyxy, original-image pixels.
      scores: [B, K] float.  labels: [B, K] int contiguous label.  valid: [B, K] bool.
      cat_ids: contiguous label -> COCO category id.
      segmentations: optional, per image b the RLEs of its valid detections in order; each
        result then also has `segmentation`.
    Returns: list of `{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}`.
    """
    out = []
    cat_ids = np.asarray(cat_ids)
    for b in range(len(image_ids)):
        if image_ids[b] < 0:
            continue
        keep = np.nonzero(valid[b])[0]
        for j, k in enumerate(keep):
            x1, y1, x2, y2 = (float(v) for v in boxes[b, k])
            res = dict(
                image_id=int(image_ids[b]),
                category_id=int(cat_ids[int(labels[b, k])]),
                bbox=[round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                score=round(float(scores[b, k]), 5),
            )
            if segmentations is not None:
                res["segmentation"] = segmentations[b][j]
            out.append(res)
    return out


def coco_evaluate(
    ann_file: str | os.PathLike | COCO,
    results: list[dict],
    image_ids: Iterable[int] | None = None,
    verbose: bool = False,
    iou_type: str = "bbox",
) -> dict:
    """Run COCOeval (`iou_type` 'bbox' or 'segm') and return the 12 standard metrics and
    per-class AP. For 'segm' the results' `segmentation` (RLE) is evaluated and their `bbox`
    dropped first (mmdetection 2.x), so the area ranges use the mask areas.

    `ann_file`: the ground truth, a COCO json path or a pycocotools `COCO` object (the tfds
    source builds one from its examples).

    Returns a dict with `AP, AP50, AP75, APs, APm, APl` (fractions in [0, 1]), `AR1, AR10,
    AR100, ARs, ARm, ARl`, `per_class_AP` ({category name: AP}) and `summary` (COCOeval's
    printed table). With no detections at all every metric is 0.0 (pycocotools itself cannot
    load an empty result list).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if isinstance(ann_file, COCO):
        gt = ann_file
        ann_file = "ground truth"
    else:
        ann_file = os.fspath(ann_file)
        if not os.path.isfile(ann_file):
            raise FileNotFoundError(f"annotation file not found: {ann_file}")
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(ann_file)
    if not gt.getAnnIds():
        raise ValueError(f"{ann_file}: the evaluation set has no annotations")
    cats = {c["id"]: c["name"] for c in gt.loadCats(gt.getCatIds())}
    names12 = list(METRIC_NAMES) + ["AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    if not results:
        metrics = {n: 0.0 for n in names12}
        metrics["per_class_AP"] = {name: 0.0 for name in cats.values()}
        metrics["summary"] = "no detections"
        return metrics
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if iou_type == "segm":
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if verbose:
        print(buf.getvalue())
    metrics = {n: float(max(v, 0.0)) for n, v in zip(names12, ev.stats, strict=True)}
    # precision: [T iou thrs, R recall, K cats, A areas, M maxdets]; area 'all', maxDets 100.
    precision = ev.eval["precision"]
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[cats[cat_id]] = float(p.mean()) if p.size else 0.0
    metrics["per_class_AP"] = per_class
    metrics["summary"] = buf.getvalue()
    return metrics


def write_json(path: str | os.PathLike, obj) -> str:
    """Write `obj` as JSON (creating parent directories) and return the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def format_table(rows: dict[str, dict], columns: Sequence[str] = METRIC_NAMES) -> str:
    """A plain-text table: one row per model name, AP columns in percent (1 decimal)."""
    width = max([len("model")] + [len(r) for r in rows])
    head = f"{'model':<{width}} | " + " | ".join(f"{c:>5}" for c in columns)
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        lines.append(f"{name:<{width}} | " + " | ".join(f"{100 * m[c]:5.1f}" for c in columns))
    return "\n".join(lines)


# ------------------------------------------------------------------------ a model on the val set
def val_annotation_file(data_cfg: ml_collections.ConfigDict) -> str:
    """The val annotation json of a data config."""
    return os.path.join(data_cfg.root, data_cfg.val_ann)


def val_ground_truth(data_cfg: ml_collections.ConfigDict):
    """What `coco_evaluate` compares with: the val json path, or for the tfds
    source a pycocotools `COCO` object built from the val examples (no json needed)."""
    if data_cfg.get("source", "coco") == "tfds":
        from fgd_jax.data.tfds_source import load_tfds_records

        return load_tfds_records(data_cfg, train=False).coco
    return val_annotation_file(data_cfg)


@functools.partial(jax.jit, static_argnums=0)
def _predict(module, variables, images, img_shape, scale_factor):
    """Jitted `predict`, compiled once per (module, shapes): the periodic evaluations of a
    training run reuse it instead of compiling a fresh closure each time."""
    return module.apply(variables, images, img_shape, scale_factor, method="predict")


def images_at_cap(valid: np.ndarray, image_ids: np.ndarray) -> int:
    """How many real images (image_id >= 0) of a batch fill every one of the K static
    detection slots (valid `[B, K]` bool): there the cap (`test_cfg.max_per_img`) may have cut
    detections that a detector without one (mmdetection's YOLOX) would keep."""
    full = np.asarray(valid).all(axis=1) & (np.asarray(image_ids) >= 0)
    return int(full.sum())


def predict_dataset(
    module,
    variables: Mapping,
    cfg: ml_collections.ConfigDict,
    mesh=None,
    progress: bool = True,
    stats: dict | None = None,
) -> tuple[list[dict], list[int]]:
    """Jitted inference over the whole val set, data-parallel over the mesh.

    Returns the COCO result dicts (on every process) and the evaluated image ids. `stats`, when
    given, receives `detections_cap` (K, the static number of detection slots per image) and
    `images_at_detection_cap` (how many images filled all K: `images_at_cap`).
    """
    mesh = mesh or parallel.make_mesh()
    loader = pipeline.build_eval_loader(
        cfg.data,
        batch_size=cfg.eval.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_classes=module.num_classes,
    )
    cat_ids = loader.label_to_cat_id

    results: list[dict] = []
    image_ids: list[int] = []
    at_cap, cap = 0, 0
    show = progress and jax.process_index() == 0
    for host_batch in tqdm(loader, desc="eval", disable=not show, leave=False):
        batch = parallel.host_batch_to_global(host_batch, mesh)
        out = _predict(module, variables, batch["image"], batch["img_shape"], batch["scale_factor"])
        out["image_id"] = batch["image_id"]
        out["orig_shape"] = batch["orig_shape"]
        out = parallel.fetch(out)
        ids = np.asarray(out["image_id"])
        image_ids.extend(int(i) for i in ids if i >= 0)
        cap = int(np.shape(out["valid"])[1])
        at_cap += images_at_cap(out["valid"], ids)
        segms = None
        if "mask_probs" in out or "mask_probs_canvas" in out:
            from fgd_jax.data.masks import encode_rle

            if "mask_probs" in out:
                from fgd_jax.models.mask_rcnn import paste_detections
            else:  # SOLO: stride-4 canvas masks
                from fgd_jax.models.solo import paste_detections

            hw = np.asarray(out["orig_shape"])
            segms = [
                encode_rle(paste_detections(out, b, tuple(hw[b]))) if ids[b] >= 0 else []
                for b in range(len(ids))
            ]
        results.extend(
            detections_to_coco(
                ids,
                np.asarray(out["boxes"]),
                np.asarray(out["scores"]),
                np.asarray(out["labels"]),
                np.asarray(out["valid"]),
                cat_ids,
                segms,
            )
        )
    if stats is not None:
        stats.update(detections_cap=cap, images_at_detection_cap=at_cap)
    return results, image_ids


def evaluate_variables(
    module,
    variables: Mapping,
    cfg: ml_collections.ConfigDict,
    mesh=None,
    out_dir: str | None = None,
) -> dict:
    """COCO bbox metrics of `module` with `variables` on `cfg.data`'s val set, and the segm
    ones (`segm_AP`, ..., `segm_per_class_AP`) for a detector predicting masks; also
    `detections_cap` / `images_at_detection_cap` (`predict_dataset`): how often the static
    cap on detections per image was reached (a warning when it was)."""
    stats: dict = {}
    results, image_ids = predict_dataset(module, variables, cfg, mesh, stats=stats)
    if stats.get("images_at_detection_cap"):
        log.warning(
            "%d of %d images filled all %d detection slots (test_cfg.max_per_img): raise it if "
            "the metric should see more than %d detections per image",
            stats["images_at_detection_cap"],
            len(image_ids),
            stats["detections_cap"],
            stats["detections_cap"],
        )
    gt = val_ground_truth(cfg.data)
    # before the bbox evaluation: pycocotools' loadRes adds box polygons as `segmentation`
    has_masks = bool(results) and "segmentation" in results[0]
    metrics = coco_evaluate(gt, results, image_ids)
    metrics.update(stats)
    if has_masks:
        segm = coco_evaluate(gt, results, image_ids, iou_type="segm")
        metrics["summary"] += "\nsegm:\n" + segm.pop("summary")
        metrics.update({f"segm_{k}": v for k, v in segm.items()})
    if out_dir and jax.process_index() == 0:
        write_json(os.path.join(out_dir, "detections.json"), results)
        write_metrics(out_dir, metrics)
    return metrics


def write_metrics(out_dir: str, metrics: Mapping) -> str:
    """metrics.json (everything but the printed summary) in `out_dir`."""
    clean = {k: v for k, v in metrics.items() if k != "summary"}
    return write_json(os.path.join(out_dir, "metrics.json"), clean)
