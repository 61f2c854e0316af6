"""One run's models, train state and pure step, and how to build, restore or load them.

The library under the commands (scenic's `train_utils`): `Experiment` (the student, the
teacher and the trained module of a config), `TrainState` (what a checkpoint holds), its init /
abstract / restore, the teacher's loading, the optimizer of a run, the jitted-to-be train step,
and `load_model` (one detector's variables from a workdir or an export). The loop that drives
them is `fgd_jax.trainer`; the commands (`python -m fgd_jax.train|eval|export|demo`) sit on top.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fgd_jax import checkpoint as ckpt_lib
from fgd_jax import optim, parallel
from fgd_jax.data import classes as data_classes
from fgd_jax.distill import distiller as distiller_lib
from fgd_jax.models import build_detector, init_module, trainable_mask, variable_shapes

log = logging.getLogger("fgd_jax.experiment")


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds. `params` is what the optimizer trains: the detector's
    params (baseline) or `{'student', 'distill_losses'}` (FGD); `model_state` holds the
    non-trained collections (BatchNorm statistics, fixed because of `norm_eval`). `ema`:
    None, or with `train.ema_momentum > 0` the exponential moving average of both,
    `{'params', 'model_state'}` (mmdetection's `ExpMomentumEMAHook`, see `ema_step`), which
    evaluation and export use."""

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: jax.Array
    ema: Any = None


def compute_dtype(cfg: ml_collections.ConfigDict) -> Any:
    """`train.dtype`: 'float32' (default) or 'bfloat16' (mixed precision: bf16 compute,
    float32 parameters, optimizer state, losses and FGD)."""
    name = cfg.get("train", {}).get("dtype", "float32") if "train" in cfg else "float32"
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"train.dtype must be 'float32' or 'bfloat16', got {name!r}")
    return None if name == "float32" else jnp.bfloat16


def is_distillation(cfg: ml_collections.ConfigDict) -> bool:
    """True when `cfg` is an FGD run (it has a `teacher` and a `distill` section)."""
    return "teacher" in cfg and cfg.get("teacher") is not None and "distill" in cfg


class Experiment:
    """The models and the pure functions of one run (no state; the loop lives in
    `fgd_jax.trainer.train`).

    Attributes: `student` (detector module), `teacher` (detector module or None),
    `distilling` (bool: an FGD run), `module` (what `apply_losses` runs: the FGD distiller, or
    the student for a baseline).
    """

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        dtype = compute_dtype(cfg)
        self.student = build_detector(cfg.model, dtype=dtype)
        self.distilling = is_distillation(cfg)
        if self.distilling:
            self.teacher = build_detector(cfg.teacher.model, dtype=dtype)
            self.module = distiller_lib.build_distiller(self.student, cfg.distill)
        else:
            self.teacher = None
            self.module = self.student

    # ------------------------------------------------------------------------- variables
    def init_variables(self, rng: jax.Array, batch: Mapping[str, np.ndarray]) -> dict:
        """Fresh variables of the trained module: the student's (its own init, so a baseline
        and an FGD run with the same seed start from the same student) and, when distilling,
        the FGD params under `params/distill_losses`."""
        images = jnp.asarray(batch["image"][:1])
        student_vars = init_module(self.student, rng, images, train=False)
        if not self.distilling:
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
        fgd_vars = init_module(
            distiller_lib.build_distill_losses(self.cfg.distill),
            fgd_rng,
            feats_s,
            feats_t,
            _slice_jnp(batch, 1),
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
        if self.distilling:
            feats_t = distiller_lib.teacher_features(
                self.teacher,
                teacher_vars,
                batch["image"],
                bn=self.cfg.distill.get("teacher_bn", "eval"),
            )
            # The student's image depends on the teacher's last map (times 0: the values are
            # unchanged; XLA does not fold a float product with 0): the teacher's forward then
            # runs to its end before the student's starts, so its transient activations never
            # coincide with the student's saved ones (issue 24).
            image = batch["image"]
            tail = feats_t[-1][:1, :1, :1, :1].astype(image.dtype)
            batch = dict(batch, image=image + jnp.zeros((), image.dtype) * tail[0])
            out = self.module.apply(variables, batch, feats_t, train=True, **kwargs)
        else:
            out = self.module.apply(variables, batch, train=True, method="forward_train", **kwargs)
        if self.updates_batch_stats:
            out, new_state = out
            model_state = dict(model_state, **new_state)
        losses = out if self.distilling else out[0]
        return dict(losses), model_state

    @property
    def uses_ema(self) -> bool:
        """True when the run keeps an EMA of the weights (`train.ema_momentum > 0`)."""
        return float(self.cfg.get("train", {}).get("ema_momentum", 0.0)) > 0

    def eval_variables(self, state: TrainState) -> dict:
        """The student variables evaluation and export use: the EMA's when the state has
        one (mmdetection swaps the EMA in before evaluating and saving), else the raw."""
        if state.ema is not None:
            return self.student_variables(state.ema["params"], state.ema["model_state"])
        return self.student_variables(state.params, state.model_state)

    def student_variables(self, params: Any, model_state: Mapping) -> dict:
        """The student's own variables (what eval and export use)."""
        if not self.distilling:
            return {"params": params, **model_state}
        out = {"params": params["student"]}
        for col, tree in model_state.items():
            out[col] = tree["student"]
        return out


def _slice_jnp(batch: Mapping[str, np.ndarray], n: int) -> dict:
    return {k: jnp.asarray(v[:n]) for k, v in batch.items()}


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


def check_batch_sizes(
    cfg: ml_collections.ConfigDict,
    device_count: int,
    process_count: int = 1,
    keys: tuple[str, ...] = ("train.batch_size", "eval.batch_size"),
) -> None:
    """Raise ValueError unless every global batch size of `cfg` named in `keys` (default: the
    training and the evaluation one) splits evenly over `device_count` devices (all processes
    together): each process then holds `batch_size / process_count` rows, a multiple of its
    local devices. The message names the key and the valid values."""
    step = int(device_count)
    for key in keys:
        section, name = key.split(".")
        if section not in cfg or name not in cfg[section]:
            continue
        size = cfg[section][name]
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % step:
            hosts = f" over {process_count} processes" if process_count > 1 else ""
            valid = ", ".join(str(step * k) for k in (1, 2, 3, 4))
            raise ValueError(
                f"{key}={size!r} must be a positive multiple of the {step} devices{hosts} "
                f"(valid values: {valid}, ...); set --config.{key}=N"
            )


def batch_input_size(
    train_cfg: ml_collections.ConfigDict,
    step: int,
    seed: int = 0,
    default_hw: tuple[int, int] | None = None,
) -> tuple[int, int] | None:
    """YOLOX's batch-level multi-scale (mmdetection 2.x `YOLOX._random_resize`): the (h, w)
    every image of step `step` (0-based) is resized to; None when multi-scale is off.
    `train.multiscale_sizes` (e.g. 480..800 step 32; empty: off) are square sizes; the first
    `train.multiscale_interval` (10) steps keep `default_hw` (the canvas; None: no resize,
    a step without `input_scale`), then every interval
    draws one size uniformly, a pure function of (seed, step // interval) so a resumed run
    draws the same. (mmdetection draws on rank 0 with Python's `random` and broadcasts.)"""
    sizes = tuple(int(s) for s in train_cfg.get("multiscale_sizes", ()))
    if not sizes:
        return None
    interval = int(train_cfg.get("multiscale_interval", 10))
    block = int(step) // interval
    if block == 0:
        return None if default_hw is None else (int(default_hw[0]), int(default_hw[1]))
    rng = np.random.default_rng([int(seed), 0x5C41E, block])
    s = sizes[int(rng.integers(len(sizes)))]
    return (s, s)


def batch_input_sizes_used(
    train_cfg: ml_collections.ConfigDict,
    start: int,
    stop: int,
    seed: int = 0,
    default_hw: tuple[int, int] | None = None,
) -> tuple[tuple[int, int] | None, ...]:
    """The distinct `batch_input_size` values of steps `start..stop-1` (0-based), in order of
    first use: the train steps a run (or a resumed run) will need compiled. Empty when
    multi-scale is off (`train.multiscale_sizes` empty) or the range is empty. Draws one size
    per interval and stops as soon as every size of `train.multiscale_sizes` (and the
    default) has come up, so a 300-epoch schedule costs a few hundred draws."""
    sizes = tuple(int(s) for s in train_cfg.get("multiscale_sizes", ()))
    if not sizes or stop <= start:
        return ()
    interval = int(train_cfg.get("multiscale_interval", 10))
    possible = {(s, s) for s in sizes}
    possible.add(None if default_hw is None else (int(default_hw[0]), int(default_hw[1])))
    seen: dict = {}
    first = int(start) // interval
    for block in range(first, (int(stop) - 1) // interval + 1):
        step = max(block * interval, int(start))
        seen.setdefault(batch_input_size(train_cfg, step, seed, default_hw), None)
        if len(seen) == len(possible):
            break
    return tuple(seen)


def resize_batch(batch: Mapping[str, jax.Array], size: tuple[int, int]) -> dict:
    """mmdetection 2.x `YOLOX._preprocess`: images bilinearly resized to `size` (h, w) (torch
    `F.interpolate(mode='bilinear', align_corners=False)`: no antialiasing), GT boxes scaled by
    (scale_x, scale_y), `input_scale` [B, 2] = (scale_y, scale_x) added for the FGD YOLOX
    variant; `img_shape` / `pad_shape` stay the pipeline's (mmdetection keeps img_metas).
    Scale 1 (the canvas size) returns the batch with `input_scale` 1 and nothing resized."""
    image = batch["image"]
    b, h, w, c = image.shape
    sy, sx = size[0] / h, size[1] / w
    out = dict(batch)
    if (int(size[0]), int(size[1])) != (h, w):
        out["image"] = jax.image.resize(
            image, (b, int(size[0]), int(size[1]), c), "linear", antialias=False
        ).astype(image.dtype)
        scale = jnp.asarray([sx, sy, sx, sy], batch["boxes"].dtype)
        out["boxes"] = batch["boxes"] * scale
        if "ignore_boxes" in batch:
            out["ignore_boxes"] = batch["ignore_boxes"] * scale
    out["input_scale"] = jnp.tile(jnp.asarray([[sy, sx]], jnp.float32), (b, 1))
    return out


def make_train_step(
    exp: Experiment,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    input_size: tuple[int, int] | None = None,
):
    """The step to jit: (state, teacher_vars, batch) -> (state, metrics).

    Arrays are global (`jax.Array` sharded over the mesh): the batch is split along 'data',
    params/optimizer state are replicated, and XLA inserts the gradient all-reduce. Loss
    normalizers (number of positives, batch size of FGD) are therefore global-batch values.
    `input_size` (h, w): YOLOX's batch multi-scale, the batch resized first (`resize_batch`;
    one compiled step per size: see `batch_input_size`).
    """

    def step_fn(state: TrainState, teacher_vars, batch):
        if input_size is not None:
            batch = resize_batch(batch, input_size)
        rng, step_rng = jax.random.split(state.rng)
        # Differentiate the trainable leaves only: frozen ones (frozen backbone stages, and
        # with them everything below the first trainable stage) get no gradient computation
        # at all, instead of gradients the optimizer then zeroes.
        leaves, treedef = jax.tree.flatten(state.params)
        trainable = treedef.flatten_up_to(trainable_params_mask(exp, state.params))

        def loss_fn(trained):
            it = iter(trained)
            full = [next(it) if t else x for x, t in zip(leaves, trainable, strict=True)]
            params = jax.tree.unflatten(treedef, full)
            losses, model_state = exp.apply_losses(
                params, state.model_state, teacher_vars, batch, step_rng
            )
            return distiller_lib.total_loss(losses), (losses, model_state)

        trained = [x for x, t in zip(leaves, trainable, strict=True) if t]
        (loss, (losses, model_state)), grads_t = jax.value_and_grad(loss_fn, has_aux=True)(trained)
        it = iter(grads_t)
        grads = jax.tree.unflatten(
            treedef,
            [next(it) if t else jnp.zeros_like(x) for x, t in zip(leaves, trainable, strict=True)],
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(losses)
        metrics["loss"] = loss
        # the norm mmdetection logs and clips: over the parameters that require grad
        metrics["grad_norm"] = optax.global_norm(grads_t)
        metrics["lr"] = schedule(state.step)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            rng=rng,
            ema=ema_step(exp.cfg.train, state.ema, state.step, params, model_state),
        )
        return new_state, metrics

    return step_fn


def ema_step(train_cfg, ema: Any, step: jax.Array, params: Any, model_state: Any) -> Any:
    """The EMA after iteration `step` (0-based) ended with `params` / `model_state`:
    mmdetection 2.x `ExpMomentumEMAHook(momentum=train.ema_momentum,
    total_iter=train.ema_total_iter)` (`skip_buffers=False`: BN statistics too). None stays
    None (no EMA)."""
    if ema is None:
        return None
    weight = optim.ema_momentum(
        step, float(train_cfg.ema_momentum), int(train_cfg.get("ema_total_iter", 2000))
    )
    new = {"params": params, "model_state": model_state}
    return optim.ema_update(ema, new, weight)


def trainable_params_mask(exp: Experiment, params: Any) -> Any:
    """Bool tree shaped like the TrainState's `params`: False for the frozen leaves (frozen
    backbone stages, `model.backbone.frozen_stages` / `norm_requires_grad`); FGD params train
    like the student's. Depends on the tree's paths only (works on tracers and shapes)."""
    student_params = params["student"] if exp.distilling else params
    mask = trainable_mask(student_params, exp.cfg.model)
    if exp.distilling:
        mask = dict(
            student=mask, distill_losses=jax.tree.map(lambda _: True, params["distill_losses"])
        )
    return mask


def run_optimizer(
    exp: Experiment, params: Any, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule) of the run: `optim.make_optimizer` (mmdetection SGD + schedule) over
    `params` with the run's trainable mask: frozen backbone stages and nothing else excluded
    (FGD params train like the student's)."""
    cfg = exp.cfg
    mask = trainable_params_mask(exp, params)
    schedule = optim.make_lr_schedule(cfg.train, steps_per_epoch)
    tx = optim.make_optimizer(cfg.train, steps_per_epoch, params, trainable_mask=mask)
    return tx, schedule


def init_train_state(
    exp: Experiment, batch: Mapping[str, np.ndarray], steps_per_epoch: int, teacher_vars=None
) -> tuple[TrainState, optax.GradientTransformation, optax.Schedule]:
    """A fresh TrainState (host arrays): student init, FGD params, ImageNet backbone weights
    (`train.backbone_init`; none with `train.from_scratch`), the inheriting strategy
    (`distill.init_student`), optimizer."""
    cfg = exp.cfg
    from_scratch = bool(cfg.train.get("from_scratch", False))
    if from_scratch and cfg.train.get("backbone_init"):
        raise ValueError(
            f"train.from_scratch=True (the recipe trains from random weights) contradicts "
            f"train.backbone_init={cfg.train.backbone_init!r}: set one of them"
        )
    rng = jax.random.PRNGKey(cfg.seed)
    init_rng, state_rng = jax.random.split(rng)
    variables = exp.init_variables(init_rng, batch)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    if (
        not cfg.train.get("backbone_init")
        and cfg.data.get("source", "coco") == "coco"
        and (not from_scratch)
    ):
        log.warning(
            "train.backbone_init is empty: the student's backbone starts from random weights; "
            "the paper's numbers need ImageNet weights (--config.train.backbone_init=r50.pth)"
        )
    if cfg.train.get("backbone_init"):
        from fgd_jax.convert import import_backbone_weights

        student_vars = exp.student_variables(params, model_state)
        bb = import_backbone_weights(cfg.train.backbone_init, cfg.model, student_vars)
        params = _set_backbone(params, bb, exp.distilling)
        model_state = _set_backbone_state(model_state, bb, exp.distilling)
    if exp.distilling and cfg.distill.init_student and teacher_vars is not None:
        student_params, copied = distiller_lib.inherit_from_teacher(
            params["student"],
            teacher_vars["params"],
            allow_missing=tuple(cfg.distill.get("inherit_allow_missing", ())),
        )
        params = dict(params, student=student_params)
        log.info("inheriting: copied %d teacher leaves (neck and heads)", len(copied))
    tx, schedule = run_optimizer(exp, params, steps_per_epoch)
    # mmdetection's EMA buffers start as copies of the weights the run starts from
    ema = None
    if exp.uses_ema:
        ema = jax.tree.map(jnp.array, {"params": params, "model_state": model_state})
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        rng=state_rng,
        ema=ema,
    )
    return state, tx, schedule


def _set_backbone(params, bb_vars, distilling: bool):
    if distilling:
        return dict(params, student=dict(params["student"], backbone=bb_vars["params"]["backbone"]))
    return dict(params, backbone=bb_vars["params"]["backbone"])


def _set_backbone_state(model_state, bb_vars, distilling: bool):
    if "batch_stats" not in bb_vars:
        return model_state
    stats = bb_vars["batch_stats"]["backbone"]
    bs = dict(model_state.get("batch_stats", {}))
    if distilling:
        bs["student"] = dict(bs["student"], backbone=stats)
    else:
        bs["backbone"] = stats
    return dict(model_state, batch_stats=bs)


def load_teacher(exp: Experiment) -> dict:
    """The teacher's variables from `teacher.ckpt`, checked against the teacher config."""
    variables, teacher_cfg = ckpt_lib.load_variables(
        exp.cfg.teacher.ckpt, expected=variable_shapes(exp.teacher)
    )
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


# ------------------------------------------------------------------- restoring and loading
def is_workdir(path: str | os.PathLike) -> bool:
    """True when `path` is a training workdir (it has a `checkpoints/` folder)."""
    return os.path.isdir(os.path.join(os.fspath(path), "checkpoints"))


def restore_train_state(
    workdir: str | os.PathLike, step: int | None = None
) -> tuple[TrainState, ml_collections.ConfigDict, int]:
    """The TrainState of a training run on the host (numpy leaves): `(state, cfg, step)`.

    `step` defaults to the latest complete checkpoint; `cfg` is the config stored with it.
    Raises FileNotFoundError / ValueError naming the workdir and the problem.
    """
    workdir = os.fspath(workdir)
    if not is_workdir(workdir):
        raise FileNotFoundError(f"{workdir}: not a training workdir (no checkpoints/ folder)")
    manager = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
    try:
        step = manager.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"{workdir}: the workdir holds no complete checkpoint yet")
        cfg = manager.restore_config(step)
        if cfg is None:
            raise ValueError(f"{workdir}: checkpoint {step} stores no config")
        target = abstract_train_state(cfg, parallel.make_mesh())
        state, _, _ = manager.restore(step, target=target, data_state=False)
    finally:
        manager.close()
    return parallel.fetch(state), cfg, int(step)


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


def load_model(
    path: str | os.PathLike, teacher: bool = False
) -> tuple[dict, ml_collections.ConfigDict]:
    """Variables (host arrays) and standalone config of one detector from any of: a training
    workdir (its latest checkpoint's student, or `teacher=True` for the teacher named in its
    config), a converted teacher, or an exported student.

    Raises FileNotFoundError / ValueError with the path and the problem.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint or workdir")
    if not is_workdir(path):
        variables, cfg = ckpt_lib.load_variables(path)
        if cfg is None:
            raise ValueError(f"{path}: the checkpoint stores no config; pass --config")
        if teacher:
            raise ValueError(f"{path} holds a single model; --teacher needs a training workdir")
        return variables, cfg
    if teacher:
        cfg = _stored_config(path)
        if "teacher" not in cfg:
            raise ValueError(f"{path}: a baseline run has no teacher")
        variables, _ = ckpt_lib.load_variables(cfg.teacher.ckpt)
        return variables, model_config(cfg, teacher=True)
    state, cfg, _ = restore_train_state(path)
    variables = Experiment(cfg).eval_variables(state)  # the EMA's when the run keeps one
    return variables, model_config(cfg)


def _stored_config(workdir: str) -> ml_collections.ConfigDict:
    """The config stored with the latest checkpoint of `workdir`."""
    with ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir}: the workdir holds no complete checkpoint yet")
        cfg = manager.restore_config(step)
    if cfg is None:
        raise ValueError(f"{workdir}: checkpoint {step} stores no config")
    return cfg


def check_variables(module, variables: Mapping, source: str) -> None:
    """Raise ValueError if `variables` do not fit `module` exactly (every leaf present, none
    extra, same shapes): Flax would otherwise ignore extra leaves, so a config naming a
    smaller model than the checkpoint evaluates a silently truncated model."""
    # every collection the model has, leaf by leaf; leaves of other collections are unexpected
    problems = ckpt_lib.tree_mismatches(variables, variable_shapes(module), limit=10)
    if problems:
        raise ValueError(
            f"{source} does not match the model of the config "
            f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )
