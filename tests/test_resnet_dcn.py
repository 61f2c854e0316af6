"""ResNet / ResNeXt with deformable conv2 (mmdetection `dcn=dict(type='DCN')`,
`stage_with_dcn=(False, True, True, True)`) and the mmcv DCN pack layers.

- The backbone against real mmdetection 3.3 / mmcv 2.1: golden file
  tests/golden/dcn/resnext50_dcn.npz written by scripts/oracles/make_dcn_golden.py (ResNeXt-50
  4x4d, DCN in c3-c5, seeded non-trivial weights incl. `conv_offset`, a 96x96 image). The
  mmdetection state dict is converted by the generic name rules (`conv2.conv_offset.*` ->
  `conv2/conv_offset/*`). float32: C3..C5 within 1e-4 of the output scale; float64 (x64): C5
  within 1e-9.
- `DeformConv2dPack` / `ModulatedDeformConv2dPack` against torch: `conv2d` for the offset branch,
  mmcv's chunk / cat / sigmoid, then `torchvision.ops.deform_conv2d` (mmcv's kernel).
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from fgd_jax.convert.core import convert_state_dict
from fgd_jax.models.deform import DeformConv2dPack, ModulatedDeformConv2dPack
from fgd_jax.models.resnet import ResNet

ROOT = os.path.join(os.path.dirname(__file__), "..")
GOLDEN = os.path.join(ROOT, "tests", "golden", "dcn", "resnext50_dcn.npz")


def _oracle_script():
    path = os.path.join(ROOT, "scripts", "oracles", "make_dcn_golden.py")
    spec = importlib.util.spec_from_file_location("make_dcn_golden", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # numpy-only at import
    return mod


def _golden_model_and_variables(dtype):
    gen = _oracle_script()
    g = np.load(GOLDEN)
    keys = [str(k) for k in g["keys"]]
    shapes, pos = [], 0
    for nd in g["ndims"]:
        shapes.append(tuple(int(d) for d in g["shapes"][pos : pos + nd]))
        pos += nd
    sd = {k: gen.seeded_tensor(k, s) for k, s in zip(keys, shapes, strict=True)}
    sums = np.array([sd[k].astype(np.float64).sum() for k in keys])
    np.testing.assert_allclose(sums, g["sums"], rtol=1e-12)  # same weights as the oracle's
    cfg = dict(gen.CONFIG)
    dcn = cfg.pop("dcn")
    assert dcn == dict(type="DCN", deform_groups=1, fallback_on_stride=False)
    model = ResNet(
        depth=cfg["depth"],
        groups=cfg["groups"],
        base_width=cfg["base_width"],
        dcn="DCN",
        dcn_deform_groups=1,
        stage_with_dcn=cfg["stage_with_dcn"],
        out_indices=cfg["out_indices"],
    )
    x = jnp.asarray(g["x"].transpose(0, 2, 3, 1), dtype)
    target = jax.eval_shape(model.init, jax.random.key(0), x)
    variables = convert_state_dict(sd, target)  # strict: every key used, every leaf filled
    variables = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)
    return g, model, variables, x


@pytest.mark.slow
def test_resnext_dcn_vs_mmdetection_float32():
    g, model, variables, x = _golden_model_and_variables(jnp.float32)
    assert "conv_offset" in variables["params"]["layer2_0"]["conv2"]
    assert "conv_offset" not in variables["params"]["layer1_0"]["conv2"]
    outs = jax.jit(model.apply)(variables, x)
    for i, out in zip((1, 2, 3), outs, strict=True):
        ref = g[f"out{i}"].transpose(0, 2, 3, 1)
        assert out.shape == ref.shape
        scale = np.abs(ref).max()
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.slow
def test_resnext_dcn_vs_mmdetection_float64():
    with jax.enable_x64(True):
        g, model, variables, x = _golden_model_and_variables(jnp.float64)
        c5 = jax.jit(model.apply)(variables, x)[-1]
        assert c5.dtype == jnp.float64
        ref = g["out3_f64"].transpose(0, 2, 3, 1)
        scale = np.abs(ref).max()
        np.testing.assert_allclose(np.asarray(c5), ref, rtol=1e-9, atol=1e-9 * scale)


def test_dcn_refused_on_basic_block_and_unknown_type():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="Bottleneck"):
        ResNet(depth=18, dcn="DCN", stage_with_dcn=(False, True, True, True)).init(
            jax.random.key(0), x
        )
    with pytest.raises(ValueError, match="dcn"):
        ResNet(depth=50, dcn="DCNv3").init(jax.random.key(0), x)


@pytest.mark.parametrize("modulated", [False, True])
def test_pack_layers_vs_torchvision(modulated):
    rng = np.random.default_rng(int(modulated))
    b, c, h, w, cout, groups, dg, stride = 2, 8, 7, 9, 6, 2, 2, 2
    cls = ModulatedDeformConv2dPack if modulated else DeformConv2dPack
    layer = cls(cout, 3, stride, groups=groups, deform_groups=dg)
    x = rng.normal(0, 1, (b, h, w, c)).astype(np.float32)
    params = layer.init(jax.random.key(0), x)["params"]
    n_off = (3 if modulated else 2) * dg * 9
    assert params["conv_offset"]["kernel"].shape == (3, 3, c, n_off)
    assert not np.any(params["conv_offset"]["kernel"])  # zero init, as mmcv
    assert ("bias" in params) == modulated
    params = jax.tree.map(lambda a: rng.normal(0, 0.5, a.shape).astype(np.float32), params)
    got = np.asarray(layer.apply({"params": params}, x))

    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    out = torch.nn.functional.conv2d(
        tx,
        t(params["conv_offset"]["kernel"].transpose(3, 2, 0, 1)),
        t(params["conv_offset"]["bias"]),
        stride=stride,
        padding=1,
    )
    mask = None
    if modulated:  # mmcv ModulatedDeformConv2dPack.forward
        o1, o2, m = torch.chunk(out, 3, dim=1)
        out, mask = torch.cat((o1, o2), dim=1), torch.sigmoid(m)
    ref = torchvision.ops.deform_conv2d(
        tx,
        out,
        t(params["kernel"].transpose(3, 2, 0, 1)),
        t(params["bias"]) if modulated else None,
        stride=stride,
        padding=1,
        mask=mask,
    )
    ref = ref.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
