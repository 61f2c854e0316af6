"""The FGD distiller: inheriting, loss composition, frozen teacher (tiny RetinaNet)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgd_jax.distill import distiller as D
from fgd_jax.experiment import Experiment, dummy_batch, init_train_state
from fgd_jax.models import build_detector

from ._tiny import make_teacher, tiny_config


@pytest.fixture(scope="module")
def fgd(tmp_path_factory):
    """The tiny FGD setup the tests below share, built once (a random R18 teacher, the
    inherited initial train state): (cfg, teacher variables, Experiment, TrainState). Tests
    that change the config copy it."""
    tmp = tmp_path_factory.mktemp("distiller")
    cfg = tiny_config(str(tmp / "data"), "fgd")
    tvars = make_teacher(cfg, str(tmp / "teacher"))
    exp = Experiment(cfg)
    state, _, _ = init_train_state(exp, dummy_batch(cfg.data), 10, teacher_vars=tvars)
    return cfg, tvars, exp, state


def _batch(cfg, n=2, seed=0):
    rng = np.random.default_rng(seed)
    b = dummy_batch(cfg.data, n)
    b["image"] = rng.normal(size=b["image"].shape).astype(np.float32)
    b["boxes"][:, :3] = np.array([[4, 6, 30, 40], [20, 20, 60, 50], [0, 0, 64, 64]], np.float32)
    b["labels"][:, :3] = [0, 1, 2]
    b["valid"][:, :3] = True
    b["valid"][1, 2] = False  # padding
    return {k: jnp.asarray(v) for k, v in b.items()}


def test_inherit_copies_exactly_the_non_backbone_leaves(fgd):
    cfg, tvars, exp, state = fgd  # state: init_train_state with the teacher's variables
    init_rng, _ = jax.random.split(jax.random.PRNGKey(cfg.seed))  # as init_train_state
    fresh = exp.init_variables(init_rng, dummy_batch(cfg.data))
    s_new, s_old, t = state.params["student"], fresh["params"]["student"], tvars["params"]
    for part in ("neck", "bbox_head"):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), s_new[part], t[part])
    # the backbone keeps the student's own init
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(a, b), s_new["backbone"], s_old["backbone"]
    )
    assert not np.array_equal(
        s_old["bbox_head"]["retina_cls"]["kernel"], t["bbox_head"]["retina_cls"]["kernel"]
    )


def test_inherit_mismatch_lists_every_problem():
    student = {"backbone": {"w": np.zeros(2)}, "neck": {"a": np.zeros((3,)), "b": np.zeros(1)}}
    teacher = {"backbone": {"w": np.zeros(5)}, "neck": {"a": np.zeros((4,)), "c": np.zeros(1)}}
    with pytest.raises(ValueError) as e:
        D.inherit_from_teacher(student, teacher)
    msg = str(e.value)
    assert "missing in teacher: neck/b" in msg and "only in teacher: neck/c" in msg
    assert "neck/a: student (3,) vs teacher (4,)" in msg


def test_fgd_weight_zero_reproduces_the_student_loss(fgd):
    """With every FGD weight 0 the distiller's losses, their total and its gradients w.r.t.
    the student's params equal the plain student detector's (reference: the detector alone).
    Each side is one compiled program returning its losses and their gradients."""
    cfg, tvars, _, state = fgd  # the initial state does not depend on the loss weights
    cfg = cfg.copy_and_resolve_references()
    for k in ("alpha_fgd", "beta_fgd", "gamma_fgd", "lambda_fgd"):
        cfg.distill[k] = 0.0
    exp = Experiment(cfg)
    batch = _batch(cfg)
    student = build_detector(cfg.model)
    sv = exp.student_variables(state.params, state.model_state)

    def fgd_total(p):
        ls, _ = exp.apply_losses(p, state.model_state, tvars, batch, jax.random.PRNGKey(0))
        return D.total_loss(ls), ls

    def plain_total(p):
        (ls, _), _ = student.apply(
            {**sv, "params": p}, batch, train=True, method="forward_train", mutable=["batch_stats"]
        )
        return D.total_loss(ls), ls

    (_, losses), g1 = jax.jit(jax.value_and_grad(fgd_total, has_aux=True))(state.params)
    (_, plain), g2 = jax.jit(jax.value_and_grad(plain_total, has_aux=True))(sv["params"])
    assert all(float(losses[f"loss_fgd_fpn_{i}"]) == 0.0 for i in range(5))
    assert float(losses["loss_fgd_fpn_0/fg"]) > 0  # the parts are still computed
    np.testing.assert_allclose(float(D.total_loss(losses)), float(D.total_loss(plain)), rtol=1e-6)
    # gradients w.r.t. the student's params equal the plain detector's too
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1["student"], g2
    )


def test_teacher_gets_no_gradient_and_fgd_params_do(fgd):
    cfg, tvars, exp, state = fgd
    batch = _batch(cfg)

    def total(p, t):
        ls, _ = exp.apply_losses(p, state.model_state, t, batch, jax.random.PRNGKey(0))
        return D.total_loss(ls)

    gp, gt = jax.jit(jax.grad(total, argnums=(0, 1)))(state.params, tvars)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(gt))
    g_fgd = gp["distill_losses"]["loss_fgd_fpn_0"]
    # The last GcBlock conv is zero-initialized (as the original), so at init only it (not
    # conv_mask_s behind it) receives a relation-loss gradient.
    assert float(jnp.abs(g_fgd["channel_add_conv_s_3"]["kernel"]).max()) > 0


def test_inherit_allow_missing_keeps_only_listed_leaves():
    student = {
        "neck": {"a": np.ones(2)},
        "bbox_head": {"c_0": {"conv": {"kernel": np.ones(1), "bias": np.full(1, 7.0)}}},
    }
    teacher = {
        "neck": {"a": np.full(2, 3.0)},
        "bbox_head": {"c_0": {"conv": {"kernel": np.full(1, 5.0)}}},
    }
    new, copied = D.inherit_from_teacher(
        student, teacher, allow_missing=[r"^bbox_head/c_\d+/conv/bias$"]
    )
    assert copied == ["bbox_head/c_0/conv/kernel", "neck/a"]
    assert float(new["bbox_head"]["c_0"]["conv"]["bias"][0]) == 7.0
    assert float(new["bbox_head"]["c_0"]["conv"]["kernel"][0]) == 5.0
    with pytest.raises(ValueError, match="missing in teacher: bbox_head/c_0/conv/bias"):
        D.inherit_from_teacher(student, teacher, allow_missing=[r"^neck/"])


def test_bfloat16_compute_matches_float32(fgd):
    """train.dtype='bfloat16': same params (float32), bf16 convolutions; every loss finite and
    within bf16 accuracy of the float32 run (reference: the float32 run)."""
    cfg, tvars, exp32, state = fgd
    cfg16 = cfg.copy_and_resolve_references()
    cfg16.train.dtype = "bfloat16"
    exp16 = Experiment(cfg16)
    batch = _batch(cfg)
    l32, _ = jax.jit(exp32.apply_losses)(
        state.params, state.model_state, tvars, batch, jax.random.PRNGKey(0)
    )
    l16, _ = jax.jit(exp16.apply_losses)(
        state.params, state.model_state, tvars, batch, jax.random.PRNGKey(0)
    )
    assert all(v.dtype == jnp.float32 for v in l16.values())
    for k in ("loss_cls", "loss_bbox", "loss_fgd_fpn_0", "loss_fgd_fpn_2"):
        assert np.isfinite(float(l16[k]))
        np.testing.assert_allclose(float(l16[k]), float(l32[k]), rtol=0.1, err_msg=k)
    # parameters stay float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


def test_bfloat16_train_step_keeps_float32_state(fgd):
    """A whole jitted train step with train.dtype='bfloat16' (its state initialized under
    bfloat16 too): params, BN statistics and the optimizer state stay float32 after the
    update, every loss is finite, params move."""
    from fgd_jax.experiment import make_train_step

    cfg, tvars, _, _ = fgd  # the teacher's variables do not depend on the compute dtype
    cfg = cfg.copy_and_resolve_references()
    cfg.train.dtype = "bfloat16"
    exp = Experiment(cfg)
    state, tx, schedule = init_train_state(exp, dummy_batch(cfg.data), 10, teacher_vars=tvars)
    before = jax.tree.map(np.asarray, state.params)
    new, metrics = jax.jit(make_train_step(exp, tx, schedule))(state, tvars, _batch(cfg))
    for name, tree in (
        ("params", new.params),
        ("model_state", new.model_state),
        ("opt_state", new.opt_state),
    ):
        dtypes = {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
        assert dtypes == {jnp.dtype(jnp.float32)}, (name, dtypes)
    assert all(np.isfinite(float(v)) for k, v in metrics.items() if k.startswith("loss"))
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before, new.params)
    assert any(jax.tree.leaves(moved))
