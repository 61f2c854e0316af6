"""Faster R-CNN R50-FPN speed: fgd-jax (Flax, jit) vs torchvision, one process, same device.

- train step: forward + RPN/RoI losses + backward + SGD(momentum) update, batch 2, random boxes.
- inference: forward + post-processing (fgd-jax `predict`; torchvision `model.eval()` call with
  its resize set to the input size), batch 1.
Both models use mmdetection / torchvision default test settings (1000 proposals per image).
torchvision's RoI pooler is its own (aligned=False, sampling_ratio=2), which is cheaper than
mmdetection's adaptive RoIAlign used by fgd-jax: the comparison is of two full detectors, not
of identical arithmetic. Timed calls alternate between the sides (`benchmarks/common.py`).

    python -m benchmarks.faster_rcnn --threads 1 --iters 3 --train-size 512 \
        --infer-size 800 1344 --out benchmarks/results/faster_rcnn_cpu.md
    python -m benchmarks.faster_rcnn --gpu --iters 20 --train-size 800 \
        --infer-size 800 1344 --out benchmarks/results/faster_rcnn_gpu.md
"""

from __future__ import annotations

from benchmarks import common


def main(argv: list[str] | None = None) -> None:
    args = common.detector_args(__doc__, argv)
    device = common.setup(args)
    import torchvision

    from fgd_jax import config as C

    peer = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=81
    )
    train, infer = common.detector_sides(
        args,
        device,
        C.faster_rcnn_model(depth=50),
        peer,
        lr=0.02,
        label_offset=1,  # torchvision's Faster R-CNN: background first
    )
    common.compare_detectors(
        "Faster R-CNN R50-FPN, fgd-jax vs torchvision", args, device, train=train, infer=infer
    )


if __name__ == "__main__":
    main()
