"""ResNet / ResNeXt backbones against torchvision (reference), weights moved by the converter.

Reference: torchvision.models ResNets in eval mode (BN on running statistics), with BN
statistics and affine parameters randomized so BN is not the identity. Tolerance: C2..C5
equal within 1e-4 relative to the output's max magnitude (fp32, highest matmul precision).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
import torchvision
from torchvision.models.resnet import Bottleneck as TvBottleneck
from torchvision.models.resnet import ResNet as TvResNet

from fgd_jax import config as C
from fgd_jax.convert import convert_state_dict, module_path
from fgd_jax.models import build_backbone, build_detector, init_module, trainable_mask
from fgd_jax.models.resnet import ResNet, stage_out_channels

RTOL = 1e-4


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.randn(c, generator=g) * 0.1
            m.running_mean = torch.randn(c, generator=g) * 0.1
            m.running_var = torch.rand(c, generator=g) + 0.5
    return model.eval()


def torch_stages(model: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    """C2..C5 of a torchvision ResNet, NHWC numpy."""
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        outs = []
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            x = layer(x)
            outs.append(x.permute(0, 2, 3, 1).numpy())
    return outs


def convert_backbone(model: torch.nn.Module, flax_model: ResNet, x: np.ndarray) -> dict:
    shapes = jax.eval_shape(flax_model.init, jax.random.key(0), x)
    return convert_state_dict(model.state_dict(), shapes, rename=[(r"^fc\.", None)])


def assert_close(got, want, rtol=RTOL):
    got = np.asarray(got, np.float32)
    scale = float(np.max(np.abs(want)))
    err = float(np.max(np.abs(got - want))) / scale
    assert got.shape == want.shape
    assert err <= rtol, f"max relative error {err:.2e} > {rtol:.0e}"
    return err


def check_against_torch(tv_model, flax_model, size=64, seed=0):
    torch.manual_seed(seed)
    randomize_bn(tv_model, seed)
    x = np.random.RandomState(seed).randn(1, size, size, 3).astype(np.float32)
    want = torch_stages(tv_model, torch.from_numpy(x).permute(0, 3, 1, 2))
    variables = convert_backbone(tv_model, flax_model, x)
    got = jax.jit(flax_model.apply)(variables, x)
    assert len(got) == 4
    return [assert_close(g, w) for g, w in zip(got, want, strict=True)]


def test_resnet18_matches_torchvision():
    torch.manual_seed(0)
    check_against_torch(torchvision.models.resnet18(), ResNet(depth=18), size=48)


def test_resnet10_matches_torchvision_basicblock_resnet():
    # one BasicBlock per stage: torchvision's generic ResNet class with layers (1, 1, 1, 1)
    from torchvision.models.resnet import BasicBlock
    from torchvision.models.resnet import ResNet as TorchResNet

    torch.manual_seed(0)
    check_against_torch(TorchResNet(BasicBlock, [1, 1, 1, 1]), ResNet(depth=10), size=48)


def test_resnet50_matches_torchvision():
    torch.manual_seed(0)
    check_against_torch(torchvision.models.resnet50(), ResNet(depth=50), size=64)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, make, flax_model",
    [
        ("resnet34", lambda: torchvision.models.resnet34(), ResNet(depth=34)),
        ("resnet101", lambda: torchvision.models.resnet101(), ResNet(depth=101)),
        ("resnet152", lambda: torchvision.models.resnet152(), ResNet(depth=152)),
        (
            "resnext101_64x4d",
            lambda: torchvision.models.resnext101_64x4d(),
            ResNet(depth=101, groups=64, base_width=4),
        ),
        (
            "resnext101_32x8d",
            lambda: torchvision.models.resnext101_32x8d(),
            ResNet(depth=101, groups=32, base_width=8),
        ),
        (
            "resnext101_32x4d",
            lambda: TvResNet(TvBottleneck, [3, 4, 23, 3], groups=32, width_per_group=4),
            ResNet(depth=101, groups=32, base_width=4),
        ),
    ],
)
def test_deep_resnets_match_torchvision(name, make, flax_model):
    torch.manual_seed(1)
    check_against_torch(make(), flax_model, size=32, seed=1)


@pytest.mark.slow
def test_caffe_style_matches_torchvision_with_stride_on_conv1():
    """mmdetection caffe style: stride on the first 1x1 conv of each downsampling block."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet50()
    for layer in (tv.layer2, tv.layer3, tv.layer4):
        layer[0].conv1.stride = (2, 2)
        layer[0].conv2.stride = (1, 1)
    check_against_torch(tv, ResNet(depth=50, style="caffe"), size=64)
    # pytorch style differs from this model (the test can fail if style is ignored).
    x = np.random.RandomState(0).randn(1, 64, 64, 3).astype(np.float32)
    pt = ResNet(depth=50, style="pytorch")
    got = jax.jit(pt.apply)(convert_backbone(tv, pt, x), x)[-1]
    want = torch_stages(tv, torch.from_numpy(x).permute(0, 3, 1, 2))[-1]
    assert np.max(np.abs(np.asarray(got) - want)) > 1e-2 * np.max(np.abs(want))


def test_out_indices_and_build_backbone_from_config():
    cfg = C.resnet_backbone(depth=18, out_indices=(1, 3), frozen_stages=-1)
    model = build_backbone(cfg)
    x = jnp.zeros((2, 64, 96, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    outs = jax.eval_shape(model.apply, variables, x)
    assert [o.shape for o in outs] == [(2, 8, 12, 128), (2, 2, 3, 512)]
    assert stage_out_channels(18, (1, 3)) == C.backbone_out_channels(cfg) == (128, 512)
    # all four stages exist (as in mmdetection), whatever out_indices says
    assert {"layer1_0", "layer4_1"} <= set(variables["params"])
    with pytest.raises(ValueError, match="unknown keys.*'depht'"):
        build_backbone(ml_collections.ConfigDict(dict(depht=50)))
    with pytest.raises(ValueError, match="invalid depth 42"):
        jax.eval_shape(ResNet(depth=42).init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="invalid style 'tf'"):
        jax.eval_shape(ResNet(depth=50, style="tf").init, jax.random.key(0), x)


def test_bf16_compute_keeps_fp32_params():
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18())
    x = np.random.RandomState(0).randn(1, 48, 48, 3).astype(np.float32)
    model = ResNet(depth=18, dtype=jnp.bfloat16)
    variables = convert_backbone(tv, model, x)
    init = jax.eval_shape(model.init, jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(init))
    got = jax.jit(model.apply)(variables, x)
    want = torch_stages(tv, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert all(g.dtype == jnp.bfloat16 for g in got)
    assert_close(got[-1], want[-1], rtol=5e-2)


def _mmdet_frozen_names(frozen_stages: int) -> set[str]:
    """Reference: mmdetection `ResNet._freeze_stages` applied to a torchvision ResNet-18:
    the torch parameter names with requires_grad=False, mapped to Flax paths."""
    tv = torchvision.models.resnet18()
    if frozen_stages >= 0:
        for m in (tv.conv1, tv.bn1):
            for p in m.parameters():
                p.requires_grad = False
    for i in range(1, frozen_stages + 1):
        for p in getattr(tv, f"layer{i}").parameters():
            p.requires_grad = False
    names = set()
    for name, p in tv.named_parameters():
        if not p.requires_grad:
            mod = name.rpartition(".")[0]
            names.add("/".join(module_path(mod)))
    return names


@pytest.mark.parametrize(
    "frozen_stages",
    [pytest.param(k, marks=pytest.mark.slow) for k in (-1, 0, 3)] + [1],
)
def test_frozen_stages_zero_gradient_and_mask(frozen_stages):
    model = ResNet(depth=18, frozen_stages=frozen_stages)
    x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
    variables = init_module(model, jax.random.key(0), x)
    params = variables["params"]

    def loss(p):
        outs = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=True)
        return sum(jnp.sum(o**2) for o in outs)

    grads = jax.jit(jax.grad(loss))(params)
    mask = trainable_mask(params, frozen_stages)
    want_frozen = _mmdet_frozen_names(frozen_stages)
    flat_mask = {
        "/".join(str(k.key) for k in path[:-1]): m
        for path, m in jax.tree_util.tree_leaves_with_path(mask)
    }
    assert {k for k, m in flat_mask.items() if not m} == want_frozen
    for (path, g), m in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(mask), strict=True
    ):
        if not m:
            assert np.all(np.asarray(g) == 0), path
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(grads))

    # An optimizer step with weight decay, both masked: frozen leaves do not move at all.
    tx = optax.chain(
        optax.masked(optax.add_decayed_weights(0.1), mask),
        optax.masked(optax.sgd(0.1, momentum=0.9), mask),
        optax.masked(optax.set_to_zero(), jax.tree_util.tree_map(lambda m: not m, mask)),
    )
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    for p0, p1, m in zip(
        jax.tree_util.tree_leaves(params),
        jax.tree_util.tree_leaves(new),
        jax.tree_util.tree_leaves(mask),
        strict=True,
    ):
        assert np.array_equal(np.asarray(p0), np.asarray(p1)) == (not m)


def test_trainable_mask_on_detector_params_and_config():
    model = ResNet(depth=18, frozen_stages=1)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    tree = {"backbone": params, "neck": {"fpn_convs_0": {"conv": {"kernel": jnp.zeros(3)}}}}
    mask = trainable_mask(tree, C.retinanet_model(depth=18))  # backbone.frozen_stages == 1
    assert mask["neck"]["fpn_convs_0"]["conv"]["kernel"] is True
    assert mask["backbone"]["layer1_1"]["bn2"]["scale"] is False
    assert mask["backbone"]["layer2_0"]["conv1"]["kernel"] is True
    with pytest.raises(ValueError, match="'params' collection"):
        trainable_mask({"params": tree}, 1)


def test_norm_requires_grad_false_freezes_every_bn_affine():
    """mmdetection's `norm_cfg=dict(type='BN', requires_grad=False)` (caffe FCOS backbones):
    every BN weight/bias (bn1..bn3, downsample.1, stem bn1) has requires_grad False; convs of
    unfrozen stages still train."""
    cfg = C.fcos_model(depth=50)
    assert cfg.backbone.norm_requires_grad is False
    assert C.retinanet_model(depth=50).backbone.norm_requires_grad is True
    backbone = build_backbone(cfg.backbone)  # the key is accepted, not a module field
    params = jax.eval_shape(backbone.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    mask = trainable_mask({"backbone": params["params"]}, cfg)
    flat = {
        "/".join(str(k.key) for k in path): m
        for path, m in jax.tree_util.tree_leaves_with_path(mask["backbone"])
    }
    torch_bn = {  # torch names of BN params in torchvision's ResNet-50 (same structure)
        "/".join(module_path(k.rsplit(".", 1)[0]))
        for k, v in torchvision.models.resnet50().named_parameters()
        if ".bn" in f".{k}" or ".downsample.1." in k
    }
    for name, m in flat.items():
        module = name.rsplit("/", 1)[0]
        stage_frozen = module.startswith(("conv1", "bn1", "layer1_"))  # frozen_stages=1
        assert m == (not stage_frozen and module not in torch_bn), name
    assert any(flat.values()) and len(torch_bn) == 53


def test_norm_eval_keeps_batch_stats_and_train_bn_matches_torch():
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18())
    # (64 px: C5 is 2x2, so train-mode BN sees 8 values per channel, not an eps-dominated 2)
    x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)

    # norm_eval=True: train-mode apply == eval apply, batch_stats untouched.
    model = ResNet(depth=18, norm_eval=True)
    variables = convert_backbone(tv, model, x)
    train_apply = lambda m: jax.jit(  # noqa: E731
        lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats"])
    )
    outs, upd = train_apply(model)(variables, x)
    for a, b in zip(
        jax.tree_util.tree_leaves(upd["batch_stats"]),
        jax.tree_util.tree_leaves(variables["batch_stats"]),
        strict=True,
    ):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert_close(outs[-1], torch_stages(tv, xt)[-1])

    # norm_eval=False, frozen_stages=1: torch train mode for layer2..4, eval for stem+layer1
    # (mmdetection keeps frozen stages in eval); running stats updated like torch (unbiased).
    model = ResNet(depth=18, norm_eval=False, frozen_stages=1)
    outs, upd = train_apply(model)(variables, x)
    tv.train()
    for m in (tv.bn1, tv.layer1):
        m.eval()
    want = torch_stages(tv, xt)
    for g, w in zip(outs, want, strict=True):
        assert_close(g, w)
    sd = tv.state_dict()
    for path, v in jax.tree_util.tree_leaves_with_path(upd["batch_stats"]):
        keys = [str(k.key) for k in path]
        torch_key = ".".join(
            [
                ".".join(k.split("_")) if k.startswith(("layer", "downsample")) else k
                for k in keys[:-1]
            ]
            + ["running_" + keys[-1]]
        )
        ref = sd[torch_key].numpy()
        np.testing.assert_allclose(np.asarray(v), ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())
    assert not np.array_equal(
        np.asarray(upd["batch_stats"]["layer2_0"]["bn1"]["var"]),
        np.asarray(variables["batch_stats"]["layer2_0"]["bn1"]["var"]),
    )


def test_build_detector_rejects_unknown_type():
    cfg = C.retinanet_model()
    cfg.type = "yolo"
    with pytest.raises(ValueError, match="unknown detector type 'yolo'.*retinanet"):
        build_detector(cfg)
