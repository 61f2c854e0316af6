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
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    import torchvision

    from fgd_jax import config as C
    from fgd_jax.models import build_detector
    from fgd_jax.models.faster_rcnn import FasterRCNN

    ts = args.train_size
    ih, iw = args.infer_size

    # ------------------------------------------------------------------------------ fgd-jax
    model = build_detector(C.faster_rcnn_model(depth=50))
    tb = common.synthetic_batch(2, ts, ts)
    ib = common.synthetic_batch(1, ih, iw)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(tb["image"]))
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(0.02, momentum=0.9)

    @jax.jit
    def step(p, o, batch, key):
        def loss_fn(p):
            losses, _ = model.apply(
                {"params": p, "batch_stats": stats},
                batch,
                method=FasterRCNN.forward_train,
                rngs={"sampler": key},
            )
            return sum(losses.values())

        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    state = [params, tx.init(params), 0]
    jtb = jax.device_put(tb)
    jib = jax.device_put(ib)

    def jax_train():
        state[2] += 1
        state[0], state[1], loss = step(state[0], state[1], jtb, jax.random.key(state[2]))
        loss.block_until_ready()

    pred = jax.jit(lambda v, x, s, f: model.apply(v, x, s, f, method=FasterRCNN.predict))

    def jax_infer():
        out = pred(variables, jib["image"], jib["img_shape"], jib["scale_factor"])
        out["boxes"].block_until_ready()

    # -------------------------------------------------------------------------- torchvision
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=81
    ).to(device)
    opt_t = torch.optim.SGD(tv.parameters(), lr=0.02, momentum=0.9)
    imgs = [torch.as_tensor(x).permute(2, 0, 1).to(device) for x in tb["image"]]
    targets = [
        dict(
            boxes=torch.as_tensor(b).to(device),
            labels=(torch.as_tensor(lab).long() + 1).to(device),  # background first
        )
        for b, lab in zip(tb["boxes"], tb["labels"], strict=True)
    ]
    img_t = [torch.as_tensor(ib["image"][0]).permute(2, 0, 1).to(device)]

    def torch_train():
        tv.train()
        tv.transform.min_size, tv.transform.max_size = (ts,), ts
        loss = sum(tv(imgs, targets).values())
        opt_t.zero_grad()
        loss.backward()
        opt_t.step()
        common.torch_sync(device)

    def torch_infer():
        tv.eval()
        tv.transform.min_size, tv.transform.max_size = (min(ih, iw),), max(ih, iw)
        with torch.no_grad():
            tv(img_t)
        common.torch_sync(device)

    common.compare_detectors(
        "Faster R-CNN R50-FPN, fgd-jax vs torchvision",
        args,
        device,
        train={"jax": jax_train, "torch": torch_train},
        infer={"jax": jax_infer, "torch": torch_infer},
    )


if __name__ == "__main__":
    main()
