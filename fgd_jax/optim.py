"""Optimizer and learning-rate schedule with mmdetection 2.x / PyTorch semantics.

The numbers follow what an mmdetection 2.11 run does, step for step:

* learning rate (mmcv 1.x `StepLrUpdaterHook` + warm-up of `LrUpdaterHook`): the regular
  rate is `lr * decay_factor ** (number of boundaries <= step)`; during the first
  `warmup_iters` iterations the warm-up factor multiplies the regular rate:
  `linear`: `1 - (1 - k / warmup_iters) * (1 - warmup_ratio)`, `constant`: `warmup_ratio`.
  `k` is the 0-based iteration index (mmcv's `runner.iter` in `before_train_iter`).
* `lr = base_lr * batch_size / reference_batch_size` (linear scaling rule; mmdetection's
  configs state the rate for 16 images).
* gradient clipping (`OptimizerHook(grad_clip=dict(max_norm=35, norm_type=2))`): PyTorch's
  `clip_grad_norm_` over the gradients of trainable parameters only, *before* the optimizer
  adds weight decay: `g *= min(1, max_norm / (||g||_2 + 1e-6))`.
* `torch.optim.SGD(momentum, weight_decay)`: `d = g + wd * p`, `buf = momentum * buf + d`
  (the first step `buf = d`, which is what a zero-initialised buffer gives), `p -= lr * buf`.
  Weight decay applies to every parameter (norm scales and biases too), as mmdetection's
  default. `bias_lr_mult` / `bias_decay_mult` (mmcv `paramwise_cfg`; FCOS uses 2.0 / 0.0)
  apply to the `bias` of convolutions and linear layers (a `bias` leaf next to a `kernel`),
  not to the bias of normalisation layers, as mmcv's `DefaultOptimizerConstructor`.
* `norm_decay_mult` (mmcv `paramwise_cfg`, YOLOX: 0) multiplies the decay of normalisation
  layers' `scale` and `bias` (a module whose leaves are exactly a 1-D `scale` and a `bias`:
  BatchNorm, GroupNorm, LayerNorm), as mmcv's `is_norm` branch, which wins over
  `bias_decay_mult` there too.
* frozen parameters (`trainable_mask` False) get exactly zero update: no decay, no momentum,
  and they do not count in the clipping norm (mmcv clips only parameters with a gradient).
* `train.lr_policy='yolox'`: mmdetection 2.x `YOLOXLrUpdaterHook` (`policy='YOLOX'`,
  `warmup='exp'`, `by_epoch=False`, `warmup_by_epoch=True`): see `make_yolox_lr_schedule`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any

_WARMUPS = ("linear", "constant", "none")
LR_POLICIES = ("step", "yolox")


# ------------------------------------------------------------------------------ schedule
def scaled_base_lr(train_cfg: ml_collections.ConfigDict) -> float:
    """`base_lr * batch_size / reference_batch_size` (the linear scaling rule)."""
    ref = train_cfg.get("reference_batch_size", train_cfg.batch_size)
    if ref <= 0:
        raise ValueError(f"train.reference_batch_size must be > 0, got {ref}")
    return float(train_cfg.base_lr) * float(train_cfg.batch_size) / float(ref)


def decay_boundaries(train_cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> list[int]:
    """Steps at which the rate is multiplied by `decay_factor`.

    `decay_steps` when `num_steps > 0`, else `decay_epochs * steps_per_epoch` (mmcv decays
    when the 0-based epoch index reaches a boundary, i.e. at the first step of that epoch).
    """
    if train_cfg.get("num_steps", -1) > 0:
        bounds = [int(s) for s in train_cfg.get("decay_steps", ())]
        key = "train.decay_steps"
    else:
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
        bounds = [int(e) * int(steps_per_epoch) for e in train_cfg.get("decay_epochs", ())]
        key = "train.decay_epochs"
    if any(b <= 0 for b in bounds) or bounds != sorted(bounds):
        raise ValueError(f"{key} must be positive and increasing, got {bounds}")
    return bounds


def make_lr_schedule(train_cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """mmdetection's step schedule with warm-up, as a jittable `optax.Schedule`.

    Args:
      train_cfg: the `train` section (`fgd_jax.config.schedule_2x`): `base_lr`, `batch_size`,
        `reference_batch_size`, `warmup` ('linear' | 'constant' | 'none'), `warmup_iters`,
        `warmup_ratio`, `decay_epochs` / `decay_steps`, `decay_factor`, `num_steps`.
      steps_per_epoch: iterations per epoch at the global batch size.
    Returns:
      `schedule(count) -> float32 scalar`, `count` the 0-based iteration index.
    `train.lr_policy='yolox'` returns `make_yolox_lr_schedule` instead.
    """
    policy = train_cfg.get("lr_policy", "step")
    if policy not in LR_POLICIES:
        raise ValueError(f"train.lr_policy must be one of {LR_POLICIES}, got {policy!r}")
    if policy == "yolox":
        return make_yolox_lr_schedule(train_cfg, steps_per_epoch)
    warmup = train_cfg.get("warmup", "none") or "none"
    if warmup not in _WARMUPS:
        raise ValueError(f"train.warmup must be one of {_WARMUPS}, got {warmup!r}")
    lr = scaled_base_lr(train_cfg)
    bounds = decay_boundaries(train_cfg, steps_per_epoch)
    factor = float(train_cfg.get("decay_factor", 0.1))
    warmup_iters = int(train_cfg.get("warmup_iters", 0))
    ratio = float(train_cfg.get("warmup_ratio", 1.0))
    if warmup != "none" and warmup_iters <= 0:
        raise ValueError(f"train.warmup={warmup!r} needs train.warmup_iters > 0")
    bounds_arr = jnp.asarray(bounds if bounds else [0], jnp.int32)

    def schedule(count):
        count = jnp.asarray(count, jnp.int32)
        if bounds:
            num_decays = jnp.sum(count >= bounds_arr)
        else:
            num_decays = jnp.zeros((), jnp.int32)
        regular = lr * jnp.power(jnp.float32(factor), num_decays.astype(jnp.float32))
        if warmup == "none":
            return regular.astype(jnp.float32)
        if warmup == "linear":
            # = 1 - (1 - k / W) * (1 - ratio), rearranged to avoid fp32 cancellation near k=0.
            warm = ratio + (1.0 - ratio) * (count.astype(jnp.float32) / warmup_iters)
        else:  # constant
            warm = jnp.float32(ratio)
        return jnp.where(count < warmup_iters, regular * warm, regular).astype(jnp.float32)

    return schedule


def total_steps(train_cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """Iterations of the run: `num_steps` when > 0, else `num_epochs * steps_per_epoch`."""
    if train_cfg.get("num_steps", -1) > 0:
        return int(train_cfg.num_steps)
    return int(train_cfg.num_epochs) * int(steps_per_epoch)


def make_yolox_lr_schedule(
    train_cfg: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
    """mmdetection 2.x `YOLOXLrUpdaterHook` as a jittable `optax.Schedule`.

    With `lr` the scaled base rate, `k` the 0-based iteration, `N` the run's iterations
    (`total_steps`), `W` the warm-up iterations (`warmup_epochs * steps_per_epoch` when
    `warmup_epochs > 0`, mmcv's `warmup_by_epoch`; else `warmup_iters`), `L =
    last_epochs * steps_per_epoch` and `lo = min_lr_ratio * lr`:
      k < W ('exp' warm-up, a square in fact):  `lr * warmup_ratio * ((k + 1) / W) ** 2`;
      else, p = k + 1:  `lo` if `p >= N - L`, otherwise the cosine
        `lo + 0.5 * (lr - lo) * (1 + cos(pi * (p - W) / (N - W - L)))`.
    mmdetection's YOLOX configs: `warmup_ratio=1`, 5 warm-up epochs, `num_last_epochs=15`,
    `min_lr_ratio=0.05`. Keys read: `warmup` ('exp' | 'none'), `warmup_epochs`,
    `warmup_iters`, `warmup_ratio`, `last_epochs`, `min_lr_ratio`, and those of
    `scaled_base_lr` / `total_steps`.
    """
    warmup = train_cfg.get("warmup", "exp") or "none"
    if warmup not in ("exp", "none"):
        raise ValueError(
            f"train.lr_policy='yolox' needs train.warmup 'exp' or 'none', got {warmup!r}"
        )
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
    lr = scaled_base_lr(train_cfg)
    n = total_steps(train_cfg, steps_per_epoch)
    w_epochs = float(train_cfg.get("warmup_epochs", 0))
    w = int(round(w_epochs * steps_per_epoch)) if w_epochs > 0 else int(train_cfg.warmup_iters)
    w = 0 if warmup == "none" else w
    last = int(round(float(train_cfg.get("last_epochs", 15)) * steps_per_epoch))
    ratio = float(train_cfg.get("warmup_ratio", 1.0))
    lo = lr * float(train_cfg.get("min_lr_ratio", 0.05))
    span = n - w - last
    if span <= 0:
        raise ValueError(
            f"train.lr_policy='yolox': {n} steps leave no cosine part after {w} warm-up and "
            f"{last} last steps"
        )

    def schedule(count):
        k = jnp.asarray(count, jnp.int32)
        p = (k + 1).astype(jnp.float32)
        cos = lo + 0.5 * (lr - lo) * (1.0 + jnp.cos(jnp.pi * (p - w) / span))
        regular = jnp.where(k + 1 >= n - last, jnp.float32(lo), cos)
        if w <= 0:
            return regular.astype(jnp.float32)
        warm = lr * ratio * jnp.square(p / w)
        return jnp.where(k < w, warm, regular).astype(jnp.float32)

    return schedule


# ------------------------------------------------------------------------------ param masks
def path_str(path: tuple) -> str:
    """`('params', 'backbone', 'conv1', 'kernel')` key path -> `'params/backbone/conv1/kernel'`."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def trainable_mask_from_patterns(params: PyTree, frozen: Iterable[str]) -> PyTree:
    """Bool tree: False for leaves whose `/`-joined path matches (re.search) any pattern.

    Example: `frozen=("^backbone/(conv1|bn1|layer1_)",)` freezes ResNet stage 1
    (`frozen_stages=1`).
    """
    regexes = [re.compile(p) for p in frozen]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(r.search(path_str(path)) for r in regexes), params
    )


def is_layer_bias(params: PyTree) -> PyTree:
    """Bool tree: True for a `bias` leaf whose module also has a `kernel` (conv / dense),
    False for norm-layer biases (whose module has a `scale`) and everything else."""

    def walk(node):
        if isinstance(node, Mapping):
            has_kernel = "kernel" in node
            return {
                k: (walk(v) if isinstance(v, Mapping) else (k == "bias" and has_kernel))
                for k, v in node.items()
            }
        return jax.tree.map(lambda _: False, node)

    out = walk(params)
    # Rebuild in the container type of `params` (dict / FrozenDict) so trees line up.
    return jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(out))


def is_norm_param(params: PyTree) -> PyTree:
    """Bool tree: True for the leaves of normalisation layers, i.e. of a module whose leaves
    are exactly a 1-D `scale` and a `bias` (BatchNorm, GroupNorm, LayerNorm; not a conv's
    bias, which has a `kernel` beside it, nor FCOS's scalar `Scale`)."""

    def walk(node):
        if isinstance(node, Mapping):
            is_norm = set(node) == {"scale", "bias"} and all(
                not isinstance(v, Mapping) and len(getattr(v, "shape", ())) == 1
                for v in node.values()
            )
            return {k: (walk(v) if isinstance(v, Mapping) else is_norm) for k, v in node.items()}
        return jax.tree.map(lambda _: False, node)

    out = walk(params)
    return jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(out))


def _check_mask(mask: PyTree, params: PyTree) -> PyTree:
    try:
        return jax.tree.map(lambda m, _: bool(m), mask, params)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "trainable_mask must be a tree of bools with the structure of params: "
            f"{jax.tree.structure(mask)} vs {jax.tree.structure(params)} ({e})"
        ) from e


# ------------------------------------------------------------------------- transformations
class _Empty(NamedTuple):
    pass


def zero_frozen(trainable: PyTree) -> optax.GradientTransformation:
    """Set updates of frozen leaves (`trainable` False) to exact zeros."""

    def update(updates, state, params=None):
        del params
        out = jax.tree.map(lambda u, t: u if t else jnp.zeros_like(u), updates, trainable)
        return out, state

    return optax.GradientTransformation(lambda _: _Empty(), update)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """PyTorch `clip_grad_norm_(norm_type=2)`: `g *= min(1, max_norm / (||g|| + 1e-6))`.

    (optax's `clip_by_global_norm` omits the 1e-6, which changes results at the 1e-8 level.)
    """

    def update(updates, state, params=None):
        del params
        norm = optax.global_norm(updates)
        coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
        return jax.tree.map(lambda u: (u * coef).astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda _: _Empty(), update)


def add_decayed_weights_tree(weight_decay: PyTree) -> optax.GradientTransformation:
    """`d = g + wd * p` with a per-leaf `wd` (a tree of Python floats like params)."""

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs params: call tx.update(grads, state, params)")
        out = jax.tree.map(
            lambda u, p, wd: u if wd == 0.0 else u + wd * p, updates, params, weight_decay
        )
        return out, state

    return optax.GradientTransformation(lambda _: _Empty(), update)


def scale_by_tree(multipliers: PyTree) -> optax.GradientTransformation:
    """Multiply each leaf by a per-leaf Python float (lr multipliers; 0 for frozen)."""

    def update(updates, state, params=None):
        del params
        out = jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, multipliers)
        return out, state

    return optax.GradientTransformation(lambda _: _Empty(), update)


def make_optimizer(
    train_cfg: ml_collections.ConfigDict,
    steps_per_epoch: int,
    params: PyTree,
    trainable_mask: PyTree | Callable[[str], bool] | None = None,
) -> optax.GradientTransformation:
    """SGD with momentum, mmdetection / PyTorch semantics (see the module docstring); or,
    with `train.optimizer='adamw'`, PyTorch AdamW (used for from-scratch toy runs).

    Args:
      train_cfg: the `train` section: `momentum`, `nesterov` (default False), `weight_decay`,
        `grad_clip_norm` (<= 0: off), `norm_decay_mult` (default 1),
        `bias_lr_mult`, `bias_decay_mult` and the schedule keys of `make_lr_schedule`.
      steps_per_epoch: iterations per epoch (global batch).
      params: the trainable variable tree (arrays or `jax.ShapeDtypeStruct`s); only its
        structure and leaf names are used.
      trainable_mask: bool tree like `params` (False = frozen), or `fn(path_str) -> bool`
        on paths such as `'backbone/layer1_0/conv1/kernel'`; None: everything trains.
    Returns:
      an `optax.GradientTransformation`; call `tx.update(grads, opt_state, params)`.
      The momentum buffer has the shape of `params` (zeros for frozen leaves).
    """
    if trainable_mask is None:
        trainable = jax.tree.map(lambda _: True, params)
    elif callable(trainable_mask):
        trainable = jax.tree_util.tree_map_with_path(
            lambda path, _: bool(trainable_mask(path_str(path))), params
        )
    else:
        trainable = _check_mask(trainable_mask, params)
    layer_bias = is_layer_bias(params)
    norm = is_norm_param(params)
    wd = float(train_cfg.get("weight_decay", 0.0))
    bias_lr = float(train_cfg.get("bias_lr_mult", 1.0))
    bias_wd = float(train_cfg.get("bias_decay_mult", 1.0))
    norm_wd = float(train_cfg.get("norm_decay_mult", 1.0))
    wd_tree = jax.tree.map(
        lambda t, b, n: 0.0 if not t else (wd * norm_wd if n else wd * bias_wd if b else wd),
        trainable,
        layer_bias,
        norm,
    )
    lr_tree = jax.tree.map(
        lambda t, b: 0.0 if not t else (bias_lr if b else 1.0), trainable, layer_bias
    )
    chain = [zero_frozen(trainable)]
    clip = float(train_cfg.get("grad_clip_norm", 0.0))
    if clip > 0:
        chain.append(clip_by_global_norm_torch(clip))
    kind = train_cfg.get("optimizer", "sgd")
    if kind == "sgd":
        chain.append(add_decayed_weights_tree(wd_tree))
        momentum = float(train_cfg.get("momentum", 0.0))
        if momentum > 0:
            # optax.trace: t = g + momentum * t, t0 = 0 -> identical to torch (dampening 0).
            # `train.nesterov` (torch `SGD(nesterov=True)`: d += momentum * buf, YOLOX's)
            nesterov = bool(train_cfg.get("nesterov", False))
            chain.append(optax.trace(decay=momentum, nesterov=nesterov))
    elif kind == "adamw":
        # torch.optim.AdamW: p -= lr * (adam_step + wd * p) (decoupled weight decay).
        b1, b2 = train_cfg.get("adam_betas", (0.9, 0.999))
        chain.append(optax.scale_by_adam(b1=b1, b2=b2, eps=train_cfg.get("adam_eps", 1e-8)))
        chain.append(add_decayed_weights_tree(wd_tree))
    else:
        raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {kind!r}")
    chain.append(scale_by_tree(lr_tree))
    chain.append(optax.scale_by_learning_rate(make_lr_schedule(train_cfg, steps_per_epoch)))
    return optax.chain(*chain)


def current_lr(opt_state: optax.OptState, schedule: optax.Schedule) -> jax.Array:
    """The rate the *next* update will use, read from the schedule's step counter."""
    counts = [
        s.count
        for s in jax.tree.leaves(
            opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)
        )
        if isinstance(s, optax.ScaleByScheduleState)
    ]
    if not counts:
        raise ValueError("opt_state has no ScaleByScheduleState (not from make_optimizer?)")
    return schedule(counts[0])


# ------------------------------------------------------------------------------------- EMA
def ema_momentum(count: jax.Array, momentum: float, total_iter: int = 2000) -> jax.Array:
    """mmdetection 2.x `ExpMomentumEMAHook`'s weight of the new value after iteration `count`
    (0-based, mmcv's `runner.iter` in `after_train_iter`):
    `(1 - momentum) * exp(-(1 + count) / total_iter) + momentum` (1 -> `momentum`)."""
    k = jnp.asarray(count, jnp.float32)
    return (1.0 - momentum) * jnp.exp(-(1.0 + k) / float(total_iter)) + momentum


def ema_update(ema: PyTree, new: PyTree, weight: jax.Array) -> PyTree:
    """`ema * (1 - weight) + new * weight` on floating leaves (torch `mul_(1 - m).add_(p,
    alpha=m)`); integer leaves (counters) take the new value, as mmdetection skips them."""

    def f(e, n):
        if not jnp.issubdtype(jnp.asarray(n).dtype, jnp.floating):
            return n
        w = jnp.asarray(weight, jnp.float32).astype(e.dtype)
        return e * (1 - w) + n * w

    return jax.tree.map(f, ema, new)
