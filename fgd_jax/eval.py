"""Evaluate a detector on the val set: COCO bbox mAP through pycocotools.

    python -m fgd_jax.eval --ckpt PATH [--config CONFIG] [--out DIR] [--teacher | --student]

PATH is a training workdir (its latest checkpoint; the student by default, `--teacher` for
the teacher of a distillation run), a converted teacher, or an exported student. The config is
stored with every checkpoint, so `--config` is only needed to override it (e.g. data.root).
Writes `detections.json` and `metrics.json` to `--out` (default: PATH/eval).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from flax.errors import FlaxError
from tqdm import tqdm

from fgd_jax import evaluation, parallel
from fgd_jax.data import pipeline


def val_annotation_file(data_cfg: ml_collections.ConfigDict) -> str:
    """The val annotation json of a data config."""
    return os.path.join(data_cfg.root, data_cfg.val_ann)


def val_ground_truth(data_cfg: ml_collections.ConfigDict):
    """What `evaluation.coco_evaluate` compares with: the val json path, or for the tfds
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


def predict_dataset(
    module, variables: Mapping, cfg: ml_collections.ConfigDict, mesh=None, progress: bool = True
) -> tuple[list[dict], list[int]]:
    """Jitted inference over the whole val set, data-parallel over the mesh.

    Returns the COCO result dicts (on every process) and the evaluated image ids.
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
    show = progress and jax.process_index() == 0
    for host_batch in tqdm(loader, desc="eval", disable=not show, leave=False):
        batch = parallel.host_batch_to_global(host_batch, mesh)
        out = _predict(module, variables, batch["image"], batch["img_shape"], batch["scale_factor"])
        out["image_id"] = batch["image_id"]
        out = parallel.fetch(out)
        ids = np.asarray(out["image_id"])
        image_ids.extend(int(i) for i in ids if i >= 0)
        results.extend(
            evaluation.detections_to_coco(
                ids,
                np.asarray(out["boxes"]),
                np.asarray(out["scores"]),
                np.asarray(out["labels"]),
                np.asarray(out["valid"]),
                cat_ids,
            )
        )
    return results, image_ids


def evaluate_variables(
    module,
    variables: Mapping,
    cfg: ml_collections.ConfigDict,
    mesh=None,
    out_dir: str | None = None,
) -> dict:
    """COCO bbox metrics of `module` with `variables` on `cfg.data`'s val set."""
    results, image_ids = predict_dataset(module, variables, cfg, mesh)
    metrics = evaluation.coco_evaluate(val_ground_truth(cfg.data), results, image_ids)
    if out_dir and jax.process_index() == 0:
        evaluation.write_json(os.path.join(out_dir, "detections.json"), results)
        write_metrics(out_dir, metrics)
    return metrics


def write_metrics(out_dir: str, metrics: Mapping) -> str:
    """metrics.json (everything but the printed summary) in `out_dir`."""
    clean = {k: v for k, v in metrics.items() if k != "summary"}
    return evaluation.write_json(os.path.join(out_dir, "metrics.json"), clean)


def main(argv: list[str] | None = None) -> int:
    from fgd_jax.config import apply_overrides, load_config
    from fgd_jax.export import check_variables, load_model
    from fgd_jax.models import build_detector

    p = argparse.ArgumentParser(prog="python -m fgd_jax.eval", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="workdir, converted teacher or exported student")
    p.add_argument("--config", help="config file (default: the one stored with the checkpoint)")
    p.add_argument("--out", help="output directory (default: CKPT/eval)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--student", action="store_true", help="evaluate the student (default)")
    who.add_argument("--teacher", action="store_true", help="evaluate the teacher of a run")
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted config overrides, e.g. data.root=/data (or --config.data.root=/data)",
    )
    args, extra = p.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    overrides = [o.removeprefix("--config.") for o in [*args.overrides, *extra]]
    try:
        variables, cfg = load_model(args.ckpt, teacher=args.teacher)
        if args.config:
            cfg = load_config(args.config)
        apply_overrides(cfg, overrides)
        ann = val_annotation_file(cfg.data)
        if cfg.data.get("source", "coco") == "coco" and not os.path.isfile(ann):
            # before any inference (the shapes source writes its files on first use)
            raise FileNotFoundError(f"{ann}: val annotation file not found (set data.root)")
        module = build_detector(cfg.model)
        check_variables(module, variables, args.ckpt)
        out = args.out or os.path.join(args.ckpt, "eval" + ("_teacher" if args.teacher else ""))
        metrics = evaluate_variables(module, variables, cfg, out_dir=out)
    except (FileNotFoundError, ValueError, TypeError, KeyError, FlaxError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(metrics.get("summary", ""))
        print(evaluation.format_table({"model": metrics}))
        per_class = metrics.get("per_class_AP", {})
        if per_class:
            width = max(len(n) for n in per_class)
            print("\nper-class AP (%):")
            for name, ap in per_class.items():
                print(f"  {name:<{width}}  {100 * ap:5.1f}")
        print(json.dumps({k: round(100 * metrics[k], 1) for k in evaluation.METRIC_NAMES}))
        print(f"wrote {out}/metrics.json and {out}/detections.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
