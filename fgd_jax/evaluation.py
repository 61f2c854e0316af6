"""COCO bbox evaluation with pycocotools: detections -> COCO results json -> AP table.

Pure host-side code: it takes numpy detections (boxes xyxy in ORIGINAL image pixels, as the
detectors' `predict` returns them) and the annotation file, and reports what
`pycocotools.cocoeval.COCOeval` reports, plus per-class AP.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pycocotools.coco import COCO

import numpy as np

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detections_to_coco(
    image_ids: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    valid: np.ndarray,
    cat_ids: Sequence[int],
) -> list[dict]:
    """Convert a batch of padded detections to COCO result dicts.

    Args:
      image_ids: [B] int; entries < 0 are padding examples and are skipped.
      boxes: [B, K, 4] float xyxy, original-image pixels.
      scores: [B, K] float.  labels: [B, K] int contiguous label.  valid: [B, K] bool.
      cat_ids: contiguous label -> COCO category id.
    Returns: list of `{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}`.
    """
    out = []
    cat_ids = np.asarray(cat_ids)
    for b in range(len(image_ids)):
        if image_ids[b] < 0:
            continue
        keep = np.nonzero(valid[b])[0]
        for k in keep:
            x1, y1, x2, y2 = (float(v) for v in boxes[b, k])
            out.append(
                dict(
                    image_id=int(image_ids[b]),
                    category_id=int(cat_ids[int(labels[b, k])]),
                    bbox=[round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                    score=round(float(scores[b, k]), 5),
                )
            )
    return out


def coco_evaluate(
    ann_file: str | os.PathLike | COCO,
    results: list[dict],
    image_ids: Iterable[int] | None = None,
    verbose: bool = False,
) -> dict:
    """Run COCOeval (bbox) and return the 12 standard metrics and per-class AP.

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
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
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
