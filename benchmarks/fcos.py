"""FCOS R50-FPN: Flax (jit) vs torchvision `fcos_resnet50_fpn`, side by side in one process.

    python -m benchmarks.fcos                    # batch 1, 512x512, 3 timed steps per side
    python -m benchmarks.fcos --size 800 --batch 2 --steps 5

Two measurements per side, same random weights (torchvision's, converted), frozen BN:
- `infer`: backbone + FPN + head + postprocess (torchvision: `postprocess_detections`; ours:
  `score_style='torchvision'`, static shapes);
- `train`: the detection loss and its gradients w.r.t. all parameters (torchvision: its own
  FCOS loss + `backward()`; ours: mmdetection's FCOS loss under `jax.value_and_grad`), 4 GT
  boxes per image.
torch uses as many intra-op threads as there are cores. Prints seconds per step (mean over
`--steps` after one warm-up call that includes compilation) and images/s.
"""

from __future__ import annotations

import argparse
import os
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=512, help="square input side (multiple of 128)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--num_classes", type=int, default=80)
    return p.parse_args()


def _time(fn, steps: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return first, (time.perf_counter() - t0) / steps


def main() -> None:
    args = _parse()
    if args.size % 128:
        raise SystemExit(f"benchmarks.fcos: --size {args.size} must be a multiple of 128")
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

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(body, 5, [2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    tv = torchvision.models.detection.FCOS(
        backbone, args.num_classes, min_size=args.size, max_size=args.size
    )
    cfg = torchvision_fcos_config(num_classes=args.num_classes)
    model = build_detector(cfg)
    variables = import_torch_checkpoint(tv.state_dict(), cfg)

    b, s = args.batch, args.size
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(b, 3, s, s)).astype(np.float32)
    gt = [[10, 20, 200, 220], [50, 60, 120, 300], [0, 0, s, s], [300, 300, 400, 350]]
    boxes = np.tile(np.array(gt, np.float32), (b, 1, 1))
    labels = np.tile(np.array([1, 2, 3, 4], np.int32), (b, 1))

    # ----- torch
    xt = torch.from_numpy(x)
    targets = [
        dict(boxes=torch.from_numpy(boxes[i]), labels=torch.from_numpy(labels[i]).long())
        for i in range(b)
    ]

    def torch_infer():
        tv.eval()
        with torch.no_grad():
            tv(list(xt))

    def torch_train():
        tv.train()
        tv.zero_grad()
        losses = tv(list(xt), targets)
        sum(losses.values()).backward()

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

    print(
        f"FCOS R50-FPN, batch {b}, {s}x{s}, {args.num_classes} classes, "
        f"{os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.devices()[0].platform}), "
        f"torch {torch.__version__}"
    )
    print(f"{'what':<8}{'side':<8}{'first call s':>14}{'s/step':>10}{'img/s':>9}")
    for what, fj, ft in (("infer", jax_infer, torch_infer), ("train", jax_train, torch_train)):
        for side, fn in (("jax", fj), ("torch", ft)):
            first, per = _time(fn, args.steps)
            print(f"{what:<8}{side:<8}{first:>14.2f}{per:>10.3f}{b / per:>9.2f}")


if __name__ == "__main__":
    main()
