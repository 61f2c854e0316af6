"""Compile time of YOLOX's batch multi-scale: one jitted train step per size (11 sizes,
480..800 step 32), compiled ahead of time (`jit(...).lower(...).compile()`, no step run).

    python -m benchmarks.yolox_multiscale_compile --cache /tmp/xla_cache   # cold, then
    python -m benchmarks.yolox_multiscale_compile --cache /tmp/xla_cache   # warm (cache hits)

The model is a tiny YOLOX (`--widen 0.0625`: 16 neck channels) by default: the step's graph
(SimOTA, losses, optimizer, EMA, the resize) is the full one, only the channel counts are
small, so the compile time is close to a real model's while the run stays short. `--fgd`
compiles the FGD YOLOX variant's step (student + teacher). The persistent compilation cache
(`trainer.enable_compilation_cache`, on by default in training) makes a restarted run
read the 11 executables instead of compiling them.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--widen", type=float, default=0.0625)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(range(480, 801, 32)))
    ap.add_argument("--cache", default="", help="persistent compilation cache dir ('' = off)")
    ap.add_argument("--fgd", action="store_true", help="the FGD YOLOX variant's step")
    args = ap.parse_args()

    import jax

    from fgd_jax import config as C
    from fgd_jax.experiment import (
        Experiment,
        dummy_batch,
        init_train_state,
        make_train_step,
        run_optimizer,
    )
    from fgd_jax.trainer import enable_compilation_cache

    enable_compilation_cache(args.cache)
    cfg = C.ConfigDict()
    cfg.model = C.yolox_model("s", num_classes=80, widen_factor=args.widen)
    if args.fgd:
        ch = int(256 * args.widen)
        cfg.teacher = C.teacher(C.yolox_model("s", num_classes=80, widen_factor=2 * args.widen), "")
        cfg.distill = C.yolox_fgd_distill(student_channels=ch, teacher_channels=2 * ch)
    cfg.data = C.yolox_coco_data()
    cfg.train = C.schedule_yolox(batch_size=args.batch)
    cfg.seed = 0
    exp = Experiment(cfg)
    batch = dummy_batch(cfg.data, args.batch)
    batch["use_l1"] = batch["flip"]
    t0 = time.perf_counter()
    state = jax.eval_shape(lambda: init_train_state(exp, batch, 1849)[0])
    tx, schedule = run_optimizer(exp, state.params, 1849)
    teacher = None
    if args.fgd:
        teacher = jax.eval_shape(
            lambda: exp.teacher.init(jax.random.key(0), batch["image"][:1], train=False)
        )
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    print(f"abstract state in {time.perf_counter() - t0:.1f} s")
    total = total_cpu = 0.0
    for s in args.sizes:
        t, c = time.perf_counter(), time.process_time()
        step = jax.jit(make_train_step(exp, tx, schedule, input_size=(s, s)), donate_argnums=(0,))
        lowered = step.lower(state, teacher, shapes)
        t_lower = time.perf_counter() - t
        lowered.compile()
        dt, dc = time.perf_counter() - t, time.process_time() - c
        total += dt
        total_cpu += dc
        print(
            f"size {s}: {dt:.1f} s ({t_lower:.1f} s tracing + lowering, "
            f"{dt - t_lower:.1f} s compiling or reading the cache), {dc:.1f} CPU-s"
        )
    print(
        f"total {total:.1f} s, {total_cpu:.1f} CPU-s for {len(args.sizes)} sizes (cache: "
        f"{args.cache or 'off'}, {'FGD' if args.fgd else 'baseline'} step, widen "
        f"{args.widen}, batch {args.batch}; load average {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
