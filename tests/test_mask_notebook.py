"""notebooks/mask_predictions.ipynb (predicted masks as a picture) and its helper
`fgd_jax.analysis.mask_overlay`.

References: the blend recomputed by hand per pixel; the notebook executed with nbclient (the
kernel helpers of tests/test_notebooks.py) on the golden tiny Mask R-CNN (real mmdetection's
weights, converted) exported with the synthetic shapes set: it must run without errors and
draw its figure.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from fgd_jax import analysis


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
    """On the synthetic shapes set with the golden Mask R-CNN's weights (tests/golden/mask_rcnn,
    real mmdetection's, converted: no init compile, and detections with real masks)."""
    from fgd_jax import checkpoint as ckpt_lib
    from fgd_jax.convert import import_torch_checkpoint

    from ._tiny import tiny_config
    from .test_mask_rcnn_golden import GOLDEN, _cfg
    from .test_notebooks import _KERNEL_ENV, _errors, _execute, _pngs

    cfg = tiny_config(str(tmp_path / "data"), "baseline")
    cfg.model = _cfg()  # 3 classes: they show as the set's first three names
    variables = import_torch_checkpoint(os.path.join(GOLDEN, "mask_rcnn.pth"), cfg.model)
    path = ckpt_lib.save_variables(tmp_path / "model", variables, cfg)
    env = dict(
        _KERNEL_ENV, FGD_NOTEBOOK_MODEL=path, FGD_NOTEBOOK_IMAGES="2", FGD_NOTEBOOK_SCORE="0.3"
    )
    cells = _execute("mask_predictions.ipynb", env, tmp_path)
    assert not _errors(cells), _errors(cells)
    assert _pngs(cells) == 1
    text = "".join(o.get("text", "") for c in cells if c.cell_type == "code" for o in c.outputs)
    shown = [line for line in text.splitlines() if "mask pixels of the shown" in line]
    assert len(shown) == 2 and any(
        line.rstrip().endswith("]") and "[]" not in line for line in shown
    )
