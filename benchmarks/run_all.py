"""Run every benchmark script in turn (one subprocess each) and collect one summary table.

    python -m benchmarks.run_all --quick           # small sizes, about 15-25 min on 2 CPU cores
    python -m benchmarks.run_all --threads 2       # (default 1 thread on both sides)
    python -m benchmarks.run_all                   # the sizes of benchmarks/results/*
    python -m benchmarks.run_all --only train_step fgd_loss
    python -m benchmarks.run_all --gpu             # GPU flags where a script has them

Each script prints its own results; this runner parses the headline numbers out of its
output into `benchmarks/results/summary_cpu.md` (or `summary_gpu.md` with `--gpu`): one row per
workload with fgd-jax, the PyTorch peer and the speed-up of fgd-jax over it (> 1: fgd-jax is
faster). Full logs of every script go to `--log-dir`. The scripts' own `--out` files are not
touched (rerun a script alone with `--out` to refresh `benchmarks/results/<name>_cpu.md`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Row:
    workload: str
    unit: str
    jax: float
    torch: float | None
    speedup: float | None  # fgd-jax over torch (> 1: fgd-jax faster)


def _num(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else None


# --------------------------------------------------------------------------------- parsers
def parse_backbone(out: str) -> list[Row]:
    head = re.search(r"ResNet-50 fwd\+bwd, batch (\d+), (\d+x\d+)", out)
    j = _num(r"^flax\s*:\s*([\d.]+) img/s", out)
    t = _num(r"^torch\s*:\s*([\d.]+) img/s", out)
    if j is None:
        return []
    name = f"ResNet-50 fwd+bwd, batch {head.group(1)}, {head.group(2)}" if head else "ResNet-50"
    return [Row(name, "img/s", j, t, j / t if t else None)]


def parse_md_table(out: str) -> list[Row]:
    """`| workload | fgd-jax img/s | torchvision img/s | ratio |` rows (retinanet, faster_rcnn)."""
    rows = []
    pat = r"^\| ([^|]+?) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$"
    for m in re.finditer(pat, out, re.MULTILINE):
        j, t = float(m.group(2)), float(m.group(3))
        rows.append(Row(m.group(1), "img/s", j, t, j / t if t else None))
    return rows


def parse_fgd_loss(out: str) -> list[Row]:
    j = _num(r"^JAX jit fwd\+bwd:\s*([\d.]+) ms/step", out)
    t = _num(r"^PyTorch reference:\s*([\d.]+) ms/step", out)
    if j is None:
        return []
    shape = re.search(r"^batch (\d+), C (\d+)", out, re.MULTILINE)
    name = "FGD loss 5 levels fwd+bwd, 800x1344 canvas"
    if shape:
        name += f", batch {shape.group(1)}, C {shape.group(2)}"
    return [Row(name, "ms/step", j, t, t / j if t else None)]


def parse_data(out: str) -> list[Row]:
    rows = []
    for m in re.finditer(r"^workers=(\d+): ([\d.]+) images/s", out, re.MULTILINE):
        name = f"input pipeline, {m.group(1)} workers"
        rows.append(Row(name, "img/s", float(m.group(2)), None, None))
    return rows


def parse_fcos(out: str) -> list[Row]:
    head = re.search(r"FCOS R50-FPN, batch (\d+), (\d+x\d+)", out)
    vals: dict[tuple[str, str], float] = {}
    for m in re.finditer(r"^(infer|train)\s+(jax|torch)\s+[\d.]+\s+[\d.]+\s+([\d.]+)$", out, re.M):
        vals[(m.group(1), m.group(2))] = float(m.group(3))
    rows = []
    for what in ("train", "infer"):
        if (what, "jax") in vals:
            j, t = vals[(what, "jax")], vals.get((what, "torch"))
            name = f"FCOS {what}" + (f", batch {head.group(1)}, {head.group(2)}" if head else "")
            rows.append(Row(name, "img/s", j, t, j / t if t else None))
    return rows


def parse_train_step(out: str) -> list[Row]:
    rows = []
    pat = r"^SUMMARY train_step \| (.+?) \| (\S+) \| ([\d.]+) \| ([\d.]+|-) \| ([\d.]+|-)$"
    for m in re.finditer(pat, out, re.MULTILINE):
        t = None if m.group(4) == "-" else float(m.group(4))
        j = float(m.group(3))
        rows.append(Row(f"FGD R101->R50 {m.group(1)}", m.group(2), j, t, j / t if t else None))
    return rows


def parse_memory(out: str) -> list[Row]:
    """`SUMMARY memory | workload | GiB | fgd-jax | torch | torch/jax` lines of memory.py;
    the speed-up column is torch / fgd-jax (> 1: fgd-jax holds less)."""
    rows = []
    pat = r"^SUMMARY memory \| (.+?) \| (\S+) \| ([\d.]+) \| ([\d.]+|-) \| ([\d.]+|-)$"
    for m in re.finditer(pat, out, re.MULTILINE):
        t = None if m.group(4) == "-" else float(m.group(4))
        j = float(m.group(3))
        rows.append(Row(f"FGD R101->R50 {m.group(1)}", m.group(2), j, t, t / j if t else None))
    return rows


def parse_deform_conv(out: str) -> list[Row]:
    """`SUMMARY deform_conv | workload | ms/step | fgd-jax | torch | torch/jax` lines of
    deform_conv.py; the speed-up column is torch / fgd-jax (> 1: fgd-jax faster)."""
    rows = []
    pat = r"^SUMMARY deform_conv \| (.+?) \| (\S+) \| ([\d.]+) \| ([\d.]+) \| [\d.]+$"
    for m in re.finditer(pat, out, re.MULTILINE):
        j, t = float(m.group(3)), float(m.group(4))
        rows.append(Row(m.group(1), m.group(2), j, t, t / j))
    return rows


def skip_reason(out: str) -> str | None:
    """The reason of a script that printed `SKIPPED <script>: <reason>` (a missing optional
    peer, e.g. gfl.py without the mmdetection oracle venv); None otherwise."""
    m = re.search(r"^SKIPPED [^:]*: (.*)$", out, re.MULTILINE)
    return m.group(1).strip() if m else None


@dataclass
class Bench:
    name: str
    quick: list[str]
    full: list[str]
    parse: Callable[[str], list[Row]]
    gpu: list[str]  # extra arguments for --gpu ([] : the script has no GPU mode)
    threads: bool = True  # the script takes --threads (same thread count on both sides)


BENCHES = [
    Bench(
        "backbone",
        ["--size", "256", "--steps", "2"],
        ["--steps", "3"],
        parse_backbone,
        [],
    ),
    Bench("retinanet", ["--iters", "1"], ["--iters", "2"], parse_md_table, ["--gpu"]),
    Bench(
        "fgd_loss",
        ["--steps", "3", "--warmup", "1"],
        ["--steps", "5", "--warmup", "2"],
        parse_fgd_loss,
        ["--device", "gpu"],
    ),
    Bench(
        "data",
        ["--workers", "0", "--steps", "4", "--batch", "4", "--num-images", "16"],
        ["--workers", "0", "2"],
        parse_data,
        [],
        threads=False,
    ),
    Bench(
        "train_step",
        ["--sizes", "256x256", "--steps", "1"],
        ["--sizes", "512x512", "--steps", "2"],
        parse_train_step,
        ["--gpu"],
    ),
    Bench(
        "memory",
        ["--sizes", "256x256"],
        ["--sizes", "512x512", "800x1344"],
        parse_memory,
        ["--gpu"],
    ),
    Bench(
        "fcos", ["--size", "256", "--steps", "1"], ["--size", "256", "--steps", "2"], parse_fcos, []
    ),
    Bench(
        "deform_conv",
        ["--iters", "1", "--size", "25", "42", "--channels", "128"],
        ["--iters", "3"],
        parse_deform_conv,
        ["--gpu"],
    ),
    Bench(
        "faster_rcnn",
        ["--iters", "1", "--train-size", "256", "--infer-size", "384", "384"],
        ["--iters", "2", "--train-size", "320", "--infer-size", "512", "512"],
        parse_md_table,
        ["--gpu"],
    ),
    Bench(
        "mask_rcnn",
        ["--iters", "1", "--train-size", "256", "--infer-size", "384", "384"],
        ["--iters", "2", "--train-size", "384", "--infer-size", "512", "768"],
        parse_md_table,
        ["--gpu"],
    ),
    # mmdetection's CPU model in the oracle venv (a subprocess); skipped without that venv
    Bench(
        "gfl",
        ["--iters", "1", "--train-size", "256", "--infer-size", "384", "384"],
        ["--iters", "2", "--train-size", "320", "--infer-size", "512", "768"],
        parse_md_table,
        [],
    ),
    # YOLOX-s vs mmdetection's CPU YOLOX (the oracle venv, a subprocess); skipped without it
    Bench(
        "yolox",
        ["--iters", "1", "--train-size", "256", "--infer-size", "320", "320"],
        ["--iters", "3", "--train-size", "640", "--infer-size", "640", "640"],
        parse_md_table,
        [],
    ),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, 1-3 timed steps")
    p.add_argument("--gpu", action="store_true", help="pass each script's GPU flag if it has one")
    p.add_argument("--only", nargs="+", choices=[b.name for b in BENCHES], default=None)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for both sides of every script that takes --threads (default 1: on a "
        "shared machine torch's OpenMP pool collapses at 2 threads, which flatters fgd-jax; "
        "0 leaves each script's default)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per script")
    p.add_argument("--out", default="", help="default benchmarks/results/summary_{cpu,gpu}.md")
    p.add_argument("--log-dir", default=os.path.join(REPO, ".cache", "benchmark_logs"))
    return p.parse_args(argv)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out_path = args.out or os.path.join(
        REPO, "benchmarks", "results", f"summary_{'gpu' if args.gpu else 'cpu'}.md"
    )
    os.makedirs(args.log_dir, exist_ok=True)
    benches = [b for b in BENCHES if args.only is None or b.name in args.only]
    results = []
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    t_all = time.perf_counter()
    for i, b in enumerate(benches):
        cmd = [sys.executable, "-m", f"benchmarks.{b.name}", *(b.quick if args.quick else b.full)]
        if args.gpu:
            cmd += b.gpu
        elif args.threads > 0 and b.threads:
            cmd += ["--threads", str(args.threads)]
        shown = "python " + " ".join(cmd[1:])
        print(f"[{i + 1}/{len(benches)}] {shown}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout
            )
            output, status = (
                proc.stdout + proc.stderr,
                ("ok" if proc.returncode == 0 else f"exit {proc.returncode}"),
            )
        except subprocess.TimeoutExpired as e:
            output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            status = f"timeout {args.timeout:.0f} s"
        wall = time.perf_counter() - t0
        log_path = os.path.join(args.log_dir, f"{b.name}.log")
        with open(log_path, "w") as f:
            f.write(f"$ {shown}\n{output}")
        rows = b.parse(output) if status == "ok" else []
        skipped = skip_reason(output) if status == "ok" else None
        if skipped:
            status = f"skipped: {skipped}"
        elif status == "ok" and not rows:
            status = "ok, no numbers parsed"
        print(f"    {status} in {wall:.0f} s, {len(rows)} rows (log: {log_path})", flush=True)
        if status != "ok" and status != "ok, no numbers parsed" and not skipped:
            print("    " + "\n    ".join(output.strip().splitlines()[-8:]), flush=True)
        results.append((b, shown, status, wall, rows))

    import jax  # versions for the header only, after the subprocesses have run
    import torch

    load = os.getloadavg()[0]
    kind = "GPU" if args.gpu else "CPU"
    flags = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# Benchmark summary ({kind}{', quick sizes' if args.quick else ''})",
        "",
        f"- date: {date}",
        f"- device: {_cpu_name()}, {os.cpu_count()} cores"
        + (f"; GPU: {jax.devices()[0].device_kind}" if args.gpu else ""),
        f"- versions: jax {jax.__version__}, torch {torch.__version__}, python "
        f"{sys.version.split()[0]}",
        f"- command: `python -m benchmarks.run_all {flags}`"
        f" ({time.perf_counter() - t_all:.0f} s in all; load average at the end {load:.1f})",
        "",
        "Speed-up = fgd-jax throughput / PyTorch throughput (> 1: fgd-jax faster); for ms/step "
        "rows it is torch ms / fgd-jax ms, for GiB rows (memory) torch GiB / fgd-jax GiB (> 1: "
        "fgd-jax holds less). PyTorch peers: torchvision models, the original FGD "
        "loss (`benchmarks/fgd_torch_reference.py`), `benchmarks/torch_fgd_peer.py`; gfl: "
        "mmdetection's own CPU model (the oracle venv, `benchmarks/mmdet_gfl_peer.py`); yolox: "
        "mmdetection's CPU YOLOX-s (`benchmarks/mmdet_yolox_peer.py`).",
        "",
        "| benchmark | workload | unit | fgd-jax | PyTorch | speed-up | script wall s | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b, _, status, wall, rows in results:
        if not rows:
            lines.append(f"| {b.name} | - | - | - | - | - | {wall:.0f} | {status} |")
        for r in rows:
            lines.append(
                f"| {b.name} | {r.workload} | {r.unit} | {_fmt(r.jax)} | {_fmt(r.torch)} | "
                f"{_fmt(r.speedup, 2)} | {wall:.0f} | {status} |"
            )
    lines += ["", "Commands:", ""] + [f"- `{shown}`" for _, shown, *_ in results]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(out_path, "w") as f:
        f.write(text)
    print(f"wrote {out_path}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
