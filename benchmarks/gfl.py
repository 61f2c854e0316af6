"""GFL R50-FPN speed: fgd-jax (Flax, jit) vs mmdetection's own CPU model, the same weights.

mmdetection lives only in the oracle venv (`/work/oracle/mmdet-venv`, or `--oracle-python`:
mmdetection 3.3, mmcv 2.1, torch CPU, no JAX): its side runs in a subprocess with that
python (`benchmarks/mmdet_gfl_peer.py`), driven over a pipe, so that the timed calls still
alternate between the sides (A, B, A, B, ..., `common.time_interleaved`); the peer times its
own call (the pipe's round trip, well under a millisecond, is left out). Both processes are
pinned to the same `--threads` cores and use that many threads.

- weights: mmdetection's `GFL` R50 (`gfl_r50_fpn_1x_coco`, random init by its own
  `init_weights`, seed 0) writes its state dict; fgd-jax converts it
  (`import_torch_checkpoint`, mmdetection layout) into `gfl_model(depth=50)`.
- train step: `loss` + backward + SGD(momentum 0.9) update, batch 2 at --train-size, 8
  random GT boxes per image (`common.synthetic_batch`, already normalized images).
- inference: batch 1 at --infer-size, forward + post-processing (`predict`;
  mmdetection `predict(rescale=True)`). With its init (class prior 0.01, below the 0.05 score
  threshold) neither side has a detection to run NMS on: the row times the network, the
  top-k and the thresholds. mmdetection 3.3's post-processing keeps the top 1000 (anchor,
  class) pairs per level where 2.11 (fgd-jax) keeps the top 1000 anchors: same work here.

    python -m benchmarks.gfl --threads 1 --iters 3 --train-size 512 --infer-size 800 1344 \
        --out benchmarks/results/gfl_cpu.md

Without the oracle venv the script says so and exits with status 0 (nothing to compare).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

from benchmarks import common

ORACLE_PYTHON = "/work/oracle/mmdet-venv/bin/python"
PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mmdet_gfl_peer.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = common.detector_parser(__doc__)
    ap.add_argument("--oracle-python", default=os.environ.get("FGD_ORACLE_PYTHON", ORACLE_PYTHON))
    return ap.parse_args(argv)


def oracle_problem(python: str) -> str | None:
    """Why the mmdetection side cannot run (None: it can)."""
    if not os.path.exists(python):
        return f"no oracle python at {python} (the mmdetection venv; --oracle-python)"
    r = subprocess.run(
        [python, "-c", "import mmdet, mmcv, torch"], capture_output=True, text=True, timeout=300
    )
    if r.returncode:
        return f"{python} cannot import mmdet / mmcv / torch: {r.stderr.strip()[-300:]}"
    return None


class Peer:
    """The mmdetection subprocess (`script`, default `mmdet_gfl_peer.py`, with `extra`
    arguments): `call('train' | 'infer')` -> reply."""

    def __init__(
        self,
        python: str,
        batch_npz: str,
        state_npz: str,
        threads: int,
        script: str = PEER,
        extra: tuple[str, ...] = (),
    ) -> None:
        cores = [str(c) for c in sorted(os.sched_getaffinity(0))]
        cmd = [python, script, "--batch", batch_npz, "--state-out", state_npz, *extra]
        cmd += ["--threads", str(threads), "--cores", *cores]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        env.pop("PYTHONPATH", None)  # the oracle venv must not import this repository's code
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.info = self._read()
        if not self.info.get("ready"):
            raise RuntimeError(f"mmdetection peer did not start: {self.info}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # skip anything mmdetection prints that is not ours
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"mmdetection peer exited (status {self.proc.wait()})")

    def call(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"mmdetection peer: {reply}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.communicate("quit\n", timeout=60)


def time_with_peer(jax_fn: Any, peer: Peer, cmd: str, iters: int) -> tuple[float, float, dict]:
    """Median seconds `(fgd-jax, mmdetection, last peer reply)`: one warm-up each, then
    `iters` alternating rounds; the peer's seconds are its own measurement of the call."""
    import statistics
    import time

    jax_fn()
    peer.call(cmd)
    tj, tp, reply = [], [], {}
    for _ in range(iters):
        t0 = time.perf_counter()
        jax_fn()
        tj.append(time.perf_counter() - t0)
        reply = peer.call(cmd)
        tp.append(float(reply["s"]))
    return statistics.median(tj), statistics.median(tp), reply


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.gpu:
        raise SystemExit("benchmarks.gfl: CPU only (the mmdetection oracle venv is CPU-only)")
    problem = oracle_problem(args.oracle_python)
    if problem:
        print(f"SKIPPED benchmarks.gfl: {problem}")
        return
    device = common.setup(args)
    from fgd_jax import config as C
    from fgd_jax.convert import import_torch_checkpoint
    from fgd_jax.models import build_detector

    ts, (ih, iw) = args.train_size, args.infer_size
    tb, ib = common.synthetic_batch(2, ts, ts), common.synthetic_batch(1, ih, iw)
    with tempfile.TemporaryDirectory() as tmp:
        batch_npz, state_npz = os.path.join(tmp, "batch.npz"), os.path.join(tmp, "state.npz")
        arrays = {f"train_{k}": v for k, v in tb.items()}
        arrays.update({f"infer_{k}": v for k, v in ib.items()})
        np.savez(batch_npz, **arrays)
        peer = Peer(args.oracle_python, batch_npz, state_npz, args.threads)
        try:
            with np.load(state_npz) as f:
                state = {k: f[k] for k in f.files}
            cfg = C.gfl_model(depth=50)
            model = build_detector(cfg)
            variables = import_torch_checkpoint(state, cfg)
            dets: dict[str, int] = {}

            def count(det: Any) -> None:
                dets["jax"] = int(np.asarray(det["valid"][0]).sum())

            train, infer = common.jax_detector_calls(model, variables, tb, ib, 0.01, count)
            lines = common.header(
                "GFL R50-FPN, fgd-jax vs mmdetection (same weights)", args, device
            )
            lines[3] += f"; mmdetection side: {args.oracle_python} (torch {peer.info['torch']})"
            # inference first: both sides still hold the same (converted) weights
            tj_inf, tp_inf, reply = time_with_peer(infer, peer, "infer", args.iters)
            tj_train, tp_train, _ = time_with_peer(train, peer, "train", args.iters)
        finally:
            peer.close()
    rows = [
        (f"train step, batch 2, {ts}x{ts}", 2 / tj_train, 2 / tp_train),
        (f"inference, batch 1, {ih}x{iw}", 1 / tj_inf, 1 / tp_inf),
    ]
    lines += common.table(rows, "mmdetection")
    lines += [
        "",
        f"Detections at inference: fgd-jax {dets['jax']}, mmdetection {reply['dets']}.",
        f"Peak RSS of the fgd-jax process: {common.peak_rss_gib():.2f} GiB.",
    ]
    common.write_report(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
