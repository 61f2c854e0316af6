"""Detectors train under FGD on the synthetic dataset (tiny models) through the real trainer:
every loss part decreases (reference: the run's own first steps). GFL and RepPoints here; FCOS in
`test_fcos.py::test_fgd_student_variant_trains_with_sgd_and_every_loss_part_falls`; the
two-stage detectors in `test_mask_rcnn.py::test_fgd_training_decreases_every_loss_part_and_
evaluates_segm` (Mask R-CNN = Faster R-CNN's RPN and RoI box head + the mask branch, FGD on
P2-P5, inheriting).

A Faster R-CNN-only copy of that test was dropped (session 8): when the tests' teacher init
moved from eager to a compiled init (the same values to float rounding, ~3e-8), its P2 FGD loss
went from falling to rising (first vs last 4 of 40 steps: 2.16 -> 2.67): with a random teacher
and the paper's tiny FGD weights, the direction of P2's FGD loss over 40 steps is decided by
noise, so that check could not tell a bug from a seed. The Mask R-CNN test runs the same code
and passes with both inits; the same caveat applies to its P2 FGD term (a sturdier check would
compare the FGD loss of the first and the last parameters on the same batches)."""

import numpy as np
import pytest

from fgd_jax import config as C
from fgd_jax.data import SHAPES_CLASS_NAMES

from ._tiny import tiny_config

pytestmark = pytest.mark.slow


def tiny_gfl_model() -> C.ConfigDict:
    """The tiny GFL of `test_gfl_trains_under_fgd_and_every_loss_part_falls` (also recorded
    in tests/model_config_cases.py): ResNet-10, 16-channel FPN and head, one tower conv."""
    m = C.gfl_model(
        depth=10,
        num_classes=len(SHAPES_CLASS_NAMES),
        fpn_channels=16,
        feat_channels=16,
        stacked_convs=1,
        num_groups=4,
        frozen_stages=-1,
    )
    m.backbone.norm_eval = False  # from scratch: BN statistics must be learned
    return m


def test_gfl_trains_under_fgd_and_every_loss_part_falls(tmp_path):
    """configs/gfl_r101_r50.py at toy scale: GFL student and teacher (random, same tiny
    architecture), FGD with the paper's GFL hyper-parameters on all 5 levels, inheriting, SGD
    with clipping at 35. Runs the trainer's own `init_train_state` / `make_train_step` on
    `cycle` fixed batches of the synthetic shapes (so the first and last steps see the same
    images) and compares the means of the first and the last `n` steps.

    QFL's soft target is the IoU of the predicted box with its GT, which grows as the boxes
    improve, so the logged `loss_cls` rises early in training (as in mmdetection's GFL logs)
    while the scores do learn. The classification is therefore judged on fixed targets: QFL
    of the first and of the last scores, both against the targets of the last boxes (a weak
    check: x0.978 measured; see the comment at the assertion)."""
    import jax

    from fgd_jax import experiment as experiment_lib
    from fgd_jax.data import pipeline

    steps, n, cycle = 36, 6, 3
    cfg = tiny_config(str(tmp_path / "data"), "fgd", steps=steps)
    cfg.model = tiny_gfl_model()
    cfg.teacher.model = tiny_gfl_model()
    real = C.load_config("configs/gfl_r101_r50.py").distill
    for key in ("temp", "alpha_fgd", "beta_fgd", "gamma_fgd", "lambda_fgd", "num_levels"):
        cfg.distill[key] = real[key]
    cfg.distill.student_channels = cfg.distill.teacher_channels = 16
    tc = cfg.train
    tc.grad_clip_norm, tc.base_lr, tc.decay_steps = 35.0, 0.006, (steps,)
    loader = pipeline.build_train_loader(cfg.data, global_batch_size=tc.batch_size, seed=0)
    batches = [next(loader) for _ in range(cycle)]
    loader.close()
    exp = experiment_lib.Experiment(cfg)
    teacher_vars = jax.jit(exp.teacher.init)(jax.random.key(1), batches[0]["image"][:1])
    state, tx, schedule = experiment_lib.init_train_state(
        exp, experiment_lib.dummy_batch(cfg.data), loader.steps_per_epoch, teacher_vars
    )
    start = exp.student_variables(state.params, state.model_state)
    step = jax.jit(experiment_lib.make_train_step(exp, tx, schedule))
    recs = []
    for i in range(steps):
        state, metrics = step(state, teacher_vars, batches[i % cycle])
        recs.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    end = exp.student_variables(state.params, state.model_state)
    keys = [k for k in recs[0] if k.startswith("loss") and "/" not in k and k != "loss"]
    fgd = {f"loss_fgd_fpn_{i}" for i in range(5)}
    assert {"loss_cls", "loss_bbox", "loss_dfl"} | fgd <= set(keys), keys
    assert all(np.isfinite(r[k]) for r in recs for k in keys)
    first = {k: np.mean([r[k] for r in recs[:n]]) for k in keys}
    last = {k: np.mean([r[k] for r in recs[-n:]]) for k in keys}
    fell = {k: last[k] / first[k] for k in keys}
    print("last / first:", fell)
    # measured (last / first): FGD levels 0.15-0.40, DFL 0.70, GIoU 0.94
    limits = {"loss_bbox": 0.97, "loss_dfl": 0.85, **{k: 0.7 for k in fgd}}
    assert all(fell[k] < lim for k, lim in limits.items()), fell

    student = exp.student

    @jax.jit
    def qfl(cls_vars, box_vars, batch):
        def outs(v):
            return student.apply(v, batch["image"], train=True, mutable=["batch_stats"])[0]

        mixed = dict(outs(box_vars), cls_scores=outs(cls_vars)["cls_scores"])
        return student.apply(box_vars, mixed, batch, method="loss")["loss_cls"]

    before = np.mean([float(qfl(start, end, b)) for b in batches])
    after = np.mean([float(qfl(end, end, b)) for b in batches])
    print("QFL on the last boxes' targets, first vs last scores:", before, after)
    # measured 0.191 -> 0.187 (x0.978): in 36 steps the scores learn slowly, because the IoU
    # targets stay small until the boxes have improved (the logged QFL grows x145 meanwhile)
    assert after < 0.99 * before, (before, after)


def tiny_reppoints_model() -> C.ConfigDict:
    """The tiny RepPoints of `test_reppoints_trains_under_fgd_and_every_loss_part_falls` (also
    recorded in tests/model_config_cases.py): ResNet-10, 16-channel GN FPN and head, one tower
    conv, GN with 4 groups."""
    m = C.reppoints_model(
        depth=10,
        num_classes=len(SHAPES_CLASS_NAMES),
        fpn_channels=16,
        feat_channels=16,
        stacked_convs=1,
        num_groups=4,
        frozen_stages=-1,
    )
    m.backbone.norm_eval = False  # from scratch: BN statistics must be learned
    return m


def test_reppoints_trains_under_fgd_and_every_loss_part_falls(tmp_path):
    """configs/reppoints_x101_r50.py at toy scale: RepPoints student and teacher (random, same
    tiny architecture, GN neck: FGD on the pre-norm `fpn_convs.{l}.conv` maps), FGD with the
    paper's RepPoints hyper-parameters on all 5 levels, inheriting, SGD with clipping at 35,
    through the trainer's own `init_train_state` / `make_train_step` on `cycle` fixed batches;
    the means of the first and the last `n` steps are compared."""
    import jax

    from fgd_jax import experiment as experiment_lib
    from fgd_jax.data import pipeline

    steps, n, cycle = 20, 4, 2
    cfg = tiny_config(str(tmp_path / "data"), "fgd", steps=steps)
    cfg.model = tiny_reppoints_model()
    cfg.teacher.model = tiny_reppoints_model()
    real = C.load_config("configs/reppoints_x101_r50.py").distill
    for key in ("temp", "alpha_fgd", "beta_fgd", "gamma_fgd", "lambda_fgd", "num_levels"):
        cfg.distill[key] = real[key]
    cfg.distill.student_channels = cfg.distill.teacher_channels = 16
    tc = cfg.train
    tc.grad_clip_norm, tc.base_lr, tc.decay_steps = 35.0, 0.02, (steps,)
    loader = pipeline.build_train_loader(cfg.data, global_batch_size=tc.batch_size, seed=0)
    batches = [next(loader) for _ in range(cycle)]
    loader.close()
    exp = experiment_lib.Experiment(cfg)
    teacher_vars = jax.jit(exp.teacher.init)(jax.random.key(1), batches[0]["image"][:1])
    state, tx, schedule = experiment_lib.init_train_state(
        exp, experiment_lib.dummy_batch(cfg.data), loader.steps_per_epoch, teacher_vars
    )
    step = jax.jit(experiment_lib.make_train_step(exp, tx, schedule))
    recs = []
    for i in range(steps):
        state, metrics = step(state, teacher_vars, batches[i % cycle])
        recs.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    keys = [k for k in recs[0] if k.startswith("loss") and "/" not in k and k != "loss"]
    fgd = {f"loss_fgd_fpn_{i}" for i in range(5)}
    assert {"loss_cls", "loss_pts_init", "loss_pts_refine"} | fgd <= set(keys), keys
    assert all(np.isfinite(r[k]) for r in recs for k in keys)
    first = {k: np.mean([r[k] for r in recs[:n]]) for k in keys}
    last = {k: np.mean([r[k] for r in recs[-n:]]) for k in keys}
    fell = {k: last[k] / first[k] for k in keys}
    print("last / first:", {k: round(float(v), 3) for k, v in fell.items()})
    # measured (last / first) at lr 0.02: focal 0.964, init points 0.936, refine points 0.918,
    # FGD levels 0.15-0.42 (lr 0.01: 0.982, 0.971, 0.939: from scratch in 20 steps the focal
    # loss, whose refine-stage targets move with the init points, falls slowly)
    limits = {"loss_cls": 0.98, "loss_pts_init": 0.96, "loss_pts_refine": 0.95}
    limits.update({k: 0.7 for k in fgd})
    assert all(fell[k] < lim for k, lim in limits.items()), fell


def tiny_solo_model() -> C.ConfigDict:
    """A tiny SOLO for 64 px shapes: ResNet-10, 16-channel FPN (P2..P6) and head, one tower
    conv per branch, num_grids (8, 6, 4, 3, 2), scale ranges / 6 of COCO's."""
    m = C.solo_model(
        depth=10,
        num_classes=len(SHAPES_CLASS_NAMES),
        fpn_channels=16,
        feat_channels=16,
        stacked_convs=1,
        num_groups=4,
        frozen_stages=-1,
        num_grids=(8, 6, 4, 3, 2),
    )
    m.head.scale_ranges = ((1, 16), (8, 32), (16, 64), (32, 128), (64, 344))
    m.test_cfg.nms_pre, m.test_cfg.max_candidates, m.test_cfg.max_per_img = 50, 100, 20
    # a few dozen steps from scratch leave the scores near the focal prior (0.01) and the
    # mask probabilities under 0.5
    m.test_cfg.score_thr, m.test_cfg.filter_thr, m.test_cfg.mask_thr = 0.0, 0.0, 0.02
    m.backbone.norm_eval = False
    return m


def test_solo_trains_under_fgd_and_evaluates_segm(tmp_path):
    """configs/solo_r101_r50.py at toy scale: a tiny SOLO student and teacher (random), FGD on
    P2..P5 with the paper's SOLO hyper-parameters, inheriting, SGD with clipping at 35, on the
    shapes' masks through the real trainer: every loss part falls (first vs last 4 of 24
    steps) and the final evaluation reports segm AP (SOLO's pasted masks)."""
    from fgd_jax.logging_utils import read_metrics
    from fgd_jax.trainer import train

    from ._tiny import make_teacher

    cfg = tiny_config(str(tmp_path / "data"), "fgd", steps=24)
    cfg.model, cfg.teacher.model = tiny_solo_model(), tiny_solo_model()
    real = C.load_config("configs/solo_r101_r50.py").distill
    for key in ("temp", "alpha_fgd", "beta_fgd", "gamma_fgd", "lambda_fgd", "num_levels"):
        cfg.distill[key] = real[key]
    cfg.distill.student_channels = cfg.distill.teacher_channels = 16
    cfg.data.with_mask, cfg.data.mask_grid = True, 32
    cfg.train.ckpt_every = 100
    cfg.train.grad_clip_norm = 35.0
    # SOLO's mask logits start at the 0.01 prior (bias -4.6), where the Dice gradient is tiny:
    # SGD at the tiny runs' lr moved loss_mask 2.9402 -> 2.9401 in 24 steps, AdamW (the demo's
    # optimizer) 2.940 -> 2.921
    cfg.train.optimizer, cfg.train.base_lr = "adamw", 0.002
    make_teacher(cfg, str(tmp_path / "teacher"))
    metrics = train(cfg, str(tmp_path / "work"))
    recs = [r for r in read_metrics(str(tmp_path / "work")) if "loss" in r]
    keys = [k for k in recs[0] if k.startswith("loss") and "/" not in k and k != "loss"]
    assert {"loss_mask", "loss_cls"} | {f"loss_fgd_fpn_{i}" for i in range(4)} == set(keys), keys
    assert all(np.isfinite(r[k]) for r in recs for k in keys)
    first = {k: np.mean([r[k] for r in recs[:4]]) for k in keys}
    last = {k: np.mean([r[k] for r in recs[-4:]]) for k in keys}
    print("first / last:", {k: (round(first[k], 4), round(last[k], 4)) for k in keys})
    grew = [k for k in keys if last[k] >= first[k]]
    assert not grew, {k: (first[k], last[k]) for k in grew}
    print("segm AP", metrics["segm_AP"], "bbox AP (mask boxes)", metrics["AP"])
    assert 0.0 <= metrics["segm_AP"] <= 1.0 and 0.0 <= metrics["AP"] <= 1.0
    assert set(metrics["segm_per_class_AP"]) == set(metrics["per_class_AP"])
