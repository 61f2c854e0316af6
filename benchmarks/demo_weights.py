"""FGD loss weights on the synthetic demo, averaged over seeds (CPU, minutes per seed).

    python -m benchmarks.demo_weights --seeds 0 1 2 --workdir /tmp/demo_weights \
        --out benchmarks/results/demo_weights_cpu.md

For each seed (`cfg.seed`: the teacher's and the students' init and the batch order; the
images are the same): trains the demo's teacher (`configs/shapes_demo.py:teacher`, 800 steps),
then the student (400 steps) alone, with the inheriting init only (every FGD weight 0), and
with each weight setting of `SETTINGS` on top of inheriting. Every student of a seed sees the
same teacher, init and batches; only the FGD loss weights differ. Prints and writes a markdown
table: COCO AP per seed and the mean, and how many seeds each setting beat inheriting alone.

This is an experiment, not a timing: it measures the method's behaviour in the demo's regime
(from-scratch, 96 px images, a weak teacher), where the paper's COCO weights were not tuned.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

from benchmarks import common
from fgd_jax.config import FGD_WEIGHT_KEYS, fgd_distill

# (alpha, beta, gamma, lambda): the paper's RetinaNet values (fgd_distill's defaults) first,
# then the focal feature terms (alpha, beta) scaled down, then parts switched off.
PAPER = tuple(fgd_distill()[k] for k in FGD_WEIGHT_KEYS)
_A, _B, _G, _L = PAPER
SETTINGS: dict[str, tuple[float, float, float, float]] = {
    "paper": PAPER,
    "focal x0.1": (_A * 0.1, _B * 0.1, _G, _L),
    "focal x0.01": (_A * 0.01, _B * 0.01, _G, _L),
    "focal 0 (attention + global)": (0.0, 0.0, _G, _L),
    "global only": (0.0, 0.0, 0.0, _L),
}


def run_seed(seed: int, workdir: str, data_root: str | None, settings: dict) -> dict[str, float]:
    """AP (percent) of every run of one seed: teacher, baseline, inheriting only, settings.
    Each run has its own folder under `workdir/seed{seed}` holding `ap.json` with the AP and
    the run's settings (`fgd_jax.demo_runs.run_key`, plus the teacher's for the students): a rerun
    reuses a finished run only when those are equal, resumes an interrupted one with the same
    settings, and starts over a folder made with others (a changed weight, steps or seed)."""
    from fgd_jax import demo_runs as demo

    args = argparse.Namespace(config=demo.CONFIG, data_root=data_root, steps=400, teacher_steps=800)
    root = os.path.join(workdir, f"seed{seed}")
    done: dict[str, float] = {}

    def one(name: str, cfg, path: str, extra_key: dict | None = None) -> dict:
        cfg.seed = seed
        key = demo.run_key(cfg) | (extra_key or {})
        key = json.loads(json.dumps(key))  # as it reads back from the file
        result_file = os.path.join(path, "ap.json")
        cached = demo.read_json(result_file)
        if cached is not None and cached.get("key") == key:
            done[name] = cached["AP"]
            return key
        done[name] = round(100 * demo.train_in(cfg, path, key)["AP"], 1)
        with open(result_file, "w") as f:
            json.dump({"AP": done[name], "key": key}, f)
        print(f"[demo_weights] seed {seed} {name}: {done[name]} AP", flush=True)
        return key

    t_cfg = demo.demo_config("teacher", args, root)
    t_dir = os.path.join(root, "teacher")
    t_key = one("teacher", t_cfg, t_dir)
    if not os.path.isdir(os.path.join(t_dir, "export", "variables")):
        demo.export_teacher(t_dir)
    one("baseline", demo.demo_config("baseline", args, root), os.path.join(root, "baseline"))
    f_cfg = demo.demo_config("fgd", args, root)  # teacher.ckpt = root/teacher/export
    teacher_run = {"teacher_run": t_key}
    one("inheriting only", demo.inherit_only(f_cfg), os.path.join(root, "inherit"), teacher_run)
    for i, (name, weights) in enumerate(settings.items()):
        one(name, demo.with_fgd_weights(f_cfg, weights), os.path.join(root, f"fgd{i}"), teacher_run)
    return done


def report(per_seed: dict[int, dict[str, float]], settings: dict, minutes: float) -> str:
    import jax

    seeds = sorted(per_seed)
    rows = ["teacher", "baseline", "inheriting only", *settings]
    now = datetime.datetime.now(datetime.UTC)
    lines = [
        f"# FGD weights on the synthetic demo ({now:%Y-%m-%d %H:%M} UTC)",
        "",
        f"`python -m benchmarks.demo_weights --seeds {' '.join(map(str, seeds))}`; jax "
        f"{jax.__version__} on {jax.devices()[0].platform}, {len(os.sched_getaffinity(0))} "
        f"cores, {minutes:.0f} min for the runs not already in the workdir. COCO bbox AP "
        "(percent) on the demo's 128 val images; teacher R18 800 steps, students R10 400 "
        "steps, P3-P5 distilled.",
        "",
        "| run | weights (alpha, beta, gamma, lambda) | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean | beats inheriting only |",
        "|---|---|" + "---|" * len(seeds) + "---|---|",
    ]
    for name in rows:
        aps = [per_seed[s][name] for s in seeds]
        weights = ", ".join(f"{w:g}" for w in settings[name]) if name in settings else "-"
        wins = "-"
        if name in settings:
            n = sum(per_seed[s][name] > per_seed[s]["inheriting only"] for s in seeds)
            wins = f"{n} of {len(seeds)}"
        cells = " | ".join(f"{a:.1f}" for a in aps)
        lines.append(f"| {name} | {weights} | {cells} | {statistics.mean(aps):.1f} | {wins} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo_weights", description=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", default="workdirs/demo_weights")
    p.add_argument("--data-root", default=None, help="synthetic data folder (default: config's)")
    p.add_argument("--out", default="", help="write the markdown table to this file")
    args = p.parse_args(argv)
    t0 = time.time()
    per_seed = {s: run_seed(s, args.workdir, args.data_root, SETTINGS) for s in args.seeds}
    text = report(per_seed, SETTINGS, (time.time() - t0) / 60)
    common.write_text(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
