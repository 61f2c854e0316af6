"""Memory of the FGD distillation step: what XLA plans for fgd-jax vs PyTorch's peak.

The step is `benchmarks/train_step.py`'s (RetinaNet R101 teacher -> R50 student, FGD on 5
levels, clip + SGD; `configs/retina_r101_r50.py` through `fgd_jax.experiment`), jitted with the
train state donated as `fgd_jax.trainer` does.

- fgd-jax: the step is lowered and compiled on abstract arguments (nothing is run) and XLA's
  buffer assignment is read from `compiled.memory_analysis()`: argument bytes (train state +
  teacher variables + batch), output bytes, bytes aliased (donated state reused in place), the
  temporaries (activations, gradients, workspace: the peak of XLA's heap simulation) and the
  generated code. What the step holds on the device = arguments + outputs - aliased + temps.
  What compiling costs (host, once) is reported apart: compile seconds and the process RSS
  increase over lower + compile.
- PyTorch (`benchmarks/torch_fgd_peer.py`, the same step): on a GPU
  `torch.cuda.max_memory_allocated`; on the CPU the resident-set-size high-water mark over
  building the peer and running 2 steps (the second one holds the momentum buffers), above the
  RSS before the peer was built (psutil, sampled every 2 ms). CPU tensors of that size are
  mmap-ed by glibc and returned on free, so RSS follows the live tensors closely; it also counts
  oneDNN scratch and allocator slack, so it is an upper bound of torch's own bytes.

    python -m benchmarks.memory                                   # 512x512, float32
    python -m benchmarks.memory --sizes 512x512 800x1344 --dtypes float32 bfloat16 \
        --out benchmarks/results/train_step_memory_cpu.md

Prints one `SUMMARY memory | ...` line per case (GiB: fgd-jax, torch, torch / fgd-jax) for
`benchmarks/run_all.py`.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np

from benchmarks import common
from benchmarks.train_step import CONFIG, PeakRSS, make_batch, versions

GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["512x512"], help="canvas sizes HxW")
    p.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--boxes", type=int, default=8, help="real GT boxes per image (torch side)")
    p.add_argument("--threads", type=int, default=0, help="CPU cores (affinity + torch threads)")
    p.add_argument("--gpu", action="store_true", help="JAX on the GPU, torch on CUDA")
    p.add_argument("--skip-torch", action="store_true", help="XLA's numbers only")
    p.add_argument("--skip-jax", action="store_true", help="PyTorch's numbers only")
    p.add_argument(
        "--torch-steps",
        type=int,
        default=2,
        help="torch steps measured (2: the second holds the momentum buffers too; 1 is faster)",
    )
    p.add_argument(
        "--config-override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides for the fgd-jax side (python literals), e.g. "
        "model.backbone.remat=True",
    )
    p.add_argument(
        "--peak-report",
        type=int,
        default=0,
        metavar="N",
        help="also print the N largest groups of what XLA holds at the step's heap peak, by "
        "JAX source path (dumps XLA's buffer live ranges to a temporary folder)",
    )
    p.add_argument("--out", default="", help="write the markdown report here")
    args = p.parse_args(argv)
    for s in args.sizes:
        if not re.fullmatch(r"\d+x\d+", s):
            p.error(f"--sizes: {s!r} is not of the form HxW (e.g. 512x512)")
    return args


def _overrides(items: list[str]) -> dict:
    import ast

    out = {}
    for item in items:
        key, _, val = item.partition("=")
        try:
            out[key] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            out[key] = val
    return out


def tree_bytes(tree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf of `tree`."""
    import jax

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def peak_breakdown(dump_dir: str, top: int = 12) -> tuple[int, list[tuple[int, str]]]:
    """What XLA holds at the heap peak of the newest compiled step in `dump_dir` (written with
    `--xla_dump_to`): (bytes live at the peak, [(bytes, source)] largest first), the source
    being the first levels of the buffer's JAX `op_name` (e.g.
    `jvp(FGDDistiller)/student.forward_train/student/student.extract_feat/backbone`; buffers
    without one, e.g. layout copies, are '(no op_name)')."""
    import collections
    import glob

    ranges = glob.glob(os.path.join(dump_dir, "*jit_step_fn*live-range.txt"))
    if not ranges:
        raise FileNotFoundError(f"peak_breakdown: no step live-range dump in {dump_dir}")
    live_path = max(ranges, key=os.path.getmtime)
    live = open(live_path).read()
    hlo = open(live_path.replace("-live-range.txt", ".txt")).read()
    if "(peak):" not in live:
        raise ValueError(f"peak_breakdown: {live_path} has no '(peak)' section")
    peak = live[live.index("(peak):") :]
    sources = dict(re.findall(r'\n\s+%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo))
    groups: collections.Counter = collections.Counter()
    total = 0
    for name, nbytes in re.findall(r"\n    (\S+)\{\S*\}: (\d+) bytes", peak):
        total += int(nbytes)
        src = sources.get(name, "(no op_name)").replace("jit(step_fn)/", "").replace("\\'", "'")
        key = re.sub(r"layer(\d)_\d+", r"layer\1_*", "/".join(src.split("/")[:5]))
        groups[key] += int(nbytes)
    return total, [(b, k) for k, b in groups.most_common(top)]


def jax_step_memory(
    h: int, w: int, batch_size: int, dtype: str, overrides: dict | None = None
) -> dict:
    """XLA's memory plan of the jitted FGD step at `h` x `w` (bytes), compiled on abstract
    arguments. Keys: argument, output, alias, temp, code, total (= argument + output - alias
    + temp), state / teacher / batch (argument parts), compile_s, compile_rss (host bytes)."""
    import jax

    from fgd_jax.config import load_config
    from fgd_jax.experiment import Experiment, init_train_state, make_train_step, run_optimizer

    cfg = load_config(
        CONFIG,
        {
            "train.batch_size": batch_size,
            "data.canvases": ((h, w),),
            "train.dtype": dtype,
            **(overrides or {}),
        },
    )
    exp = Experiment(cfg)
    batch = make_batch(batch_size, h, w, 1, cfg.data.max_boxes, cfg.data.max_ignore)
    abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)  # noqa: E731
    image1 = jax.ShapeDtypeStruct((1, h, w, 3), np.float32)
    teacher = jax.eval_shape(lambda x: exp.teacher.init(jax.random.key(1), x), image1)
    state = jax.eval_shape(lambda: init_train_state(exp, batch, 1000)[0])
    tx, schedule = run_optimizer(exp, state.params, 1000)
    jbatch = abstract(batch)
    step = jax.jit(make_train_step(exp, tx, schedule), donate_argnums=(0,))
    with PeakRSS(interval=0.002) as rss:
        t0 = time.perf_counter()
        compiled = step.lower(state, teacher, jbatch).compile()
        compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    out = dict(
        argument=m.argument_size_in_bytes,
        output=m.output_size_in_bytes,
        alias=m.alias_size_in_bytes,
        temp=m.temp_size_in_bytes,
        code=m.generated_code_size_in_bytes,
        state=tree_bytes(state),
        teacher=tree_bytes(teacher),
        batch=tree_bytes(jbatch),
        compile_s=compile_s,
        compile_rss=rss.peak,
    )
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def torch_step_memory(
    h: int, w: int, batch_size: int, n_boxes: int, dtype: str, gpu: bool, steps: int = 2
):
    """PyTorch's peak bytes for the same step (see the module docstring): dict with `peak`,
    `params` (every parameter of the peer, teacher included) and `trainable` bytes."""
    import torch

    from benchmarks.torch_fgd_peer import TorchFGDPeer, make_sgd, train_step
    from fgd_jax.config import load_config

    data_cfg = load_config(CONFIG).data
    batch = make_batch(batch_size, h, w, n_boxes, data_cfg.max_boxes, data_cfg.max_ignore)
    device = "cuda" if gpu else "cpu"
    torch.manual_seed(0)
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS(interval=0.002) as rss:
        peer = TorchFGDPeer().to(device)
        opt = make_sgd(peer, lr=0.01 * batch_size / 16)
        images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous().to(device)
        targets = [
            dict(
                boxes=torch.from_numpy(batch["boxes"][i][batch["valid"][i]]).to(device),
                labels=torch.from_numpy(batch["labels"][i][batch["valid"][i]]).long().to(device),
            )
            for i in range(batch_size)
        ]
        shapes = [tuple(int(v) for v in s) for s in batch["img_shape"]]
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = train_step(peer, opt, images, targets, shapes, 35.0, autocast)
        step_s = (time.perf_counter() - t0) / steps
    if not np.isfinite(loss):
        raise FloatingPointError(f"torch step: non-finite loss {loss}")
    params = sum(p.numel() * p.element_size() for p in peer.parameters())
    trainable = sum(p.numel() * p.element_size() for p in peer.parameters() if p.requires_grad)
    peak = torch.cuda.max_memory_allocated() - base if gpu else rss.peak
    del peer, opt
    return dict(peak=peak, params=params, trainable=trainable, step_s=step_s)


def report(results: list[dict], env: dict) -> str:
    lines = [
        "# Memory of the FGD distillation step (RetinaNet R101 -> R50), fgd-jax vs PyTorch",
        "",
        f"- date: {env['date']}",
        f"- device: {env['device']}",
        f"- versions: {env['versions']}",
        f"- command: `{env['command']}`",
        "",
        "fgd-jax: XLA's buffer assignment of the compiled, state-donating step "
        "(`compiled.memory_analysis()`); held = arguments + outputs - aliased + temporaries. "
        "PyTorch: " + env["torch_how"] + ". GiB = 2^30 bytes.",
        "",
        "| canvas | dtype | fgd-jax held GiB | torch peak GiB | fgd-jax / torch | arguments "
        "(state + teacher + batch) | outputs | aliased | temporaries | generated code MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        j, t = r["jax"], r.get("torch")
        tp = f"{t['peak'] / GIB:.2f}" if t else "-"
        ratio = f"{j['total'] / t['peak']:.2f}" if t else "-"
        lines.append(
            f"| {r['size']} | {r['dtype']} | {j['total'] / GIB:.2f} | {tp} | {ratio} | "
            f"{j['argument'] / GIB:.2f} ({j['state'] / GIB:.2f} + {j['teacher'] / GIB:.2f} + "
            f"{j['batch'] / GIB:.3f}) | {j['output'] / GIB:.2f} | {j['alias'] / GIB:.2f} | "
            f"{j['temp'] / GIB:.2f} | {j['code'] / 2**20:.1f} |"
        )
    lines += [
        "",
        "Compilation (host, once per shape; not part of the step): compile seconds and the "
        "process RSS increase over lower + compile. PyTorch's parameter bytes (teacher "
        "included) and trainable bytes (x3 with gradients and momentum) for scale:",
        "",
        "| canvas | dtype | JAX compile s | JAX compile RSS GiB | torch params GiB | torch "
        "trainable GiB | torch s/step (incl. the first) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        j, t = r["jax"], r.get("torch")
        tcols = (
            f"{t['params'] / GIB:.3f} | {t['trainable'] / GIB:.3f} | {t['step_s']:.1f}"
            if t
            else "- | - | -"
        )
        lines.append(
            f"| {r['size']} | {r['dtype']} | {j['compile_s']:.1f} | "
            f"{j['compile_rss'] / GIB:.2f} | {tcols} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dump_dir = ""
    if args.peak_report:
        import tempfile

        dump_dir = tempfile.mkdtemp(prefix="fgd_memory_dump_")
        flags = f"--xla_dump_to={dump_dir} --xla_dump_hlo_pass_re=NONE"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    if not args.gpu:
        cores = sorted(os.sched_getaffinity(0))
        n = args.threads or len(cores)
        os.sched_setaffinity(0, cores[:n])
        os.environ["JAX_PLATFORMS"] = "cpu"
        args.threads = n
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    if args.gpu:
        device = f"{jax.devices()[0].device_kind} (JAX {jax.default_backend()}; torch cuda)"
        torch_how = (
            f"`torch.cuda.max_memory_allocated()` over building the peer + {args.torch_steps} "
            "step(s)"
        )
    else:
        from benchmarks.train_step import cpu_info

        info = cpu_info()
        device = f"{info['model']}, {args.threads} of {info['machine_cores']} cores, no GPU"
        torch_how = (
            f"RSS high-water over building the peer + {args.torch_steps} step(s), above the RSS "
            "before (psutil, 2 ms "
            "sampling; an upper bound of torch's tensors: it includes oneDNN scratch and "
            "allocator slack)"
        )
    if not args.skip_torch:
        import torch

        if not args.gpu:
            torch.set_num_threads(args.threads)
    env = dict(
        date=subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
        device=device,
        versions=versions(),
        command="python -m benchmarks.memory " + shlex.join(sys.argv[1:] if argv is None else argv),
        torch_how=torch_how,
    )
    overrides = _overrides(args.config_override)
    results = []
    for size in args.sizes:
        h, w = (int(v) for v in size.split("x"))
        for dtype in args.dtypes:
            r = dict(size=size, dtype=dtype)
            if args.skip_jax:
                t = torch_step_memory(
                    h, w, args.batch, args.boxes, dtype, args.gpu, args.torch_steps
                )
                print(
                    f"[{size} {dtype}] torch: peak {t['peak'] / GIB:.3f} GiB, params "
                    f"{t['params'] / GIB:.3f}, trainable {t['trainable'] / GIB:.3f}, "
                    f"{t['step_s']:.1f} s/step",
                    flush=True,
                )
                continue
            r["jax"] = j = jax_step_memory(h, w, args.batch, dtype, overrides)
            print(
                f"[{size} {dtype}] fgd-jax: held {j['total'] / GIB:.3f} GiB (arguments "
                f"{j['argument'] / GIB:.3f}, outputs {j['output'] / GIB:.3f}, aliased "
                f"{j['alias'] / GIB:.3f}, temporaries {j['temp'] / GIB:.3f}); code "
                f"{j['code'] / 2**20:.1f} MiB; compile {j['compile_s']:.1f} s, "
                f"+{j['compile_rss'] / GIB:.2f} GiB RSS",
                flush=True,
            )
            if dump_dir:
                live, groups = peak_breakdown(dump_dir, args.peak_report)
                print(f"[{size} {dtype}] live at XLA's heap peak: {live / GIB:.3f} GiB, by source:")
                for nbytes, src in groups:
                    print(f"  {nbytes / 2**20:9.1f} MiB  {src}", flush=True)
            if not args.skip_torch:
                r["torch"] = t = torch_step_memory(
                    h, w, args.batch, args.boxes, dtype, args.gpu, args.torch_steps
                )
                print(f"[{size} {dtype}] torch: peak {t['peak'] / GIB:.3f} GiB", flush=True)
            tp = f"{r['torch']['peak'] / GIB:.3f}" if "torch" in r else "-"
            ratio = f"{r['torch']['peak'] / j['total']:.2f}" if "torch" in r else "-"
            # One machine-readable line per case (benchmarks/run_all.py collects these);
            # the last column is torch / fgd-jax (> 1: fgd-jax needs less).
            print(
                f"SUMMARY memory | distill step, batch {args.batch}, {size}, {dtype} | GiB | "
                f"{j['total'] / GIB:.3f} | {tp} | {ratio}",
                flush=True,
            )
            results.append(r)
    text = report(results, env)
    common.write_text(text, args.out)


if __name__ == "__main__":
    main()
