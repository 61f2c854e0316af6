"""Evaluate a detector on the val set: COCO bbox mAP through pycocotools.

    python -m fgd_jax.eval --ckpt PATH [--config CONFIG] [--out DIR] [--teacher | --student] \\
        [--config.data.root=/data ...]

PATH is a training workdir (its latest checkpoint; the student by default, `--teacher` for
the teacher of a distillation run), a converted teacher, or an exported student. The config is
stored with every checkpoint, so `--config` is only needed to replace it; `--config.KEY=VALUE`
overrides one key (e.g. data.root). Writes `detections.json` and `metrics.json` to `--out`
(default: PATH/eval). The work is `fgd_jax.evaluation.evaluate_variables`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
from flax.errors import FlaxError

from fgd_jax import evaluation, parallel
from fgd_jax.config import OVERRIDE_HELP, apply_overrides, load_config, parse_command_line
from fgd_jax.experiment import check_batch_sizes, check_variables, load_model
from fgd_jax.models import build_detector


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m fgd_jax.eval` (overrides are taken out first)."""
    p = argparse.ArgumentParser(
        prog="python -m fgd_jax.eval", description=__doc__.split("\n")[0], epilog=OVERRIDE_HELP
    )
    p.add_argument("--ckpt", required=True, help="workdir, converted teacher or exported student")
    p.add_argument("--config", help="config file (default: the one stored with the checkpoint)")
    p.add_argument("--out", help="output directory (default: CKPT/eval)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--student", action="store_true", help="evaluate the student (default)")
    who.add_argument("--teacher", action="store_true", help="evaluate the teacher of a run")
    p.add_argument(
        "overrides", nargs="*", help="KEY=VALUE overrides as --config.KEY=VALUE (older spelling)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    args, overrides = parse_command_line(p, argv)
    overrides = [*args.overrides, *overrides]
    parallel.enable_compilation_cache()
    try:
        variables, cfg = load_model(args.ckpt, teacher=args.teacher)
        if args.config:
            cfg = load_config(args.config)
        apply_overrides(cfg, overrides)
        check_batch_sizes(cfg, jax.device_count(), jax.process_count(), keys=("eval.batch_size",))
        ann = evaluation.val_annotation_file(cfg.data)
        if cfg.data.get("source", "coco") == "coco" and not os.path.isfile(ann):
            # before any inference (the shapes source writes its files on first use)
            raise FileNotFoundError(f"{ann}: val annotation file not found (set data.root)")
        module = build_detector(cfg.model)
        check_variables(module, variables, args.ckpt)
        out = args.out or os.path.join(args.ckpt, "eval" + ("_teacher" if args.teacher else ""))
        metrics = evaluation.evaluate_variables(module, variables, cfg, out_dir=out)
    except (FileNotFoundError, ValueError, TypeError, KeyError, FlaxError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(metrics.get("summary", ""))
        rows = {"model": metrics}
        if "segm_AP" in metrics:  # a detector predicting masks (Mask R-CNN)
            rows["model segm"] = {k: metrics[f"segm_{k}"] for k in evaluation.METRIC_NAMES}
        print(evaluation.format_table(rows))
        if "images_at_detection_cap" in metrics:
            print(
                f"detection cap (test_cfg.max_per_img = {metrics['detections_cap']}) reached in "
                f"{metrics['images_at_detection_cap']} images"
            )
        for kind in ("", "segm_"):
            per_class = metrics.get(f"{kind}per_class_AP", {})
            if per_class:
                width = max(len(n) for n in per_class)
                print(f"\nper-class {kind.replace('_', ' ')}AP (%):")
                for name, ap in per_class.items():
                    print(f"  {name:<{width}}  {100 * ap:5.1f}")
        if "segm_AP" in metrics:
            names = evaluation.METRIC_NAMES
            print(json.dumps({f"segm_{k}": round(100 * metrics[f"segm_{k}"], 1) for k in names}))
        print(json.dumps({k: round(100 * metrics[k], 1) for k in evaluation.METRIC_NAMES}))
        print(f"wrote {out}/metrics.json and {out}/detections.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
