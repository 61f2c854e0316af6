"""Training metrics: progress bar, JSON lines, TensorBoard, host memory, NaN guard.

Only process 0 writes (`is_main=jax.process_index() == 0` by default); other processes get a
logger whose methods do nothing, so a trainer calls it unconditionally.

Progress bar: `tqdm`. It is already a dependency, prints a readable single line with rate and
ETA in a terminal, and degrades to periodic plain lines in batch logs (SLURM `.out` files)
via `mininterval`, where `rich`'s live display would emit control codes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np


def _to_float(value: Any) -> float | None:
    """Scalar-like -> float; None for non-scalars (arrays with >1 element, strings)."""
    try:
        arr = np.asarray(value)
    except Exception:  # noqa: BLE001 - anything that is not array-like is not a scalar
        return None
    if arr.size != 1 or not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
        return None
    return float(arr.reshape(()))


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
    """Raise `FloatingPointError` naming every non-finite scalar (loss) and the step.

    `metrics` values may be Python numbers, numpy or (fetched / replicated) JAX scalars.
    """
    bad = {}
    for name, value in metrics.items():
        f = _to_float(value)
        if f is not None and not math.isfinite(f):
            bad[name] = f
    if bad:
        listed = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        raise FloatingPointError(
            f"non-finite value(s) at step {step}: {listed}. Training diverged; lower "
            "train.base_lr, check train.grad_clip_norm, or resume from an earlier checkpoint."
        )


def host_rss_mib() -> float:
    """Resident memory of this process in MiB (psutil)."""
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


class MetricLogger:
    """Console progress (tqdm) + `workdir/metrics.jsonl` + TensorBoard (`workdir/tb`).

    Args:
      workdir: output directory (created).
      total_steps: length of the progress bar.
      is_main: write anything at all (default: this is process 0).
      initial_step: where the bar starts (when resuming).
      tensorboard: use `tensorboardX.SummaryWriter` if it is installed.
      progress: show the tqdm bar.
    Each `log(step, metrics)` appends one JSON object
    `{"step", "time" (unix s), "elapsed_s", "host_rss_mib", <every scalar metric>}`.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        total_steps: int,
        is_main: bool | None = None,
        initial_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
    ):
        if is_main is None:
            import jax

            is_main = jax.process_index() == 0
        self.is_main = bool(is_main)
        self.workdir = os.fspath(workdir)
        self.jsonl_path = os.path.join(self.workdir, "metrics.jsonl")
        self._t0 = time.time()
        self._file = None
        self._tb = None
        self._bar = None
        self._step = initial_step
        if not self.is_main:
            return
        os.makedirs(self.workdir, exist_ok=True)
        if initial_step > 0:
            self._drop_records_after(initial_step)
        self._file = open(self.jsonl_path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                SummaryWriter = None  # noqa: N806
            if SummaryWriter is not None:
                self._tb = SummaryWriter(os.path.join(self.workdir, "tb"))
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=initial_step,
                dynamic_ncols=True,
                mininterval=1.0,
                unit="step",
            )

    def _drop_records_after(self, step: int) -> None:
        """On resume: forget what a killed run logged after its last checkpoint (those steps
        run again), so `metrics.jsonl` has each step once. Written atomically."""
        if not os.path.isfile(self.jsonl_path):
            return
        with open(self.jsonl_path) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if int(rec.get("step", 0)) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        if len(keep) != len(lines):
            tmp = self.jsonl_path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.jsonl_path)

    def update(self, step: int) -> None:
        """Advance the progress bar to `step` (cheap: call every step)."""
        if self._bar is not None and step > self._step:
            self._bar.update(step - self._step)
        self._step = max(self._step, step)

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> dict:
        """Record the scalar entries of `metrics` at `step` (non-scalars are skipped).

        Returns the record written (empty on non-main processes).
        """
        if not self.is_main:
            return {}
        self.update(step)
        now = time.time()
        record: dict[str, Any] = {
            "step": int(step),
            "time": now,
            "elapsed_s": now - self._t0,
            "host_rss_mib": host_rss_mib(),
        }
        for k, v in metrics.items():
            f = _to_float(v)
            if f is not None:
                record[prefix + k] = f
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time"):
                    self._tb.add_scalar(k, v, global_step=int(step))
        if self._bar is not None:
            shown = {k: record[k] for k in list(record)[4:8]}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        return record

    def write(self, text: str) -> None:
        """Print a line without breaking the progress bar (main process only)."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """All records of `workdir/metrics.jsonl` (for notebooks and tests)."""
    path = os.path.join(os.fspath(workdir), "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics file")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
