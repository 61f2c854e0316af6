"""Golden file for the DCN backbone parity test, from real mmdetection 3.3 / mmcv 2.1 (CPU ops).

Run with the oracle venv, from the repository root:

    /work/oracle/mmdet-venv/bin/python scripts/oracles/make_dcn_golden.py

Writes `tests/golden/dcn/resnext50_dcn.npz` (read by tests/test_resnet_dcn.py; the tests never
need mmdetection). The model: mmdetection `ResNeXt(depth=50, groups=4, base_width=4,
dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False),
stage_with_dcn=(False, True, True, True))`, eval mode (BN on running statistics), i.e. the
DCN teachers' backbone (ResNeXt-101 32x4d / 64x4d with DCN in c3-c5) with the fewest blocks and
groups mmdetection allows for Bottleneck (BasicBlock asserts `dcn is None`), on one seeded
1x3x96x96 image (C3..C5: 12x12, 6x6, 3x3). Not smaller: mmcv's `DeformConv2dPack.forward` calls
the op directly, without `DeformConv2d.forward`'s zero-pad-and-crop of maps smaller than the
kernel, and the CPU op raises "input image is smaller than kernel" for any DCN input under 3x3
(a 64x96 image gives stage 4's stride-1 DCNs 2x3 maps). Our op has no such limit.

Weights are not stored (they would be ~30 MB): `seeded_state_dict` draws every tensor from a
numpy generator seeded by the key's crc32 (numpy only, so the test regenerates them without
torch); the file keeps each key's shape and float64 sum, which the test checks before use.
The `conv_offset` weights are non-zero (std chosen so the offsets reach a few pixels, many
samples fall outside the maps), and BN statistics are non-trivial.

Recorded: `x` [1, 3, 96, 96], `out{i}` for i = 1, 2, 3 (C3, C4, C5: the DCN stages; NCHW,
float32 run) and `out3_f64` (C5 of the same model and input in float64, `model.double()`; mmcv's
CPU deformable conv is templated on the float type; C5 depends on every layer), `keys`, `shapes`
(flattened, with `ndims`), `sums`. About 0.6 MB.

Also writes `tests/golden/dcn/cascade_x101_dcn_keys.npz`: the state-dict keys and shapes (no
values) of the whole `cascade-mask-rcnn_x101-32x4d-dconv-c3-c5_fpn_1x_coco` detector built from
mmdetection's own config (2.x name: `cascade_mask_rcnn_x101_32x4d_fpn_dconv_c3-c5_1x_coco`), the
paper's Faster R-CNN teacher, so the test can check that our feature teacher takes exactly its
`backbone.*` / `neck.*` keys and drops its cascade / mask heads by name.

mmdetection 3.3 vs 2.11 here: `ResNet` / `ResNeXt` `Bottleneck` build `conv2` the same way
(`dcn.pop('fallback_on_stride')`, `build_conv_layer(dcn, width, width, 3, stride, padding=
dilation, dilation, groups, bias=False)`, 'DCN' = mmcv `DeformConv2dPack`); mmcv 2.1's
`DeformConv2dPack` is 1.x's (same `conv_offset`, same CUDA/CPU im2col).
"""

from __future__ import annotations

import os
import zlib

import numpy as np

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "golden", "dcn")
NAME = "resnext50_dcn.npz"
SEED = 18
INPUT_SHAPE = (1, 3, 96, 96)
CONFIG = dict(
    depth=50,
    groups=4,
    base_width=4,
    dcn=dict(type="DCN", deform_groups=1, fallback_on_stride=False),
    stage_with_dcn=(False, True, True, True),
    out_indices=(1, 2, 3),
)


def seeded_tensor(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 value of state-dict entry `key` (mmdetection name) of shape `shape`."""
    rng = np.random.default_rng([SEED, zlib.crc32(key.encode())])
    leaf = key.rsplit(".", 1)[-1]
    if "conv_offset" in key:
        if leaf == "weight":  # offsets of a few pixels from post-ReLU activations
            fan_in = int(np.prod(shape[1:]))
            return (rng.standard_normal(shape) * 1.5 / np.sqrt(fan_in)).astype(np.float32)
        return rng.uniform(-1.5, 1.5, shape).astype(np.float32)
    if len(shape) == 4:  # conv: He normal
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    block_out = ".bn3." in key or ".downsample.1." in key
    if leaf == "weight":  # BN scale; smaller on the residual branch keeps 16 blocks bounded
        lo, hi = (0.2, 0.5) if block_out else (0.5, 1.0)
        return rng.uniform(lo, hi, shape).astype(np.float32)
    if leaf in ("bias", "running_mean"):
        return rng.uniform(-0.2, 0.2, shape).astype(np.float32)
    if leaf == "running_var":
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    raise ValueError(f"no rule for {key} {shape}")


def write_cascade_keys() -> None:
    """Keys and shapes of the Cascade Mask R-CNN X101-32x4d DCN c3-c5 teacher's state dict."""
    import mmdet
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    name = "cascade-mask-rcnn_x101-32x4d-dconv-c3-c5_fpn_1x_coco.py"
    cfg = Config.fromfile(os.path.join(os.path.dirname(mmdet.__file__), ".mim/configs/dcn", name))
    cfg.model.backbone.init_cfg = None  # no download
    sd = MODELS.build(cfg.model).state_dict()
    keys = list(sd)
    path = os.path.join(OUT, "cascade_x101_dcn_keys.npz")
    np.savez_compressed(
        path,
        keys=np.array(keys),
        ndims=np.array([sd[k].ndim for k in keys]),
        shapes=np.array([d for k in keys for d in sd[k].shape]),
    )
    kept = sum(k.startswith(("backbone.", "neck.")) for k in keys)
    print(f"wrote {path}: {len(keys)} keys, {kept} under backbone./neck.")


def main() -> None:
    import mmcv.ops  # noqa: F401  (registers 'DCN' in mmcv's conv layers)
    import torch
    from mmdet.models.backbones import ResNeXt

    torch.manual_seed(0)
    model = ResNeXt(**CONFIG, norm_eval=True, init_cfg=None)
    model.eval()  # (mmdet ResNet.train returns None, so no chaining)
    sd = model.state_dict()
    keys = [k for k in sd if not k.endswith("num_batches_tracked")]
    vals = {k: seeded_tensor(k, tuple(sd[k].shape)) for k in keys}
    model.load_state_dict({k: torch.from_numpy(v) for k, v in vals.items()}, strict=False)
    assert any("conv_offset" in k for k in keys)

    x = np.random.default_rng(SEED).standard_normal(INPUT_SHAPE).astype(np.float32)
    offsets = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: offsets.append(o.detach().abs()))
        for n, m in model.named_modules()
        if n.endswith("conv_offset")
    ]
    with torch.no_grad():
        outs = model(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    off = torch.cat([o.flatten() for o in offsets])
    print(f"|offset|: mean {off.mean():.2f} max {off.max():.2f} px over {len(offsets)} DCNs")
    with torch.no_grad():
        outs64 = model.double()(torch.from_numpy(x).double())
    rec = dict(
        x=x,
        keys=np.array(keys),
        ndims=np.array([vals[k].ndim for k in keys]),
        shapes=np.array([d for k in keys for d in vals[k].shape]),
        sums=np.array([vals[k].astype(np.float64).sum() for k in keys]),
    )
    for i, o32 in zip(CONFIG["out_indices"], outs, strict=True):
        rec[f"out{i}"] = o32.numpy()
        print(f"C{i + 2}: {tuple(o32.shape)} |max| {o32.abs().max():.3g}")
    rec["out3_f64"] = outs64[-1].numpy()
    err = np.abs(rec["out3"] - rec["out3_f64"]).max() / np.abs(rec["out3_f64"]).max()
    print(f"C5 float32 vs float64 in torch: {err:.2e} of max")
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, NAME)
    np.savez_compressed(path, **rec)
    print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB)")
    write_cascade_keys()


if __name__ == "__main__":
    main()
