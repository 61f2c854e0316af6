"""SOLO R50-FPN: Flax (jit) vs mmdetection's SOLO (CPU), train step and inference.

    python -m benchmarks.solo                              # batch 1, 512x512, 1 thread
    python -m benchmarks.solo --size 640 --threads 2 --iters 3 --out benchmarks/results/solo_cpu.md

mmdetection is not in the project's environment, so its side runs as a subprocess with the
oracle venv's python (`--peer_python`, default /work/oracle/mmdet-venv/bin/python: mmdetection
3.3 + mmcv 2.1 on CPU, whose SOLO is 2.x's code) running `benchmarks/solo_mmdet_peer.py`: it
builds `solo_r50_fpn_1x_coco` (80 classes, mmdetection's own init), saves the state dict,
which this side converts (so both run the same weights), and times its side; then this
process times ours. The two sides run one after the other (not interleaved), each with
`--threads` cores, so a change of machine load between them shows in the ratio; the load
average is in the report.

- `infer`: backbone + FPN + head + postprocess (mmdetection: `mask_head.predict`, masks
  upsampled to the image; ours: `predict`, static shapes, stride-4 masks: the host pastes
  them at evaluation). With mmdetection's init (category prior 0.01) few or no (cell, class)
  pairs pass `score_thr` 0.1, so mmdetection's postprocess exits early; ours always runs its
  fixed-size candidate selection and matrix NMS.
- `train`: the SOLO losses (targets, Dice, focal) and their gradients w.r.t. all parameters,
  `--gts` GT ellipses per image (mmdetection: bitmaps; ours: the data path's 56 x 56 grids).
First call (compilation on the JAX side) and the median of `--iters` calls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

from benchmarks import common

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "solo_mmdet_peer.py")


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    common.add_common_args(p)
    p.set_defaults(threads=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=512, help="square input side (multiple of 32)")
    p.add_argument("--gts", type=int, default=4)
    p.add_argument("--peer_python", default="/work/oracle/mmdet-venv/bin/python")
    return p.parse_args(argv)


def make_batch(b: int, size: int, g: int, seed: int = 0) -> dict:
    """Images N(0, 1), `g` ellipse masks per image (bitmaps, boxes, labels) and their grids."""
    import numpy as np

    from fgd_jax.data.masks import mask_grid

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    bitmaps = np.zeros((b, g, size, size), np.uint8)
    boxes = np.zeros((b, g, 4), np.float32)
    grids = np.zeros((b, g, 56, 56), np.uint8)
    regions = np.zeros((b, g, 4), np.float32)
    for i in range(b):
        for k in range(g):
            r = rng.uniform(0.05, 0.3, 2) * size
            c = rng.uniform(r, size - r)
            m = ((yy - c[0]) / r[0]) ** 2 + ((xx - c[1]) / r[1]) ** 2 <= 1
            bitmaps[i, k] = m
            ys, xs = np.nonzero(m)
            boxes[i, k] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            grids[i, k], regions[i, k] = mask_grid(
                m.astype(np.uint8), boxes[i, k], (size, size), (size, size), False, 56
            )
    return dict(
        image=rng.normal(0, 1, (b, size, size, 3)).astype(np.float32),
        bitmaps=bitmaps,
        boxes=boxes,
        labels=rng.integers(0, 80, (b, g)).astype(np.int32),
        valid=np.ones((b, g), bool),
        masks=grids,
        mask_regions=regions,
        img_shape=np.tile([size, size], (b, 1)).astype(np.int32),
        scale_factor=np.ones((b, 4), np.float32),
    )


def run_peer(args: argparse.Namespace, batch: dict, tmp: str) -> dict:
    import numpy as np

    path = os.path.join(tmp, "batch.npz")
    np.savez(path, **{k: batch[k] for k in ("image", "bitmaps", "boxes", "labels", "valid")})
    out = os.path.join(tmp, "peer.json")
    cmd = [
        args.peer_python, PEER, "--batch", path, "--state", os.path.join(tmp, "solo.pth"),
        "--json", out, "--threads", str(args.threads), "--iters", str(args.iters),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env.pop("PYTHONPATH", None)
    subprocess.run(cmd, check=True, env=env)
    with open(out) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.gpu:
        raise SystemExit("benchmarks.solo: CPU only (the mmdetection peer runs on CPU)")
    device = common.setup(args)
    batch = make_batch(args.batch, args.size, args.gts)
    with tempfile.TemporaryDirectory() as tmp:
        peer = run_peer(args, batch, tmp)
        import jax
        import jax.numpy as jnp
        import numpy as np
        import torch

        from fgd_jax import config as C
        from fgd_jax.convert.core import convert_state_dict
        from fgd_jax.models import build_detector, variable_shapes

        model = build_detector(C.solo_model(depth=50))
        sd = torch.load(os.path.join(tmp, "solo.pth"), map_location="cpu")
        sd = {k: v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        variables = jax.tree.map(jnp.asarray, convert_state_dict(sd, variable_shapes(model)))
    jb = {k: jnp.asarray(v) for k, v in batch.items() if k != "bitmaps"}

    @jax.jit
    def infer(v, b):
        return model.apply(v, b["image"], b["img_shape"], b["scale_factor"], method="predict")

    @jax.jit
    def train(params, b):
        def loss(p):
            losses, _ = model.apply(
                {"params": p, "batch_stats": variables["batch_stats"]}, b, True,
                method="forward_train",
            )  # fmt: skip
            return sum(losses.values())

        return jax.value_and_grad(loss)(params)

    fns = {
        "infer": lambda: jax.block_until_ready(infer(variables, jb)),
        "train": lambda: jax.block_until_ready(train(variables["params"], jb)),
    }
    ours = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        ours[name] = dict(first=first, step=float(np.median(times)))
    lines = [
        "# SOLO R50-FPN: fgd-jax vs mmdetection (CPU)",
        "",
        f"`python -m benchmarks.solo --batch {args.batch} --size {args.size} --gts {args.gts} "
        f"--threads {args.threads} --iters {args.iters}`",
        "",
        f"- device: {common.device_name(device)}, {args.threads} thread(s) per side",
        f"- jax {jax.__version__}; mmdetection {peer['mmdet']} (torch {peer['torch']}) in the "
        "oracle venv, run as a subprocess (benchmarks/solo_mmdet_peer.py)",
        f"- load average after the run: {os.getloadavg()[0]:.2f} (the machine was shared)",
        "",
        "| what | side | first call s | s/step | img/s | jax / mmdet |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("infer", "train"):
        for side, res in (("jax", ours[name]), ("mmdet", peer[name])):
            ratio = ours[name]["step"] / peer[name]["step"] if side == "jax" else 1.0
            lines.append(
                f"| {name} | {side} | {res['first']:.2f} | {res['step']:.3f} | "
                f"{args.batch / res['step']:.2f} | {ratio:.2f} |"
            )
    common.write_report(lines, args.out)


if __name__ == "__main__":
    main()
