"""The train step differentiates trainable parameters only (issue 24): same result as the
former formulation (gradients of every leaf, the optimizer zeroing the frozen ones), and no
more compiled memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fgd_jax import experiment as E
from fgd_jax.distill import distiller as distiller_lib
from fgd_jax.models import init_module
from tests._tiny import tiny_config


def _reference_step(exp, tx, schedule):
    """The step as it was before issue 24: `value_and_grad` over every parameter, frozen
    ones included; grad_norm over the trainable leaves."""

    def step_fn(state, teacher_vars, batch):
        rng, step_rng = jax.random.split(state.rng)

        def loss_fn(params):
            losses, model_state = exp.apply_losses(
                params, state.model_state, teacher_vars, batch, step_rng
            )
            return distiller_lib.total_loss(losses), (losses, model_state)

        (loss, (losses, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        mask = E.trainable_params_mask(exp, state.params)
        trained = [
            g for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(mask), strict=True) if m
        ]
        metrics = dict(losses, loss=loss, lr=schedule(state.step))
        metrics["grad_norm"] = optax.global_norm(trained)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            rng=rng,
        )
        return new_state, metrics

    return step_fn


def _batch(cfg) -> dict:
    batch = E.dummy_batch(cfg.data, cfg.train.batch_size)
    rng = np.random.default_rng(0)
    b, h, w = batch["image"].shape[:3]
    batch["image"] = rng.normal(0, 1, batch["image"].shape).astype(np.float32)
    xy = rng.uniform(0, 0.5, (b, 3, 2)) * [w, h]
    wh = rng.uniform(0.2, 0.45, (b, 3, 2)) * [w, h]
    batch["boxes"][:, :3] = np.concatenate([xy, xy + wh], -1)
    batch["labels"][:, :3] = rng.integers(0, cfg.model.num_classes, (b, 3))
    batch["valid"][:, :3] = True
    return batch


@pytest.fixture(scope="module")
def fgd_setup(tmp_path_factory):
    # The paper's setting: frozen stem + stage 1, frozen BN statistics (norm_eval).
    cfg = tiny_config(
        str(tmp_path_factory.mktemp("data")),
        "fgd",
        **{"model.backbone.frozen_stages": 1, "model.backbone.norm_eval": True},
    )
    exp = E.Experiment(cfg)
    batch = _batch(cfg)
    teacher_vars = init_module(exp.teacher, jax.random.key(1), jnp.asarray(batch["image"][:1]))
    state, tx, schedule = E.init_train_state(exp, batch, 10, teacher_vars)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    # compiled once each, donating the state as the trainer does
    compiled = {
        name: jax.jit(fn(exp, tx, schedule), donate_argnums=(0,))
        .lower(state, teacher_vars, jbatch)
        .compile()
        for name, fn in (("new", E.make_train_step), ("old", _reference_step))
    }
    return exp, state, compiled, teacher_vars, jbatch


def test_step_result_equals_the_former_formulation(fgd_setup):
    exp, state, compiled, teacher_vars, batch = fgd_setup
    mask = jax.tree.leaves(E.trainable_params_mask(exp, state.params))
    assert not all(mask) and any(mask)  # frozen and trainable leaves both present
    copy = lambda: jax.tree.map(jnp.copy, state)  # noqa: E731 (the steps donate it)
    new, m = compiled["new"](copy(), teacher_vars, batch)
    ref, r = compiled["old"](copy(), teacher_vars, batch)
    assert float(m["loss"]) > 0
    np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-6)
    for k in r:
        if k.startswith("loss"):
            np.testing.assert_allclose(m[k], r[k], rtol=1e-6, err_msg=k)
    # grad_norm: over the trainable leaves (mmdetection's clip_grad_norm_ over requires_grad)
    np.testing.assert_allclose(m["grad_norm"], r["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b, t in zip(
        jax.tree.leaves(new.params), jax.tree.leaves(state.params), mask, strict=True
    ):
        if not t:
            np.testing.assert_array_equal(a, b)  # frozen leaves do not move
    for a, b in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(ref.opt_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_compiled_step_needs_no_more_memory_than_the_former_one(fgd_setup):
    compiled = fgd_setup[2]
    new, old = (compiled[k].memory_analysis() for k in ("new", "old"))
    assert new.temp_size_in_bytes <= old.temp_size_in_bytes
    assert new.temp_size_in_bytes + new.output_size_in_bytes - new.alias_size_in_bytes <= (
        old.temp_size_in_bytes + old.output_size_in_bytes - old.alias_size_in_bytes
    )


@pytest.mark.parametrize("depth", [18, 50])
def test_backbone_remat_gives_the_same_outputs_and_gradients(depth):
    from fgd_jax.models.resnet import ResNet

    x = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
    plain = ResNet(depth=depth, frozen_stages=1)
    remat = ResNet(depth=depth, frozen_stages=1, remat=True)
    variables = init_module(plain, jax.random.key(1), x)
    assert jax.tree.structure(init_module(remat, jax.random.key(1), x)) == jax.tree.structure(
        variables
    )

    def loss(params, module):
        outs = module.apply({**variables, "params": params}, x, train=True)
        return sum(jnp.sum(o**2) for o in outs)

    for a, b in zip(
        jax.tree.leaves(
            jax.jit(jax.value_and_grad(loss), static_argnums=1)(variables["params"], plain)
        ),
        jax.tree.leaves(
            jax.jit(jax.value_and_grad(loss), static_argnums=1)(variables["params"], remat)
        ),
        strict=True,
    ):
        # float32 sums in another order: within 1e-5 of each leaf's largest magnitude
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
