"""Train a detector, alone (`*_baseline` configs) or as an FGD student.

    python -m fgd_jax.train --config configs/retina_r101_r50.py --workdir workdirs/run1 \\
        [--config.train.batch_size=8 ...]

The same command runs on one CPU, one GPU, 8 GPUs, or many hosts (launched once per host; see
README). The loop itself is `fgd_jax.trainer.train`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from fgd_jax import parallel, trainer
from fgd_jax.config import OVERRIDE_HELP, load_config, parse_command_line


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m fgd_jax.train` (overrides are taken out first)."""
    p = argparse.ArgumentParser(
        prog="python -m fgd_jax.train",
        description=__doc__.split("\n")[0],
        epilog=OVERRIDE_HELP,
    )
    p.add_argument(
        "--config",
        required=True,
        help="config file defining get_config(); FILE.py:ARG calls get_config('ARG')",
    )
    p.add_argument(
        "--workdir",
        help="where checkpoints, logs and eval results go (default: workdirs/<config name>)",
    )
    p.add_argument(
        "--coordinator_address",
        help="multi-host without SLURM/Open MPI: host:port of process 0 (or env FGD_COORDINATOR)",
    )
    p.add_argument("--num_processes", type=int, help="multi-host: number of processes (hosts)")
    p.add_argument("--process_id", type=int, help="multi-host: this process's index")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    args, overrides = parse_command_line(p, argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fgd_jax").setLevel(logging.INFO)
    parallel.maybe_initialize_distributed(
        args.coordinator_address, args.num_processes, args.process_id
    )
    config_name = os.path.splitext(os.path.basename(args.config.split(":")[0]))[0]
    workdir = args.workdir or os.path.join("workdirs", config_name)
    try:
        cfg = load_config(args.config, overrides)
        trainer.train(cfg, workdir)
    except trainer.Preempted as e:
        print(f"{e} in {workdir}; run the same command to resume")
        return 0
    except (FileNotFoundError, ValueError, TypeError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"outputs written to {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
