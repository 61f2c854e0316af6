"""How far SOLO's targets built from the batch's per-GT mask grids are from mmdetection's.

    python -m benchmarks.solo_targets                        # 300 objects, grid 56
    python -m benchmarks.solo_targets --out benchmarks/results/solo_targets_cpu.md

Reference (mmdetection 2.x `SOLOHead._get_targets_single`): the polygon decoded at the original
size, rescaled (nearest) to the keep-ratio size of (1333, 800), flipped half of the time,
padded to the 800 x 1344 / 1344 x 800 canvas (`fgd_jax.data.masks.resized_bitmap`); then
- the mass centre: `center_of_mass` (row / column index weighted by the bitmap);
- the masks at the mask strides s = 4, 8, 16: `mmcv.imrescale(bitmap, 1 / s)` (cv2 bilinear
  on uint8 0/1). For canvases divisible by s this is exactly "the mean of the 2 x 2 pixels at
  rows / columns `s * i + s / 2 - 1`, `s * i + s / 2` is >= 0.5" (cv2's fixed-point rounds
  halves up; checked against mmcv 2.1's `imrescale` for s = 4, 8, 16 on random bitmaps), which
  is what is computed here;
- the centre cell of every grid size of SOLO (40, 36, 24, 16, 12):
  `trunc(center / canvas * S)`.
Ours: `fgd_jax.data.masks.mask_grid` (M x M grid over the mask's region), then
`fgd_jax.ops.solo.grid_center_of_mass` and `grid_masks_at_stride`.

Objects: the COCO-like polygons of `benchmarks.mask_targets` (stars, ellipses, thin strips,
convex polygons, 4 px to the image's short side). Reported: mean IoU of the masks per stride
(two empty masks count as IoU 1), by object size (area of the resized box), the centre error
in pixels, and how often the centre cell differs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.mask_targets import make_cases  # noqa: E402
from fgd_jax.data import masks as M  # noqa: E402

STRIDES = (4, 8, 16)
GRIDS = (40, 36, 24, 16, 12)


def reference(full: np.ndarray, stride: int) -> np.ndarray:
    """`mmcv.imrescale(full, 1 / stride) > 0` for a canvas divisible by `stride`."""
    o = stride // 2 - 1
    h, w = full.shape[0] // stride, full.shape[1] // stride
    f = full.astype(np.float32)
    avg = (
        f[o::stride][:h, o::stride][:, :w]
        + f[o + 1 :: stride][:h, o::stride][:, :w]
        + f[o::stride][:h, o + 1 :: stride][:, :w]
        + f[o + 1 :: stride][:h, o + 1 :: stride][:, :w]
    ) / 4
    return avg >= 0.5


def center_of_mass(full: np.ndarray) -> tuple[float, float]:
    """mmdetection `center_of_mass` (pixel-index units)."""
    ys, xs = np.nonzero(full)
    return float(ys.mean()), float(xs.mean())


def evaluate(cases: list[dict], grid: int) -> dict:
    import jax
    import jax.numpy as jnp

    from fgd_jax.ops import solo as S

    com = jax.jit(S.grid_center_of_mass)
    ious = {s: [] for s in STRIDES}
    areas, errs, cells = [], [], []
    for c in cases:
        full = M.resized_bitmap(c["bitmap"], c["resized_hw"], c["canvas_hw"], c["flipped"])
        vals, region = M.mask_grid(
            c["bitmap"], c["box"], c["resized_hw"], c["canvas_hw"], c["flipped"], grid
        )
        g, r = jnp.asarray(vals[None]), jnp.asarray(region[None])
        H, W = c["canvas_hw"]
        for s in STRIDES:
            ours = np.asarray(S.grid_masks_at_stride(g, r, (H // s, W // s), s))[0] > 0
            ref = reference(full, s)
            union = (ours | ref).sum()
            ious[s].append((ours & ref).sum() / union if union else 1.0)
        ch, cw, _ = com(g, r)
        rh, rw = center_of_mass(full)
        errs.append(np.hypot(float(ch[0]) - rh, float(cw[0]) - rw))
        cells.append(
            [
                (int(float(ch[0]) / H * n), int(float(cw[0]) / W * n))
                != (int(rh / H * n), int(rw / W * n))
                for n in GRIDS
            ]
        )
        areas.append(c["area"])
    areas = np.array(areas)
    small, large = areas < 32**2, areas >= 96**2
    medium = ~small & ~large
    out = dict(n=len(cases), grid=grid)
    for s in STRIDES:
        v = np.array(ious[s])
        out[f"iou_s{s}"] = float(v.mean())
        for name, sel in (("small", small), ("medium", medium), ("large", large)):
            out[f"iou_s{s}_{name}"] = float(v[sel].mean()) if sel.any() else float("nan")
        out[f"iou_s{s}_p05"] = float(np.percentile(v, 5))
    errs = np.array(errs)
    out["center_err_mean"] = float(errs.mean())
    out["center_err_max"] = float(errs.max())
    out["cell_differs"] = float(np.mean(cells))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", type=int, default=300)
    ap.add_argument("--grid", type=int, default=56)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    cases = make_cases(args.objects, args.seed, proposals=1)
    res = evaluate(cases, args.grid)
    lines = [
        "# SOLO targets from mask grids vs mmdetection's (full bitmaps)",
        "",
        f"`python -m benchmarks.solo_targets --objects {args.objects} --grid {args.grid}`, "
        f"{datetime.date.today()}, {platform.machine()} (CPU; accuracy only, no timing).",
        "",
        "| mask stride | mean IoU | small | medium | large | 5th percentile |",
        "|---|---|---|---|---|---|",
    ]
    for s in STRIDES:
        lines.append(
            f"| {s} | {res[f'iou_s{s}']:.4f} | {res[f'iou_s{s}_small']:.4f} | "
            f"{res[f'iou_s{s}_medium']:.4f} | {res[f'iou_s{s}_large']:.4f} | "
            f"{res[f'iou_s{s}_p05']:.4f} |"
        )
    lines += [
        "",
        f"Mass centre error: mean {res['center_err_mean']:.3f} px, max "
        f"{res['center_err_max']:.3f} px; the centre cell differs in "
        f"{100 * res['cell_differs']:.2f}% of (object, grid size) pairs (grids {GRIDS}).",
        f"{res['n']} objects (sizes: COCO small < 32^2 <= medium < 96^2 <= large, resized box).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
