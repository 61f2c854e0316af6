"""The full FGD distillation step, fgd-jax vs a PyTorch peer, in one process; plus its FLOPs.

One step = teacher forward (RetinaNet R101-FPN, frozen) + student forward/backward (RetinaNet
R50-FPN: focal + L1 losses) + FGD on the 5 FPN levels + gradient clipping (35) + SGD with
momentum and weight decay.
- fgd-jax: the real `configs/retina_r101_r50.py` through `fgd_jax.experiment.Experiment`,
  `init_train_state` and `make_train_step`, `jax.jit` with the state donated; random teacher
  variables (inherited into the student, as `init_student=True` does); GT padded to the
  config's `max_boxes` slots.
- PyTorch: `benchmarks/torch_fgd_peer.py` (torchvision RetinaNet R50 student, R101 teacher
  from `resnet_fpn_backbone`, the original FGD `FeatureLoss`, SGD + `clip_grad_norm_`).
Same random images and boxes (8 per image), batch 2 by default. Both sides get the same CPU
cores: the process is pinned to `--threads` cores (affinity, which bounds XLA's thread pool)
and torch uses that many intra-op threads. Timed steps alternate between the two sides so
both see the same machine load; medians are reported.

Reported per image size: images/s of each side and the ratio; JAX compile time (trace +
lower + XLA compile) and first-call time; peak memory (CPU: the RSS increase of each side's
setup + compile + first step, sampled with psutil, and the process high-water mark; GPU: the
device allocator peaks); FLOPs of the jitted step from XLA's cost analysis (and, as a
cross-check, torch's `FlopCounterMode` count of the peer's convolutions and matmuls), the
achieved FLOP/s and the fraction of the device's peak.

    python -m benchmarks.train_step                                  # 512x512, 2 timed steps
    python -m benchmarks.train_step --sizes 512x512 800x1344 --steps 3 \
        --out benchmarks/results/train_step_cpu.md
    python -m benchmarks.train_step --gpu --steps 20 --out benchmarks/results/train_step_gpu.md

Mixed precision: `--dtype bfloat16` sets the config's `train.dtype` (bf16 compute, float32
parameters, optimizer state, losses and FGD, see `fgd_jax.experiment.compute_dtype`) and runs the
torch peer under `torch.autocast(dtype=torch.bfloat16)`. Meant for GPUs: XLA:CPU has no fast
bf16 convolutions, and the CPU peak estimate below is the fp32 one.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

from benchmarks import common

CONFIG = "configs/retina_r101_r50.py"

# Dense peak FLOP/s (tera) of the accelerators this project is lent, per compute dtype.
# fp32 = CUDA cores (no tensor cores); tf32 = tensor cores on fp32 inputs (what XLA and cuDNN
# use for fp32 convolutions by default on Hopper); bf16 = tensor cores, dense (no sparsity).
GPU_PEAK_TFLOPS = {
    "H100": {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4},  # H100 SXM5
    "H200": {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4},  # same GH100 compute
}


# ------------------------------------------------------------------------------------ args
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--sizes",
        nargs="+",
        default=["512x512"],
        help="canvas sizes HxW to run (800x1344 is the COCO canvas; slow on a small CPU)",
    )
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps per side (after 1 warm-up)")
    p.add_argument("--boxes", type=int, default=8, help="real GT boxes per image")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU cores for both sides (affinity + torch threads); 0 = all this process may "
        "use. On a machine shared with other jobs use 1: torch's OpenMP threads collapse under "
        "oversubscription (see benchmarks/results/train_step_cpu.md)",
    )
    p.add_argument("--gpu", action="store_true", help="JAX on the GPU, torch on CUDA")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--skip-torch", action="store_true", help="time fgd-jax only")
    p.add_argument(
        "--no-torch-flops", action="store_true", help="skip torch's FlopCounterMode cross-check"
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="device peak (TFLOP/s) for the fraction of peak; 0 = from the built-in table",
    )
    p.add_argument(
        "--fma-units",
        type=int,
        default=2,
        help="vector FMA units per CPU core for the CPU peak estimate (2 on Xeon Gold/Platinum)",
    )
    p.add_argument("--out", default="", help="write the markdown report here")
    args = p.parse_args(argv)
    for s in args.sizes:
        if not re.fullmatch(r"\d+x\d+", s):
            p.error(f"--sizes: {s!r} is not of the form HxW (e.g. 512x512)")
    return args


# ---------------------------------------------------------------------------- machine info
def cpu_info() -> dict:
    """CPU model, usable cores, vector width and nominal clock (from lscpu / /proc/cpuinfo)."""
    info = {"model": platform.processor() or "unknown CPU", "flags": set(), "mhz": 0.0}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "Model name":
                info["model"] = val.strip()
            elif key.strip() == "Flags":
                info["flags"] = set(val.split())
            elif key.strip() in ("CPU max MHz",) and not info["mhz"]:
                info["mhz"] = float(val)
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    if not info["mhz"]:
        try:
            with open("/proc/cpuinfo") as f:
                mhz = [float(l.split(":")[1]) for l in f if l.startswith("cpu MHz")]
            info["mhz"] = max(mhz) if mhz else 0.0
        except OSError:
            pass
    info["cores"] = len(os.sched_getaffinity(0))
    info["machine_cores"] = os.cpu_count()
    return info


def cpu_peak_gflops(info: dict, cores: int, fma_units: int) -> tuple[float, str]:
    """fp32 peak = cores x FMA units x SIMD fp32 lanes x 2 (multiply + add) x clock."""
    lanes = 16 if "avx512f" in info["flags"] else 8 if "avx2" in info["flags"] else 4
    isa = {16: "AVX-512", 8: "AVX2", 4: "SSE"}[lanes]
    ghz = info["mhz"] / 1e3
    peak = cores * fma_units * lanes * 2 * ghz
    how = (
        f"{cores} cores x {fma_units} FMA units x {lanes} fp32 lanes ({isa}) x 2 flops x "
        f"{ghz:.2f} GHz (nominal clock from lscpu or /proc/cpuinfo; AVX-512 clocks may be lower, "
        f"AMX/bf16 units not counted: XLA:CPU fp32 does not use them)"
    )
    return peak, how


def gpu_peak_tflops(kind: str, dtype: str) -> tuple[float, str]:
    for name, peaks in GPU_PEAK_TFLOPS.items():
        if name in kind:
            key = "tf32" if dtype == "float32" else dtype
            return peaks[key], f"{name} dense {key} peak (table in benchmarks/train_step.py)"
    return 0.0, f"no peak known for {kind!r} (pass --peak-tflops)"


def versions() -> str:
    import flax
    import jax
    import torch
    import torchvision

    return (
        f"jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, python {platform.python_version()}"
    )


class PeakRSS:
    """Peak resident-set-size increase (bytes) over a `with` block, sampled in a thread."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.base = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss - self.base)


def rss_high_water_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------------- batch
def make_batch(
    b: int, h: int, w: int, n_boxes: int, max_boxes: int, max_ignore: int, seed: int = 0
) -> dict:
    """A batch in the `docs/contracts.md` layout: random normalized images, `n_boxes` random
    boxes per image (xyxy pixels, 10-40% of the side) padded to `max_boxes` slots."""
    if n_boxes > max_boxes:
        raise ValueError(f"--boxes {n_boxes} exceeds data.max_boxes {max_boxes} of {CONFIG}")
    rng = np.random.default_rng(seed)
    boxes = np.zeros((b, max_boxes, 4), np.float32)
    labels = np.full((b, max_boxes), -1, np.int32)
    valid = np.zeros((b, max_boxes), bool)
    xy = rng.uniform(0, 0.6, (b, n_boxes, 2)) * [w, h]
    wh = rng.uniform(0.1, 0.4, (b, n_boxes, 2)) * [w, h]
    boxes[:, :n_boxes] = np.concatenate([xy, xy + wh], -1)
    labels[:, :n_boxes] = rng.integers(0, 80, (b, n_boxes))
    valid[:, :n_boxes] = True
    hw = np.tile(np.array([[h, w]], np.int32), (b, 1))
    return dict(
        image=rng.normal(0, 1, (b, h, w, 3)).astype(np.float32),
        boxes=boxes,
        labels=labels,
        valid=valid,
        ignore_boxes=np.zeros((b, max_ignore, 4), np.float32),
        ignore_valid=np.zeros((b, max_ignore), bool),
        img_shape=hw,
        pad_shape=hw.copy(),
        scale_factor=np.ones((b, 4), np.float32),
        orig_shape=hw.copy(),
        flip=np.zeros((b,), bool),
        image_id=np.arange(b, dtype=np.int32),
    )


# ------------------------------------------------------------------------------------- JAX
def build_jax(args: argparse.Namespace, batch: dict) -> dict:
    """The jitted fgd-jax step on `batch`: compiled, run once. Returns a dict with `step`
    (a no-argument callable running one step to completion) and measurements."""
    import jax
    import jax.numpy as jnp

    from fgd_jax import parallel
    from fgd_jax.config import load_config
    from fgd_jax.experiment import Experiment, init_train_state, make_train_step
    from fgd_jax.models import init_module

    b, h, w = batch["image"].shape[:3]
    cfg = load_config(
        CONFIG, {"train.batch_size": b, "data.canvases": ((h, w),), "train.dtype": args.dtype}
    )
    exp = Experiment(cfg)
    t0 = time.perf_counter()
    teacher_vars = init_module(exp.teacher, jax.random.key(1), jnp.asarray(batch["image"][:1]))
    state, tx, schedule = init_train_state(exp, batch, 1000, teacher_vars)
    # As `fgd_jax.trainer.train` does: fresh global arrays on a mesh of every device. (The
    # inherited student leaves are the teacher's own arrays after `init_train_state`, so
    # donating the state without this copy would donate teacher buffers too.)
    mesh = parallel.make_mesh()
    state = parallel.replicate(state, mesh)
    teacher_vars = parallel.replicate(teacher_vars, mesh)
    jbatch = parallel.host_batch_to_global(batch, mesh)
    jax.block_until_ready((state, teacher_vars, jbatch))
    init_s = time.perf_counter() - t0

    step_fn = jax.jit(make_train_step(exp, tx, schedule), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, teacher_vars, jbatch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", float("nan")))

    holder = {"state": state}

    def step() -> None:
        holder["state"], metrics = compiled(holder["state"], teacher_vars, jbatch)
        jax.block_until_ready((holder["state"], metrics))
        holder["metrics"] = metrics

    t0 = time.perf_counter()
    step()
    first_s = time.perf_counter() - t0
    loss = float(holder["metrics"]["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"fgd-jax step: non-finite loss {loss}")
    n_params = sum(x.size for x in jax.tree.leaves(holder["state"].params))
    return dict(
        step=step,
        init_s=init_s,
        compile_s=compile_s,
        first_s=first_s,
        flops=flops,
        loss=loss,
        n_params=n_params,
        holder=holder,
    )


# ----------------------------------------------------------------------------------- torch
def build_torch(args: argparse.Namespace, batch: dict, device: str) -> dict:
    """The PyTorch peer on `batch`: built and run once (counting its FLOPs unless disabled)."""
    import torch

    from benchmarks.torch_fgd_peer import TorchFGDPeer, make_sgd, train_step

    torch.manual_seed(0)
    b = batch["image"].shape[0]
    peer = TorchFGDPeer().to(device)
    opt = make_sgd(peer, lr=0.01 * b / 16)  # the JAX side's linear scaling from batch 16
    images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous().to(device)
    targets = [
        dict(
            boxes=torch.from_numpy(batch["boxes"][i][batch["valid"][i]]).to(device),
            labels=torch.from_numpy(batch["labels"][i][batch["valid"][i]]).long().to(device),
        )
        for i in range(b)
    ]
    shapes = [tuple(int(v) for v in s) for s in batch["img_shape"]]

    autocast = torch.bfloat16 if args.dtype == "bfloat16" else None

    def step() -> None:
        step.loss = train_step(
            peer, opt, images, targets, shapes, clip_norm=35.0, autocast_dtype=autocast
        )

    t0 = time.perf_counter()
    flops = float("nan")
    if args.no_torch_flops:
        step()
    else:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = float(counter.get_total_flops())
    first_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in peer.parameters() if p.requires_grad)
    return dict(step=step, first_s=first_s, flops=flops, loss=step.loss, n_params=n_params)


# ------------------------------------------------------------------------------------- run
def run_size(args: argparse.Namespace, h: int, w: int, device: str) -> dict:
    import jax

    from fgd_jax.config import load_config

    data_cfg = load_config(CONFIG).data
    batch = make_batch(args.batch, h, w, args.boxes, data_cfg.max_boxes, data_cfg.max_ignore)
    res: dict = {"size": f"{h}x{w}"}
    with PeakRSS() as mem:
        res["jax"] = build_jax(args, batch)
    res["jax"]["rss_gib"] = mem.peak / 2**30
    print(
        f"[{h}x{w}] fgd-jax: init {res['jax']['init_s']:.1f} s, compile "
        f"{res['jax']['compile_s']:.1f} s, first call {res['jax']['first_s']:.1f} s, "
        f"{res['jax']['flops'] / 1e9:.1f} GFLOP/step (XLA), loss {res['jax']['loss']:.3f}",
        flush=True,
    )
    sides = {"fgd-jax": res["jax"]["step"]}
    if not args.skip_torch:
        import torch

        if args.gpu:
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as mem:
            res["torch"] = build_torch(args, batch, device)
        res["torch"]["rss_gib"] = mem.peak / 2**30
        print(
            f"[{h}x{w}] torch: first step {res['torch']['first_s']:.1f} s, "
            f"{res['torch']['flops'] / 1e9:.1f} GFLOP/step (FlopCounterMode, conv/matmul only), "
            f"loss {res['torch']['loss']:.3f}",
            flush=True,
        )
        sides["torch"] = res["torch"]["step"]
    times: dict[str, list[float]] = {k: [] for k in sides}
    for i in range(args.steps):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        print(
            f"[{h}x{w}] step {i + 1}/{args.steps}: "
            + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
            flush=True,
        )
    for name, key in (("fgd-jax", "jax"), ("torch", "torch")):
        if name in times:
            res[key]["step_s"] = statistics.median(times[name])
            res[key]["all_s"] = times[name]
            res[key]["img_s"] = args.batch / res[key]["step_s"]
    if args.gpu:
        stats = jax.devices()[0].memory_stats() or {}
        res["jax"]["dev_peak_gib"] = stats.get("peak_bytes_in_use", float("nan")) / 2**30
        if "torch" in res:
            import torch

            res["torch"]["dev_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    res["jax"]["achieved_tflops"] = res["jax"]["flops"] / res["jax"]["step_s"] / 1e12
    # Free this size's arrays before the next one.
    res["jax"].pop("holder", None)
    res["jax"].pop("step", None)
    res.get("torch", {}).pop("step", None)
    return res


def report(args: argparse.Namespace, results: list[dict], env: dict) -> str:
    peak_t, peak_how = env["peak_tflops"], env["peak_how"]
    lines = [
        "# FGD distillation train step (RetinaNet R101 -> R50), fgd-jax vs PyTorch",
        "",
        f"- date: {env['date']}",
        f"- device: {env['device']}",
        f"- threads: {env['threads']}",
        f"- versions: {env['versions']}",
        f"- command: `{env['command']}`",
        f"- load average (1 min) before / after: {env['load_before']:.1f} / "
        f"{os.getloadavg()[0]:.1f}",
        f"- step: teacher R101-FPN forward + student R50-FPN forward/backward + FGD on 5 levels "
        f"+ clip 35 + SGD(momentum 0.9, wd 1e-4); batch {args.batch}, {args.boxes} GT boxes "
        f"per image, {args.dtype}; {args.steps} timed steps per side after 1 warm-up, alternating "
        "sides, median",
        "",
        "| canvas | fgd-jax img/s | torch img/s | ratio (jax/torch) | fgd-jax s/step | torch "
        "s/step | JAX compile s | JAX first call s | torch first step s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        j, t = r["jax"], r.get("torch")
        lines.append(
            f"| {r['size']} | {j['img_s']:.3f} | {t['img_s']:.3f} | {j['img_s'] / t['img_s']:.2f} "
            f"| {j['step_s']:.2f} | {t['step_s']:.2f} | {j['compile_s']:.1f} | "
            f"{j['first_s']:.1f} | {t['first_s']:.1f} |"
            if t
            else f"| {r['size']} | {j['img_s']:.3f} | - | - | {j['step_s']:.2f} | - | "
            f"{j['compile_s']:.1f} | {j['first_s']:.1f} | - |"
        )
    lines += [
        "",
        "Memory (CPU: RSS increase over each side's setup + compile + first step, psutil "
        "sampled every 5 ms; the JAX side's arrays stay alive while torch runs):",
        "",
        "| canvas | fgd-jax peak GiB | torch peak GiB | process RSS high-water GiB |",
        "|---|---|---|---|",
    ]
    for r in results:
        j, t = r["jax"], r.get("torch")
        jm = f"{j['dev_peak_gib']:.2f} (device)" if "dev_peak_gib" in j else f"{j['rss_gib']:.2f}"
        tm = "-"
        if t:
            dev = t.get("dev_peak_gib")
            tm = f"{dev:.2f} (device)" if dev is not None else f"{t['rss_gib']:.2f}"
        lines.append(f"| {r['size']} | {jm} | {tm} | {r['rss_high_water_gib']:.2f} |")
    lines += [
        "",
        "FLOPs per step (XLA `compiled.cost_analysis()['flops']` of the jitted fgd-jax step; "
        "torch `FlopCounterMode`, convolutions and matmuls only, forward + backward, as a "
        "cross-check of the order of magnitude), achieved FLOP/s at the fgd-jax median step "
        "time, fraction of the device peak:",
        "",
        "| canvas | XLA GFLOP/step | torch GFLOP/step | fgd-jax achieved GFLOP/s | peak GFLOP/s "
        "| fraction of peak |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        j, t = r["jax"], r.get("torch")
        tf = f"{t['flops'] / 1e9:.1f}" if t and np.isfinite(t["flops"]) else "-"
        ach = j["achieved_tflops"] * 1e3
        frac = f"{100 * ach / (peak_t * 1e3):.1f}%" if peak_t else "-"
        lines.append(
            f"| {r['size']} | {j['flops'] / 1e9:.1f} | {tf} | {ach:.1f} | "
            f"{peak_t * 1e3:.0f} | {frac} |"
        )
    lines += ["", f"Peak: {peak_how}.", ""]
    lines += [
        "Notes: random weights on both sides (the frozen-BN teacher and student without "
        "ImageNet statistics give very large FGD losses; the arithmetic is the same as with "
        "real weights). The PyTorch peer builds P6 from P5 (torchvision) instead of C5 "
        "(mmdetection), a fraction of a percent of the FLOPs. XLA's count includes every "
        "element-wise op; torch's counter only convolutions and matmuls."
    ]
    if not args.gpu and env["load_before"] > (os.cpu_count() or 1):
        lines += [
            "",
            f"**Caveat**: the machine was loaded (load average {env['load_before']:.1f} on "
            f"{os.cpu_count()} cores at the start) by other jobs: absolute times are inflated and "
            "noisy; the alternating order gives both sides the same load, so the ratio is the "
            "number to read, and only roughly.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.gpu:
        cores = sorted(os.sched_getaffinity(0))
        n = args.threads or len(cores)
        if n > len(cores):
            raise SystemExit(f"--threads {n}: only {len(cores)} cores are available")
        os.sched_setaffinity(0, cores[:n])
        os.environ["JAX_PLATFORMS"] = "cpu"
        args.threads = n
    import jax
    import torch

    # Measure real compilation: never read a persistent compilation cache.
    jax.config.update("jax_enable_compilation_cache", False)
    env = {
        "date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip(),
        "versions": versions(),
        "command": "python -m benchmarks.train_step " + shlex.join(sys.argv[1:] or []),
        "load_before": os.getloadavg()[0],
    }
    if args.gpu:
        if jax.default_backend() != "gpu":
            raise SystemExit("--gpu: JAX sees no GPU (install jax[cuda12]; see README)")
        if not args.skip_torch and not torch.cuda.is_available():
            raise SystemExit("--gpu: torch sees no CUDA device (or pass --skip-torch)")
        # The JAX default for fp32 convolutions/matmuls on Hopper is TF32: let torch do the same.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        kind = jax.devices()[0].device_kind
        env["device"] = f"{kind} (JAX {jax.default_backend()}; torch cuda)"
        env["threads"] = "n/a (GPU)"
        peak, how = gpu_peak_tflops(kind, args.dtype)
        device = "cuda"
    else:
        torch.set_num_threads(args.threads)
        info = cpu_info()
        env["device"] = (
            f"{info['model']}, {info['cores']} usable cores of {info['machine_cores']}, no GPU"
        )
        env["threads"] = (
            f"{args.threads} (process affinity for both; torch.set_num_threads({args.threads}); "
            f"XLA:CPU's pool is bounded by the affinity)"
        )
        gflops, how = cpu_peak_gflops(info, args.threads, args.fma_units)
        peak = gflops / 1e3
        device = "cpu"
    if args.peak_tflops:
        peak, how = args.peak_tflops, f"{args.peak_tflops} TFLOP/s given with --peak-tflops"
    env["peak_tflops"], env["peak_how"] = peak, how
    print(f"{env['device']}; {env['versions']}; threads {env['threads']}", flush=True)

    results = []
    for size in args.sizes:
        h, w = (int(v) for v in size.split("x"))
        r = run_size(args, h, w, device)
        r["rss_high_water_gib"] = rss_high_water_gib()
        results.append(r)
        j, t = r["jax"], r.get("torch")
        ratio = f"{j['img_s'] / t['img_s']:.2f}" if t else "-"
        timg = f"{t['img_s']:.3f}" if t else "-"
        # One machine-readable line per size (benchmarks/run_all.py collects these).
        print(
            f"SUMMARY train_step | distill step, batch {args.batch}, {size} | img/s | "
            f"{j['img_s']:.3f} | {timg} | {ratio}",
            flush=True,
        )
    text = report(args, results, env)
    common.write_text(text, args.out)


if __name__ == "__main__":
    main()
