"""The demo's runs as a library: its configs, run folders keyed by their settings (resumed or
reused only when made with the same ones), the teacher's export, FGD loss-weight variants.

Used by `python -m fgd_jax.demo` and `benchmarks/demo_weights.py`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

from fgd_jax import checkpoint as ckpt_lib
from fgd_jax import evaluation, experiment, trainer
from fgd_jax.config import FGD_WEIGHT_KEYS, ConfigDict, apply_overrides, load_config

CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "shapes_demo.py")


def demo_config(variant: str, args, workdir: str) -> ConfigDict:
    """The demo's config of one run, `variant` 'teacher' | 'baseline' | 'fgd', sized by `args`
    (attributes `config`, `data_root`, `steps`, `teacher_steps`, optional `overrides`: the
    demo's command line); the FGD run's teacher is `workdir/teacher/export`."""
    path = args.config if os.path.isfile(args.config) else CONFIG
    cfg = load_config(f"{path}:{variant}")
    if args.data_root:
        cfg.data.root = args.data_root
    steps = args.teacher_steps if variant == "teacher" else args.steps
    cfg.train.num_steps = steps
    cfg.train.decay_steps = (int(steps * 0.8),)
    cfg.train.warmup_iters = min(cfg.train.warmup_iters, max(1, steps // 5))
    cfg.train.ckpt_every = max(1, steps // 3)
    cfg.train.log_every = max(1, min(cfg.train.log_every, steps // 4))
    if variant == "fgd":
        cfg.teacher.ckpt = os.path.join(workdir, "teacher", "export")
    apply_overrides(cfg, getattr(args, "overrides", None) or [], source="demo")
    return cfg


KEY_FILE = "demo_key.json"


def run_key(cfg: ConfigDict) -> dict:
    """What a demo run's workdir must have been made with to be resumed or reused: the
    config's model, data, schedule, seed, teacher and distillation settings, and the
    synthetic dataset's generator version (a new version changes the images)."""
    from fgd_jax.data import shapes

    cfg_json = json.loads(cfg.to_json_best_effort())
    keys = ("model", "data", "train", "seed", "teacher", "distill")
    return {k: cfg_json.get(k) for k in keys} | {"shapes_version": shapes._VERSION}


def prepare_workdir(path: str, key: dict) -> None:
    """Keep `path` when it was made for `key` (the run resumes or is reused), else empty it;
    then record `key` in it before any training, so an interrupted run resumes."""
    if os.path.isdir(path) and read_json(os.path.join(path, KEY_FILE)) != key:
        print(f"[demo] {path} was made with other settings: starting it over")
        shutil.rmtree(path)
    evaluation.write_json(os.path.join(path, KEY_FILE), key)


def export_teacher(run_dir: str) -> str:
    """Write the trained model of `run_dir` as a standalone export in `run_dir/export`, the
    folder the FGD configs' `teacher.ckpt` points to; returns that folder."""
    out = os.path.join(run_dir, "export")
    variables, standalone = experiment.load_model(run_dir)
    ckpt_lib.save_variables(out, variables, standalone, overwrite=True)
    return out


def train_in(cfg: ConfigDict, path: str, key: dict) -> dict:
    """`prepare_workdir(path, key)`, then train (or resume) there; the final eval metrics."""
    prepare_workdir(path, key)
    return trainer.train(cfg, path)


def read_json(path: str) -> Any:
    """The JSON value in `path`, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def with_fgd_weights(cfg: ConfigDict, weights: Sequence[float]) -> ConfigDict:
    """A copy of the FGD config `cfg` with its four loss weights (`FGD_WEIGHT_KEYS`: alpha,
    beta, gamma, lambda) set to `weights`; the rest (teacher, init, data, steps) unchanged."""
    cfg = cfg.copy_and_resolve_references()
    for key, w in zip(FGD_WEIGHT_KEYS, weights, strict=True):
        cfg.distill[key] = float(w)
    return cfg


def inherit_only(cfg: ConfigDict) -> ConfigDict:
    """The FGD config with the four FGD loss weights at 0: the student still starts from the
    teacher's neck and heads (inheriting) and sees the same batches, but no distillation
    loss reaches it. The train CLI equivalent: `--config.distill.alpha_fgd=0` (and beta,
    gamma, lambda)."""
    if not cfg.distill.init_student:
        raise ValueError("inherit_only: the config does not use the inheriting init")
    return with_fgd_weights(cfg, (0.0,) * len(FGD_WEIGHT_KEYS))
