"""ResNet-50 forward+backward: Flax (jit) vs torchvision, side by side in one process.

    python -m benchmarks.backbone --threads 1                  # default: batch 2, 512x512
    python -m benchmarks.backbone --threads 1 --variant nchw   # one entry of VARIANTS
    python -m benchmarks.backbone --threads 1 --sweep --out table.md   # every variant
    python -m benchmarks.backbone --threads 1 --sweep --only default,bf16

Both sides: BN on running statistics (mmdetection norm_eval), all parameters trainable, loss =
sum of the squared means of C2..C5, gradients w.r.t. all parameters; torch in channels_last.
`--threads N`: both sides on the same N cores (process affinity, which also sizes XLA:CPU's
thread pool, and `torch.set_num_threads`; `benchmarks.common.setup`). The timed steps alternate
between the two sides (`common.time_interleaved`) so both see the same machine load; prints
the median ms/step and img/s per side, the ratio, and the peak RSS increase of each side's
first (warm-up) step (psutil, sampled every 5 ms; Flax compiled beforehand).

VARIANTS are other formulations of the same network and the same parameters (NCHW layout,
im2col convolutions, a matmul weight gradient, bfloat16, XLA flags), written below in plain
`jax.lax`. Every variant's loss and gradients on the timed input are compared with those of
the default Flax model (saved by the `default` run to `--ref`): the reported error is the
largest `||a - b|| / ||b||` over the loss and every gradient leaf. `--sweep` runs every
variant in its own process (XLA flags must be set before JAX starts), each with its own
torch reference, and prints one markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks import common

# name -> (description, formulation). Formulation keys: `impl` 'flax' (fgd_jax ResNet) or 'lax'
# (the functions below); `layout` NHWC | NCHW; `pointwise` (1x1 convs) 'matmul' | 'conv';
# `spatial` (7x7 and 3x3 convs) 'conv' (lax.conv_general_dilated) | 'im2col' (k*k shifted
# strided slices concatenated + one matmul, autodiff) | 'patches'
# (lax.conv_general_dilated_patches + matmul, autodiff) | 'conv_mmw' (XLA conv forward and
# input gradient, custom VJP whose weight gradient is one im2col matmul) | 'im2col_vjp' (im2col
# matmul, custom VJP that keeps only x and recomputes the patches for the weight gradient);
# `dtype` float32 | bfloat16 (compute; params and gradients stay float32); `xla_flags`.
VARIANTS: dict[str, tuple[str, dict]] = {
    "default": ("fgd_jax ResNet (Flax, NHWC, 1x1 as matmul)", dict(impl="flax")),
    "lax_nhwc": (
        "lax re-implementation, NHWC, 1x1 matmul, kxk lax conv (control)",
        dict(impl="lax", layout="NHWC", pointwise="matmul", spatial="conv"),
    ),
    "nchw": (
        "NCHW/OIHW, every conv lax.conv_general_dilated",
        dict(impl="lax", layout="NCHW", pointwise="conv", spatial="conv"),
    ),
    "nchw_mm1x1": (
        "NCHW/OIHW, kxk lax conv, 1x1 as matmul",
        dict(impl="lax", layout="NCHW", pointwise="matmul", spatial="conv"),
    ),
    "im2col": (
        "NHWC, 7x7+3x3 as im2col (slices+concat) + matmul, autodiff",
        dict(impl="lax", layout="NHWC", pointwise="matmul", spatial="im2col"),
    ),
    "im2col_vjp": (
        "NHWC, im2col matmul, custom VJP (recomputed patches, dW matmul)",
        dict(impl="lax", layout="NHWC", pointwise="matmul", spatial="im2col_vjp"),
    ),
    "patches": (
        "NHWC, lax.conv_general_dilated_patches + matmul, autodiff",
        dict(impl="lax", layout="NHWC", pointwise="matmul", spatial="patches"),
    ),
    "conv_mmw": (
        "NHWC, XLA conv fwd + dx, custom VJP dW as im2col matmul",
        dict(impl="lax", layout="NHWC", pointwise="matmul", spatial="conv_mmw"),
    ),
    "bf16": ("fgd_jax ResNet, dtype=bfloat16", dict(impl="flax", dtype="bfloat16")),
    "bf16_im2col": (
        "bfloat16, im2col + matmul",
        dict(impl="lax", layout="NHWC", pointwise="matmul", spatial="im2col", dtype="bfloat16"),
    ),
}
_FLAGS = {
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "no_eigen_mt": "--xla_cpu_multi_thread_eigen=false",
    "no_thunks": "--xla_cpu_use_thunk_runtime=false",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_cc": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "onednn_fuse": "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
    "xnn_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "ynn_fuse": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "strict_math": "--xla_cpu_strict_dot_conv_math=true",
}
for _name, _flag in _FLAGS.items():
    VARIANTS[f"xla:{_name}"] = (f"default + `{_flag}`", dict(impl="flax", xla_flags=_flag))


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    common.add_common_args(p, iters=3)
    p.add_argument("--steps", dest="iters", type=int, default=argparse.SUPPRESS, help="= --iters")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--variant", default="default", choices=sorted(VARIANTS))
    p.add_argument("--xla_flags", default="", help="added to XLA_FLAGS before JAX starts")
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--sweep", action="store_true", help="every variant, one process each")
    p.add_argument("--only", default="", help="--sweep: comma-separated variant names")
    p.add_argument("--ref", default="", help="reference gradients (.npz; default: in /tmp)")
    p.add_argument("--json", default="", help="append this run's result as a JSON line")
    args = p.parse_args(argv)
    if args.gpu:
        p.error("backbone.py is a CPU benchmark (no --gpu)")
    if not args.ref:
        args.ref = os.path.join(
            tempfile.gettempdir(), f"backbone_ref_b{args.batch}_{args.size}.npz"
        )
    return args


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


def _first_call_measured(fn, record: dict):
    """`fn` whose first call runs under `PeakRSS`; its peak and return value go to `record`."""

    def wrapped():
        if "peak" in record:
            return fn()
        with PeakRSS() as mem:
            record["out"] = fn()
        record["peak"] = mem.peak
        return record["out"]

    return wrapped


# ------------------------------------------------------------------------------ torch side
def make_torch(args):
    import torch
    import torchvision

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

    return step, f"torch {torch.get_num_threads()} threads, channels_last"


# ---------------------------------------------------------- the network in plain jax.lax
def _out_size(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def _im2col(x, k: int, s: int, p: int):
    """NHWC `x` -> `[B, Ho, Wo, k*k*C]`: the k*k shifted strided windows, (kh, kw, c) order
    (the row order of an HWIO kernel reshaped to `[k*k*C, O]`)."""
    import jax
    import jax.numpy as jnp

    b, h, w, c = x.shape
    ho, wo = _out_size(h, k, s, p), _out_size(w, k, s, p)
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x
    cols = [
        jax.lax.slice(
            xp, (0, i, j, 0), (b, i + (ho - 1) * s + 1, j + (wo - 1) * s + 1, c), (1, s, s, 1)
        )
        for i in range(k)
        for j in range(k)
    ]
    return jnp.concatenate(cols, axis=-1)


def _col2im(cols, x_shape, k: int, s: int, p: int):
    """Adjoint of `_im2col`: scatter-add `[B, Ho, Wo, k*k*C]` back to NHWC `x_shape`."""
    import jax
    import jax.numpy as jnp

    b, h, w, c = x_shape
    ho, wo = cols.shape[1:3]
    hp, wp = h + 2 * p, w + 2 * p
    zero = jnp.zeros((), cols.dtype)
    out = None
    for n, (i, j) in enumerate((i, j) for i in range(k) for j in range(k)):
        piece = cols[..., n * c : (n + 1) * c]
        cfg = (
            (0, 0, 0),
            (i, hp - i - (ho - 1) * s - 1, s - 1),
            (j, wp - j - (wo - 1) * s - 1, s - 1),
            (0, 0, 0),
        )
        padded = jax.lax.pad(piece, zero, cfg)
        out = padded if out is None else out + padded
    return out[:, p : p + h, p : p + w, :]


def _lax_conv(x, w_hwio, s: int, p: int, layout: str):
    import jax

    if layout == "NCHW":
        return jax.lax.conv_general_dilated(
            x, w_hwio.transpose(3, 2, 0, 1), (s, s), ((p, p), (p, p)),
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        )  # fmt: skip
    return jax.lax.conv_general_dilated(
        x, w_hwio, (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@functools.cache
def _custom_vjp_convs():
    """(conv_mmw, im2col_vjp), built on first use (jax must not be imported at module load:
    `common.setup` pins the threads first). Both: NHWC x, HWIO w, stride s, padding p."""
    import jax
    import jax.numpy as jnp

    def wgrad(x, w, s, p, g):  # the weight gradient as one matmul over the im2col patches
        k, _, cin, cout = w.shape
        dw = jnp.einsum("bhwk,bhwo->ko", _im2col(x, k, s, p), g)
        return dw.reshape(k, k, cin, cout).astype(w.dtype)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def conv_mmw(x, w, s, p):
        return _lax_conv(x, w, s, p, "NHWC")

    def conv_mmw_fwd(x, w, s, p):
        return _lax_conv(x, w, s, p, "NHWC"), (x, w)

    def conv_mmw_bwd(s, p, res, g):
        x, w = res
        _, vjp_x = jax.vjp(lambda x: _lax_conv(x, w, s, p, "NHWC"), x)
        return vjp_x(g)[0], wgrad(x, w, s, p, g)

    conv_mmw.defvjp(conv_mmw_fwd, conv_mmw_bwd)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def im2col_vjp(x, w, s, p):
        k, _, cin, cout = w.shape
        return _im2col(x, k, s, p) @ w.reshape(k * k * cin, cout)

    def im2col_vjp_fwd(x, w, s, p):
        return im2col_vjp(x, w, s, p), (x, w)  # keeps x, not the k*k times larger patches

    def im2col_vjp_bwd(s, p, res, g):
        x, w = res
        k, _, cin, cout = w.shape
        dx = _col2im(g @ w.reshape(k * k * cin, cout).T, x.shape, k, s, p)
        return dx, wgrad(x, w, s, p, g)

    im2col_vjp.defvjp(im2col_vjp_fwd, im2col_vjp_bwd)
    return conv_mmw, im2col_vjp


def _conv(x, w, s: int, p: int, f: dict):
    """PyTorch Conv2d(stride s, padding p, no bias) of `x` (f['layout']) with HWIO `w`."""
    import jax
    import jax.numpy as jnp

    k, _, cin, cout = w.shape
    w = w.astype(x.dtype)
    if k == 1 and p == 0 and f["pointwise"] == "matmul":
        if f["layout"] == "NCHW":
            return jnp.einsum("bchw,cd->bdhw", x[:, :, ::s, ::s], w[0, 0])
        return jnp.einsum("bhwc,cd->bhwd", x[:, ::s, ::s], w[0, 0])
    if k == 1 or f["spatial"] == "conv" or f["layout"] == "NCHW":
        return _lax_conv(x, w, s, p, f["layout"])
    if f["spatial"] == "im2col":
        return _im2col(x, k, s, p) @ w.reshape(k * k * cin, cout)
    if f["spatial"] == "patches":
        cols = jax.lax.conv_general_dilated_patches(
            x, (k, k), (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )  # features in (c, kh, kw) order
        return cols @ w.transpose(2, 0, 1, 3).reshape(cin * k * k, cout)
    if f["spatial"] == "conv_mmw":
        return _custom_vjp_convs()[0](x, w, s, p)
    if f["spatial"] == "im2col_vjp":
        return _custom_vjp_convs()[1](x, w, s, p)
    raise ValueError(f"unknown spatial conv formulation {f['spatial']!r}")


def lax_resnet50(params, stats, x, f: dict):
    """ResNet-50 (pytorch style, BN on running statistics) on the fgd_jax ResNet's own
    `params` / `batch_stats` trees; `x` in f['layout'] (NHWC or NCHW). Returns C2..C5."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(f.get("dtype", "float32"))
    shape = (1, -1, 1, 1) if f["layout"] == "NCHW" else (1, 1, 1, -1)

    def bn(h, p, st):  # TorchBatchNorm(use_running_average=True)
        mul = p["scale"] * jax.lax.rsqrt(st["var"] + 1e-5)
        add = p["bias"] - st["mean"] * mul
        return h * mul.reshape(shape).astype(dtype) + add.reshape(shape).astype(dtype)

    x = x.astype(dtype)
    h = jax.nn.relu(bn(_conv(x, params["conv1"]["kernel"], 2, 3, f), params["bn1"], stats["bn1"]))
    win = (1, 1, 3, 3) if f["layout"] == "NCHW" else (1, 3, 3, 1)
    strides = (1, 1, 2, 2) if f["layout"] == "NCHW" else (1, 2, 2, 1)
    pads = (
        ((0, 0), (0, 0), (1, 1), (1, 1))
        if f["layout"] == "NCHW"
        else ((0, 0), (1, 1), (1, 1), (0, 0))
    )
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, win, strides, pads)
    outs = []
    for i, n_blocks in enumerate((3, 4, 6, 3)):
        for j in range(n_blocks):
            name = f"layer{i + 1}_{j}"
            p, st = params[name], stats[name]
            s = 2 if (j == 0 and i > 0) else 1
            out = jax.nn.relu(bn(_conv(h, p["conv1"]["kernel"], 1, 0, f), p["bn1"], st["bn1"]))
            out = jax.nn.relu(bn(_conv(out, p["conv2"]["kernel"], s, 1, f), p["bn2"], st["bn2"]))
            out = bn(_conv(out, p["conv3"]["kernel"], 1, 0, f), p["bn3"], st["bn3"])
            if j == 0:
                sc = _conv(h, p["downsample_0"]["kernel"], s, 0, f)
                h = bn(sc, p["downsample_1"], st["downsample_1"])
            h = jax.nn.relu(out + h)
        outs.append(h)
    return tuple(outs)


# ------------------------------------------------------------------------------- JAX side
def make_flax(args, form: dict):
    """(step, info): step() runs one compiled fwd+bwd and returns (loss, grads) as numpy."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fgd_jax.models import init_module
    from fgd_jax.models.resnet import ResNet

    dtype = form.get("dtype", "float32")
    model = ResNet(depth=50, frozen_stages=-1, norm_eval=True)
    shape = (args.batch, args.size, args.size, 3)
    x = jnp.asarray(np.random.RandomState(0).randn(*shape), jnp.float32)
    variables = init_module(model, jax.random.key(0), x)
    params, stats = variables["params"], variables["batch_stats"]
    if form["impl"] == "flax":
        model = ResNet(depth=50, frozen_stages=-1, norm_eval=True, dtype=jnp.dtype(dtype))

        def forward(p, x):
            return model.apply({"params": p, "batch_stats": stats}, x, train=True)

    else:
        if form["layout"] == "NCHW":
            x = x.transpose(0, 3, 1, 2)

        def forward(p, x):
            return lax_resnet50(p, stats, x, form)

    @jax.jit
    def grad_step(p, x):
        def loss_fn(p):
            return sum(jnp.mean(o.astype(jnp.float32)) ** 2 for o in forward(p, x))

        return jax.value_and_grad(loss_fn)(p)

    compiled = grad_step.lower(params, x).compile()

    def step():
        loss, grads = compiled(params, x)
        jax.block_until_ready(grads)
        return loss, grads

    return step, f"{jax.devices()[0].platform}, {jax.__version__}"


def _flat(loss, grads) -> dict:
    import jax
    import numpy as np

    out = {"loss": np.asarray(loss, np.float64)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        out[jax.tree_util.keystr(path)] = np.asarray(leaf, np.float64)
    return out


def _rel_err(got: dict, ref_path: str) -> float | None:
    """max ||a - b|| / ||b|| over the loss and all gradient leaves, vs the saved default."""
    import numpy as np

    if not os.path.exists(ref_path):
        return None
    ref = np.load(ref_path)
    if set(ref.files) != set(got):
        raise SystemExit(f"gradient trees differ from the reference {ref_path}")
    return max(float(np.linalg.norm(got[k] - ref[k]) / np.linalg.norm(ref[k])) for k in got)


def run_one(args) -> dict:
    desc, form = VARIANTS[args.variant]
    flags = " ".join(f for f in (form.get("xla_flags", ""), args.xla_flags) if f)
    if flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    common.setup(args)  # affinity + torch threads + JAX_PLATFORMS, before jax is imported
    import numpy as np

    print(_versions(args.threads))
    print(
        f"ResNet-50 fwd+bwd, batch {args.batch}, {args.size}x{args.size}, {args.iters} steps; "
        f"variant {args.variant}: {desc}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        flush=True,
    )
    t0 = time.perf_counter()
    flax_step, flax_info = make_flax(args, form)
    print(f"flax : build + jit compile {time.perf_counter() - t0:5.1f} s", flush=True)
    records = {"flax": {}, "torch": {}}
    fns = {"flax": _first_call_measured(flax_step, records["flax"])}
    infos = {"flax": flax_info}
    if not args.skip_torch:
        torch_step, infos["torch"] = make_torch(args)
        fns["torch"] = _first_call_measured(torch_step, records["torch"])
    med = common.time_interleaved(fns, args.iters)
    got = _flat(*records["flax"]["out"])
    if args.variant == "default" and not args.xla_flags:
        np.savez(args.ref, **got)
        err = 0.0
    else:
        err = _rel_err(got, args.ref)
    res = dict(
        variant=args.variant,
        desc=desc,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        batch=args.batch,
        size=args.size,
        threads=args.threads,
        load=os.getloadavg()[0],
        err=err,
    )
    for name in fns:
        res[f"{name}_ms"] = 1e3 * med[name]
        res[f"{name}_peak_mib"] = records[name]["peak"] / 2**20
        print(
            f"{name:5s}: {args.batch / med[name]:6.3f} img/s  median {1e3 * med[name]:7.0f} ms/step"
            f"  peak RSS +{res[f'{name}_peak_mib']:5.0f} MiB  [{infos[name]}]",
            flush=True,
        )
    if "torch_ms" in res:
        print(f"flax / torch throughput: {res['torch_ms'] / res['flax_ms']:.2f}x")
    print(f"max relative error vs default: {err if err is None else f'{err:.1e}'}")
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(res) + "\n")
    return res


def _versions(threads: int) -> str:
    import jax
    import jaxlib
    import torch
    import torchvision

    return (
        f"jax {jax.__version__} (jaxlib {jaxlib.__version__}), torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}; {threads} thread(s) per side"
    )


def sweep(args) -> None:
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--only: unknown variants {unknown}")
    fd, results = tempfile.mkstemp(suffix=".jsonl")
    os.close(fd)
    for name in names:
        cmd = [sys.executable, "-m", "benchmarks.backbone", f"--variant={name}"]
        cmd += [f"--batch={args.batch}", f"--size={args.size}", f"--iters={args.iters}"]
        cmd += [f"--threads={args.threads}", f"--ref={args.ref}", f"--json={results}"]
        if args.skip_torch:
            cmd.append("--skip_torch")
        print(f"=== {name}: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.run(cmd, check=False).returncode
        if rc:
            with open(results, "a") as fh:
                fh.write(json.dumps(dict(variant=name, desc=VARIANTS[name][0], rc=rc)) + "\n")
    with open(results) as fh:
        rows = [json.loads(line) for line in fh]
    lines = [
        "| variant | formulation | load | fgd-jax ms/step | torch ms/step | ratio (torch/jax "
        "time) | max rel. error vs default | peak RSS jax / torch MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "rc" in r:
            lines.append(f"| {r['variant']} | {r['desc']} | - | failed (exit {r['rc']}) |||||")
            continue
        t = r.get("torch_ms")
        err = "-" if r["err"] is None else f"{r['err']:.1e}"
        lines.append(
            f"| {r['variant']} | {r['desc']} | {r['load']:.1f} | {r['flax_ms']:.0f} | "
            f"{t:.0f} | {t / r['flax_ms']:.2f}x | {err} | "
            f"{r['flax_peak_mib']:.0f} / {r.get('torch_peak_mib', 0):.0f} |"
            if t
            else f"| {r['variant']} | {r['desc']} | {r['load']:.1f} | {r['flax_ms']:.0f} | - | "
            f"- | {err} | {r['flax_peak_mib']:.0f} / - |"
        )
    common.write_report(lines, args.out)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.sweep:
        sweep(args)
    else:
        run_one(args)


if __name__ == "__main__":
    main()
