"""RetinaNet R50-FPN speed: fgd-jax (Flax, jit) vs torchvision, one process, same device.

- train step: forward + loss + backward + SGD(momentum) update, batch 2, random boxes.
- inference: forward + post-processing (fgd-jax `predict`; torchvision `model.eval()` call
  with its resize set to the input size), batch 1.
Timed calls alternate between the sides (`benchmarks/common.py`); reports images/s, the ratio
and peak memory (RSS of the shared process; device memory of each side with `--gpu`).

    python -m benchmarks.retinanet --threads 1 --iters 3 --out benchmarks/results/retinanet_cpu.md
    python -m benchmarks.retinanet --gpu --iters 20 --train-size 800 \
        --out benchmarks/results/retinanet_gpu.md
"""

from __future__ import annotations

from benchmarks import common


def main(argv: list[str] | None = None) -> None:
    args = common.detector_args(__doc__, argv)
    device = common.setup(args)
    from torchvision.models.detection import retinanet as tv_retinanet

    from fgd_jax import config as C

    peer = tv_retinanet.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=80)
    train, infer = common.detector_sides(args, device, C.retinanet_model(depth=50), peer, lr=0.01)
    common.compare_detectors(
        "RetinaNet R50-FPN, fgd-jax vs torchvision", args, device, train=train, infer=infer
    )


if __name__ == "__main__":
    main()
