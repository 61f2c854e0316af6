"""The newcomer's first run: FGD end to end on the embedded synthetic dataset.

    python -m fgd_jax.demo [--workdir workdirs/demo] [--steps 400] [--teacher-steps 800]
                           [--no-ablation] [--config.KEY=VALUE ...]

1. writes the synthetic COCO-format dataset (`fgd_jax.data.shapes`) if it is not there;
2. trains the teacher (RetinaNet R18) or reuses it from `WORKDIR/teacher` when complete;
3. trains the student (RetinaNet R10) alone, and the student with FGD, for the same steps;
   unless `--no-ablation`, also the student with the inheriting init only (the FGD run with
   every FGD weight set to 0: same teacher, init, data order and steps; only the loss
   differs), which splits FGD's gain into what inheriting gives and what the loss adds;
4. evaluates them with pycocotools and prints a table like the paper's.

Everything is the real code path (`fgd_jax.trainer.train`, `fgd_jax.evaluation`), only
smaller. `--config.KEY=VALUE` overrides apply to every run's config (teacher and students).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

from fgd_jax import checkpoint as ckpt_lib
from fgd_jax import evaluation, parallel
from fgd_jax.config import OVERRIDE_HELP, ConfigDict, parse_command_line
from fgd_jax.data import pipeline
from fgd_jax.demo_runs import (
    CONFIG,
    demo_config,
    export_teacher,
    inherit_only,
    prepare_workdir,
    run_key,
    train_in,
)
from fgd_jax.models import build_detector


def run(args) -> dict:
    workdir = args.workdir
    t_start = time.time()
    parallel.enable_compilation_cache()  # the teacher's evaluation below compiles before train()
    pipeline.ensure_shapes_dataset(demo_config("baseline", args, workdir).data)
    rows: dict[str, dict] = {}

    # 2. the teacher, cached
    t_cfg = demo_config("teacher", args, workdir)
    b_cfg = demo_config("baseline", args, workdir)
    t_name = f"teacher (R{t_cfg.model.backbone.depth})"
    s_name = f"student (R{b_cfg.model.backbone.depth})"
    f_name = f"{s_name} + FGD"
    t_dir = os.path.join(workdir, "teacher")
    t_export = os.path.join(t_dir, "export")
    t_key = run_key(t_cfg)
    prepare_workdir(t_dir, t_key)
    if os.path.isdir(os.path.join(t_export, "variables")):
        print(f"[demo] reusing the teacher in {t_export}")
        variables, _ = ckpt_lib.load_variables(t_export)
        rows[t_name] = _evaluate(t_cfg, variables)
    else:
        print(f"[demo] training the teacher for {t_cfg.train.num_steps} steps -> {t_dir}")
        rows[t_name] = train_in(t_cfg, t_dir, t_key)
        export_teacher(t_dir)

    # 3. the student, alone and with FGD, same steps and seed; each run resumes an
    # interrupted one with the same settings (the FGD ones also need the same teacher run)
    steps = b_cfg.train.num_steps
    print(f"[demo] training the student baseline for {steps} steps")
    rows[s_name] = train_in(b_cfg, os.path.join(workdir, "student_baseline"), run_key(b_cfg))
    f_cfg = demo_config("fgd", args, workdir)
    print(f"[demo] training the student with FGD for {f_cfg.train.num_steps} steps")
    f_key = run_key(f_cfg) | {"teacher_run": t_key}
    rows[f_name] = train_in(f_cfg, os.path.join(workdir, "student_fgd"), f_key)
    i_name = f"{s_name} + inheriting only"
    if args.ablation:
        i_cfg = inherit_only(f_cfg)  # a copy: f_cfg is not changed
        print(f"[demo] training the student with the inheriting init only for {steps} steps")
        i_key = run_key(i_cfg) | {"teacher_run": t_key}
        rows[i_name] = train_in(i_cfg, os.path.join(workdir, "student_inherit"), i_key)

    # 4. the table
    table = evaluation.format_table(rows)
    minutes = (time.time() - t_start) / 60
    gain = 100 * (rows[f_name]["AP"] - rows[s_name]["AP"])
    verdict = (
        f"FGD changed the student's AP by {gain:+.1f} points"
        f" ({'better' if gain > 0 else 'not better'} than the baseline in this run)"
    )
    if args.ablation:
        inherit_gain = 100 * (rows[i_name]["AP"] - rows[s_name]["AP"])
        verdict += (
            f"; inheriting alone {inherit_gain:+.1f}, the FGD loss on top of it "
            f"{gain - inherit_gain:+.1f}"
        )
    print("\nCOCO bbox metrics on the synthetic val set (pycocotools), in percent:\n")
    print(table)
    print(f"\n{verdict}; total time {minutes:.1f} min on {jax.devices()[0].platform}.")
    out = {
        name: {k: m[k] for k in evaluation.METRIC_NAMES} | {"per_class_AP": m["per_class_AP"]}
        for name, m in rows.items()
    }
    evaluation.write_json(os.path.join(workdir, "results.json"), out)
    print(f"results written to {os.path.join(workdir, 'results.json')}")
    return rows


def _evaluate(cfg: ConfigDict, variables) -> dict:
    return evaluation.evaluate_variables(build_detector(cfg.model), variables, cfg)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog="python -m fgd_jax.demo", description=__doc__.split("\n")[0], epilog=OVERRIDE_HELP
    )
    p.add_argument("--workdir", default="workdirs/demo")
    p.add_argument("--data-root", default=None, help="synthetic data folder (default: config's)")
    p.add_argument("--config", default=CONFIG, help="demo config (default configs/shapes_demo.py)")
    p.add_argument("--steps", type=int, default=400, help="student training steps")
    p.add_argument("--teacher-steps", type=int, default=800, help="teacher training steps")
    p.add_argument(
        "--ablation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train the student with the inheriting init only (no FGD loss); on by default",
    )
    args, overrides = parse_command_line(p, argv)
    args.overrides = overrides
    rows = run(args)
    print(json.dumps({n: round(100 * m["AP"], 1) for n, m in rows.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
