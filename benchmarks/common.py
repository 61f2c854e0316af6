"""Shared scaffolding of the side-by-side detector benchmarks (retinanet.py, faster_rcnn.py).

What every such script needs, in one place:
- `add_common_args`: `--iters`, `--threads` (CPU cores for both frameworks), `--gpu` (JAX on
  the GPU and torch on CUDA), `--out`;
- `setup`: call BEFORE importing jax or torch: pins the process to `--threads` cores (XLA:CPU
  sizes its thread pool from the affinity) or checks that both frameworks see a GPU;
- `time_interleaved`: one warm-up call per side, then the timed calls alternate between the
  sides (A, B, A, B, ...), so a change of machine load hits both alike; median seconds;
- `synthetic_batch`: a static-shape batch with random boxes (contracts.md keys);
- `detector_sides` + `compare_detectors`: a whole fgd-jax vs torchvision detector comparison
  (train step and inference), used by retinanet.py and faster_rcnn.py;
- `jax_detector_calls`: fgd-jax's train / infer calls for given (converted) variables, used by
  mask_rcnn.py and gfl.py;
- `header` and `table`: the markdown report (date, device, versions, threads, load average,
  peak memory).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def add_common_args(p: argparse.ArgumentParser, iters: int = 3) -> None:
    p.add_argument("--iters", type=int, default=iters, help="timed calls per side")
    p.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="CPU cores for both frameworks (process affinity + torch threads); CPU mode only",
    )
    p.add_argument("--gpu", action="store_true", help="JAX on the GPU, torch on CUDA")
    p.add_argument("--out", default="", help="write the markdown report to this file")


def setup(args: argparse.Namespace) -> str:
    """Prepare the process for `args`; returns the torch device name ('cpu' or 'cuda').
    Must run before jax and torch are imported (affinity and JAX_PLATFORMS)."""
    if args.gpu:
        os.environ.pop("JAX_PLATFORMS", None)
        import jax
        import torch

        if jax.default_backend() != "gpu":
            raise SystemExit("--gpu: JAX sees no GPU (install jax[cuda12]; see the README)")
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: torch sees no CUDA device")
        return "cuda"
    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= args.threads <= len(cores):
        raise SystemExit(f"--threads must be in 1..{len(cores)}, got {args.threads}")
    os.sched_setaffinity(0, cores[: args.threads])
    os.environ["JAX_PLATFORMS"] = "cpu"
    import torch

    torch.set_num_threads(args.threads)
    return "cpu"


def torch_sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], iters: int) -> dict[str, float]:
    """Median seconds per call of each function (each must block until its work is done):
    one warm-up call each (compilation), then `iters` rounds calling every function once."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def synthetic_batch(b: int, h: int, w: int, g: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Random image [b, h, w, 3] float32 and `g` random boxes per image (xyxy pixels, inside
    the image), labels in [0, 80), all valid, img_shape = (h, w), scale factor 1."""
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


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_device_gib(device: str) -> tuple[float | None, float | None]:
    """(JAX, torch) peak device memory in GiB on a GPU run; (None, None) on CPU."""
    if device != "cuda":
        return None, None
    import jax
    import torch

    stats = jax.devices()[0].memory_stats() or {}
    jax_peak = stats.get("peak_bytes_in_use")
    return (
        jax_peak / 2**30 if jax_peak is not None else None,
        torch.cuda.max_memory_allocated() / 2**30,
    )


def device_name(device: str) -> str:
    if device == "cuda":
        import jax

        return f"{jax.devices()[0].device_kind} (JAX gpu, torch cuda)"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        pass
    return cpu


def header(title: str, args: argparse.Namespace, device: str) -> list[str]:
    import jax
    import torch
    import torchvision

    threads = "-" if device == "cuda" else str(args.threads)
    return [
        f"# {title}",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- device: {device_name(device)}; CPU threads for both sides: {threads}",
        f"- versions: jax {jax.__version__}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, python {platform.python_version()}",
        f"- load average before the run: {os.getloadavg()[0]:.2f}",
        f"- timing: {args.iters} calls per side after 1 warm-up (compilation excluded), "
        "alternating between the sides; median",
        "",
    ]


def table(rows: list[tuple[str, float, float]], peer: str) -> list[str]:
    """Markdown rows `(workload, fgd-jax img/s, peer img/s)` with the ratio."""
    lines = [f"| workload | fgd-jax img/s | {peer} img/s | ratio (jax/torch) |"]
    lines.append("|---|---|---|---|")
    for name, a, b in rows:
        lines.append(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.2f} |")
    return lines


def detector_parser(
    doc: str, train_size: int = 512, infer_size: tuple[int, int] = (800, 1344)
) -> argparse.ArgumentParser:
    """The parser of a detector comparison: the common flags, `--train-size` (square, batch 2)
    and `--infer-size` (h w, batch 1) with these defaults; a benchmark adds its own flags."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(ap)
    ap.add_argument(
        "--train-size", type=int, default=train_size, help="square training images, batch 2"
    )
    ap.add_argument("--infer-size", type=int, nargs=2, default=infer_size, help="h w, batch 1")
    return ap


def detector_args(doc: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of a detector comparison (`detector_parser`), parsed."""
    return detector_parser(doc).parse_args(argv)


def detector_sides(
    args: argparse.Namespace,
    device: str,
    model_cfg: Any,
    peer: Any,
    lr: float,
    label_offset: int = 0,
) -> tuple[dict[str, Callable[[], None]], dict[str, Callable[[], None]]]:
    """The timed calls of a detector comparison, `({'jax': train, 'torch': train},
    {'jax': infer, 'torch': infer})`, for `compare_detectors`.

    Train: one SGD(momentum 0.9) step on the same synthetic batch of 2 at --train-size (fgd-jax
    `forward_train`, a fresh sampler key per step; the torchvision `peer` in train mode, its
    resize set to the input size). Infer: a batch of 1 at --infer-size (`predict`; the peer in
    eval mode under `no_grad`). `label_offset`: added to the labels for the peer (1 for a
    background-first class order, as torchvision's Faster R-CNN)."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch

    from fgd_jax.models import build_detector, init_module

    ts, (ih, iw) = args.train_size, args.infer_size
    tb, ib = synthetic_batch(2, ts, ts), synthetic_batch(1, ih, iw)

    model = build_detector(model_cfg)
    variables = init_module(model, jax.random.key(0), jnp.asarray(tb["image"]))
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(lr, momentum=0.9)

    @jax.jit
    def step(p, o, batch, key):
        def loss_fn(p):
            losses, _ = model.apply(
                {"params": p, "batch_stats": stats},
                batch,
                method="forward_train",
                rngs={"sampler": key},  # (Faster R-CNN's samplers; unused by the others)
            )
            return sum(losses.values())

        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    state = [params, tx.init(params), 0]
    jtb, jib = jax.device_put(tb), jax.device_put(ib)
    pred = jax.jit(lambda v, x, s, f: model.apply(v, x, s, f, method="predict"))

    def jax_train() -> None:
        state[2] += 1
        state[0], state[1], loss = step(state[0], state[1], jtb, jax.random.key(state[2]))
        loss.block_until_ready()

    def jax_infer() -> None:
        out = pred(variables, jib["image"], jib["img_shape"], jib["scale_factor"])
        out["boxes"].block_until_ready()

    peer = peer.to(device)
    opt = torch.optim.SGD(peer.parameters(), lr=lr, momentum=0.9)
    imgs = [torch.as_tensor(x).permute(2, 0, 1).to(device) for x in tb["image"]]
    targets = [
        dict(
            boxes=torch.as_tensor(b).to(device),
            labels=(torch.as_tensor(lab).long() + label_offset).to(device),
        )
        for b, lab in zip(tb["boxes"], tb["labels"], strict=True)
    ]
    img_t = [torch.as_tensor(ib["image"][0]).permute(2, 0, 1).to(device)]

    def torch_train() -> None:
        peer.train()
        peer.transform.min_size, peer.transform.max_size = (ts,), ts
        loss = sum(peer(imgs, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch_sync(device)

    def torch_infer() -> None:
        peer.eval()
        peer.transform.min_size, peer.transform.max_size = (min(ih, iw),), max(ih, iw)
        with torch.no_grad():
            peer(img_t)
        torch_sync(device)

    return {"jax": jax_train, "torch": torch_train}, {"jax": jax_infer, "torch": torch_infer}


def jax_detector_calls(
    model: Any,
    variables: Any,
    train_batch: dict[str, np.ndarray],
    infer_batch: dict[str, np.ndarray],
    lr: float,
    after_predict: Callable[[Any], None] | None = None,
) -> tuple[Callable[[], None], Callable[[], None]]:
    """fgd-jax's timed calls `(train, infer)` of a detector with given `variables` (e.g.
    converted from the peer's weights): one jit SGD(momentum 0.9) step of `forward_train` on
    `train_batch` (a fresh sampler key per step), and a jit `predict` on `infer_batch`
    followed by `after_predict(detections on the host)` when given (e.g. pasting masks)."""
    import jax
    import optax

    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(lr, momentum=0.9)

    @jax.jit
    def step(p, o, batch, key):
        def loss_fn(p):
            losses, _ = model.apply(
                {"params": p, "batch_stats": stats},
                batch,
                method="forward_train",
                rngs={"sampler": key},  # (two-stage samplers; unused by the others)
            )
            return sum(losses.values())

        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    state = [params, tx.init(params), 0]
    jtb, jib = jax.device_put(train_batch), jax.device_put(infer_batch)
    pred = jax.jit(lambda v, x, s, f: model.apply(v, x, s, f, method="predict"))

    def train() -> None:
        state[2] += 1
        state[0], state[1], loss = step(state[0], state[1], jtb, jax.random.key(state[2]))
        loss.block_until_ready()

    def infer() -> None:
        det = pred(variables, jib["image"], jib["img_shape"], jib["scale_factor"])
        if after_predict is None:
            jax.block_until_ready(det)
        else:
            after_predict(jax.device_get(det))

    return train, infer


def compare_detectors(
    title: str,
    args: argparse.Namespace,
    device: str,
    train: dict[str, Callable[[], object]],
    infer: dict[str, Callable[[], object]],
) -> None:
    """Time `train` ({'jax': fn, 'torch': fn}: one step on a batch of 2 at --train-size) and
    `infer` (a batch of 1 at --infer-size) alternately, then print / write the report."""
    lines = header(title, args, device)
    t_train = time_interleaved(train, args.iters)
    t_infer = time_interleaved(infer, args.iters)
    ts, (ih, iw) = args.train_size, args.infer_size
    rows = [
        (f"train step, batch 2, {ts}x{ts}", 2 / t_train["jax"], 2 / t_train["torch"]),
        (f"inference, batch 1, {ih}x{iw}", 1 / t_infer["jax"], 1 / t_infer["torch"]),
    ]
    lines += table(rows, "torchvision")
    jax_dev, torch_dev = peak_device_gib(device)
    lines.append("")
    if jax_dev is not None:
        lines.append(f"Peak device memory: fgd-jax {jax_dev:.2f} GiB, torch {torch_dev:.2f} GiB.")
    lines.append(f"Peak RSS of the process (both sides): {peak_rss_gib():.2f} GiB.")
    write_report(lines, args.out)


def write_text(text: str, out: str) -> None:
    """Print a report and, if `out` is set, write it there (creating its folder)."""
    print(text)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
        print(f"wrote {out}")


def write_report(lines: list[str], out: str) -> None:
    """`write_text` of the lines joined by newlines."""
    write_text("\n".join(lines) + "\n", out)
