"""Export the student of a training run (the original's `pth_transfer.py`, done right).

    python -m fgd_jax.export --ckpt WORKDIR --out DIR [--torch FILE.pth] [--teacher] \\
        [--config.data.root=/data ...]

Writes the student alone (no teacher, no FGD params, no optimizer state) with its config as
an orbax checkpoint, loadable by `python -m fgd_jax.eval --ckpt DIR` and in Python with

    variables, cfg = fgd_jax.experiment.load_model("DIR")
    detector = fgd_jax.models.build_detector(cfg.model)

and optionally as an mmdetection-layout PyTorch state dict (`{'state_dict': ..., 'meta': ...}`)
that mmdetection's `load_checkpoint` reads for the same architecture. `--config.KEY=VALUE`
changes the stored config (e.g. data.root for where the export will be evaluated).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import ml_collections
import numpy as np

from fgd_jax import checkpoint as ckpt_lib
from fgd_jax.config import OVERRIDE_HELP, apply_overrides, parse_command_line
from fgd_jax.experiment import load_model


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


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m fgd_jax.export` (overrides are taken out first)."""
    p = argparse.ArgumentParser(
        prog="python -m fgd_jax.export", description=__doc__.split("\n")[0], epilog=OVERRIDE_HELP
    )
    p.add_argument("--ckpt", required=True, help="training workdir (or any model checkpoint)")
    p.add_argument("--out", required=True, help="output directory of the orbax export")
    p.add_argument("--torch", help="also write an mmdetection-layout PyTorch state dict here")
    p.add_argument("--teacher", action="store_true", help="export the run's teacher instead")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    args, overrides = parse_command_line(p, argv)
    try:
        variables, cfg = load_model(args.ckpt, teacher=args.teacher)
        apply_overrides(cfg, overrides)
        out = ckpt_lib.save_variables(args.out, variables, cfg, overwrite=args.overwrite)
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
        print(f"wrote the {'teacher' if args.teacher else 'student'} ({n:,} parameters) to {out}")
        if args.torch:
            pth = write_torch_state_dict(args.torch, variables, cfg)
            print(f"wrote the PyTorch state dict to {pth}")
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
