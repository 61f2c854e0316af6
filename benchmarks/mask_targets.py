"""How far Mask R-CNN mask targets built from the batch's per-GT mask grids are from
mmdetection's, and what the grids cost.

    python -m benchmarks.mask_targets                     # all grid sizes, 300 objects
    python -m benchmarks.mask_targets --grids 56 --samples 2 --objects 100
    python -m benchmarks.mask_targets --out benchmarks/results/mask_targets_cpu.md

Reference (mmdetection 2.x): the polygon decoded by pycocotools at the original size, the
bitmap rescaled with nearest (cv2 `INTER_NEAREST`) to the keep-ratio size of (1333, 800),
flipped half of the time, padded to the 800 x 1344 / 1344 x 800 canvas
(`fgd_jax.data.masks.resized_bitmap`), then for each positive proposal clipped to the canvas
`torchvision.ops.roi_align(bitmap, proposal, 28, 1.0, sampling_ratio=0, aligned=True) >= 0.5`
(torchvision's RoIAlign is mmcv's, which `BitmapMasks.crop_and_resize` calls).
Ours: `fgd_jax.data.masks.mask_grid` (M x M uint8 grid over the mask's region) then
`fgd_jax.ops.masks.mask_targets`.

Objects are COCO-like polygons in images of COCO sizes (short side 240..640, long side up to
640): random star-shaped / convex polygons with 5..60 vertices, ellipses and thin rotated
strips (aspect up to 1:25), extents log-uniform from 4 px to the image's short side, partly
outside the image at times. Proposals: each GT box shifted and scaled at random (jitter up to
25% of its size per side), kept when IoU >= 0.5 (mmdetection's positives), 8 per object.
Mean IoU of the 28 x 28 targets (two empty targets count as IoU 1; their number is reported).
"""

from __future__ import annotations

import os

# one BLAS thread, as in a loader worker (OpenBLAS threads thrash on a loaded machine)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from fgd_jax.data import masks as M  # noqa: E402
from fgd_jax.data import transforms as T  # noqa: E402

CANVASES = ((800, 1344), (1344, 800))


def random_polygon(rng: np.random.Generator, h: int, w: int) -> list[list[float]]:
    """One COCO-like polygon segmentation (one or two parts) in an image of `h x w`."""
    short = min(h, w)
    size = float(np.exp(rng.uniform(np.log(4.0), np.log(short))))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    kind = rng.integers(0, 4)
    if kind == 0:  # thin rotated strip
        aspect = np.exp(rng.uniform(np.log(4), np.log(25)))
        a, b = size / 2, max(size / 2 / aspect, 0.75)
        base = np.array([[-a, -b], [a, -b], [a, b], [-a, b]])
    elif kind == 1:  # ellipse with many vertices
        k = int(rng.integers(16, 61))
        t = np.linspace(0, 2 * np.pi, k, endpoint=False)
        ratio = np.exp(rng.uniform(np.log(0.3), 0))
        base = np.stack([np.cos(t) * size / 2, np.sin(t) * size / 2 * ratio], -1)
    elif kind == 2:  # convex-ish polygon
        k = int(rng.integers(5, 13))
        t = np.sort(rng.uniform(0, 2 * np.pi, k))
        base = np.stack([np.cos(t), np.sin(t)], -1) * size / 2
    else:  # star-shaped with random radii (concave)
        k = int(rng.integers(6, 41))
        t = np.sort(rng.uniform(0, 2 * np.pi, k))
        r = rng.uniform(0.3, 1.0, k) * size / 2
        base = np.stack([np.cos(t) * r, np.sin(t) * r], -1)
    ang = rng.uniform(0, np.pi)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    pts = base @ rot.T + np.array([cx, cy])
    parts = [pts]
    if rng.random() < 0.15:  # a second part beside it (occluded objects in COCO)
        parts.append(pts * 0.5 + np.array([cx, cy]) * 0.5 + size * 0.6)
    return [list(p.reshape(-1).astype(np.float64)) for p in parts]


def jitter_proposals(rng, box: np.ndarray, n: int) -> np.ndarray:
    """`[n, 4]` boxes around `box` with IoU >= 0.5 (rejection sampling)."""
    w, h = box[2] - box[0], box[3] - box[1]
    out = []
    while len(out) < n:
        d = rng.uniform(-0.25, 0.25, 4) * np.array([w, h, w, h])
        p = box + d
        if p[2] - p[0] < 1 or p[3] - p[1] < 1:
            continue
        ix = max(0.0, min(p[2], box[2]) - max(p[0], box[0]))
        iy = max(0.0, min(p[3], box[3]) - max(p[1], box[1]))
        inter = ix * iy
        union = w * h + (p[2] - p[0]) * (p[3] - p[1]) - inter
        if inter / union >= 0.5:
            out.append(p)
    return np.array(out, np.float32)


def make_cases(num_objects: int, seed: int, proposals: int = 8) -> list[dict]:
    """Objects through mmdetection's pipeline: bitmap, box, resized / canvas sizes, flip,
    proposals (the reference targets are added by `reference_targets`)."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < num_objects:
        long = int(rng.integers(320, 641))
        short = int(rng.integers(240, long + 1))
        h, w = (short, long) if rng.random() < 0.7 else (long, short)
        segm = random_polygon(rng, h, w)
        usable, problems = M.check_segmentation(segm, (h, w))
        if problems:
            continue
        bitmap = M.decode_segmentation(usable, (h, w))
        if bitmap.sum() == 0:
            continue
        ys, xs = np.nonzero(bitmap)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
        canvas = CANVASES[0] if w >= h else CANVASES[1]
        (rh, rw), _ = T.rescale_size((h, w), (1333, 800))
        sf = np.array([rw / w, rh / h, rw / w, rh / h], np.float32)
        rbox = box * sf
        flipped = bool(rng.random() < 0.5)
        if flipped:
            rbox = T.flip_boxes(rbox[None], rw)[0]
        if (rbox[2] - rbox[0]) < 1 or (rbox[3] - rbox[1]) < 1:
            continue
        cases.append(
            dict(
                bitmap=bitmap,
                box=rbox,
                resized_hw=(rh, rw),
                canvas_hw=canvas,
                flipped=flipped,
                area=float((rbox[2] - rbox[0]) * (rbox[3] - rbox[1])),
                proposals=jitter_proposals(rng, rbox, proposals),
            )
        )
    return cases


def reference_targets(case: dict, out_size: int = 28) -> np.ndarray:
    """mmdetection's `mask_target_single` for one GT's proposals (torchvision RoIAlign)."""
    import torch
    from torchvision.ops import roi_align

    full = M.resized_bitmap(case["bitmap"], case["resized_hw"], case["canvas_hw"], case["flipped"])
    H, W = case["canvas_hw"]
    p = case["proposals"].astype(np.float32).copy()
    p[:, 0::2] = np.clip(p[:, 0::2], 0, W)
    p[:, 1::2] = np.clip(p[:, 1::2], 0, H)
    rois = torch.cat([torch.zeros(len(p), 1), torch.from_numpy(p)], 1)
    t = roi_align(torch.from_numpy(full).float()[None, None], rois, out_size, 1.0, 0, True)
    return (t[:, 0] >= 0.5).numpy()


def grid_targets(case: dict, grid: int, samples: int, out_size: int = 28) -> np.ndarray:
    import jax.numpy as jnp

    from fgd_jax.ops.masks import mask_targets

    vals, region = M.mask_grid(
        case["bitmap"], case["box"], case["resized_hw"], case["canvas_hw"], case["flipped"], grid
    )
    n = len(case["proposals"])
    t = mask_targets(
        jnp.asarray(vals[None]),
        jnp.asarray(region[None]),
        jnp.asarray(case["proposals"]),
        jnp.zeros((n,), jnp.int32),
        jnp.asarray(case["canvas_hw"]),
        out_size,
        samples,
    )
    return np.asarray(t) > 0.5


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-target IoU of `[n, S, S]` bools; two empty targets give 1."""
    inter = (a & b).sum((1, 2))
    union = (a | b).sum((1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def evaluate(cases: list[dict], grid: int, samples: int) -> dict:
    ious, areas, empty = [], [], 0
    for c in cases:
        ref = c["reference"]
        ours = grid_targets(c, grid, samples)
        ious.append(iou(ref, ours))
        areas.append(np.full(len(ref), c["area"]))
        empty += int(((ref.sum((1, 2)) == 0) & (ours.sum((1, 2)) == 0)).sum())
    ious, areas = np.concatenate(ious), np.concatenate(areas)
    small, large = areas < 32**2, areas >= 96**2
    medium = ~small & ~large
    return dict(
        mean=float(ious.mean()),
        small=float(ious[small].mean()) if small.any() else float("nan"),
        medium=float(ious[medium].mean()) if medium.any() else float("nan"),
        large=float(ious[large].mean()) if large.any() else float("nan"),
        p01=float(np.percentile(ious, 1)),
        min=float(ious.min()),
        n=int(len(ious)),
        empty=empty,
    )


def grid_cost(cases: list[dict], grid: int) -> float:
    """Host seconds per GT to build its grid (decode excluded)."""
    t0 = time.perf_counter()
    for c in cases:
        M.mask_grid(c["bitmap"], c["box"], c["resized_hw"], c["canvas_hw"], c["flipped"], grid)
    return (time.perf_counter() - t0) / len(cases)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--objects", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grids", type=int, nargs="+", default=[28, 40, 56, 64])
    p.add_argument("--samples", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--max-boxes", type=int, default=100, help="padded GTs per image (memory)")
    p.add_argument("--out", default="", help="append the markdown report to this file")
    args = p.parse_args(argv)

    cases = make_cases(args.objects, args.seed)
    for c in cases:
        c["reference"] = reference_targets(c)
    rows = []
    for g in args.grids:
        per_gt = grid_cost(cases[:100], g)
        for s in args.samples:
            r = evaluate(cases, g, s)
            mem = args.max_boxes * (g * g + 16)
            rows.append(
                f"| {g} | {s} | {r['mean']:.4f} | {r['small']:.4f} | {r['medium']:.4f} | "
                f"{r['large']:.4f} | {r['p01']:.3f} | {r['min']:.3f} | {r['n']} ({r['empty']}) | "
                f"{mem / 1e3:.0f} KB | {per_gt * 1e3:.2f} ms |"
            )
            print(rows[-1], flush=True)
    full = args.max_boxes * 800 * 1344
    cmd = "python -m benchmarks.mask_targets " + " ".join(argv if argv else sys.argv[1:])
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = [
        f"## {now} - {platform.processor() or platform.machine()}",
        "",
        f"- command: `{cmd.strip()}`",
        f"- {len(cases)} objects, {sum(len(c['proposals']) for c in cases)} proposals "
        f"(IoU >= 0.5 with their GT), seed {args.seed}",
        f"- full-canvas bitmaps (mmdetection): {args.max_boxes} x 800 x 1344 uint8 = "
        f"{full / 1e6:.1f} MB per image",
        "",
        "| grid M | samples | mean IoU | small | medium | large | 1st pct | min | "
        "targets (both empty) | grids per image (max_boxes GTs) | host ms per GT |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    text = "\n".join(report)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
        print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
