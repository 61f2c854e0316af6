"""FCOS R50-FPN: Flax (jit) vs torchvision `fcos_resnet50_fpn`, side by side in one process.

    python -m benchmarks.fcos                    # batch 1, 512x512, 3 timed steps per side
    python -m benchmarks.fcos --size 800 --batch 2 --steps 5 --threads 1
    python -m benchmarks.fcos --gpu --size 896 --batch 2 --steps 20

Two measurements per side, same random weights (torchvision's, converted), frozen BN:
- `infer`: backbone + FPN + head + postprocess (torchvision: `postprocess_detections`; ours:
  `score_style='torchvision'`, static shapes);
- `train`: the detection loss and its gradients w.r.t. all parameters (torchvision: its own
  FCOS loss + `backward()`; ours: mmdetection's FCOS loss under `jax.value_and_grad`), 4 GT
  boxes per image.
Both sides use `--threads` CPU cores (default all), or the GPU with `--gpu`. Prints the first
call's seconds (compilation included), then seconds per step (median of `--steps` calls,
alternating between the sides, `benchmarks/common.py`) and images/s.
"""

from __future__ import annotations

import argparse
import time

from benchmarks import common


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--steps", dest="iters", type=int, help="the same as --iters")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=512, help="square input side (multiple of 128)")
    p.add_argument("--num_classes", type=int, default=80)
    return p.parse_args(argv)


def _first_call(fn) -> float:
    """Seconds of the first call (compilation on the JAX side)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.size % 128:
        raise SystemExit(f"benchmarks.fcos: --size {args.size} must be a multiple of 128")
    device = common.setup(args)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torchvision
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    from fgd_jax.convert import import_torch_checkpoint
    from fgd_jax.convert.torchvision_fcos import torchvision_fcos_config
    from fgd_jax.models import build_detector

    torch.manual_seed(0)
    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(body, 5, [2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    tv = torchvision.models.detection.FCOS(
        backbone, args.num_classes, min_size=args.size, max_size=args.size
    )
    cfg = torchvision_fcos_config(num_classes=args.num_classes)
    model = build_detector(cfg)
    variables = import_torch_checkpoint(tv.state_dict(), cfg)
    tv = tv.to(device)

    b, s = args.batch, args.size
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(b, 3, s, s)).astype(np.float32)
    gt = [[10, 20, 200, 220], [50, 60, 120, 300], [0, 0, s, s], [300, 300, 400, 350]]
    boxes = np.tile(np.array(gt, np.float32), (b, 1, 1))
    labels = np.tile(np.array([1, 2, 3, 4], np.int32), (b, 1))

    # ----- torch
    xt = torch.from_numpy(x).to(device)
    targets = [
        dict(
            boxes=torch.from_numpy(boxes[i]).to(device),
            labels=torch.from_numpy(labels[i]).long().to(device),
        )
        for i in range(b)
    ]

    def torch_infer():
        tv.eval()
        with torch.no_grad():
            tv(list(xt))
        common.torch_sync(device)

    def torch_train():
        tv.train()
        tv.zero_grad()
        losses = tv(list(xt), targets)
        sum(losses.values()).backward()
        common.torch_sync(device)

    # ----- jax (the torchvision transform normalizes with ImageNet mean/std: do it up front)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    images = jnp.asarray((x.transpose(0, 2, 3, 1) - mean) / std)
    batch = dict(
        image=images,
        boxes=jnp.asarray(boxes),
        labels=jnp.asarray(labels),
        valid=jnp.ones(labels.shape, bool),
        img_shape=jnp.full((b, 2), s, jnp.int32),
        scale_factor=jnp.ones((b, 4), jnp.float32),
    )
    shape, factor = batch["img_shape"], batch["scale_factor"]
    infer = jax.jit(lambda v, im: model.apply(v, im, shape, factor, method="predict"))

    def loss_fn(params, rest, bt):
        losses, _ = model.apply({"params": params, **rest}, bt, method="forward_train")
        return sum(losses.values())

    grad = jax.jit(jax.value_and_grad(loss_fn))
    rest = {k: v for k, v in variables.items() if k != "params"}

    def jax_infer():
        jax.block_until_ready(infer(variables, images))

    def jax_train():
        jax.block_until_ready(grad(variables["params"], rest, batch))

    where = common.device_name(device) if device == "cuda" else f"{args.threads} CPU threads"
    lines = [
        f"FCOS R50-FPN, batch {b}, {s}x{s}, {args.num_classes} classes, {where}, "
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}",
        f"timing: first call alone, then {args.iters} calls per side alternating; median",
        f"{'what':<8}{'side':<8}{'first call s':>14}{'s/step':>10}{'img/s':>9}",
    ]
    print("\n".join(lines), flush=True)
    for what, fj, ft in (("infer", jax_infer, torch_infer), ("train", jax_train, torch_train)):
        first = {side: _first_call(fn) for side, fn in (("jax", fj), ("torch", ft))}
        per = common.time_interleaved({"jax": fj, "torch": ft}, args.iters)
        for side in ("jax", "torch"):
            line = f"{what:<8}{side:<8}{first[side]:>14.2f}{per[side]:>10.3f}"
            line += f"{b / per[side]:>9.2f}"
            print(line, flush=True)
            lines.append(line)
    if args.out:
        common.write_report(["```", *lines, "```"], args.out)


if __name__ == "__main__":
    main()
