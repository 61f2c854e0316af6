"""ResNet-50 forward+backward: Flax (jit) vs torchvision, side by side in one process.

    python -m benchmarks.backbone                      # default: batch 2, 512x512, 3 steps
    python -m benchmarks.backbone --xla_flags="--xla_cpu_use_onednn=true"
    python -m benchmarks.backbone --sweep              # one subprocess per XLA-flag variant
    python -m benchmarks.backbone --flax_1x1=conv      # 1x1 convs via nn.Conv (the old path)

Both sides: BN on running statistics (mmdetection norm_eval), all parameters trainable, loss =
sum of the squared means of C2..C5, gradients w.r.t. all parameters; torch in channels_last
with as many intra-op threads as JAX's CPU client uses (all cores). The timed steps alternate
between the two sides so both see the same machine load (the dev machine is shared); prints
the median images/s per side, the ratio, and the peak RSS increase of each side's first
(warm-up) step (psutil, sampled every 5 ms; Flax compiled beforehand). Every --sweep variant
runs torch beside it, so compare the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (after 1 warm-up)")
    p.add_argument("--xla_flags", default="", help="added to XLA_FLAGS before JAX starts")
    p.add_argument(
        "--flax_1x1",
        choices=("conv", "matmul"),
        default="matmul",
        help="1x1 convs as the model's PointwiseConv matmul (default) or as nn.Conv",
    )
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--sweep", action="store_true", help="run every variant in VARIANTS")
    return p.parse_args()


# (label, extra command-line arguments) tried by --sweep.
VARIANTS = (
    ("default", []),
    ("1x1 as nn.Conv", ["--flax_1x1=conv"]),
    ("oneDNN", ["--xla_flags=--xla_cpu_use_onednn=true"]),
    (
        "oneDNN custom call",
        ["--xla_flags=--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true"],
    ),
    ("no XNNPACK", ["--xla_flags=--xla_cpu_use_xnnpack=false"]),
    ("fast math", ["--xla_flags=--xla_cpu_enable_fast_math=true"]),
)


class PeakRSS:
    """Peak resident-set-size increase (bytes) over a `with` block, sampled in a thread."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_torch(args):
    import torch
    import torchvision

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.size, args.size).to(memory_format=torch.channels_last)
    stages = (model.layer1, model.layer2, model.layer3, model.layer4)

    def step():
        model.zero_grad(set_to_none=True)
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        loss = 0.0
        for layer in stages:
            h = layer(h)
            loss = loss + h.mean() ** 2
        loss.backward()
        return float(loss.detach())

    return step, f"{torch.get_num_threads()} threads"


def make_flax(args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fgd_jax.models import layers
    from fgd_jax.models.resnet import ResNet

    if args.flax_1x1 == "conv":
        _patch_1x1_as_conv(layers)
    model = ResNet(depth=50, frozen_stages=-1, norm_eval=True)
    shape = (args.batch, args.size, args.size, 3)
    x = jnp.asarray(np.random.RandomState(0).randn(*shape), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)

    @jax.jit
    def grad_step(params, batch_stats, x):
        def loss_fn(p):
            outs = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True)
            return sum(jnp.mean(o) ** 2 for o in outs)

        return jax.value_and_grad(loss_fn)(params)

    compiled = grad_step.lower(variables["params"], variables["batch_stats"], x).compile()

    def step():
        loss, grads = compiled(variables["params"], variables["batch_stats"], x)
        jax.block_until_ready(grads)
        return float(loss)

    return step, str(jax.devices())


def _patch_1x1_as_conv(layers) -> None:
    """Experiment: 1x1 convs through `nn.Conv` (XLA conv) instead of `PointwiseConv`."""
    import flax.linen as nn
    import jax.numpy as jnp

    import fgd_jax.models.resnet as resnet

    original = layers.torch_conv

    def torch_conv(
        features,
        kernel_size,
        stride=1,
        padding=None,
        dilation=1,
        groups=1,
        use_bias=False,
        dtype=None,
        kernel_init=layers.kaiming_fan_out,
        name=None,
    ):
        if kernel_size == 1 and not padding and groups == 1:
            return nn.Conv(
                features,
                (1, 1),
                strides=(stride, stride),
                padding="VALID",
                use_bias=use_bias,
                dtype=dtype,
                param_dtype=jnp.float32,
                kernel_init=kernel_init,
                name=name,
            )
        return original(
            features,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            use_bias,
            dtype,
            kernel_init,
            name,
        )

    resnet.torch_conv = torch_conv


def _versions() -> str:
    import jax
    import jaxlib
    import torch
    import torchvision

    return (
        f"jax {jax.__version__} (jaxlib {jaxlib.__version__}), torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, {os.cpu_count()} CPU cores"
    )


def main() -> None:
    args = _parse()
    if args.sweep:
        for label, extra in VARIANTS:
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.backbone",
                f"--batch={args.batch}",
                f"--size={args.size}",
                f"--steps={args.steps}",
                *extra,
            ]
            print(f"=== {label}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=False)
        return
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    print(_versions())
    print(
        f"ResNet-50 fwd+bwd, batch {args.batch}, {args.size}x{args.size}, {args.steps} steps; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, 1x1={args.flax_1x1}",
        flush=True,
    )
    sides = {}
    t0 = time.perf_counter()
    sides["flax"] = make_flax(args)
    print(f"flax : build + jit compile {time.perf_counter() - t0:5.1f} s", flush=True)
    if not args.skip_torch:
        sides["torch"] = make_torch(args)
    # First call of each side alone, its peak RSS increase measured (compile excluded).
    peak = {}
    for name, (step, _) in sides.items():
        with PeakRSS() as mem:
            step()
        peak[name] = mem.peak
    # Timed steps interleaved (flax, torch, flax, ...) so both see the same machine load.
    times = {name: [] for name in sides}
    for _ in range(args.steps):
        for name, (step, _) in sides.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    ips = {}
    for name, (_, info) in sides.items():
        med = statistics.median(times[name])
        ips[name] = args.batch / med
        print(
            f"{name:5s}: {ips[name]:6.3f} img/s  median {med:6.2f} s/step "
            f"(all {', '.join(f'{t:.2f}' for t in times[name])})  "
            f"peak RSS +{peak[name] / 2**20:5.0f} MiB  [{info}]",
            flush=True,
        )
    if "torch" in ips:
        print(f"flax / torch throughput: {ips['flax'] / ips['torch']:.2f}x")


if __name__ == "__main__":
    main()
