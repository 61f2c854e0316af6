"""The original's `yolox` branch variant of FGD vs a torch transcription of that branch.

The branch (yzd-v/FGD, branch `yolox`, commit 207473e, `mmdet/distillation/losses/fgd.py`)
changes the master `FeatureLoss` in two lines: `forward(preds_S, preds_T, gt_bboxes, scale_y,
scale_x, img_metas)` maps boxes with `gt / img_shape[1] * W / scale_x` (rows alike) and
returns `loss / scale_x / scale_y`. `FeatureLossYOLOXReference` below re-states exactly that on
top of the master transcription (benchmarks/fgd_torch_reference.py). Tolerances as
tests/test_fgd.py: loss and gradients float64 on both sides rel 1e-12, float32 rel 5e-6;
masks cell by cell, exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks.fgd_torch_reference import FeatureLossReference
from fgd_jax import config as C
from fgd_jax.distill import distiller as distiller_lib
from fgd_jax.distill.fgd import FGDLoss, fg_bg_masks
from tests.test_fgd import (
    CS,
    CT,
    FEAT_HW,
    assert_rel_close,
    make_batch,
    make_reference,
    random_inside_boxes,
    torch_to_flax,
)

SCALE = (1.3, 0.8)
# compile at XLA's backend optimization level 0: several times faster, rounding-only changes
_FAST = {
    "xla_backend_optimization_level": 0
}  # (scale_y, scale_x): e.g. a 832 x 512 batch of 640 x 640 defaults


class FeatureLossYOLOXReference(FeatureLossReference):
    """The `yolox` branch's `FeatureLoss`: `forward(S, T, gt, scale_y, scale_x, img_metas)`."""

    @staticmethod
    def masks_scaled(gt_bboxes, img_metas, like, scale_y, scale_x):
        n, h, w = like.shape
        mask_fg = torch.zeros_like(like)
        mask_bg = torch.ones_like(like)
        for i in range(n):
            img_h, img_w = img_metas[i]["img_shape"][0], img_metas[i]["img_shape"][1]
            new = torch.ones_like(gt_bboxes[i])
            new[:, 0] = gt_bboxes[i][:, 0] / img_w * w / scale_x
            new[:, 2] = gt_bboxes[i][:, 2] / img_w * w / scale_x
            new[:, 1] = gt_bboxes[i][:, 1] / img_h * h / scale_y
            new[:, 3] = gt_bboxes[i][:, 3] / img_h * h / scale_y
            wmin, wmax = torch.floor(new[:, 0]).int(), torch.ceil(new[:, 2]).int()
            hmin, hmax = torch.floor(new[:, 1]).int(), torch.ceil(new[:, 3]).int()
            area = (
                1.0
                / (hmax.view(1, -1) + 1 - hmin.view(1, -1))
                / (wmax.view(1, -1) + 1 - wmin.view(1, -1))
            )
            for j in range(len(gt_bboxes[i])):
                rows = slice(int(hmin[j]), int(hmax[j]) + 1)
                cols = slice(int(wmin[j]), int(wmax[j]) + 1)
                mask_fg[i][rows, cols] = torch.maximum(mask_fg[i][rows, cols], area[0][j])
            mask_bg[i] = torch.where(mask_fg[i] > 0, 0, 1)
            if torch.sum(mask_bg[i]):
                mask_bg[i] /= torch.sum(mask_bg[i])
        return mask_fg, mask_bg

    def forward(self, preds_S, preds_T, gt_bboxes, scale_y, scale_x, img_metas):
        if self.align is not None:
            preds_S = self.align(preds_S)
        S_t, C_t = self.get_attention(preds_T, self.temp)
        S_s, C_s = self.get_attention(preds_S, self.temp)
        mask_fg, mask_bg = self.masks_scaled(gt_bboxes, img_metas, S_t, scale_y, scale_x)
        fg_loss, bg_loss = self.get_fea_loss(preds_S, preds_T, mask_fg, mask_bg, C_t, S_t)
        mask_loss = self.get_mask_loss(C_s, C_t, S_s, S_t)
        rela_loss = self.get_rela_loss(preds_S, preds_T)
        loss = (
            self.alpha_fgd * fg_loss
            + self.beta_fgd * bg_loss
            + self.gamma_fgd * mask_loss
            + self.lambda_fgd * rela_loss
        )
        return dict(loss=loss / scale_x / scale_y, fg=fg_loss, bg=bg_loss, mask=mask_loss)


def _reference(dtype) -> FeatureLossYOLOXReference:
    master = make_reference()  # randomized parameters, the yolox weights set below
    ref = FeatureLossYOLOXReference(
        CS, CT, temp=0.5, alpha_fgd=0.002, beta_fgd=0.001, gamma_fgd=0.001, lambda_fgd=1e-5
    )
    ref.load_state_dict(master.state_dict())
    return ref.to(dtype)


def _boxes_in_resized_pixels(boxes: np.ndarray) -> np.ndarray:
    """The branch's boxes: the pipeline's boxes times the batch resize factors
    (`YOLOX._preprocess` scales gt_bboxes in place), while img_metas keep the pipeline's
    img_shape. Boxes of make_batch are in img_shape pixels; stretch them by the scales."""
    out = boxes.copy()
    out[..., 0::2] *= np.float32(SCALE[1])
    out[..., 1::2] *= np.float32(SCALE[0])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("np_dtype,rtol", [(np.float64, 1e-12), (np.float32, 5e-6)])
def test_yolox_variant_loss_and_grads_match_the_branch(np_dtype, rtol):
    with jax.enable_x64(np_dtype == np.float64):
        torch_dtype = torch.float64 if np_dtype == np.float64 else torch.float32
        ref = _reference(torch_dtype)
        boxes, valid, img_shape, pad_shape = make_batch(0)
        boxes = _boxes_in_resized_pixels(boxes).astype(np_dtype)
        rng = np.random.default_rng(1)
        b = boxes.shape[0]
        s_nhwc = rng.normal(size=(b, *FEAT_HW, CS)).astype(np_dtype)
        t_nhwc = rng.normal(size=(b, *FEAT_HW, CT)).astype(np_dtype)

        s_t = torch.tensor(s_nhwc.transpose(0, 3, 1, 2), requires_grad=True)
        t_t = torch.tensor(t_nhwc.transpose(0, 3, 1, 2))
        gt = [torch.as_tensor(boxes[i][valid[i]], dtype=torch_dtype) for i in range(b)]
        metas = [{"img_shape": (int(img_shape[i, 0]), int(img_shape[i, 1]), 3)} for i in range(b)]
        out_t = ref(s_t, t_t, gt, SCALE[0], SCALE[1], metas)
        out_t["loss"].backward()
        ref_grads = torch_to_flax({k: p.grad for k, p in ref.named_parameters()})
        ref_grad_s = s_t.grad.numpy().transpose(0, 2, 3, 1)

        params = jax.tree.map(jnp.asarray, torch_to_flax(ref.state_dict()))
        module = FGDLoss(
            CS, CT, temp=0.5, alpha_fgd=0.002, beta_fgd=0.001, gamma_fgd=0.001, lambda_fgd=1e-5
        )
        scale = jnp.asarray(SCALE, np_dtype)

        def loss_fn(p, s):
            out = module.apply(
                {"params": p}, s, jnp.asarray(t_nhwc), jnp.asarray(boxes), jnp.asarray(valid),
                jnp.asarray(img_shape), jnp.asarray(pad_shape), input_scale=scale,
            )  # fmt: skip
            return out["loss"], out

        (_, out_j), (g_params, g_s) = jax.jit(
            jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True), compiler_options=_FAST
        )(params, jnp.asarray(s_nhwc))
        assert out_j["loss"].dtype == np_dtype
        for key in ("loss", "fg", "bg", "mask"):
            ref_v = float(out_t[key].detach())
            assert ref_v > 0, key
            assert_rel_close(out_j[key], ref_v, rtol, key)
        parts = sum(out_j[k] for k in ("loss_fg", "loss_bg", "loss_mask", "loss_relation"))
        assert_rel_close(parts, out_j["loss"], 1e-12 if np_dtype == np.float64 else 1e-6, "sum")
        assert_rel_close(g_s, ref_grad_s, rtol, "d loss / d student features")
        for name in ref_grads:
            for leaf, r in ref_grads[name].items():
                g, what = g_params[name][leaf], f"d loss / d {name}/{leaf}"
                if name.startswith("conv_mask") and leaf == "bias":  # ~0 on both sides
                    assert (
                        np.abs(np.asarray(g) - r).max()
                        <= rtol * np.abs(ref_grads[name]["kernel"]).max()
                    ), what
                    continue
                assert np.abs(r).max() > 0, what
                assert_rel_close(g, r, rtol, what)

        # the scaling matters: the master loss (no input_scale) of the same inputs differs
        plain = module.apply(
            {"params": params}, jnp.asarray(s_nhwc), jnp.asarray(t_nhwc), jnp.asarray(boxes),
            jnp.asarray(valid), jnp.asarray(img_shape), jnp.asarray(pad_shape),
        )  # fmt: skip
        assert abs(float(plain["fg"]) - float(out_j["fg"])) > 1e-3 * float(out_j["fg"])


def test_yolox_masks_match_the_branch_cell_by_cell():
    rng = np.random.default_rng(3)
    img_shape = np.array([[90, 150], [96, 160], [61, 99], [77, 131]], np.int32)
    pad_shape = np.array([(96, 160)] * 4, np.int32)
    masks = jax.jit(
        fg_bg_masks,
        static_argnames=("feat_hw", "box_scale", "dtype", "unroll"),
        compiler_options=_FAST,
    )
    for trial, scale in enumerate([(1.3, 0.8), (0.75, 1.25), (1.0, 1.0)]):
        boxes, valid = random_inside_boxes(rng, img_shape, 16, [16, 9, 0, 5 + trial])
        boxes = boxes * np.float32([scale[1], scale[0], scale[1], scale[0]])
        sc = np.tile(np.asarray(scale, np.float32), (4, 1))
        fg, bg = masks(boxes, valid, img_shape, pad_shape, FEAT_HW, input_scale=sc)
        gt = [torch.as_tensor(boxes[i][valid[i]]) for i in range(4)]
        metas = [{"img_shape": tuple(int(v) for v in img_shape[i])} for i in range(4)]
        fg_r, bg_r = FeatureLossYOLOXReference.masks_scaled(
            gt, metas, torch.zeros((4, *FEAT_HW)), scale[0], scale[1]
        )
        np.testing.assert_array_equal(np.asarray(fg), fg_r.numpy())
        np.testing.assert_array_equal(np.asarray(bg), bg_r.numpy())
        if scale == (1.0, 1.0):  # scale 1 = the master masks
            fg_m, bg_m = masks(boxes, valid, img_shape, pad_shape, FEAT_HW)
            np.testing.assert_array_equal(np.asarray(fg_m), np.asarray(fg))


def test_distill_losses_yolox_variant_reads_the_batch_scale():
    """`DistillLosses(variant='yolox')` passes row 0 of `batch['input_scale']` to every level
    (1 without it: then it equals 'master'); 'master' ignores the key."""
    rng = np.random.default_rng(0)
    shapes = [(2, 8, 8)]
    feats_s = tuple(jnp.asarray(rng.normal(size=(*s, 4)), jnp.float32) for s in shapes)
    feats_t = tuple(jnp.asarray(rng.normal(size=(*s, 8)), jnp.float32) for s in shapes)
    batch = dict(
        boxes=jnp.asarray([[[3.0, 5.0, 30.0, 40.0]], [[10.0, 0.0, 64.0, 20.0]]]),
        valid=jnp.ones((2, 1), bool),
        img_shape=jnp.full((2, 2), 64, jnp.int32),
        pad_shape=jnp.full((2, 2), 64, jnp.int32),
    )
    cfg = C.yolox_fgd_distill(student_channels=4, teacher_channels=8, num_levels=1)
    assert cfg.teacher_bn == "train" and not cfg.init_student and cfg.variant == "yolox"
    yolox = distiller_lib.build_distill_losses(cfg)
    master = yolox.clone(variant="master")
    params = jax.jit(yolox.init, compiler_options={"xla_backend_optimization_level": 0})(
        jax.random.key(0), feats_s, feats_t, batch
    )
    scaled = dict(batch, input_scale=jnp.tile(jnp.asarray([[1.25, 0.5]]), (2, 1)))
    module = FGDLoss(4, 8, temp=0.5, alpha_fgd=0.002, beta_fgd=0.001, gamma_fgd=0.001,
                     lambda_fgd=1e-5)  # fmt: skip

    @functools.partial(jax.jit, compiler_options=_FAST)
    def run(params):
        direct = [
            module.apply(
                {"params": params["params"][f"loss_fgd_fpn_{i}"]}, feats_s[i], feats_t[i],
                batch["boxes"], batch["valid"], batch["img_shape"], batch["pad_shape"],
                input_scale=jnp.asarray([1.25, 0.5]),
            )["loss"]
            for i in range(1)
        ]  # fmt: skip
        return (
            yolox.apply(params, feats_s, feats_t, batch),
            master.apply(params, feats_s, feats_t, scaled),
            yolox.apply(params, feats_s, feats_t, scaled),
            direct,
        )

    out_y1, out_m, out_ys, direct = run(params)
    for i in range(1):
        name = f"loss_fgd_fpn_{i}"
        assert float(out_y1[name]) == float(out_m[name])
        np.testing.assert_allclose(float(out_ys[name]), float(direct[i]), rtol=1e-6)
        assert abs(float(out_ys[name]) - float(out_m[name])) > 1e-3 * float(out_m[name])
    with pytest.raises(ValueError, match="variant"):
        yolox.clone(variant="v2").apply(params, feats_s, feats_t, batch)


def test_teacher_bn_modes():
    """'eval' uses the stored statistics, 'train' those of the batch; neither changes the
    teacher's variables."""
    import flax.linen as nn

    class Tiny(nn.Module):
        def setup(self):
            self.bn = nn.BatchNorm()

        def __call__(self, x, train=False):
            return self.extract_feat(x, train)

        def extract_feat(self, x, train=False):
            return (self.bn(x, use_running_average=not train),)

    x = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, size=(4, 5, 5, 3)), jnp.float32)
    teacher = Tiny()
    tv = teacher.init(jax.random.key(0), x)
    (f_eval,) = distiller_lib.teacher_features(teacher, tv, x, bn="eval")
    (f_train,) = distiller_lib.teacher_features(teacher, tv, x, bn="train")
    np.testing.assert_allclose(np.asarray(f_eval), np.asarray(x) / np.sqrt(1 + 1e-5), rtol=1e-6)
    xn = np.asarray(x)
    expect = (xn - xn.mean((0, 1, 2))) / np.sqrt(xn.var((0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(np.asarray(f_train), expect, rtol=1e-4, atol=1e-5)
    assert float(tv["batch_stats"]["bn"]["mean"].sum()) == 0.0
    with pytest.raises(ValueError, match="teacher_bn"):
        distiller_lib.teacher_features(teacher, tv, x, bn="frozen")
