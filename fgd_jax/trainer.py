"""The training loop of `python -m fgd_jax.train`: `train(cfg, workdir)`.

The story, as big_vision tells it: build the mesh, build the data, build the models, init or
restore, loop (log, check for NaN, checkpoint, evaluate), save. The same loop runs on one CPU,
one GPU, 8 GPUs, or many hosts. The pieces it drives live in `fgd_jax.experiment`; evaluation
in `fgd_jax.evaluation`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import ml_collections
import numpy as np

from fgd_jax import checkpoint as ckpt_lib
from fgd_jax import config as config_lib
from fgd_jax import evaluation, logging_utils, parallel
from fgd_jax.data import classes as data_classes
from fgd_jax.data import pipeline
from fgd_jax.experiment import (
    Experiment,
    abstract_train_state,
    batch_input_size,
    batch_input_sizes_used,
    check_batch_sizes,
    dummy_batch,
    init_train_state,
    load_teacher,
    make_train_step,
    run_optimizer,
)

log = logging.getLogger("fgd_jax.trainer")


def abstract_tree(tree):
    """Every array leaf of `tree` -> `jax.ShapeDtypeStruct` with its shape, dtype, weak type
    and sharding (what `jit(...).lower` needs to compile for it; no buffer is held)."""

    def leaf(x):
        if isinstance(x, jax.Array | np.ndarray | np.generic):
            sharding = getattr(x, "sharding", None)
            weak = bool(getattr(getattr(x, "aval", None), "weak_type", False))
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding, weak_type=weak)
        return x

    return jax.tree.map(leaf, tree)


def precompile_threads(requested: int, num_jobs: int) -> int:
    """Threads for `precompile`: `requested` (> 0), else the CPUs this process may use;
    capped by `num_jobs`, at least 1."""
    if requested <= 0:
        try:
            requested = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            requested = os.cpu_count() or 1
    return max(1, min(int(requested), int(num_jobs)))


def precompile(
    jitted: Mapping[Hashable, Callable],
    args: Sequence,
    threads: int = 0,
) -> tuple[dict, dict, float]:
    """Ahead-of-time compile of several jitted functions for the same arguments.

    Each `jitted[key]` (a `jax.jit` wrapper) is traced and lowered for `args` (arrays or
    `jax.ShapeDtypeStruct`s; see `abstract_tree`) in this thread, one after another (tracing
    holds the GIL), and each lowered program is handed at once to a pool of `threads`
    threads (0: `precompile_threads`) that compile them (XLA's compile releases the GIL),
    reading and writing the persistent compilation cache as `jit` does.

    Returns `(compiled, seconds, wall)`: `{key: jax.stages.Compiled}` (call them instead of
    the jit wrappers: a wrapper compiles again at its first call), `{key: (lower_s,
    compile_s)}` (wall seconds of each phase; compiles overlap), and the wall seconds of the
    whole. An error of any compile is raised after the others have finished."""
    keys = list(jitted)
    n = precompile_threads(threads, len(keys))
    seconds: dict = {}
    t0 = time.perf_counter()

    def compile_one(key, lowered):
        t = time.perf_counter()
        out = lowered.compile()
        seconds[key] = (seconds[key][0], time.perf_counter() - t)
        return out

    futures = {}
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="precompile") as pool:
        for key in keys:
            t = time.perf_counter()
            lowered = jitted[key].lower(*args)
            seconds[key] = (time.perf_counter() - t, 0.0)
            futures[key] = pool.submit(compile_one, key, lowered)
    compiled = {key: futures[key].result() for key in keys}
    return compiled, seconds, time.perf_counter() - t0


class StepsBySize:
    """The jitted train step of each batch multi-scale size (`experiment.batch_input_size`:
    an (h, w) or None), made by `make_jitted(size)` (a `jax.jit` wrapper) and kept.

    `mode` (`train.precompile`, `config.PRECOMPILE_MODES`): 'lazy' compiles a size at its
    first call; 'parallel' compiles the sizes given to `precompile` ahead of time, in
    `threads` threads (0: one per CPU, capped by the number of sizes), and the step then
    calls those executables: no size compiles again at its first real use."""

    def __init__(
        self,
        make_jitted: Callable[[tuple[int, int] | None], Callable],
        mode: str = config_lib.PRECOMPILE_DEFAULT,
        threads: int = 0,
    ):
        if mode not in config_lib.PRECOMPILE_MODES:
            raise ValueError(
                f"train.precompile must be one of {config_lib.PRECOMPILE_MODES}, got {mode!r}"
            )
        self.make_jitted, self.mode, self.threads = make_jitted, mode, int(threads)
        self._jitted: dict = {}
        self._compiled: dict = {}

    def jitted(self, size: tuple[int, int] | None) -> Callable:
        """The jit wrapper of `size`'s step (made once)."""
        if size not in self._jitted:
            self._jitted[size] = self.make_jitted(size)
        return self._jitted[size]

    def __call__(self, size: tuple[int, int] | None, *args):
        """Run `size`'s step on `args`: its precompiled executable if any, else the jit
        wrapper (compiled at its first call, then cached by jit). Arguments unlike those an
        executable was compiled for (another dtype or shape: a changed batch) fall back to
        the jit wrapper, with a warning, instead of failing (checked before any buffer is
        donated)."""
        exe = self._compiled.get(size)
        if exe is not None:
            try:
                return exe(*args)
            except TypeError as e:
                log.warning("precompiled train step %s: %s; compiling it again", size, e)
                del self._compiled[size]
        return self.jitted(size)(*args)

    def is_compiled(self, size: tuple[int, int] | None) -> bool:
        """Whether `size`'s step was compiled ahead of time (`precompile`)."""
        return size in self._compiled

    def precompile(self, sizes: Sequence, args: Sequence) -> tuple[dict, str] | None:
        """'parallel' mode: compile the steps of `sizes` for `args` (the step's arguments or
        their `abstract_tree`) before any runs (`precompile`). Returns what to log: a record
        `{"total_wall_s", "threads", "<h>x<w>_lower_s", "<h>x<w>_compile_s"}` (seconds, wall)
        and a line saying the same; None in 'lazy' mode or when nothing is left to compile."""
        todo = [s for s in sizes if s not in self._compiled]
        if self.mode != "parallel" or not todo:
            return None
        n = precompile_threads(self.threads, len(todo))
        compiled, seconds, wall = precompile({s: self.jitted(s) for s in todo}, args, n)
        self._compiled.update(compiled)
        record = {"total_wall_s": wall, "threads": n}
        parts = []
        for size, (lo, co) in seconds.items():
            name = "x".join(map(str, size)) if size is not None else "unresized"
            record[f"{name}_lower_s"], record[f"{name}_compile_s"] = lo, co
            parts.append(f"{name} {lo:.1f}+{co:.1f}")
        line = (
            f"precompiled {len(todo)} train steps in {wall:.1f} s wall, {n} threads (per size, "
            f"seconds lowering + compiling or reading the cache: {', '.join(parts)})"
        )
        log.info(line)
        return record, line


def sharded_train_steps(
    exp: Experiment,
    tx,
    schedule,
    mesh,
    mode: str = config_lib.PRECOMPILE_DEFAULT,
    threads: int = 0,
) -> StepsBySize:
    """The run's train step per batch multi-scale size (`StepsBySize` with `mode` /
    `threads`), jitted with explicit shardings (pjit style): state and teacher replicated,
    the batch split on 'data'; the state is donated (updated in place)."""
    rep, shard = parallel.replicated(mesh), parallel.data_sharding(mesh)
    return StepsBySize(
        lambda size: jax.jit(
            make_train_step(exp, tx, schedule, input_size=size),
            in_shardings=(rep, rep, shard),
            out_shardings=(rep, rep),
            donate_argnums=(0,),
        ),
        mode=mode,
        threads=threads,
    )


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or resume) training in `workdir`; returns the final eval metrics.

    Raises ValueError (a batch size that does not split over the devices, a bad config),
    FloatingPointError (a NaN / inf loss), `Preempted` (stopped by SIGUSR1 / SIGTERM after
    saving a checkpoint)."""
    # every batch size, before anything is written or compiled (eval's too: its first use
    # comes after a checkpoint)
    check_batch_sizes(cfg, jax.device_count(), jax.process_count())
    parallel.enable_compilation_cache()
    mesh = parallel.make_mesh()
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    tc = cfg.train
    global_batch = tc.batch_size

    # ---- data
    loader = pipeline.build_train_loader(
        cfg.data,
        global_batch_size=global_batch,
        seed=cfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_classes=cfg.model.num_classes,
    )
    cfg = data_classes.with_classes(cfg, loader.records)  # saved with every checkpoint
    steps_per_epoch = loader.steps_per_epoch
    total_steps = tc.num_steps if tc.num_steps > 0 else tc.num_epochs * steps_per_epoch

    # ---- models and state
    exp = Experiment(cfg)
    batch0 = dummy_batch(cfg.data)
    teacher_vars = load_teacher(exp) if exp.distilling else None
    manager = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"), keep=tc.keep_ckpts)
    start = manager.latest_step()
    if start is None:
        state, tx, schedule = init_train_state(exp, batch0, steps_per_epoch, teacher_vars)
        state = parallel.replicate(state, mesh)
    else:
        target = abstract_train_state(cfg, mesh)
        state, data_state, _ = manager.restore(start, target=target)
        tx, schedule = run_optimizer(exp, state.params, steps_per_epoch)
        if data_state is not None:
            loader.set_state(data_state)
        if is_main:
            print(f"resumed from step {start} in {workdir}")
    if teacher_vars is not None:
        teacher_vars = parallel.replicate(teacher_vars, mesh)

    # YOLOX's batch multi-scale (train.multiscale_sizes): one compiled step per size, all
    # the run will use compiled ahead of time in parallel before the first step
    # (train.precompile='parallel'), or each at its first use ('lazy'); either way read from
    # the persistent compilation cache on restarts
    if tc.get("multiscale_sizes", ()) and len(cfg.data.canvases) != 1:
        raise ValueError("train.multiscale_sizes resizes one canvas: give data.canvases one")
    steps = sharded_train_steps(
        exp,
        tx,
        schedule,
        mesh,
        mode=tc.get("precompile", config_lib.PRECOMPILE_DEFAULT),
        threads=tc.get("precompile_threads", 0),
    )

    step = int(parallel.fetch(state.step))
    logger = logging_utils.MetricLogger(
        workdir, total_steps=total_steps, is_main=is_main, initial_step=step
    )
    eval_every = tc.eval_every if tc.eval_every != -1 else steps_per_epoch
    pending = None
    t_last, step_last, paused = time.time(), step, 0.0
    stop = _StopRequest()
    canvas = tuple(cfg.data.canvases[0])
    sizes_ahead = batch_input_sizes_used(tc, step, total_steps, cfg.seed, canvas)
    first_batch = None
    try:
        if steps.mode == "parallel" and sizes_ahead:
            # the first batch gives the shapes, dtypes and shardings every step gets
            first_batch = parallel.host_batch_to_global(next(loader), mesh)
            done = steps.precompile(sizes_ahead, abstract_tree((state, teacher_vars, first_batch)))
            if done is not None:
                logger.write(done[1])
                logger.log(step, done[0], prefix="compile/")
                paused += done[0]["total_wall_s"]  # not in the first images_per_s
        while step < total_steps:
            if first_batch is not None:
                batch, first_batch = first_batch, None
            else:
                batch = parallel.host_batch_to_global(next(loader), mesh)
            size = batch_input_size(tc, step, cfg.seed, canvas)
            state, metrics = steps(size, state, teacher_vars, batch)
            step += 1
            # Check the previous step's losses while this one runs (keeps the device busy).
            if pending is not None:
                check_finite_metrics(*pending)
            pending = (step, metrics)
            logger.update(step)
            at_log = step % tc.log_every == 0 or step == total_steps
            if at_log:
                check_finite_metrics(*pending)
                pending = None
                host = parallel.fetch(metrics)
                now = time.time()
                # training throughput: checkpoint and eval time excluded
                busy = max(now - t_last - paused, 1e-9)
                host["images_per_s"] = global_batch * (step - step_last) / busy
                host["step_time_s"] = busy / max(step - step_last, 1)
                skipped = loader.num_skipped
                if skipped:  # unreadable images replaced (data.on_bad_image='skip')
                    host["data_skipped_images"] = skipped
                t_last, step_last, paused = now, step, 0.0
                logger.log(step, host)
            stopping = at_log and stop.agreed()
            if step % tc.ckpt_every == 0 or step == total_steps or stopping:
                if pending is not None:
                    check_finite_metrics(*pending)
                    pending = None
                t0 = time.time()
                manager.save(step, state, data_state=loader.get_state(), config=cfg)
                paused += time.time() - t0
            if stopping:
                manager.wait()
                logger.write(
                    f"stopped by {stop.signal_name} at step {step}; checkpoint saved. "
                    "Run the same command to resume."
                )
                raise Preempted(step)
            if eval_every > 0 and step % eval_every == 0 and step != total_steps:
                t0 = time.time()
                m = evaluation.evaluate_variables(exp.student, exp.eval_variables(state), cfg, mesh)
                logger.log(step, {k: v for k, v in m.items() if _is_num(v)}, prefix="eval/")
                logger.write(f"step {step}: bbox AP {100 * m['AP']:.1f}")
                paused += time.time() - t0
    except BaseException:
        logger.close()
        raise
    finally:
        # Let pending async checkpoint writes finish whatever ended the loop (a NaN error
        # included: the last good checkpoint must be complete on disk). The final eval below
        # builds its own loader.
        stop.restore()
        manager.close()
        loader.close()
    final = evaluation.evaluate_variables(
        exp.student,
        exp.eval_variables(state),  # the EMA's when the run keeps one (train.ema_momentum)
        cfg,
        mesh,
        out_dir=os.path.join(workdir, "eval"),
    )
    logger.log(step, {k: v for k, v in final.items() if _is_num(v)}, prefix="eval/")
    logger.close()
    if is_main:
        print(evaluation.format_table({os.path.basename(workdir.rstrip("/")): final}))
    return final


def _is_num(v) -> bool:
    return isinstance(v, int | float)


def check_finite_metrics(step: int, metrics: Mapping) -> None:
    """Every loss and the gradient norm must be finite: an inf gradient with finite losses
    would turn the clipped update (35 / inf * inf) into NaN params, saved at the next
    checkpoint."""
    watched = {k: v for k, v in metrics.items() if k.startswith("loss") or k == "grad_norm"}
    logging_utils.check_finite(parallel.fetch(watched), step)


class Preempted(Exception):  # noqa: N818 - a stop request, not an error
    """Training stopped on SIGUSR1 / SIGTERM after saving a checkpoint at `step`."""

    def __init__(self, step: int):
        super().__init__(f"stopped at step {step} after saving a checkpoint")
        self.step = step


class _StopRequest:
    """SIGUSR1 (SLURM's `--signal=USR1@T` warning before the time limit) and SIGTERM
    (preemption) set a flag; the loop checks it at log steps, where every process agrees
    (`agreed`: any process flagged) so all of them save the same step and stop."""

    SIGNALS = ("SIGUSR1", "SIGTERM")

    def __init__(self) -> None:
        self.signal_name = ""
        self._old = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        flag = np.array([bool(self.signal_name)])
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = multihost_utils.process_allgather(flag)
            if flag.any() and not self.signal_name:
                self.signal_name = "a signal to another process"
        return bool(flag.any())

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
