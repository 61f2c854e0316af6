"""Convert a PyTorch detector checkpoint (mmdetection or torchvision) into an orbax checkpoint.

    python scripts/convert_torch_teacher.py --src retinanet_r101_fpn_2x_coco.pth \
        --config configs/retinanet_r101_baseline.py --out checkpoints/retinanet_r101_2x

With an FGD config (one that has a `teacher`), converts that teacher; with a detector config,
converts `model`. A feature teacher (model type 'features', backbone + FPN only, e.g. the
Cascade Mask R-CNN X101-32x4d-DCN teacher of configs/faster_rcnn_cascade_x101_r50.py) takes the
checkpoint's `backbone.*` and `neck.*` keys and drops the others, printing how many per part.
Strict: every (kept) checkpoint key is used exactly once and every parameter is filled, or it
stops and lists the missing, unexpected and wrongly shaped keys. The result is what
`teacher.ckpt` of an FGD config points to, and `python -m fgd_jax.eval --ckpt OUT` evaluates
it (not a feature teacher: it has no heads). No GPU needed; the `.pth` is read without running
code from it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def checksum(variables) -> str:
    """sha256 over every leaf (path-sorted, float32 little-endian bytes): first 16 hex digits."""
    import jax

    h = hashlib.sha256()
    flat, _ = jax.tree_util.tree_flatten_with_path(variables)
    for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf, dtype="<f4")).tobytes())
    return h.hexdigest()[:16]


def convert(src: str, config: str, out: str, overwrite: bool = False) -> dict:
    """Convert and save; returns a summary dict (what the CLI prints)."""
    import jax

    from fgd_jax import checkpoint as ckpt_lib
    from fgd_jax.config import load_config
    from fgd_jax.convert import import_torch_checkpoint
    from fgd_jax.data import classes as data_classes
    from fgd_jax.experiment import model_config

    cfg = load_config(config)
    is_teacher = "teacher" in cfg and cfg.get("teacher") is not None
    standalone = model_config(cfg, teacher=is_teacher)
    variables, report = import_torch_checkpoint(src, standalone.model, return_report=True)
    # the classes the checkpoint's meta records (mmdetection), checked when it is used
    standalone = data_classes.with_recorded_names(
        standalone, data_classes.names_from_torch_checkpoint(src)
    )
    path = ckpt_lib.save_variables(out, variables, standalone, overwrite=overwrite)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    return dict(
        out=path,
        model=standalone.model.type,
        depth=standalone.model.backbone.depth,
        parameters=n_params,
        mapped_keys=len(report.loaded),
        ignored_keys=len(report.ignored),
        dropped=_count_by_part(report.dropped),
        checksum=checksum(variables),
    )


def _count_by_part(keys: list[str]) -> dict[str, int]:
    """Dropped keys counted by their top-level part (`roi_head.bbox_head.0...` -> roi_head)."""
    out: dict[str, int] = {}
    for k in keys:
        part = k.split(".", 1)[0]
        out[part] = out.get(part, 0) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="PyTorch checkpoint (.pth)")
    p.add_argument("--config", required=True, help="detector or FGD config file")
    p.add_argument("--out", required=True, help="output directory (orbax)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        s = convert(args.src, args.config, args.out, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"converted {args.src}: {s['model']} R{s['depth']}, {s['parameters']:,} parameters, "
        f"{s['mapped_keys']} keys mapped ({s['ignored_keys']} ignored), checksum {s['checksum']}"
    )
    if s["dropped"]:  # a feature teacher ('features'): only backbone + neck are kept
        parts = ", ".join(f"{k} ({n})" for k, n in sorted(s["dropped"].items()))
        print(f"dropped {sum(s['dropped'].values())} keys outside backbone/neck: {parts}")
    print(f"wrote {s['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
