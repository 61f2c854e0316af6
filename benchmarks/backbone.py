"""ResNet-50 forward+backward: Flax (jit) vs torchvision, side by side in one process.

    python -m benchmarks.backbone                      # default: batch 2, 512x512, 2 steps
    python -m benchmarks.backbone --xla_flags="--xla_cpu_use_onednn=true"
    python -m benchmarks.backbone --sweep              # one subprocess per XLA-flag variant
    python -m benchmarks.backbone --flax_1x1=matmul    # 1x1 convs as jnp.einsum

Both sides: BN on running statistics (mmdetection norm_eval), all parameters trainable, loss =
sum of the squared means of C2..C5, gradients w.r.t. all parameters; torch in channels_last
with as many intra-op threads as JAX's CPU client uses (all cores). Prints images/s per side,
the ratio and the peak RSS increase of each side (psutil, sampled every 5 ms).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="timed steps per side (after 1 warm-up)")
    p.add_argument("--xla_flags", default="", help="added to XLA_FLAGS before JAX starts")
    p.add_argument("--flax_1x1", choices=("conv", "matmul"), default="conv")
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--sweep", action="store_true", help="run every variant in VARIANTS")
    return p.parse_args()


# (label, extra command-line arguments) tried by --sweep.
VARIANTS = (
    ("default", []),
    ("1x1 as einsum", ["--flax_1x1=matmul"]),
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


def _time(step, steps: int) -> tuple[float, float]:
    """(first-call seconds incl. compile, mean seconds per step over `steps`)."""
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return first, (time.perf_counter() - t0) / steps


def run_torch(args) -> dict:
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

    with PeakRSS() as mem:
        first, per_step = _time(step, args.steps)
    return dict(first=first, per_step=per_step, peak=mem.peak, threads=torch.get_num_threads())


def run_flax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fgd_jax.models import layers
    from fgd_jax.models.resnet import ResNet

    if args.flax_1x1 == "matmul":
        _patch_1x1_as_matmul(layers)
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

    def step():
        loss, grads = grad_step(variables["params"], variables["batch_stats"], x)
        jax.block_until_ready(grads)
        return float(loss)

    with PeakRSS() as mem:
        first, per_step = _time(step, args.steps)
    return dict(first=first, per_step=per_step, peak=mem.peak, devices=str(jax.devices()))


def _patch_1x1_as_matmul(layers) -> None:
    """Experiment: 1x1 stride-1 convs as `jnp.einsum` on the same HWIO kernel."""
    import flax.linen as nn
    import jax.numpy as jnp

    original = layers.torch_conv

    class Conv1x1(nn.Module):
        features: int
        kernel_init: object
        dtype: object = None

        @nn.compact
        def __call__(self, x):
            k = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features))
            return jnp.einsum("bhwc,cd->bhwd", x, k[0, 0])

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
        if kernel_size == 1 and stride == 1 and groups == 1 and not use_bias:
            return Conv1x1(features, kernel_init, dtype, name=name)
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

    import fgd_jax.models.resnet as resnet

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
            if label != "default":
                cmd.append("--skip_torch")
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
    fx = run_flax(args)
    ips_f = args.batch / fx["per_step"]
    print(
        f"flax : {ips_f:6.3f} img/s  {fx['per_step']:6.2f} s/step  "
        f"first call {fx['first']:5.1f} s  peak RSS +{fx['peak'] / 2**20:6.0f} MiB",
        flush=True,
    )
    if args.skip_torch:
        return
    th = run_torch(args)
    ips_t = args.batch / th["per_step"]
    print(
        f"torch: {ips_t:6.3f} img/s  {th['per_step']:6.2f} s/step  "
        f"first call {th['first']:5.1f} s  peak RSS +{th['peak'] / 2**20:6.0f} MiB  "
        f"({th['threads']} threads)"
    )
    print(f"flax / torch throughput: {ips_f / ips_t:.2f}x")


if __name__ == "__main__":
    main()
