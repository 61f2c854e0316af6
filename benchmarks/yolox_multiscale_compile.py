"""Compile time of YOLOX's batch multi-scale: one jitted train step per size (11 sizes,
480..800 step 32), compiled ahead of time the way `fgd_jax.trainer.train` does it
(`trainer.StepsBySize.precompile`: lowering in the main thread, `compile()` in a thread pool)
without running a step.

    python -m benchmarks.yolox_multiscale_compile --cache /tmp/c --mode lazy      # cold
    python -m benchmarks.yolox_multiscale_compile --cache /tmp/c2 --mode parallel # cold
    python -m benchmarks.yolox_multiscale_compile --cache /tmp/c2 --mode parallel # warm

`--mode lazy` compiles the sizes one after another in one thread: the compile work a
`train.precompile='lazy'` run pays at each size's first use (spread over its first
iterations); `--mode parallel` (`train.precompile`'s default) compiles them in `--threads`
threads (0: one per CPU, capped by the number of sizes). A cache directory that is empty is a
cold start; run again on the same directory for the warm one (a restarted run reads the
executables from the persistent compilation cache). `--hlo` prints, for the first size, the
op counts of the lowered (StableHLO) and the optimized (HLO) program and the ops that
dominate them.

The model is a tiny YOLOX (`--widen 0.0625`: 16 neck channels, the student of
tests/test_yolox_fgd_train.py) by default: the step's graph (SimOTA, losses, optimizer, EMA,
the resize) is the full one, only the channel counts are small, so the compile time is close
to a real model's while the run stays short. `--fgd` compiles the FGD YOLOX variant's step
(student + a teacher twice as wide).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import time


def _op_counts(text: str, pattern: str) -> collections.Counter:
    return collections.Counter(re.findall(pattern, text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--widen", type=float, default=0.0625)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(range(480, 801, 32)))
    ap.add_argument("--cache", default="", help="persistent compilation cache dir ('' = off)")
    ap.add_argument("--mode", choices=("lazy", "parallel"), default="parallel")
    ap.add_argument("--threads", type=int, default=0, help="parallel mode (0: one per CPU)")
    ap.add_argument("--fgd", action="store_true", help="the FGD YOLOX variant's step")
    ap.add_argument("--hlo", action="store_true", help="op counts of the first size's program")
    args = ap.parse_args()

    import jax

    from fgd_jax import config as C
    from fgd_jax import parallel
    from fgd_jax.experiment import (
        Experiment,
        dummy_batch,
        init_train_state,
        run_optimizer,
    )
    from fgd_jax.parallel import enable_compilation_cache
    from fgd_jax.trainer import abstract_tree, sharded_train_steps

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
    mesh = parallel.make_mesh()
    rep = parallel.replicated(mesh)
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
    state, teacher = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), (state, teacher)
    )
    batch = abstract_tree(parallel.host_batch_to_global(batch, mesh))
    print(f"abstract state in {time.perf_counter() - t0:.1f} s")
    sizes = [(s, s) for s in args.sizes]
    steps = sharded_train_steps(
        exp, tx, schedule, mesh, mode="parallel", threads=1 if args.mode == "lazy" else args.threads
    )
    if args.hlo:
        t = time.perf_counter()
        lowered = steps.jitted(sizes[0]).lower(state, teacher, batch)
        t_lower = time.perf_counter() - t
        text = lowered.as_text()
        t = time.perf_counter()
        compiled = lowered.compile()
        t_compile = time.perf_counter() - t
        hlo = compiled.as_text()
        shlo = _op_counts(text, r"= (?:\"?)([a-z_]+\.[a-z_]+)")
        ops = _op_counts(hlo, r"= [a-z0-9\[\]{}, ]*?\b([a-z][a-z\-]*)\(")
        print(
            f"size {sizes[0]}: lowering {t_lower:.1f} s, compiling {t_compile:.1f} s; "
            f"StableHLO {sum(shlo.values())} ops, {len(text) / 1e6:.2f} MB; optimized HLO "
            f"{sum(ops.values())} ops, {hlo.count('fusion(')} fusions, "
            f"{ops.get('while', 0)} while loops"
        )
        print("StableHLO top ops:", ", ".join(f"{k} {v}" for k, v in shlo.most_common(12)))
        print("HLO top ops:", ", ".join(f"{k} {v}" for k, v in ops.most_common(12)))
        return
    c0 = time.process_time()
    record, line = steps.precompile(sizes, (state, teacher, batch))
    cpu = time.process_time() - c0
    print(line)
    print(
        f"total {record['total_wall_s']:.1f} s wall, {cpu:.1f} CPU-s for {len(sizes)} sizes "
        f"(mode {args.mode}, {record['threads']} threads, cache: {args.cache or 'off'}, "
        f"{'FGD' if args.fgd else 'baseline'} step, widen {args.widen}, batch {args.batch}; "
        f"load average after {os.getloadavg()[0]:.1f}, {jax.devices()[0].device_kind})"
    )


if __name__ == "__main__":
    main()
