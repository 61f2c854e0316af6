"""Deformable convolution: fgd_jax.ops.deform_conv (jit) vs torchvision.ops.deform_conv2d.

Setting (a c4-stage DCN of a ResNet/ResNeXt teacher on COCO at 800x1344): batch 2, 256 -> 256
channels, 50x84 map, 3x3 kernel, padding 1, deform_groups 1, random offsets (std 2 px) and,
for v2, a random mask. Workloads, each side in one process, timed interleaved
(`benchmarks/common.py`):
- `v1 forward`: the output alone (torch under `no_grad`);
- `v1 fwd+bwd` / `v2 fwd+bwd`: the output and the gradients w.r.t. input, offsets, weight (and
  mask) for a fixed random cotangent (torch: `backward()`).
Median ms per call; the speed-up is torch / fgd-jax (> 1: fgd-jax faster).

    python -m benchmarks.deform_conv --threads 1 --iters 3 \
        --out benchmarks/results/deform_conv_cpu.md
    python -m benchmarks.deform_conv --gpu --iters 20 --out benchmarks/results/deform_conv_gpu.md
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from benchmarks.common import add_common_args, header, setup, time_interleaved, torch_sync


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=int, default=256, help="input = output channels")
    p.add_argument("--size", type=int, nargs=2, default=(50, 84), help="h w of the map")
    p.add_argument("--deform-groups", type=int, default=1)
    p.add_argument("--groups", type=int, default=1, help="conv groups (ResNeXt: 32)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = setup(args)
    import jax
    import jax.numpy as jnp
    import torch
    import torchvision

    from fgd_jax.ops.deform_conv import deform_conv2d

    b, c, (h, w), dg, g = args.batch, args.channels, args.size, args.deform_groups, args.groups
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (b, h, w, c)).astype(np.float32)
    off = rng.normal(0, 2, (b, h, w, 2 * dg * 9)).astype(np.float32)
    mask = rng.uniform(0, 1, (b, h, w, dg * 9)).astype(np.float32)
    wt = rng.normal(0, 0.05, (3, 3, c // g, c)).astype(np.float32)
    cot = rng.normal(0, 1, (b, h, w, c)).astype(np.float32)

    # ------------------------------------------------------------------------------ JAX
    jx, joff, jmask, jwt, jcot = map(jnp.asarray, (x, off, mask, wt, cot))

    def f(x, off, wt, mask):
        return deform_conv2d(x, off, wt, mask, padding=1, groups=g, deform_groups=dg)

    fwd = jax.jit(lambda x, off, wt: f(x, off, wt, None))
    v1 = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a, None) * jcot), argnums=(0, 1, 2)))
    v2 = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * jcot), argnums=(0, 1, 2, 3)))

    # ---------------------------------------------------------------------------- torch
    def tt(a, grad=False):
        t = torch.tensor(np.ascontiguousarray(a.transpose(0, 3, 1, 2)), device=device)
        return t.requires_grad_(grad)

    tx, toff, tmask = tt(x, True), tt(off, True), tt(mask, True)
    twt = torch.tensor(wt.transpose(3, 2, 0, 1).copy(), device=device, requires_grad=True)
    tcot = tt(cot)

    def torch_fwd():
        with torch.no_grad():
            torchvision.ops.deform_conv2d(tx, toff, twt, padding=1)
        torch_sync(device)

    def torch_bwd(modulated: bool):
        for t in (tx, toff, twt, tmask):
            t.grad = None
        y = torchvision.ops.deform_conv2d(
            tx, toff, twt, padding=1, mask=tmask if modulated else None
        )
        (y * tcot).sum().backward()
        torch_sync(device)

    def block(fn, *a):
        return lambda: jax.block_until_ready(fn(*a))

    workloads = [
        ("v1 forward", block(fwd, jx, joff, jwt), torch_fwd),
        ("v1 fwd+bwd", block(v1, jx, joff, jwt), lambda: torch_bwd(False)),
        ("v2 fwd+bwd", block(v2, jx, joff, jwt, jmask), lambda: torch_bwd(True)),
    ]
    shape = f"batch {b}, {c}->{c}, {h}x{w}, 3x3, groups {g}, dg {dg}"
    rows = []
    for name, jfn, tfn in workloads:
        t = time_interleaved({"jax": jfn, "torch": tfn}, args.iters)
        jms, tms = 1e3 * t["jax"], 1e3 * t["torch"]
        rows.append((name, jms, tms))
        print(
            f"SUMMARY deform_conv | DCN {name}, {shape} | ms/step | {jms:.2f} | {tms:.2f} | "
            f"{tms / jms:.2f}",
            flush=True,
        )

    lines = header("Deformable convolution: fgd-jax vs torchvision.ops.deform_conv2d", args, device)
    lines += [f"Setting: {shape}, padding 1, offsets ~N(0, 2 px), float32.", ""]
    lines += [
        "| workload | fgd-jax ms | torchvision ms | speed-up (torch/jax) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {a:.1f} | {t:.1f} | {t / a:.2f} |" for n, a, t in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
