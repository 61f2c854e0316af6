"""FPN against torchvision.ops.FeaturePyramidNetwork (LastLevelP6P7 on C5 / on P5,
LastLevelMaxPool) and against a torch functional transcription of mmdetection's `FPN.forward`
(for 'on_lateral' and no ReLU between extra convs), weights transferred by the converter's
torchvision FPN rules. Odd spatial sizes throughout. Tolerance 1e-5 relative (fp32).
"""

from collections import OrderedDict

import jax
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from fgd_jax import config as C
from fgd_jax.convert import convert_state_dict
from fgd_jax.convert.torchvision_backbone import fpn_rules
from fgd_jax.models import build_neck
from fgd_jax.models.fpn import FPN
from fgd_jax.models.layers import resize_nearest_to

RTOL = 1e-5
IN_CH = (4, 8, 12, 16)
SIZES = ((23, 17), (12, 9), (6, 5), (3, 3))  # odd, not exact halvings


def _inputs(seed=0, batch=2):
    rs = np.random.RandomState(seed)
    shapes = [(batch, h, w, c) for (h, w), c in zip(SIZES, IN_CH, strict=True)]
    return [rs.randn(*s).astype(np.float32) for s in shapes]


def _nchw(x):
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.2
    return module.eval()


def _flax_from_torchvision(tv_fpn, fpn: FPN, xs):
    shapes = jax.eval_shape(fpn.init, jax.random.key(0), xs)
    target = {"params": {"neck": shapes["params"]}}
    sd = {f"backbone.fpn.{k}": v for k, v in tv_fpn.state_dict().items()}
    used = len(fpn.in_channels) - fpn.start_level
    variables = convert_state_dict(sd, target, rename=fpn_rules(used))
    return {"params": variables["params"]["neck"]}


def _assert_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        w = w.permute(0, 2, 3, 1).numpy()
        assert g.shape == w.shape
        err = np.max(np.abs(np.asarray(g) - w)) / np.max(np.abs(w))
        assert err <= RTOL, f"relative error {err:.2e}"


@pytest.mark.parametrize(
    "mode, tv_extra, start_level, num_outs",
    [
        ("on_input", lambda: LastLevelP6P7(16, 8), 1, 5),  # RetinaNet: P6 from C5
        ("on_output", lambda: LastLevelP6P7(8, 8), 1, 5),  # P6 from P5 (torchvision use_P5)
        (False, lambda: LastLevelMaxPool(), 0, 5),  # Faster R-CNN: max-pool P6
    ],
)
def test_fpn_matches_torchvision(mode, tv_extra, start_level, num_outs):
    torch.manual_seed(0)
    tv = _randomize(FeaturePyramidNetwork(list(IN_CH[start_level:]), 8, extra_blocks=tv_extra()))
    xs = _inputs()
    fpn = FPN(
        in_channels=IN_CH,
        out_channels=8,
        num_outs=num_outs,
        start_level=start_level,
        add_extra_convs=mode,
        relu_before_extra_convs=True,  # torchvision applies F.relu(p6) before p7
    )
    variables = _flax_from_torchvision(tv, fpn, xs)
    with torch.no_grad():
        feats = OrderedDict((str(i), _nchw(x)) for i, x in enumerate(xs[start_level:]))
        want = list(tv(feats).values())
    got = jax.jit(fpn.apply)(variables, xs)
    _assert_close(got, want)


def _mmdet_fpn_reference(xs, w, start_level, num_outs, mode, relu_before_extra):
    """Torch functional transcription of mmdetection 2.11 `FPN.forward` (no norm/act)."""
    n_used = len(xs) - start_level
    lat = [
        F.conv2d(xs[i + start_level], *w[f"lateral_convs.{i}.conv"], padding=0)
        for i in range(n_used)
    ]
    for i in range(n_used - 1, 0, -1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
    outs = [F.conv2d(lat[i], *w[f"fpn_convs.{i}.conv"], padding=1) for i in range(n_used)]
    source = {"on_input": xs[-1], "on_lateral": lat[-1], "on_output": outs[-1]}[mode]
    outs.append(F.conv2d(source, *w[f"fpn_convs.{n_used}.conv"], stride=2, padding=1))
    for i in range(n_used + 1, num_outs):
        x = F.relu(outs[-1]) if relu_before_extra else outs[-1]
        outs.append(F.conv2d(x, *w[f"fpn_convs.{i}.conv"], stride=2, padding=1))
    return outs


@pytest.mark.parametrize("mode", ["on_lateral", "on_input", "on_output"])
def test_fpn_matches_mmdet_formula_without_relu(mode):
    xs = _inputs(seed=1)
    fpn = FPN(IN_CH, 8, num_outs=6, start_level=1, add_extra_convs=mode)
    variables = jax.eval_shape(fpn.init, jax.random.key(0), xs)
    g = torch.Generator().manual_seed(1)
    w, sd = {}, {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
        name = ".".join(str(k.key) for k in path[:-1]).replace("_convs_", "_convs.")
        if path[-1].key == "kernel":
            kh, kw, ci, co = leaf.shape
            w.setdefault(name, [None, None])[0] = torch.randn(co, ci, kh, kw, generator=g) * 0.2
            sd[f"{name}.weight"] = w[name][0]
        else:
            w.setdefault(name, [None, None])[1] = torch.randn(leaf.shape, generator=g) * 0.2
            sd[f"{name}.bias"] = w[name][1]
    params = convert_state_dict(sd, variables)
    with torch.no_grad():
        want = _mmdet_fpn_reference([_nchw(x) for x in xs], w, 1, 6, mode, False)
    got = jax.jit(fpn.apply)(params, xs)
    assert len(got) == 6
    _assert_close(got, want)


@pytest.mark.parametrize("hw_in, hw_out", [((3, 5), (6, 9)), ((4, 4), (8, 8)), ((5, 7), (11, 13))])
def test_nearest_resize_matches_torch_interpolate(hw_in, hw_out):
    x = np.random.RandomState(0).randn(1, *hw_in, 2).astype(np.float32)
    want = F.interpolate(_nchw(x), size=hw_out, mode="nearest").permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.asarray(resize_nearest_to(x, hw_out)), want)


def test_build_neck_names_and_errors():
    cfg = C.fpn_neck(in_channels=IN_CH, out_channels=8)  # RetinaNet defaults
    fpn = build_neck(cfg)
    xs = _inputs()
    variables = jax.eval_shape(fpn.init, jax.random.key(0), xs)
    names = set(variables["params"])
    assert names == {f"lateral_convs_{i}" for i in range(3)} | {f"fpn_convs_{i}" for i in range(5)}
    assert variables["params"]["fpn_convs_3"]["conv"]["kernel"].shape == (3, 3, 16, 8)  # C5
    outs = jax.eval_shape(fpn.apply, variables, xs)
    assert [o.shape[1:3] for o in outs] == [(12, 9), (6, 5), (3, 3), (2, 2), (1, 1)]
    with pytest.raises(ValueError, match="add_extra_convs 'on_foo'"):
        jax.eval_shape(FPN(IN_CH, 8, 5, 1, add_extra_convs="on_foo").init, jax.random.key(0), xs)
    with pytest.raises(ValueError, match=r"input 2 has shape .*expected \[B, H, W, 12\]"):
        jax.eval_shape(FPN(IN_CH, 8, 5).init, jax.random.key(0), xs[:2] + xs[3:] + xs[3:])
    with pytest.raises(ValueError, match="unknown keys"):
        build_neck(ml_collections.ConfigDict(dict(in_channel=IN_CH)))
