"""Train a detector, alone (`*_baseline` configs) or as an FGD student.

    python -m fgd_jax.train --config configs/retina_r101_r50.py --workdir workdirs/run1 \
        [--config.train.batch_size=8 ...]

The story, as big_vision tells it: build the mesh, build the data, build the models, init or
restore, loop (log, check for NaN, checkpoint, evaluate), save. The same command runs on one
CPU, one GPU, 8 GPUs, or many hosts (launched once per host; see README).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fgd_jax import checkpoint as ckpt_lib
from fgd_jax import evaluation, logging_utils, optim, parallel
from fgd_jax.data import classes as data_classes
from fgd_jax.data import pipeline
from fgd_jax.distill import distiller as distill_lib
from fgd_jax.models import build_detector, trainable_mask

log = logging.getLogger("fgd_jax.train")


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds. `params` is what the optimizer trains: the detector's
    params (baseline) or `{'student', 'distill_losses'}` (FGD); `model_state` holds the
    non-trained collections (BatchNorm statistics, fixed because of `norm_eval`)."""

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: jax.Array


def enable_compilation_cache(path: str | None = None) -> None:
    """Persistent XLA compilation cache (on by default), so a restarted run does not pay
    compilation again. `FGD_JAX_COMPILATION_CACHE` overrides the directory; '' disables."""
    path = os.environ.get("FGD_JAX_COMPILATION_CACHE", path) if path is None else path
    if path is None:
        path = os.path.expanduser("~/.cache/fgd_jax/xla")
    if not path:
        return
    try:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except Exception as e:  # noqa: BLE001 - a cache problem must never stop training
        log.warning("compilation cache disabled: %s", e)


def compute_dtype(cfg: ml_collections.ConfigDict) -> Any:
    """`train.dtype`: 'float32' (default) or 'bfloat16' (mixed precision: bf16 compute,
    float32 parameters, optimizer state, losses and FGD)."""
    name = cfg.get("train", {}).get("dtype", "float32") if "train" in cfg else "float32"
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"train.dtype must be 'float32' or 'bfloat16', got {name!r}")
    return None if name == "float32" else jnp.bfloat16


class Experiment:
    """The models and the pure functions of one run (no state; the loop lives in `train`)."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        dtype = compute_dtype(cfg)
        self.student = build_detector(cfg.model, dtype=dtype)
        self.distill = "teacher" in cfg and cfg.get("teacher") is not None and "distill" in cfg
        if self.distill:
            self.teacher = build_detector(cfg.teacher.model, dtype=dtype)
            self.module = distill_lib.build_distiller(self.student, cfg.distill)
        else:
            self.teacher = None
            self.module = self.student

    # ------------------------------------------------------------------------- variables
    def init_variables(self, rng: jax.Array, batch: Mapping[str, np.ndarray]) -> dict:
        """Fresh variables of the trained module: the student's (its own init, so a baseline
        and an FGD run with the same seed start from the same student) and, when distilling,
        the FGD params under `params/distill_losses`."""
        images = jnp.asarray(batch["image"][:1])
        # jitted: eager init of a detector runs op by op and is several times slower
        student_vars = jax.jit(functools.partial(self.student.init, train=False))(rng, images)
        if not self.distill:
            return student_vars
        feats = jax.eval_shape(
            lambda v, x: self.student.apply(v, x, train=False, method="extract_feat"),
            student_vars,
            images,
        )
        feats_s = tuple(jnp.zeros(f.shape, f.dtype) for f in feats)
        tc = self.cfg.distill.teacher_channels
        feats_t = tuple(jnp.zeros(f.shape[:-1] + (tc,), f.dtype) for f in feats)
        fgd_rng = jax.random.fold_in(rng, 1)
        fgd_vars = jax.jit(distill_lib.build_distill_losses(self.cfg.distill).init)(
            fgd_rng, feats_s, feats_t, _slice_jnp(batch, 1)
        )
        out = {"params": {"student": student_vars["params"], "distill_losses": fgd_vars["params"]}}
        for col, tree in student_vars.items():
            if col != "params":
                out[col] = {"student": tree}
        return out

    @property
    def updates_batch_stats(self) -> bool:
        """True when the student's BN trains on batch statistics (`norm_eval=False`, e.g.
        from-scratch training). Under jit over the mesh the statistics are those of the
        global batch (SyncBN semantics)."""
        return not self.cfg.model.backbone.get("norm_eval", True)

    def apply_losses(
        self,
        params: Any,
        model_state: Mapping,
        teacher_vars: Mapping | None,
        batch: Mapping[str, jax.Array],
        rng: jax.Array,
    ) -> tuple[dict[str, jax.Array], Mapping]:
        """Every loss of one training step (scalars) and the new model state (BN statistics,
        unchanged unless `updates_batch_stats`)."""
        variables = {"params": params, **model_state}
        kwargs = dict(rngs={"sampler": rng})
        if self.updates_batch_stats:
            kwargs["mutable"] = ["batch_stats"]
        if self.distill:
            feats_t = distill_lib.teacher_features(self.teacher, teacher_vars, batch["image"])
            out = self.module.apply(variables, batch, feats_t, train=True, **kwargs)
        else:
            out = self.module.apply(variables, batch, train=True, method="forward_train", **kwargs)
        if self.updates_batch_stats:
            out, new_state = out
            model_state = dict(model_state, **new_state)
        losses = out if self.distill else out[0]
        return dict(losses), model_state

    def student_variables(self, params: Any, model_state: Mapping) -> dict:
        """The student's own variables (what eval and export use)."""
        if not self.distill:
            return {"params": params, **model_state}
        out = {"params": params["student"]}
        for col, tree in model_state.items():
            out[col] = tree["student"]
        return out


def _slice_jnp(batch: Mapping[str, np.ndarray], n: int) -> dict:
    return {k: jnp.asarray(v[:n]) for k, v in batch.items()}


def make_train_step(exp: Experiment, tx: optax.GradientTransformation, schedule: optax.Schedule):
    """The step to jit: (state, teacher_vars, batch) -> (state, metrics).

    Arrays are global (`jax.Array` sharded over the mesh): the batch is split along 'data',
    params/optimizer state are replicated, and XLA inserts the gradient all-reduce. Loss
    normalizers (number of positives, batch size of FGD) are therefore global-batch values.
    """

    def step_fn(state: TrainState, teacher_vars, batch):
        rng, step_rng = jax.random.split(state.rng)

        def loss_fn(params):
            losses, model_state = exp.apply_losses(
                params, state.model_state, teacher_vars, batch, step_rng
            )
            return distill_lib.total_loss(losses), (losses, model_state)

        (loss, (losses, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(losses)
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["lr"] = schedule(state.step)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            rng=rng,
        )
        return new_state, metrics

    return step_fn


def dummy_batch(data_cfg: ml_collections.ConfigDict, batch_size: int = 1) -> dict:
    """A zero batch with the shapes of the data pipeline's (first canvas), for shape-only
    initialisation (`jax.eval_shape`) without reading any data."""
    h, w = data_cfg.canvases[0]
    g, i = data_cfg.max_boxes, data_cfg.max_ignore
    return dict(
        image=np.zeros((batch_size, h, w, 3), np.float32),
        boxes=np.zeros((batch_size, g, 4), np.float32),
        labels=np.full((batch_size, g), -1, np.int32),
        valid=np.zeros((batch_size, g), bool),
        ignore_boxes=np.zeros((batch_size, i, 4), np.float32),
        ignore_valid=np.zeros((batch_size, i), bool),
        img_shape=np.tile(np.array([[h, w]], np.int32), (batch_size, 1)),
        pad_shape=np.tile(np.array([[h, w]], np.int32), (batch_size, 1)),
        scale_factor=np.ones((batch_size, 4), np.float32),
        orig_shape=np.tile(np.array([[h, w]], np.int32), (batch_size, 1)),
        flip=np.zeros((batch_size,), bool),
        image_id=np.zeros((batch_size,), np.int32),
    )


def make_optimizer(exp: Experiment, params: Any, steps_per_epoch: int):
    """(tx, schedule) of the run: mmdetection SGD + schedule; frozen backbone stages and
    nothing else excluded (FGD params train like the student's)."""
    cfg = exp.cfg
    student_params = params["student"] if exp.distill else params
    mask = trainable_mask(student_params, cfg.model)
    if exp.distill:
        mask = dict(
            student=mask, distill_losses=jax.tree.map(lambda _: True, params["distill_losses"])
        )
    schedule = optim.make_lr_schedule(cfg.train, steps_per_epoch)
    tx = optim.make_optimizer(cfg.train, steps_per_epoch, params, trainable_mask=mask)
    return tx, schedule


def init_train_state(
    exp: Experiment, batch: Mapping[str, np.ndarray], steps_per_epoch: int, teacher_vars=None
) -> tuple[TrainState, optax.GradientTransformation, optax.Schedule]:
    """A fresh TrainState (host arrays): student init, FGD params, ImageNet backbone weights
    (`train.backbone_init`), the inheriting strategy (`distill.init_student`), optimizer."""
    cfg = exp.cfg
    rng = jax.random.PRNGKey(cfg.seed)
    init_rng, state_rng = jax.random.split(rng)
    variables = exp.init_variables(init_rng, batch)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    if not cfg.train.get("backbone_init") and cfg.data.get("source", "coco") == "coco":
        log.warning(
            "train.backbone_init is empty: the student's backbone starts from random weights; "
            "the paper's numbers need ImageNet weights (--config.train.backbone_init=r50.pth)"
        )
    if cfg.train.get("backbone_init"):
        from fgd_jax.convert import import_backbone_weights

        student_vars = exp.student_variables(params, model_state)
        bb = import_backbone_weights(cfg.train.backbone_init, cfg.model, student_vars)
        params = _set_backbone(params, bb, exp.distill)
        model_state = _set_backbone_state(model_state, bb, exp.distill)
    if exp.distill and cfg.distill.init_student and teacher_vars is not None:
        student_params, copied = distill_lib.inherit_from_teacher(
            params["student"],
            teacher_vars["params"],
            allow_missing=tuple(cfg.distill.get("inherit_allow_missing", ())),
        )
        params = dict(params, student=student_params)
        log.info("inheriting: copied %d teacher leaves (neck and heads)", len(copied))
    tx, schedule = make_optimizer(exp, params, steps_per_epoch)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        rng=state_rng,
    )
    return state, tx, schedule


def load_teacher(exp: Experiment, batch: Mapping[str, np.ndarray]) -> dict:
    """The teacher's variables from `teacher.ckpt`, checked against the teacher config."""
    expected = jax.eval_shape(
        lambda: exp.teacher.init(jax.random.PRNGKey(0), jnp.asarray(batch["image"][:1]))
    )
    variables, teacher_cfg = ckpt_lib.load_variables(exp.cfg.teacher.ckpt, expected=expected)
    data_classes.check_model_classes(teacher_cfg, exp.cfg, f"the teacher {exp.cfg.teacher.ckpt}")
    return variables


def abstract_train_state(cfg: ml_collections.ConfigDict, mesh) -> TrainState:
    """Shapes/dtypes/shardings of a run's TrainState (replicated on `mesh`), for restoring a
    checkpoint on any device count without building real arrays."""
    exp = Experiment(cfg)
    batch = dummy_batch(cfg.data)
    # Step count only shapes schedule constants, never array shapes.
    state = jax.eval_shape(lambda: init_train_state(exp, batch, 1)[0])
    return ckpt_lib.abstract_tree(state, parallel.replicated(mesh))


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or resume) training in `workdir`; returns the final eval metrics."""
    from fgd_jax import eval as eval_lib

    enable_compilation_cache()
    mesh = parallel.make_mesh()
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    tc = cfg.train
    global_batch = tc.batch_size
    if global_batch % jax.device_count():
        raise ValueError(
            f"train.batch_size={global_batch} must be divisible by the {jax.device_count()} devices"
        )

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
    teacher_vars = load_teacher(exp, batch0) if exp.distill else None
    manager = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"), keep=tc.keep_ckpts)
    start = manager.latest_step()
    if start is None:
        state, tx, schedule = init_train_state(exp, batch0, steps_per_epoch, teacher_vars)
        state = parallel.replicate(state, mesh)
    else:
        target = abstract_train_state(cfg, mesh)
        state, data_state, _ = manager.restore(start, target=target)
        tx, schedule = make_optimizer(exp, state.params, steps_per_epoch)
        if data_state is not None:
            loader.set_state(data_state)
        if is_main:
            print(f"resumed from step {start} in {workdir}")
    if teacher_vars is not None:
        teacher_vars = parallel.replicate(teacher_vars, mesh)

    # Explicit shardings (pjit style): state and teacher replicated, the batch split on 'data';
    # the state is donated (updated in place).
    rep, shard = parallel.replicated(mesh), parallel.data_sharding(mesh)
    train_step = jax.jit(
        make_train_step(exp, tx, schedule),
        in_shardings=(rep, rep, shard),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )
    step = int(parallel.fetch(state.step))
    logger = logging_utils.MetricLogger(
        workdir, total_steps=total_steps, is_main=is_main, initial_step=step
    )
    eval_every = tc.eval_every if tc.eval_every != -1 else steps_per_epoch
    pending = None
    t_last, step_last, paused = time.time(), step, 0.0
    stop = _StopRequest()
    try:
        while step < total_steps:
            batch = parallel.host_batch_to_global(next(loader), mesh)
            state, metrics = train_step(state, teacher_vars, batch)
            step += 1
            # Check the previous step's losses while this one runs (keeps the device busy).
            if pending is not None:
                _check(*pending)
            pending = (step, metrics)
            logger.update(step)
            at_log = step % tc.log_every == 0 or step == total_steps
            if at_log:
                _check(*pending)
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
                    _check(*pending)
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
                m = eval_lib.evaluate_variables(
                    exp.student, exp.student_variables(state.params, state.model_state), cfg, mesh
                )
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
    final = eval_lib.evaluate_variables(
        exp.student,
        exp.student_variables(state.params, state.model_state),
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


def _check(step: int, metrics: Mapping) -> None:
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


def _set_backbone(params, bb_vars, distill: bool):
    if distill:
        return dict(params, student=dict(params["student"], backbone=bb_vars["params"]["backbone"]))
    return dict(params, backbone=bb_vars["params"]["backbone"])


def _set_backbone_state(model_state, bb_vars, distill: bool):
    if "batch_stats" not in bb_vars:
        return model_state
    stats = bb_vars["batch_stats"]["backbone"]
    bs = dict(model_state.get("batch_stats", {}))
    if distill:
        bs["student"] = dict(bs["student"], backbone=stats)
    else:
        bs["backbone"] = stats
    return dict(model_state, batch_stats=bs)


def main(argv: list[str] | None = None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "Where checkpoints, logs and eval results go.")
    config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config()).")
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "Multi-host without SLURM/Open MPI: host:port of process 0 (or env FGD_COORDINATOR).",
    )
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (hosts).")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
    flags.mark_flags_as_required(["config"])

    def _run(_):
        f = flags.FLAGS
        parallel.maybe_initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
        cfg = flags.FLAGS.config
        workdir = flags.FLAGS.workdir or os.path.join(
            "workdirs", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
        )
        try:
            train(cfg, workdir)
        except Preempted as e:
            print(f"{e} in {workdir}; run the same command to resume")
            sys.exit(0)
        except (FileNotFoundError, ValueError, FloatingPointError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        print(f"outputs written to {workdir}")

    app.run(_run, argv=argv or sys.argv)


if __name__ == "__main__":
    main()
