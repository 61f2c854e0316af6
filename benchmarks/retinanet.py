"""RetinaNet R50-FPN speed on this machine: fgd-jax (Flax, jit) vs torchvision, one process.

- train step: forward + loss + backward + SGD(momentum) update, batch 2, 512x512, random boxes.
- inference: forward + post-processing (fgd-jax `predict`; torchvision `model.eval()` call
  with its resize disabled), batch 1, 800x1344.
Reports images/s, the ratio, and the process's peak RSS after each part (both frameworks share
the process, so the peak is cumulative; it is an upper bound for whichever ran later).

    python -m benchmarks.retinanet --iters 3 --out benchmarks/results/retinanet_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torchvision
from torchvision.models.detection import retinanet as tv_retinanet

from fgd_jax import config as C
from fgd_jax.models import build_detector
from fgd_jax.models.retinanet import RetinaNet


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn, iters: int) -> float:
    fn()  # warm-up (compile)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def batch_of(b: int, h: int, w: int, g: int = 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 0.6, (b, g, 2)) * [w, h]
    wh = rng.uniform(0.1, 0.4, (b, g, 2)) * [w, h]
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    return dict(
        image=rng.normal(0, 1, (b, h, w, 3)).astype(np.float32),
        boxes=boxes,
        labels=rng.integers(0, 80, (b, g)).astype(np.int32),
        valid=np.ones((b, g), bool),
        img_shape=np.tile([h, w], (b, 1)).astype(np.int32),
        scale_factor=np.ones((b, 4), np.float32),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []

    cfg = C.retinanet_model(depth=50)
    model = build_detector(cfg)
    tb = batch_of(2, 512, 512)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(tb["image"]))
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(0.01, momentum=0.9)
    opt = tx.init(params)

    @jax.jit
    def step(p, o, batch):
        def loss_fn(p):
            losses, _ = model.apply(
                {"params": p, "batch_stats": stats}, batch, method=RetinaNet.forward_train
            )
            return sum(losses.values())

        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    state = [params, opt]

    def jax_train():
        state[0], state[1], loss = step(state[0], state[1], tb)
        loss.block_until_ready()

    t_jax_train = timed(jax_train, args.iters)
    rss_jax_train = peak_rss_gib()

    ib = batch_of(1, 800, 1344)
    pred = jax.jit(lambda v, x, s, f: model.apply(v, x, s, f, method=RetinaNet.predict))

    def jax_infer():
        out = pred(variables, ib["image"], ib["img_shape"], ib["scale_factor"])
        out["boxes"].block_until_ready()

    t_jax_inf = timed(jax_infer, args.iters)
    rss_jax = peak_rss_gib()

    tv = tv_retinanet.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=80)
    opt_t = torch.optim.SGD(tv.parameters(), lr=0.01, momentum=0.9)
    imgs = [torch.as_tensor(x).permute(2, 0, 1) for x in tb["image"]]
    targets = [
        dict(boxes=torch.as_tensor(b), labels=torch.as_tensor(l).long())
        for b, l in zip(tb["boxes"], tb["labels"], strict=True)
    ]
    tv.transform.min_size, tv.transform.max_size = (512,), 512

    def torch_train():
        tv.train()
        losses = tv(imgs, targets)
        loss = sum(losses.values())
        opt_t.zero_grad()
        loss.backward()
        opt_t.step()

    t_tv_train = timed(torch_train, args.iters)
    tv.eval()
    tv.transform.min_size, tv.transform.max_size = (800,), 1344
    img_t = [torch.as_tensor(ib["image"][0]).permute(2, 0, 1)]

    def torch_infer():
        with torch.no_grad():
            tv(img_t)

    t_tv_inf = timed(torch_infer, args.iters)
    rss_all = peak_rss_gib()

    rows.append(("train step, batch 2, 512x512", 2 / t_jax_train, 2 / t_tv_train))
    rows.append(("inference, batch 1, 800x1344", 1 / t_jax_inf, 1 / t_tv_inf))
    lines = [
        "# RetinaNet R50-FPN, fgd-jax vs torchvision, CPU",
        "",
        f"- date: {datetime.date.today()}",
        f"- device: {platform.processor() or platform.machine()}, "
        f"{len(jax.devices())} JAX CPU device, torch threads {torch.get_num_threads()}",
        f"- versions: jax {jax.__version__}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, python {platform.python_version()}",
        f"- iterations: {args.iters} timed after 1 warm-up (compile excluded)",
        "",
        "| workload | fgd-jax img/s | torchvision img/s | ratio (jax/torch) |",
        "|---|---|---|---|",
    ]
    for name, a, b in rows:
        lines.append(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.2f} |")
    lines += [
        "",
        f"Peak RSS of the process: after fgd-jax train {rss_jax_train:.2f} GiB, after fgd-jax "
        f"inference {rss_jax:.2f} GiB, after torchvision {rss_all:.2f} GiB (cumulative).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
