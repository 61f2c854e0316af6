"""FGD loss vs the original PyTorch `FeatureLoss` (re-stated in benchmarks/fgd_torch_reference.py).

References and tolerances:
- losses and gradients: the torch transcription with the same weights, float64 on both sides
  (rel 1e-12; measured ~2e-15) and float32 on both sides (rel 5e-6; measured ~6e-7);
- masks: the original per-box slicing loops, cell by cell, exact equality (same float ops);
- init: mmcv kaiming fan_in normal / torch default uniform / zeros, by distribution checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks.fgd_torch_reference import FeatureLossReference
from fgd_jax.distill.fgd import FGDLoss, fg_bg_masks, spatial_channel_attention
from fgd_jax.models import init_module

CS, CT = 8, 16  # student != teacher channels: `align` exists
FEAT_HW = (12, 20)
PAD = (96, 160)  # canvas (h, w), stride 8


# ----------------------------------------------------------------------------------- helpers
def torch_to_flax(state_dict: dict[str, torch.Tensor]) -> dict:
    """The generic mmdetection rule: `a.b.0.c.weight` -> a/b_0/c/kernel, OIHW -> HWIO,
    LayerNorm weight [C, 1, 1] -> scale [C]."""
    params: dict = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        names: list[str] = []
        for p in parts[:-1]:
            if p.isdigit():
                names[-1] = f"{names[-1]}_{p}"
            else:
                names.append(p)
        v = value.detach().cpu().numpy()
        leaf = parts[-1]
        if leaf == "weight" and v.ndim == 4:
            leaf, v = "kernel", v.transpose(2, 3, 1, 0)
        elif leaf == "weight":
            leaf, v = "scale", v.reshape(-1)
        else:
            v = v.reshape(-1)
        node = params
        for n in names:
            node = node.setdefault(n, {})
        node[leaf] = v
    return params


def make_reference(cs: int = CS, ct: int = CT, seed: int = 0) -> FeatureLossReference:
    """The torch loss with every parameter randomized (the zero-init last convs too, so the
    relation loss and its gradients are non-trivial)."""
    torch.manual_seed(seed)
    ref = FeatureLossReference(cs, ct, temp=0.5, gamma_fgd=0.001)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".1.weight" in name:  # LayerNorm scale around 1
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return ref


def make_batch(seed: int = 0):
    """3 images of different img_shape in one canvas: varied box counts, boxes on the borders,
    a tiny, a zero-width and a full-image box, garbage in padded slots, an image without boxes."""
    rng = np.random.default_rng(seed)
    img_shape = np.array([[90, 150], [96, 160], [60, 100]], np.int32)
    pad_shape = np.array([PAD] * 3, np.int32)
    g = 7
    boxes = rng.uniform(-50, 300, size=(3, g, 4)).astype(np.float32)  # garbage in padding
    valid = np.zeros((3, g), bool)
    real0 = [
        [0.0, 0.0, 150.0, 90.0],  # the whole image
        [0.0, 10.3, 20.7, 33.1],  # touches the left border
        [120.2, 70.0, 150.0, 90.0],  # touches right and bottom
        [40.0, 40.0, 40.4, 40.3],  # tiny
        [77.0, 5.0, 77.0, 25.5],  # zero width
        [60.5, 30.25, 99.75, 61.0],
    ]
    real1 = [[10.0, 12.0, 150.5, 95.9], [33.3, 44.4, 55.5, 66.6]]
    for i, real in enumerate([real0, real1, []]):
        if real:
            boxes[i, : len(real)] = np.array(real, np.float32)
            valid[i, : len(real)] = True
    return boxes, valid, img_shape, pad_shape


def reference_inputs(boxes, valid, img_shape, pad_shape, box_scale, dtype):
    """Per-image box lists and img_metas for the reference; 'pad_shape' mode = the original
    given the canvas as its img_shape."""
    frame = img_shape if box_scale == "img_shape" else pad_shape
    gt = [torch.as_tensor(boxes[i][valid[i]], dtype=dtype) for i in range(len(boxes))]
    metas = [{"img_shape": (int(frame[i, 0]), int(frame[i, 1]), 3)} for i in range(len(boxes))]
    return gt, metas


def run_both(box_scale: str, np_dtype, seed: int = 0):
    """Loss parts and gradients (student features, all FGD params) from torch and JAX."""
    torch_dtype = torch.float64 if np_dtype == np.float64 else torch.float32
    ref = make_reference(seed=seed).to(torch_dtype)
    boxes, valid, img_shape, pad_shape = make_batch(seed)
    rng = np.random.default_rng(seed + 1)
    b = boxes.shape[0]
    s_nhwc = rng.normal(size=(b, *FEAT_HW, CS)).astype(np_dtype)
    t_nhwc = rng.normal(size=(b, *FEAT_HW, CT)).astype(np_dtype)

    s_t = torch.tensor(s_nhwc.transpose(0, 3, 1, 2), requires_grad=True)
    t_t = torch.tensor(t_nhwc.transpose(0, 3, 1, 2))
    gt, metas = reference_inputs(
        boxes.astype(np_dtype), valid, img_shape, pad_shape, box_scale, torch_dtype
    )
    out_t = ref(s_t, t_t, gt, metas)
    out_t["loss"].backward()
    ref_vals = {k: float(v.detach()) for k, v in out_t.items()}
    ref_grads = torch_to_flax({k: p.grad for k, p in ref.named_parameters()})
    ref_grad_s = s_t.grad.numpy().transpose(0, 2, 3, 1)

    params = jax.tree.map(jnp.asarray, torch_to_flax(ref.state_dict()))
    module = FGDLoss(CS, CT, temp=0.5, gamma_fgd=0.001, box_scale=box_scale)
    args = (jnp.asarray(t_nhwc), jnp.asarray(boxes.astype(np_dtype)), jnp.asarray(valid))
    shapes = (jnp.asarray(img_shape), jnp.asarray(pad_shape))

    def loss_fn(p, s):
        out = module.apply({"params": p}, s, *args, *shapes)
        return out["loss"], out

    (_, out_j), (g_params, g_s) = jax.jit(
        jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    )(params, jnp.asarray(s_nhwc))
    return ref_vals, ref_grads, ref_grad_s, out_j, g_params, g_s


def assert_rel_close(actual, expected, rtol, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.max(np.abs(expected)), 1e-30)
    err = np.max(np.abs(actual - expected)) / scale
    assert err <= rtol, f"{what}: max error / max |ref| = {err:.3g} > {rtol}"


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize(
    "box_scale,np_dtype,rtol",
    [
        ("img_shape", np.float64, 1e-12),
        ("pad_shape", np.float64, 1e-12),
        ("img_shape", np.float32, 5e-6),
    ],
)
def test_loss_and_grads_match_original(box_scale, np_dtype, rtol):
    with jax.enable_x64(np_dtype == np.float64):
        ref_vals, ref_grads, ref_grad_s, out_j, g_params, g_s = run_both(box_scale, np_dtype)
        assert out_j["loss"].dtype == np_dtype
        for key in ("loss", "fg", "bg", "mask", "relation"):
            assert ref_vals[key] > 0, key  # every part is non-trivial here
            assert_rel_close(out_j[key], ref_vals[key], rtol, key)
        assert_rel_close(g_s, ref_grad_s, rtol, "d loss / d student features")
        assert jax.tree.structure(g_params) == jax.tree.structure(ref_grads)
        for name in ref_grads:
            for leaf, r in ref_grads[name].items():
                g = g_params[name][leaf]
                what = f"d loss / d {name}/{leaf}"
                if name.startswith("conv_mask") and leaf == "bias":
                    # A bias before a softmax over H*W: the gradient is 0 up to rounding on
                    # both sides; compare on the scale of the kernel's gradient.
                    scale = np.abs(ref_grads[name]["kernel"]).max()
                    assert np.abs(np.asarray(g) - r).max() <= rtol * scale, what
                    continue
                assert np.abs(r).max() > 0, what
                assert_rel_close(g, r, rtol, what)


def test_equal_channels_has_no_align():
    module = FGDLoss(16, 16)
    s = jnp.ones((1, 4, 4, 16))
    b = jnp.zeros((1, 1, 4))
    shp = jnp.array([[32, 32]])
    params = jax.eval_shape(
        module.init, jax.random.key(0), s, s, b, jnp.ones((1, 1), bool), shp, shp
    )["params"]
    assert "align" not in params
    ref = FeatureLossReference(16, 16)
    expected = jax.tree.map(np.shape, torch_to_flax(ref.state_dict()))
    assert jax.tree.map(lambda x: x.shape, params) == expected


def test_param_tree_and_init_match_original():
    """Names/shapes equal the converted torch state dict; init distributions as the original."""
    cs, ct = 256, 512
    module = FGDLoss(cs, ct)
    s = jnp.ones((1, 2, 2, cs))
    t = jnp.ones((1, 2, 2, ct))
    params = init_module(
        module,
        jax.random.key(0),
        s,
        t,
        jnp.zeros((1, 1, 4)),
        jnp.ones((1, 1), bool),
        jnp.array([[16, 16]]),
        jnp.array([[16, 16]]),
    )["params"]
    ref = FeatureLossReference(cs, ct)
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, torch_to_flax(ref.state_dict()))
    # mmcv kaiming_init(mode='fan_in'): N(0, 2 / fan_in), bias 0.
    for side in "st":
        k = np.asarray(params[f"conv_mask_{side}"]["kernel"])
        assert abs(k.std() / np.sqrt(2.0 / ct) - 1) < 0.15
        assert abs(k.mean()) < 3 * np.sqrt(2.0 / ct) / np.sqrt(k.size)
        assert np.all(np.asarray(params[f"conv_mask_{side}"]["bias"]) == 0)
        # mmcv constant_init(val=0) on the last conv of channel_add_conv.
        last = params[f"channel_add_conv_{side}_3"]
        assert np.all(np.asarray(last["kernel"]) == 0) and np.all(np.asarray(last["bias"]) == 0)
        ln = params[f"channel_add_conv_{side}_1"]
        assert np.all(np.asarray(ln["scale"]) == 1) and np.all(np.asarray(ln["bias"]) == 0)
    # PyTorch default: U(+-1/sqrt(fan_in)) for weight and bias.
    for name, fan_in in [("align", cs), ("channel_add_conv_s_0", ct), ("channel_add_conv_t_0", ct)]:
        bound = 1.0 / np.sqrt(fan_in)
        for leaf in ("kernel", "bias"):
            v = np.asarray(params[name][leaf])
            assert np.abs(v).max() <= bound and np.abs(v).max() > 0.9 * bound, (name, leaf)
            assert abs(v.std() / (bound / np.sqrt(3)) - 1) < 0.15, (name, leaf)


# ------------------------------------------------------------------------------------- masks
masks_jit = jax.jit(fg_bg_masks, static_argnames=("feat_hw", "box_scale", "dtype", "unroll"))


def reference_masks(boxes, valid, img_shape, pad_shape, box_scale, dtype=torch.float32):
    gt, metas = reference_inputs(boxes, valid, img_shape, pad_shape, box_scale, dtype)
    like = torch.zeros((len(boxes), *FEAT_HW), dtype=dtype)
    fg, bg = FeatureLossReference.masks(gt, metas, like)
    return fg.numpy(), bg.numpy()


def random_inside_boxes(rng, img_shape, g, n_valid):
    """Boxes inside each image (the real data), some snapped to integers and borders."""
    b = len(img_shape)
    h, w = img_shape[:, 0:1], img_shape[:, 1:2]
    x = np.sort(rng.uniform(0, 1, size=(b, g, 2)), axis=-1) * w[..., None]
    y = np.sort(rng.uniform(0, 1, size=(b, g, 2)), axis=-1) * h[..., None]
    boxes = np.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1).astype(np.float32)
    snap = rng.uniform(size=boxes.shape) < 0.3
    boxes = np.where(snap, np.round(boxes / 8) * 8, boxes)  # on grid lines
    boxes[:, :2, 2] = w.astype(np.float32)  # right border
    boxes[:, 2:4, 3] = h.astype(np.float32)  # bottom border
    boxes[:, 4, 0] = boxes[:, 4, 2]  # zero width
    boxes = np.clip(boxes, 0, np.concatenate([w, h, w, h], -1)[:, None, :])
    valid = np.arange(g)[None, :] < np.asarray(n_valid)[:, None]
    return boxes.astype(np.float32), valid


@pytest.mark.parametrize("box_scale", ["img_shape", "pad_shape"])
def test_masks_match_original_loops_cell_by_cell(box_scale):
    rng = np.random.default_rng(3)
    img_shape = np.array([[90, 150], [96, 160], [61, 99], [77, 131]], np.int32)
    pad_shape = np.array([PAD] * 4, np.int32)
    for trial in range(4):
        boxes, valid = random_inside_boxes(rng, img_shape, 24, [24, 13, 0, 6 + trial])
        fg, bg = masks_jit(boxes, valid, img_shape, pad_shape, FEAT_HW, box_scale)
        fg_r, bg_r = reference_masks(boxes, valid, img_shape, pad_shape, box_scale)
        np.testing.assert_array_equal(np.asarray(fg), fg_r)
        np.testing.assert_array_equal(np.asarray(bg), bg_r)
        if trial == 0:  # the unrolled loop (default off CPU) gives the same masks
            fg_u, bg_u = masks_jit(
                boxes, valid, img_shape, pad_shape, FEAT_HW, box_scale, unroll=True
            )
            np.testing.assert_array_equal(np.asarray(fg_u), fg_r)
            np.testing.assert_array_equal(np.asarray(bg_u), bg_r)
        assert np.all(np.asarray(fg)[2] == 0)  # no boxes
        np.testing.assert_allclose(np.asarray(bg)[2], 1.0 / np.prod(FEAT_HW), rtol=1e-7)
        np.testing.assert_allclose(np.asarray(bg).sum((1, 2)), 1.0, rtol=1e-5)


def test_masks_with_valid_boxes_anywhere_in_the_slots():
    """The CPU loop stops after the batch's last valid slot: valid boxes scattered among the
    padding (the last slot included) still all mark, and the masks equal the original's.
    Gradients w.r.t. the boxes are zero, not an error (no tangent enters the loop)."""
    rng = np.random.default_rng(5)
    img_shape = np.array([[90, 150], [96, 160]], np.int32)
    pad_shape = np.array([PAD] * 2, np.int32)
    boxes, _ = random_inside_boxes(rng, img_shape, 12, [12, 12])
    valid = np.zeros((2, 12), bool)
    valid[0, [3, 11]] = True
    valid[1, [0, 5, 6]] = True
    fg, bg = masks_jit(boxes, valid, img_shape, pad_shape, FEAT_HW, "img_shape")
    fg_r, bg_r = reference_masks(boxes, valid, img_shape, pad_shape, "img_shape")
    np.testing.assert_array_equal(np.asarray(fg), fg_r)
    np.testing.assert_array_equal(np.asarray(bg), bg_r)
    grad = jax.grad(lambda bx: jnp.sum(fg_bg_masks(bx, valid, img_shape, pad_shape, FEAT_HW)[0]))(
        jnp.asarray(boxes)
    )
    assert np.all(np.asarray(grad) == 0)


def test_mask_values_for_every_box_size():
    """One box per image, of every (rows, cols) the grid allows: the cell value
    1.0 / rows / cols (float32, two roundings) equals the original's bit for bit."""
    h, w = FEAT_HW
    rows, cols = np.meshgrid(np.arange(h + 1), np.arange(w + 1), indexing="ij")
    n = rows.size
    boxes = np.zeros((n, 1, 4), np.float32)
    boxes[:, 0, 2] = cols.reshape(-1)  # x2 = c -> wmax = c, cols_n = c + 1
    boxes[:, 0, 3] = rows.reshape(-1)
    valid = np.ones((n, 1), bool)
    shape = np.tile(np.array([[h, w]], np.int32), (n, 1))  # 1 pixel = 1 cell
    fg, bg = masks_jit(boxes, valid, shape, shape, FEAT_HW, "img_shape")
    gt, metas = reference_inputs(boxes, valid, shape, shape, "img_shape", torch.float32)
    fg_r, bg_r = FeatureLossReference.masks(gt, metas, torch.zeros((n, h, w)))
    np.testing.assert_array_equal(np.asarray(fg), fg_r.numpy())
    np.testing.assert_array_equal(np.asarray(bg), bg_r.numpy())


def test_img_shape_and_pad_shape_scaling_differ_on_padded_images():
    boxes = np.array([[[0.0, 0.0, 40.0, 40.0]]], np.float32)
    valid = np.ones((1, 1), bool)
    img_shape, pad_shape = np.array([[48, 80]]), np.array([[96, 160]])
    fg_img, _ = masks_jit(boxes, valid, img_shape, pad_shape, FEAT_HW, "img_shape")
    fg_pad, _ = masks_jit(boxes, valid, img_shape, pad_shape, FEAT_HW, "pad_shape")
    # 40 px of a 48x80 image -> 40/48*12 = 10 rows, 40/80*20 = 10 cols (0..10 inclusive);
    # of the 96x160 canvas -> 5 rows, 5 cols (0..5 inclusive).
    assert (
        np.count_nonzero(fg_img) == 11 * 11 and np.asarray(fg_img).max() == np.float32(1) / 11 / 11
    )
    assert np.count_nonzero(fg_pad) == 6 * 6 and np.asarray(fg_pad).max() == np.float32(1) / 6 / 6


def test_outside_boxes_are_clipped_to_the_frame():
    """Documented choice: coordinates outside the frame are clipped (= the original run on the
    clipped boxes); the unclipped original would read negative slices from the row's end."""
    img_shape = np.array([[90, 150], [96, 160]], np.int32)
    pad_shape = np.array([PAD] * 2, np.int32)
    boxes = np.array(
        [
            [[-0.001, 5.0, 30.0, 20.0], [100.0, -3.0, 151.5, 95.0], [-20.0, -20.0, -5.0, -5.0]],
            [[-0.5, -0.5, 170.0, 100.0], [0.0, 0.0, 0.0, 0.0], [50.0, 50.0, 60.0, 60.0]],
        ],
        np.float32,
    )
    valid = np.array([[True, True, True], [True, True, False]])
    for box_scale in ("img_shape", "pad_shape"):
        frame = img_shape if box_scale == "img_shape" else pad_shape
        hw = np.concatenate([frame[:, ::-1], frame[:, ::-1]], -1)[:, None, :].astype(np.float32)
        clipped = np.clip(boxes, 0, hw)
        fg, bg = masks_jit(boxes, valid, img_shape, pad_shape, FEAT_HW, box_scale)
        fg_r, bg_r = reference_masks(clipped, valid, img_shape, pad_shape, box_scale)
        np.testing.assert_array_equal(np.asarray(fg), fg_r)
        np.testing.assert_array_equal(np.asarray(bg), bg_r)
    # Where the original differs: x1 = -0.001 -> wmin = -1 -> slice [-1:k] is empty, so the
    # original marks nothing for the first box; we mark the clipped box from column 0.
    one = boxes[:1, :1]
    fg_orig, _ = reference_masks(
        one, np.ones((1, 1), bool), img_shape[:1], pad_shape[:1], "img_shape"
    )
    fg_ours, _ = masks_jit(one, np.ones((1, 1), bool), img_shape[:1], pad_shape[:1], FEAT_HW)
    assert np.count_nonzero(fg_orig) == 0 and np.asarray(fg_ours)[0, :, 0].max() > 0


def test_padded_boxes_never_mark_and_empty_images():
    boxes = np.zeros((2, 5, 4), np.float32)  # padded boxes are zeros (contracts.md)
    boxes[0, 0] = [10.0, 10.0, 50.0, 50.0]
    valid = np.zeros((2, 5), bool)
    valid[0, 0] = True
    shapes = np.array([PAD, PAD], np.int32)
    fg, bg = masks_jit(boxes, valid, shapes, shapes, FEAT_HW)
    fg, bg = np.asarray(fg), np.asarray(bg)
    assert fg[0, 0, 0] == 0 and fg[0].max() > 0  # a zero padded box would mark cell (0, 0)
    assert np.all(fg[1] == 0) and np.allclose(bg[1], 1.0 / np.prod(FEAT_HW))
    # A valid box on an image of size 0 (a padding example) marks nothing instead of NaN.
    fg0, bg0 = masks_jit(boxes, valid, np.zeros_like(shapes), shapes, FEAT_HW)
    assert np.all(np.asarray(fg0) == 0) and np.allclose(np.asarray(bg0), 1.0 / np.prod(FEAT_HW))


# ---------------------------------------------------------------------------- jit, no NaN, API
@pytest.mark.slow
def test_degenerate_boxes_and_empty_batch_jitted_no_nan():
    module = FGDLoss(CS, CT, box_scale="img_shape")
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(2, *FEAT_HW, CS)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(2, *FEAT_HW, CT)), jnp.float32)
    img_shape = jnp.array([[90, 150], [96, 160]], jnp.int32)
    degenerate = jnp.array(
        [
            [[5.0, 5.0, 5.0, 5.0], [30.0, 10.0, 10.0, 50.0], [150.0, 90.0, 150.0, 90.0]],
            [[0.0, 0.0, 0.0, 90.0], [3.0, 3.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]],
        ],
        jnp.float32,
    )
    params = init_module(
        module, jax.random.key(1), s, t, degenerate, jnp.ones((2, 3), bool), img_shape, img_shape
    )
    # Randomize the zero-init convs so every gradient path is live.
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)

    @jax.jit
    def step(p, s, boxes, valid):
        def f(p, s):
            return module.apply(p, s, t, boxes, valid, img_shape, img_shape)["loss"]

        return jax.value_and_grad(f, argnums=(0, 1))(p, s)

    for boxes, valid in [
        (degenerate, jnp.ones((2, 3), bool)),
        (degenerate, jnp.zeros((2, 3), bool)),  # no boxes at all
        (
            jnp.full((2, 3, 4), jnp.nan, jnp.float32),
            jnp.zeros((2, 3), bool),
        ),  # NaN garbage in padding
    ]:
        loss, (gp, gs) = step(params, s, boxes, valid)
        assert np.isfinite(float(loss))
        assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves((gp, gs)))
    assert step._cache_size() == 1  # static shapes: one compilation


def test_batch_size_override_divides_by_global_batch():
    module = FGDLoss(CT, CT)
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(2, 6, 6, CT)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(2, 6, 6, CT)), jnp.float32)
    boxes = jnp.array([[[4.0, 4.0, 20.0, 30.0]], [[0.0, 0.0, 48.0, 48.0]]])
    valid, shp = jnp.ones((2, 1), bool), jnp.array([[48, 48], [48, 48]])
    params = init_module(module, jax.random.key(0), s, t, boxes, valid, shp, shp)
    apply = jax.jit(lambda p, n: module.apply(p, s, t, boxes, valid, shp, shp, batch_size=n))
    local = apply(params, 2)  # = the default (B), checked against the original above
    glob = apply(params, 8)
    for k in local:
        np.testing.assert_allclose(float(glob[k]), float(local[k]) / 4, rtol=1e-6)
    np.testing.assert_allclose(
        float(local["loss"]),
        float(local["loss_fg"] + local["loss_bg"] + local["loss_mask"] + local["loss_relation"]),
        rtol=1e-6,
    )


def test_attention_matches_torch_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 7, 6)).astype(np.float64)
    with jax.enable_x64(True):
        sp, ch = spatial_channel_attention(jnp.asarray(x), 0.5)
        sp_r, ch_r = FeatureLossReference.get_attention(torch.tensor(x.transpose(0, 3, 1, 2)), 0.5)
        np.testing.assert_allclose(np.asarray(sp), sp_r.numpy(), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(ch), ch_r.numpy(), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(sp).mean((1, 2)), 1.0, rtol=1e-12)


def test_bad_inputs_raise_clear_errors():
    module = FGDLoss(CS, CT)
    s = jnp.ones((1, 4, 4, CS))
    t = jnp.ones((1, 4, 4, CT))
    b, v, shp = jnp.zeros((1, 2, 4)), jnp.ones((1, 2), bool), jnp.array([[32, 32]])
    with pytest.raises(ValueError, match="teacher features have 8 channels"):
        init_module(module, jax.random.key(0), s, s, b, v, shp, shp)
    with pytest.raises(ValueError, match="differ in \\[B, H, W\\]"):
        init_module(module, jax.random.key(0), s, jnp.ones((1, 5, 4, CT)), b, v, shp, shp)
    with pytest.raises(ValueError, match="box_scale"):
        init_module(FGDLoss(CS, CT, box_scale="pad"), jax.random.key(0), s, t, b, v, shp, shp)
    with pytest.raises(ValueError, match="valid must be"):
        fg_bg_masks(b, jnp.ones((1, 3), bool), shp, shp, (4, 4))


def test_fused_passes_vjps_match_autodiff_of_the_plain_formulas():
    """The three fused passes' hand-written VJPs, every input's cotangent (teacher-side ones
    included, which the loss itself never uses), against numerical differentiation (float64)
    and against autodiff of the plain formulas."""
    from jax.test_util import check_grads

    from fgd_jax.distill import fgd

    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        s, t = (jnp.asarray(rng.normal(size=(2, 3, 4, 5))) for _ in range(2))
        k = jnp.asarray(rng.normal(size=(5,)))
        w_s, w_t = (jnp.asarray(rng.uniform(0.1, 1, size=(2, 3, 4))) for _ in range(2))
        ch = jnp.asarray(rng.uniform(0.5, 2, size=(2, 5)))
        d = jnp.asarray(rng.normal(size=(2, 5)))
        colsum = jnp.sum(s - t, axis=(1, 2))

        def plain_stats(x, k):
            return jnp.mean(jnp.abs(x), -1), jnp.mean(jnp.abs(x), (1, 2)), x @ k

        def plain_pool(s, t, w_s, w_t, ch):
            ctx = lambda x, w: jnp.sum(w[..., None] * x, (1, 2))  # noqa: E731
            per_cell = jnp.sum((s - t) ** 2 * ch[:, None, None, :], -1)
            return ctx(s, w_s), ctx(t, w_t), per_cell, jnp.sum(s - t, (1, 2))

        def plain_relation(s, t, d):
            return jnp.sum((s - t + d[:, None, None, :]) ** 2)

        cases = [
            (fgd._abs_and_logit_stats, plain_stats, (s, k)),
            (fgd._pool_and_focal, plain_pool, (s, t, w_s, w_t, ch)),
            (lambda s, t, d: fgd._relation_sum(s, t, d, colsum), plain_relation, (s, t, d)),
        ]
        for fused, plain, args in cases:
            check_grads(fused, args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
            out_f, vjp_f = jax.vjp(fused, *args)
            out_p, vjp_p = jax.vjp(plain, *args)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), out_f, out_p)
            cot = jax.tree.map(lambda o: jnp.asarray(rng.normal(size=o.shape)), out_p)
            for gf, gp in zip(vjp_f(cot), vjp_p(cot), strict=True):
                np.testing.assert_allclose(gf, gp, rtol=1e-10, atol=1e-12)
