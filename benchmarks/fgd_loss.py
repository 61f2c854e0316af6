"""FGD loss, forward + backward over 5 FPN levels: JAX (jit) vs the original PyTorch loops.

Setting (RetinaNet on COCO at 1333x800): batch 2 on an 800x1344 canvas, P3..P7 = 100x168,
50x84, 25x42, 13x21, 7x11, C = 256, 10 GT boxes per image padded to `--max-boxes` slots.
One step = the summed loss of the 5 levels and its gradients w.r.t. the student features and
all FGD parameters. PyTorch runs `benchmarks/fgd_torch_reference.py` (the original's per-box
loops) with the same inputs and the same number of threads. Also times the mask construction
alone (`fg_bg_masks` for the 5 levels, jitted) as a fraction of the JAX step.

    .venv/bin/python -m benchmarks.fgd_loss --threads 2 --steps 20
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import numpy as np


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="CPU cores for both frameworks (process affinity + torch threads)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps per framework")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--boxes", type=int, default=10, help="real boxes per image")
    p.add_argument("--max-boxes", type=int, default=100, help="padded box slots (data.max_boxes)")
    p.add_argument("--device", default="cpu", help="'cpu' or 'gpu' (JAX and torch both)")
    p.add_argument("--out", default="", help="append a markdown result row to this file")
    return p.parse_args()


def median_ms(fn, steps: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks.fgd_torch_reference import FeatureLossReference
    from fgd_jax.distill.fgd import FGDLoss, fg_bg_masks
    from fgd_jax.models import init_module

    torch.set_num_threads(args.threads)
    tdev = torch.device("cuda" if args.device == "gpu" else "cpu")

    b, c = args.batch, args.channels
    pad = (800, 1344)
    # FPN strides 8..128 on the padded canvas (ceil, as the stride-2 convs give): P3..P7.
    level_hw = [(-(-pad[0] // s), -(-pad[1] // s)) for s in (8, 16, 32, 64, 128)]
    rng = np.random.default_rng(0)
    img_shape = np.array([[800, 1199], [750, 1333]] * b, np.int32)[:b]
    pad_shape = np.tile(np.array([pad], np.int32), (b, 1))
    g = args.max_boxes
    boxes = np.zeros((b, g, 4), np.float32)  # padded slots are zeros (contracts.md)
    valid = np.zeros((b, g), bool)
    for i in range(b):
        h, w = img_shape[i]
        x = np.sort(rng.uniform(0, w - 1, size=(args.boxes, 2)), axis=1)
        y = np.sort(rng.uniform(0, h - 1, size=(args.boxes, 2)), axis=1)
        x[:, 1] = np.maximum(x[:, 1], x[:, 0] + 1)
        y[:, 1] = np.maximum(y[:, 1], y[:, 0] + 1)
        boxes[i, : args.boxes] = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], -1)
        valid[i, : args.boxes] = True
    feats_s = [rng.normal(size=(b, h, w, c)).astype(np.float32) for h, w in level_hw]
    feats_t = [rng.normal(size=(b, h, w, c)).astype(np.float32) for h, w in level_hw]

    # ------------------------------------------------------------------------------ JAX
    modules = [FGDLoss(c, c, name=f"loss_fgd_fpn_{i}") for i in range(len(level_hw))]
    jb, jv = jnp.asarray(boxes), jnp.asarray(valid)
    js, jp = jnp.asarray(img_shape), jnp.asarray(pad_shape)
    js_feats = [jnp.asarray(f) for f in feats_s]
    jt_feats = [jnp.asarray(f) for f in feats_t]
    params = [
        init_module(m, jax.random.key(i), s, t, jb, jv, js, jp)["params"]
        for i, (m, s, t) in enumerate(zip(modules, js_feats, jt_feats, strict=True))
    ]

    def total_loss(params, feats_s, feats_t, boxes, valid, img_shape, pad_shape):
        return sum(
            m.apply({"params": p}, s, t, boxes, valid, img_shape, pad_shape)["loss"]
            for m, p, s, t in zip(modules, params, feats_s, feats_t, strict=True)
        )

    step = jax.jit(jax.value_and_grad(total_loss, argnums=(0, 1)))

    def jax_step():
        jax.block_until_ready(step(params, js_feats, jt_feats, jb, jv, js, jp))

    @jax.jit
    def masks(boxes, valid, img_shape, pad_shape):
        return [fg_bg_masks(boxes, valid, img_shape, pad_shape, hw) for hw in level_hw]

    def mask_step():
        jax.block_until_ready(masks(jb, jv, js, jp))

    # ---------------------------------------------------------------------------- torch
    torch.manual_seed(0)
    refs = [FeatureLossReference(c, c).to(tdev) for _ in level_hw]
    ts_feats = [
        torch.tensor(f.transpose(0, 3, 1, 2), device=tdev, requires_grad=True) for f in feats_s
    ]
    tt_feats = [torch.tensor(f.transpose(0, 3, 1, 2), device=tdev) for f in feats_t]
    gt = [torch.tensor(boxes[i][valid[i]], device=tdev) for i in range(b)]
    metas = [{"img_shape": (int(h), int(w), 3)} for h, w in img_shape]

    def torch_step():
        for r in refs:
            r.zero_grad(set_to_none=True)
        for f in ts_feats:
            f.grad = None
        loss = sum(
            r(s, t, gt, metas)["loss"] for r, s, t in zip(refs, ts_feats, tt_feats, strict=True)
        )
        loss.backward()
        if tdev.type == "cuda":
            torch.cuda.synchronize()

    # ------------------------------------------------------------------------------ run
    jax_ms, jax_min = median_ms(jax_step, args.steps, args.warmup)
    mask_ms, mask_min = median_ms(mask_step, args.steps * 5, args.warmup)
    torch_ms, torch_min = median_ms(torch_step, args.steps, args.warmup)

    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        pass
    device = str(jax.devices()[0].device_kind) if args.device == "gpu" else cpu
    print(
        f"device: {device}, threads: {args.threads}, jax {jax.__version__}, "
        f"torch {torch.__version__}"
    )
    print(f"batch {b}, C {c}, levels {level_hw}, {args.boxes} boxes/image in {g} slots")
    print(f"JAX jit fwd+bwd:   {jax_ms:8.2f} ms/step (min {jax_min:.2f})")
    print(f"PyTorch reference: {torch_ms:8.2f} ms/step (min {torch_min:.2f})")
    print(f"speed-up:          {torch_ms / jax_ms:8.2f}x")
    print(f"masks alone (JAX): {mask_ms:8.3f} ms = {100 * mask_ms / jax_ms:.2f}% of the JAX step")
    if args.out:
        row = (
            f"| {datetime.date.today()} | {device} | {args.threads} | jax {jax.__version__}, "
            f"torch {torch.__version__} | {jax_ms:.1f} | {torch_ms:.1f} | "
            f"{torch_ms / jax_ms:.1f}x | {mask_ms:.3f} ({100 * mask_ms / jax_ms:.2f}%) |\n"
        )
        with open(args.out, "a") as fh:
            fh.write(row)
        print(f"appended a row to {args.out}")


if __name__ == "__main__":
    main()
