"""notebooks/mask_predictions.ipynb (predicted masks as a picture) and its helper
`fgd_jax.analysis.mask_overlay`.

References: the blend recomputed by hand per pixel; the notebook executed with nbclient (the
kernel helpers of tests/test_notebooks.py) on a tiny Mask R-CNN exported with its init
weights, on the synthetic shapes set: it must run without errors and draw its figure.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgd_jax import analysis
from fgd_jax import config as C


def test_mask_overlay_blends_each_mask_in_its_colour():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    masks = np.zeros((12, 6, 7), bool)
    masks[0, 1:3, 1:4] = True
    masks[1, 2:5, 3:6] = True  # over mask 0 at (2, 3)
    masks[11, 5, 6] = True  # colour 11 % 10 = 1
    out = analysis.mask_overlay(image, masks, alpha=0.25)
    assert out.dtype == np.uint8 and out.shape == image.shape
    c = analysis.MASK_COLORS
    want = image.astype(np.float64)
    for k in range(len(masks)):
        want[masks[k]] = 0.75 * want[masks[k]] + 0.25 * c[k % 10]
    np.testing.assert_array_equal(out, np.clip(np.rint(want), 0, 255).astype(np.uint8))
    untouched = ~masks.any(0)
    np.testing.assert_array_equal(out[untouched], image[untouched])
    with pytest.raises(ValueError, match="do not fit"):
        analysis.mask_overlay(image, masks[:, :5])


@pytest.mark.slow
def test_mask_predictions_notebook(tmp_path):
    from fgd_jax import checkpoint as ckpt_lib
    from fgd_jax.models import build_detector, init_module

    from ._tiny import tiny_config
    from .test_notebooks import _KERNEL_ENV, _errors, _execute, _pngs

    cfg = tiny_config(str(tmp_path / "data"), "baseline")
    cfg.model = C.mask_rcnn_model(
        depth=18, num_classes=cfg.data.num_classes, fpn_channels=16, rpn_feat_channels=16,
        fc_out_channels=32, mask_channels=16,
    )  # fmt: skip
    h, w = cfg.data.canvases[0]
    model = build_detector(cfg.model)
    variables = init_module(model, jax.random.key(0), jnp.zeros((1, h, w, 3)))
    path = ckpt_lib.save_variables(tmp_path / "model", variables, cfg)
    env = dict(
        _KERNEL_ENV, FGD_NOTEBOOK_MODEL=path, FGD_NOTEBOOK_IMAGES="2", FGD_NOTEBOOK_SCORE="0"
    )
    cells = _execute("mask_predictions.ipynb", env, tmp_path)
    assert not _errors(cells), _errors(cells)
    assert _pngs(cells) == 1
