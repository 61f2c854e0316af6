"""YOLOX's batch-level multi-scale (mmdetection 2.x `YOLOX._preprocess` / `_random_resize`):
the size schedule and the batch resize against torch `F.interpolate`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from fgd_jax.experiment import batch_input_size, resize_batch

SIZES = tuple(range(480, 801, 32))


def test_size_schedule():
    tc = ml_collections.ConfigDict(dict(multiscale_sizes=SIZES, multiscale_interval=10))
    sizes = [batch_input_size(tc, k, seed=0, default_hw=(640, 640)) for k in range(2000)]
    assert len(SIZES) == 11
    # mmdet: the first interval at the default size, then one draw per 10 iterations
    assert set(sizes[:10]) == {(640, 640)}
    blocks = [sizes[i : i + 10] for i in range(0, 2000, 10)]
    assert all(len(set(b)) == 1 for b in blocks)
    drawn = [b[0] for b in blocks[1:]]
    assert {s for s, _ in drawn} == set(SIZES)  # all 11 sizes come up over 199 draws
    assert all(h == w for h, w in drawn)
    # a pure function of (seed, step): a resumed run draws the same; another seed differs
    assert sizes == [batch_input_size(tc, k, 0, (640, 640)) for k in range(2000)]
    assert sizes != [batch_input_size(tc, k, 1, (640, 640)) for k in range(2000)]
    assert batch_input_size(ml_collections.ConfigDict(), 50) is None
    assert batch_input_size(tc, 5) is None  # no default: the first interval is not resized


@pytest.mark.parametrize("size", [(96, 96), (32, 32), (48, 80)])
def test_resize_batch_matches_torch_interpolate(size):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    boxes = rng.uniform(0, 64, (2, 3, 4)).astype(np.float32)
    batch = dict(
        image=jnp.asarray(image),
        boxes=jnp.asarray(boxes),
        valid=jnp.asarray([[True, True, False], [True, False, False]]),
        img_shape=jnp.full((2, 2), 64, jnp.int32),
        pad_shape=jnp.full((2, 2), 64, jnp.int32),
    )
    out = jax.jit(lambda b: resize_batch(b, size))(batch)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(image).permute(0, 3, 1, 2), size=size, mode="bilinear",
        align_corners=False,
    ).permute(0, 2, 3, 1).numpy()  # fmt: skip
    np.testing.assert_allclose(np.asarray(out["image"]), ref, rtol=1e-5, atol=1e-3)
    sy, sx = size[0] / 64, size[1] / 64
    np.testing.assert_allclose(np.asarray(out["boxes"]), boxes * [sx, sy, sx, sy], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["input_scale"]), [[sy, sx]] * 2, rtol=1e-7)
    # img_metas untouched (the FGD YOLOX variant maps boxes with them and the scale)
    np.testing.assert_array_equal(np.asarray(out["img_shape"]), np.asarray(batch["img_shape"]))
    np.testing.assert_array_equal(np.asarray(out["valid"]), np.asarray(batch["valid"]))
    same = resize_batch(batch, (64, 64))
    assert same["image"] is batch["image"]
    np.testing.assert_array_equal(np.asarray(same["input_scale"]), np.ones((2, 2)))
