"""YOLOX-s speed: fgd-jax (Flax, jit) vs mmdetection's own CPU YOLOX, the same weights.

mmdetection lives only in the oracle venv (`/work/oracle/mmdet-venv`, or `--oracle-python`:
mmdetection 3.3, mmcv 2.1, torch CPU, no JAX): its side runs in a subprocess with that python
(`benchmarks/mmdet_yolox_peer.py`), driven over a pipe as in `benchmarks/gfl.py` (`gfl.Peer`,
`gfl.time_with_peer`): the timed calls alternate between the sides (A, B, A, B, ...), the peer
times its own call (the pipe's round trip is left out), both processes are pinned to the same
`--threads` cores and use that many threads.

- model: YOLOX-s (`config.yolox_model('s')`: CSPDarknet deepen 0.33 / widen 0.5, YOLOXPAFPN
  128 channels, YOLOXHead; mmdetection `yolox_s_8xb8-300e_coco`'s model). Weights:
  mmdetection's own random init (`init_weights`, seed 0; `--score-bias` optionally sets the
  classification and objectness biases), its state dict converted by fgd-jax
  (`import_torch_checkpoint`, `fgd_jax.convert.mmdet_yolox`).
- images: raw 0-255 pixels (YOLOX has no Normalize), uniform noise; 8 random GT boxes per
  training image (`common.synthetic_batch`'s boxes), the same arrays on both sides; fgd-jax's
  GT arrays padded to `--gt-slots` rows (default 100, the recipe's `max_boxes`: its static
  SimOTA works on every slot, mmdetection on the 8 boxes).
- train step: batch 2 at --train-size: forward in train mode (every BatchNorm on batch
  statistics, running statistics updated: fgd-jax `mutable=['batch_stats']`), SimOTA, the
  YOLOX losses (cls / obj BCE, IoU 'square', L1 off), backward, SGD(lr 0.01, momentum 0.9).
  mmdetection: its real `model.loss` + `backward` + `torch.optim.SGD.step`.
- inference: batch 1 at --infer-size (640x640 as YOLOX tests): forward in eval mode, score
  0.01, class-wise NMS 0.65 (fgd-jax `predict`, static cap 1000; mmdetection `predict
  (rescale=True)`, no cap). Timed first, while both sides hold the same weights. The report
  gives the priors over the score threshold and the detections of each side: with
  mmdetection's init (cls and obj priors 0.01, scores ~1e-4) few or none pass, so NMS has
  little or nothing to do; `--score-bias B` (e.g. -2.5) raises the scores to exercise it.

    python -m benchmarks.yolox --threads 1 --iters 3 --train-size 640 --infer-size 640 640 \
        --out benchmarks/results/yolox_cpu.md

Without the oracle venv the script says so (`SKIPPED benchmarks.yolox: ...`) and exits with
status 0 (nothing to compare).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

import numpy as np

from benchmarks import common, gfl

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mmdet_yolox_peer.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = common.detector_parser(__doc__, train_size=640, infer_size=(640, 640))
    ap.add_argument(
        "--score-bias",
        type=float,
        default=None,
        help="set every cls and obj conv bias to this (both sides; default mmdetection's init)",
    )
    ap.add_argument(
        "--gt-slots",
        type=int,
        default=100,
        help="GT rows per training image on the fgd-jax side (8 valid, the rest padding; "
        "default 100: the YOLOX data recipe's max_boxes)",
    )
    oracle = os.environ.get("FGD_ORACLE_PYTHON", gfl.ORACLE_PYTHON)
    ap.add_argument("--oracle-python", default=oracle)
    return ap.parse_args(argv)


def yolox_batch(b: int, h: int, w: int, slots: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """`common.synthetic_batch` (8 random GT boxes per image) with raw 0-255 pixels
    (uniform) as YOLOX's pipeline feeds, the GT arrays padded to `slots` rows with
    `valid=False` (the data pipeline's `max_boxes` layout; mmdetection gets the valid rows)."""
    batch = common.synthetic_batch(b, h, w, seed=seed)
    rng = np.random.default_rng(seed + 1)
    batch["image"] = rng.uniform(0, 255, batch["image"].shape).astype(np.float32)
    pad = slots - batch["boxes"].shape[1]
    if pad < 0:
        raise ValueError(f"--gt-slots {slots} < the 8 GT boxes per image")
    for key in ("boxes", "labels", "valid"):
        widths = [(0, 0), (0, pad)] + [(0, 0)] * (batch[key].ndim - 2)
        batch[key] = np.pad(batch[key], widths)
    return batch


def jax_yolox_calls(
    model: Any, variables: Any, tb: dict[str, np.ndarray], ib: dict[str, np.ndarray], lr: float
) -> tuple[Any, Any, Any]:
    """fgd-jax's `(train, infer, count)`: a jit SGD(momentum 0.9) step of `forward_train`
    with BatchNorm on batch statistics (the statistics carried from step to step; each step's
    (loss, gradient global norm) appended to `train.losses`), a jit
    `predict` (blocks until done), and `count() -> (priors over score_thr, detections)` of
    the inference image (untimed)."""
    import jax
    import optax

    tx = optax.sgd(lr, momentum=0.9)

    @jax.jit
    def step(p, o, stats, batch):
        def loss_fn(p):
            (losses, _), new = model.apply(
                {"params": p, "batch_stats": stats},
                batch,
                method="forward_train",
                mutable=["batch_stats"],
            )
            return sum(losses.values()), new["batch_stats"]

        (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, stats, (loss, optax.global_norm(g))

    params = variables["params"]
    losses: list[tuple[float, float]] = []
    state = [params, tx.init(params), variables["batch_stats"]]
    jtb, jib = jax.device_put(tb), jax.device_put(ib)
    pred = jax.jit(lambda v, x, s, f: model.apply(v, x, s, f, method="predict"))

    def scores(m: Any, x: Any) -> Any:
        cls, _, obj, _ = m._flat(m(x))
        return jax.nn.sigmoid(cls).max(-1) * jax.nn.sigmoid(obj)

    score_fn = jax.jit(lambda v, x: model.apply(v, x, method=scores))

    def train() -> None:
        state[0], state[1], state[2], loss = step(state[0], state[1], state[2], jtb)
        losses.append(tuple(float(v) for v in loss))  # (blocks until the step is done)

    def infer() -> dict:
        det = pred(variables, jib["image"], jib["img_shape"], jib["scale_factor"])
        return jax.block_until_ready(det)

    def count() -> tuple[int, int]:
        s = np.asarray(score_fn(variables, jib["image"]))
        n_cand = int((s[0] >= model.test_cfg.score_thr).sum())
        return n_cand, int(np.asarray(infer()["valid"][0]).sum())

    train.losses = losses  # type: ignore[attr-defined]
    return train, infer, count


def time_train(train: Any, peer: gfl.Peer, iters: int) -> tuple[float, float, list, list]:
    """`gfl.time_with_peer` for the train step, keeping each side's loss of every step
    (warm-up included): median seconds (fgd-jax, mmdetection) and the two lists of
    (loss, gradient global norm)."""
    import statistics
    import time

    train()
    first = peer.call("train")
    peer_losses = [(float(first["loss"]), float(first["gnorm"]))]
    tj, tp = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        train()
        tj.append(time.perf_counter() - t0)
        reply = peer.call("train")
        tp.append(float(reply["s"]))
        peer_losses.append((float(reply["loss"]), float(reply["gnorm"])))
    return statistics.median(tj), statistics.median(tp), list(train.losses), peer_losses


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.gpu:
        raise SystemExit("benchmarks.yolox: CPU only (the mmdetection oracle venv is CPU-only)")
    problem = gfl.oracle_problem(args.oracle_python)
    if problem:
        print(f"SKIPPED benchmarks.yolox: {problem}")
        return
    device = common.setup(args)
    from fgd_jax import config as C
    from fgd_jax.convert import import_torch_checkpoint
    from fgd_jax.models import build_detector

    ts, (ih, iw) = args.train_size, args.infer_size
    tb, ib = yolox_batch(2, ts, ts, args.gt_slots), yolox_batch(1, ih, iw, seed=1)
    extra = () if args.score_bias is None else ("--score-bias", repr(args.score_bias))
    with tempfile.TemporaryDirectory() as tmp:
        batch_npz, state_npz = os.path.join(tmp, "batch.npz"), os.path.join(tmp, "state.npz")
        arrays = {f"train_{k}": v for k, v in tb.items()}
        arrays.update({f"infer_{k}": v for k, v in ib.items()})
        np.savez(batch_npz, **arrays)
        peer = gfl.Peer(args.oracle_python, batch_npz, state_npz, args.threads, PEER, extra)
        try:
            with np.load(state_npz) as f:
                state = {k: f[k] for k in f.files}
            cfg = C.yolox_model("s")
            model = build_detector(cfg)
            variables = import_torch_checkpoint(state, cfg)
            train, infer, count = jax_yolox_calls(model, variables, tb, ib, 0.01)
            lines = common.header("YOLOX-s, fgd-jax vs mmdetection (same weights)", args, device)
            lines[3] += (
                f"; mmdetection side: {args.oracle_python} (mmdetection {peer.info['mmdet']}, "
                f"torch {peer.info['torch']})"
            )
            # inference first: both sides still hold the same (converted) weights
            tj_inf, tp_inf, reply = gfl.time_with_peer(infer, peer, "infer", args.iters)
            n_cand, n_det = count()
            tj_train, tp_train, lj, lp = time_train(train, peer, args.iters)
        finally:
            peer.close()
    rows = [
        (f"train step, batch 2, {ts}x{ts}", 2 / tj_train, 2 / tp_train),
        (f"inference, batch 1, {ih}x{iw}", 1 / tj_inf, 1 / tp_inf),
    ]
    lines += common.table(rows, "mmdetection")
    lines += ["", f"GT rows per training image on the fgd-jax side: {args.gt_slots} (8 valid)."]
    bias = "mmdetection's init" if args.score_bias is None else f"{args.score_bias:g}"
    lines += [
        "",
        f"Seconds per call (median): train fgd-jax {tj_train:.3f}, mmdetection {tp_train:.3f}; "
        f"inference fgd-jax {tj_inf:.3f}, mmdetection {tp_inf:.3f}.",
        f"Inference (cls / obj biases: {bias}): priors with score >= 0.01 (NMS input): fgd-jax "
        f"{n_cand}, mmdetection {reply['candidates']}; detections after NMS: fgd-jax {n_det}, "
        f"mmdetection {reply['dets']}.",
        "Total loss / gradient global norm of each train step (warm-up first; step 1 from the "
        "same weights, then each side's own SGD updates): fgd-jax "
        + ", ".join(f"{a:.4f} / {b:.3f}" for a, b in lj)
        + "; mmdetection "
        + ", ".join(f"{a:.4f} / {b:.3f}" for a, b in lp)
        + ".",
        f"Peak RSS of the fgd-jax process: {common.peak_rss_gib():.2f} GiB.",
    ]
    common.write_report(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
