"""Images per second through the training input pipeline (decode, resize to 1333x800, flip,
normalize, pad to 800x1344 / 1344x800 canvases, GT padding) on the synthetic dataset.

    python -m benchmarks.data                       # 2 workers, 640x480 images, batch 8
    python -m benchmarks.data --workers 0 2 --out benchmarks/results/data_cpu.md

The per-core rate (images/s divided by the worker processes, or by 1 in-process) sizes the
CPU a GPU host needs: e.g. 8 GPUs x 2 images per step at 5 steps/s = 80 images/s.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(workers: int, cfg, batch: int, steps: int) -> tuple[float, float, float]:
    """(images/s wall, seconds to the first batch, images per CPU-second of this process) for
    `steps` batches after a warm-up. The last is the per-core rate when `workers == 0`, and is
    robust to other jobs sharing the machine (wall-clock rates are not)."""
    from fgd_jax.data.pipeline import build_train_loader

    t0 = time.perf_counter()
    cfg = cfg.copy_and_resolve_references()
    cfg.num_workers = workers
    loader = build_train_loader(cfg, batch, seed=0, process_index=0, process_count=1)
    next(loader)
    first = time.perf_counter() - t0
    for _ in range(2):  # fill the worker buffers
        next(loader)
    t1, c1 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        b = next(loader)
    dt, cpu = time.perf_counter() - t1, time.process_time() - c1
    assert b["image"].shape[1:3] in [(800, 1344), (1344, 800)]
    loader.close()
    return steps * batch / dt, first, steps * batch / cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[2])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--num-images", type=int, default=96)
    ap.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    ap.add_argument("--root", default=".cache/shapes_bench")
    ap.add_argument("--out", default="", help="append a markdown table to this file")
    args = ap.parse_args()

    from fgd_jax.config import coco_data
    from fgd_jax.data.shapes import make_shapes_dataset

    t = time.perf_counter()
    make_shapes_dataset(args.root, args.num_images, 4, tuple(args.image_size), seed=0)
    print(f"dataset ready in {time.perf_counter() - t:.1f} s at {os.path.abspath(args.root)}")
    cfg = coco_data(root=args.root)  # img_scale (1333, 800), canvases 800x1344 / 1344x800
    cfg.train_ann, cfg.train_images = "annotations/instances_train.json", "train"
    cfg.num_classes, cfg.max_boxes = 6, 16
    rows = []
    for w in args.workers:
        rate, first, per_cpu_s = run(w, cfg, args.batch, args.steps)
        per_core = rate / max(w, 1)
        cpu_note = f"{per_cpu_s:.1f}" if w == 0 else "-"
        rows.append((w, rate, per_core, cpu_note, first))
        print(
            f"workers={w}: {rate:.1f} images/s ({per_core:.1f} per core wall), "
            f"images per CPU-second {cpu_note}, first batch after {first:.1f} s"
        )
    if args.out:
        h, w_ = args.image_size
        lines = [
            "",
            f"## {datetime.date.today().isoformat()} - {_cpu_name()}, {os.cpu_count()} cores, "
            f"load average {os.getloadavg()[0]:.1f} at the end",
            "",
            f"Synthetic shapes {w_}x{h} PNG -> Resize(1333, 800) keep-ratio -> flip -> normalize "
            f"-> pad to 800x1344 / 1344x800; batch {args.batch}, {args.steps} timed steps after "
            "warm-up. `python -m benchmarks.data --workers "
            + " ".join(str(r[0]) for r in rows)
            + "`",
            "",
            "| workers | images/s (wall) | per core (wall) | images per CPU-s | first batch (s) |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {w} | {r:.1f} | {p:.1f} | {c} | {f:.1f} |" for w, r, p, c, f in rows]
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
