"""Images per second through the training input pipeline (decode, resize to 1333x800, flip,
normalize, pad to 800x1344 / 1344x800 canvases, GT padding) on the synthetic dataset, compared
with the training step's images per second on the same machine.

    python -m benchmarks.data                       # 2 workers, 640x480 images, batch 8
    python -m benchmarks.data --workers 0 2 --out benchmarks/results/data_cpu.md
    python -m benchmarks.data --recipe yolox --workers 0   # YOLOX's Mosaic / Affine / MixUp /
                                                           # HSV / flip / resize / pad to 640

Two rates per run:
  - images/s (wall): what the loader delivered; it must exceed the training step's images/s
    (read from `--train-step-md`, the fgd-jax column of `train_step_cpu.md`, or given with
    `--train-step-ips`) with room to spare: the check asks for `--min-ratio` (20) times.
  - images per CPU-second: images divided by the CPU time of this process AND its grain
    worker processes (user + system, all threads). This is the per-core rate that sizes a GPU
    host: cores needed = images/s the GPUs consume / this rate. It does not depend on how busy
    the machine is, unlike the wall rate.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import os
import platform
import re
import sys
import time

DEFAULT_TRAIN_MD = os.path.join(os.path.dirname(__file__), "results", "train_step_cpu.md")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def train_step_rate(path: str) -> tuple[float, str] | None:
    """(fgd-jax train-step images/s, canvas) from the first row of the table in a
    `train_step` results file (columns `canvas | fgd-jax img/s | ...`); None if absent."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(r"^\| (\d+x\d+) \| ([\d.]+) \|", text, re.MULTILINE)
    return (float(m.group(2)), m.group(1)) if m else None


def _cpu_seconds(proc) -> float:
    """User + system CPU seconds of `proc` and its live child processes (grain workers)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # a child that just exited
            pass
    return total


def run(workers: int, cfg, batch: int, steps: int) -> tuple[float, float, float]:
    """(images/s wall, seconds to the first batch, images per CPU-second of this process and
    its worker processes) for `steps` batches after a warm-up."""
    import psutil

    from fgd_jax.data.pipeline import build_train_loader

    me = psutil.Process()
    t0 = time.perf_counter()
    cfg = cfg.copy_and_resolve_references()
    cfg.num_workers = workers
    loader = build_train_loader(cfg, batch, seed=0, process_index=0, process_count=1)
    next(loader)
    first = time.perf_counter() - t0
    for _ in range(2):  # fill the worker buffers
        next(loader)
    t1, c1 = time.perf_counter(), _cpu_seconds(me)
    for _ in range(steps):
        b = next(loader)
    dt, cpu = time.perf_counter() - t1, _cpu_seconds(me) - c1
    assert b["image"].shape[1:3] in [tuple(c) for c in cfg.canvases]
    loader.close()
    return steps * batch / dt, first, steps * batch / cpu


def _versions() -> str:
    names = ("grain", "numpy", "pillow", "jax")
    found = []
    for n in names:
        try:
            found.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join([f"python {platform.python_version()}", *found])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[2])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--num-images", type=int, default=96)
    ap.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    ap.add_argument("--root", default=".cache/shapes_bench")
    ap.add_argument("--train-step-md", default=DEFAULT_TRAIN_MD)
    ap.add_argument("--train-step-ips", type=float, default=None, help="overrides the file")
    ap.add_argument("--min-ratio", type=float, default=20.0)
    ap.add_argument("--out", default="", help="append a markdown section to this file")
    ap.add_argument(
        "--recipe",
        choices=("standard", "yolox"),
        default="standard",
        help="'yolox': config.yolox_coco_data (Mosaic of 4 + MixUp of a 5th image per example)",
    )
    args = ap.parse_args()

    from fgd_jax.config import coco_data, yolox_coco_data
    from fgd_jax.data.shapes import make_shapes_dataset

    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    make_shapes_dataset(args.root, args.num_images, 4, tuple(args.image_size), seed=0)
    print(f"dataset ready in {time.perf_counter() - t:.1f} s at {os.path.abspath(args.root)}")
    if args.recipe == "yolox":  # 640 x 640 canvas, raw BGR, pad 114, mosaic phase
        cfg = yolox_coco_data(root=args.root)
    else:
        cfg = coco_data(root=args.root)  # img_scale (1333, 800), canvases 800x1344 / 1344x800
    cfg.train_ann, cfg.train_images = "annotations/instances_train.json", "train"
    cfg.num_classes, cfg.max_boxes = 6, 16

    if args.train_step_ips is not None:
        train_ips, train_src = args.train_step_ips, "--train-step-ips"
    else:
        found = train_step_rate(args.train_step_md)
        md_name = os.path.relpath(args.train_step_md)
        train_ips, train_src = (found[0], f"{md_name}, {found[1]} canvas") if found else (0, "")
    rows = []
    for w in args.workers:
        rate, first, per_cpu_s = run(w, cfg, args.batch, args.steps)
        ratio = rate / train_ips if train_ips else float("nan")
        rows.append((w, rate, per_cpu_s, ratio, first))
        print(
            f"workers={w}: {rate:.1f} images/s wall, {per_cpu_s:.1f} images per CPU-second "
            f"(this process + workers), {ratio:.0f}x the train step, "
            f"first batch after {first:.1f} s"
        )
    load_after = os.getloadavg()[0]
    best = max(r[1] for r in rows)
    per_core = max(r[2] for r in rows)
    if train_ips:
        ok = best >= args.min_ratio * train_ips
        verdict = (
            f"{'KEEPS UP' if ok else 'DOES NOT KEEP UP'}: {best:.1f} images/s vs the train step's "
            f"{train_ips:.3g} images/s ({train_src}) = {best / train_ips:.0f}x "
            f"(required >= {args.min_ratio:.0f}x; the pipeline fills 800x1344 canvases, so a "
            "step measured on a smaller canvas only understates the margin)"
        )
    else:
        ok, verdict = True, "no train-step rate found: pass --train-step-ips to compare"
    sizing = (
        f"per-core rate {per_core:.1f} images per CPU-second: a host whose GPUs consume R "
        f"images/s needs R / {per_core:.1f} cores for decoding (e.g. 8 GPUs each taking an "
        f"assumed 10 images/s = 80 images/s -> {80 / per_core:.1f} cores)"
    )
    print(verdict)
    print(sizing)
    if args.out:
        h, w_ = args.image_size
        cmd = "python -m benchmarks.data " + " ".join(sys.argv[1:])
        lines = [
            "",
            f"## {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC - {_cpu_name()}, "
            f"{os.cpu_count()} cores",
            "",
            f"- command: `{cmd}`",
            f"- load average (1 min) before / after: {load_before:.2f} / {load_after:.2f}",
            f"- versions: {_versions()}",
            (
                f"- synthetic shapes {w_}x{h} PNG -> Resize(1333, 800) keep-ratio -> flip -> "
                "normalize -> pad to 800x1344 / 1344x800"
                if args.recipe == "standard"
                else f"- synthetic shapes {w_}x{h} PNG -> YOLOX recipe (fgd_jax.data.yolox_aug): "
                "Mosaic of 4 -> RandomAffine -> MixUp with a 5th -> HSV -> flip -> resize 640 "
                "-> pad 640x640 with 114, raw BGR"
            )
            + f"; batch {args.batch}, {args.steps} timed steps after warm-up",
            "",
            "| workers | images/s (wall) | images per CPU-s (process + workers) "
            "| x train step (wall) | first batch (s) |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {w} | {r:.1f} | {c:.1f} | {x:.0f} | {f:.1f} |" for w, r, c, x, f in rows]
        lines += ["", f"**{verdict}.**", "", f"Sizing: {sizing}."]
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
