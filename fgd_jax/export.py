"""Export the student of a training run (the original's `pth_transfer.py`, done right).

    python -m fgd_jax.export --ckpt WORKDIR --out DIR [--torch FILE.pth] [--teacher]

Writes the student alone (no teacher, no FGD params, no optimizer state) with its config as
an orbax checkpoint, loadable by `python -m fgd_jax.eval --ckpt DIR` and in Python with

    variables, cfg = fgd_jax.export.load_model("DIR")
    detector = fgd_jax.models.build_detector(cfg.model)

and optionally as an mmdetection-layout PyTorch state dict (`{'state_dict': ..., 'meta': ...}`)
that mmdetection's `load_checkpoint` reads for the same architecture.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np

from fgd_jax import checkpoint as ckpt_lib
from fgd_jax import parallel


def _is_workdir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


def model_config(
    cfg: ml_collections.ConfigDict, teacher: bool = False
) -> ml_collections.ConfigDict:
    """A standalone config of the student (or teacher) of `cfg`: `model` set, no teacher and
    no distill sections, data/eval kept so eval can run it as is."""
    out = copy.deepcopy(cfg)
    with out.unlocked():
        if teacher:
            out.model = copy.deepcopy(cfg.teacher.model)
        for key in ("teacher", "distill"):
            if key in out:
                del out[key]
    return out


def load_model(path: str, teacher: bool = False) -> tuple[dict, ml_collections.ConfigDict]:
    """Variables and standalone config of one detector from any of:
    a training workdir (its latest checkpoint's student, or `teacher=True` for the teacher
    named in its config), a converted teacher, or an exported student.

    Raises FileNotFoundError / ValueError with the path and the problem.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint or workdir")
    if not _is_workdir(path):
        variables, cfg = ckpt_lib.load_variables(path)
        if cfg is None:
            raise ValueError(f"{path}: the checkpoint stores no config; pass --config")
        if teacher:
            raise ValueError(f"{path} holds a single model; --teacher needs a training workdir")
        return variables, cfg
    from fgd_jax.train import Experiment, abstract_train_state

    manager = ckpt_lib.CheckpointManager(os.path.join(path, "checkpoints"))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{path}: the workdir holds no complete checkpoint yet")
    cfg = manager.restore_config(step)
    if cfg is None:
        raise ValueError(f"{path}: checkpoint {step} stores no config")
    if teacher:
        if "teacher" not in cfg:
            raise ValueError(f"{path}: a baseline run has no teacher")
        variables, _ = ckpt_lib.load_variables(cfg.teacher.ckpt)
        return variables, model_config(cfg, teacher=True)
    mesh = parallel.make_mesh()
    state, _, _ = manager.restore(step, target=abstract_train_state(cfg, mesh), data_state=False)
    manager.close()
    exp = Experiment(cfg)
    variables = parallel.fetch(exp.student_variables(state.params, state.model_state))
    return variables, model_config(cfg)


def check_variables(module, variables: Mapping, source: str) -> None:
    """Raise ValueError if `variables` do not fit `module` exactly (every leaf present, none
    extra, same shapes): Flax would otherwise ignore extra leaves, so a config naming a
    smaller model than the checkpoint evaluates a silently truncated model."""
    import jax.numpy as jnp

    image = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    expected = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), image)
    # every collection the model has, leaf by leaf; leaves of other collections are unexpected
    problems = ckpt_lib.tree_mismatches(variables, expected, limit=10)
    if problems:
        raise ValueError(
            f"{source} does not match the model of the config "
            f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )


def write_torch_state_dict(path: str, variables: dict, cfg: ml_collections.ConfigDict) -> str:
    """An mmdetection-style `.pth`: `{'state_dict': {name: tensor}, 'meta': {...}}`."""
    import torch

    from fgd_jax.convert import export_torch_state_dict

    sd = export_torch_state_dict(variables, cfg.model)
    tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()}
    from fgd_jax.data.classes import torch_meta

    meta = {"fgd_jax_model": cfg.model.to_json(), "exported_by": "fgd_jax.export"}
    meta.update(torch_meta(cfg))  # CLASSES, as mmdetection 2.x checkpoints carry them
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"state_dict": tensors, "meta": meta}, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fgd_jax.export", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="training workdir (or any model checkpoint)")
    p.add_argument("--out", required=True, help="output directory of the orbax export")
    p.add_argument("--torch", help="also write an mmdetection-layout PyTorch state dict here")
    p.add_argument("--teacher", action="store_true", help="export the run's teacher instead")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        variables, cfg = load_model(args.ckpt, teacher=args.teacher)
        out = ckpt_lib.save_variables(args.out, variables, cfg, overwrite=args.overwrite)
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
        print(f"wrote the {'teacher' if args.teacher else 'student'} ({n:,} parameters) to {out}")
        if args.torch:
            pth = write_torch_state_dict(args.torch, variables, cfg)
            print(f"wrote the PyTorch state dict to {pth}")
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
