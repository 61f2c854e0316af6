"""Golden file for the RepPoints X101-DCN teacher's distilled features (backbone + GN FPN), from
real mmdetection 3.3 / mmcv 2.1 (CPU ops).

Run with the oracle venv, from the repository root:

    /work/oracle/mmdet-venv/bin/python scripts/oracles/make_reppoints_teacher_golden.py

Writes `tests/golden/reppoints/x101_dcn_gn_fpn.npz` (read by tests/test_reppoints.py; the tests
never need mmdetection). The model is the backbone + neck of
`reppoints_moment_x101_fpn_dconv_c3-c5_gn-neck+head_2x_coco` (the FGD RepPoints teacher) at the
smallest size of the same code paths: mmdetection `ResNeXt(depth=50, groups=4, base_width=4,
dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False), stage_with_dcn=(False, True,
True, True))` (scripts/oracles/make_dcn_golden.py's backbone and weights: `seeded_tensor`) and
`FPN(in_channels=(256, 512, 1024, 2048), out_channels=16, start_level=1,
add_extra_convs='on_input', num_outs=5, norm_cfg=GN(4 groups))` with the weights of
`seeded_neck_tensor` (numpy only, so the test regenerates every weight without torch; the file
keeps keys, shapes and float64 sums), on make_dcn_golden's seeded 1x3x96x96 image (C5 3x3:
mmcv's DCN op refuses maps under the kernel size).

Recorded: the distilled maps FGD hooks, `neck.fpn_convs.{l}.conv` outputs (`pre{l}`, before
GN; P3..P7 12x12 .. 1x1, NHWC) and the neck outputs (`p{l}`), float32; `pre{l}_f64` of the same
model in float64 (`model.double()`).

mmdetection 3.3 vs 2.11 here: `ResNeXt` / `Bottleneck` with DCN (see make_dcn_golden.py) and
`FPN` (ConvModule conv -> GN, `bias='auto'`: no conv bias with GN; extra convs 'on_input' from
C5, later ones on the previous output) are the same code.
"""

from __future__ import annotations

import importlib.util
import os
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "..", "tests", "golden", "reppoints")
NAME = "x101_dcn_gn_fpn.npz"
SEED = 180
NECK = dict(
    in_channels=[256, 512, 1024, 2048],
    out_channels=16,
    start_level=1,
    add_extra_convs="on_input",
    num_outs=5,
    norm_cfg=dict(type="GN", num_groups=4, requires_grad=True),
)


def dcn_script():
    """scripts/oracles/make_dcn_golden.py as a module (numpy only at import)."""
    path = os.path.join(HERE, "make_dcn_golden.py")
    spec = importlib.util.spec_from_file_location("make_dcn_golden", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def seeded_neck_tensor(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 value of the neck's state-dict entry `key` (without `neck.`)."""
    rng = np.random.default_rng([SEED, zlib.crc32(key.encode())])
    leaf = key.rsplit(".", 1)[-1]
    if len(shape) == 4:  # conv: He normal
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    if leaf == "weight":  # GN scale
        return rng.uniform(0.6, 1.4, shape).astype(np.float32)
    if leaf == "bias":
        return rng.uniform(-0.2, 0.2, shape).astype(np.float32)
    raise ValueError(f"no rule for {key} {shape}")


def main() -> None:
    import mmcv.ops  # noqa: F401  (registers 'DCN')
    import torch
    from mmdet.models.backbones import ResNeXt
    from mmdet.models.necks import FPN

    gen = dcn_script()
    torch.manual_seed(0)
    cfg = dict(gen.CONFIG, out_indices=(0, 1, 2, 3))
    backbone = ResNeXt(**cfg, norm_eval=True, init_cfg=None)
    neck = FPN(**NECK)
    vals: dict[str, np.ndarray] = {}
    for prefix, mod, fn in (
        ("backbone.", backbone, gen.seeded_tensor),
        ("neck.", neck, seeded_neck_tensor),
    ):
        sd = {k: v for k, v in mod.state_dict().items() if not k.endswith("num_batches_tracked")}
        vs = {k: fn(k, tuple(v.shape)) for k, v in sd.items()}
        mod.load_state_dict({k: torch.from_numpy(v) for k, v in vs.items()}, strict=False)
        vals.update({prefix + k: v for k, v in vs.items()})
    backbone.eval(), neck.eval()
    x = np.random.default_rng(gen.SEED).standard_normal(gen.INPUT_SHAPE).astype(np.float32)

    def run(dtype):
        pre = []
        hooks = [
            m.conv.register_forward_hook(lambda _m, _i, o: pre.append(o)) for m in neck.fpn_convs
        ]
        with torch.no_grad():
            outs = neck(backbone(torch.from_numpy(x).to(dtype)))
        for h in hooks:
            h.remove()
        return pre, outs

    pre, outs = run(torch.float32)
    keys = list(vals)
    rec = dict(
        x=x,
        keys=np.array(keys),
        ndims=np.array([vals[k].ndim for k in keys]),
        shapes=np.array([d for k in keys for d in vals[k].shape]),
        sums=np.array([vals[k].astype(np.float64).sum() for k in keys]),
    )
    for lvl, (a, b) in enumerate(zip(pre, outs, strict=True)):
        rec[f"pre{lvl}"] = a.permute(0, 2, 3, 1).numpy()
        rec[f"p{lvl}"] = b.permute(0, 2, 3, 1).numpy()
        print(f"P{lvl + 3}: {tuple(a.shape)} |max| pre {a.abs().max():.3g} out {b.abs().max():.3g}")
    backbone.double(), neck.double()
    pre64, _ = run(torch.float64)
    for lvl, a in enumerate(pre64):
        rec[f"pre{lvl}_f64"] = a.permute(0, 2, 3, 1).numpy()
    err = max(
        np.abs(rec[f"pre{i}"] - rec[f"pre{i}_f64"]).max() / np.abs(rec[f"pre{i}_f64"]).max()
        for i in range(5)
    )
    print(f"float32 vs float64 in torch: {err:.2e} of max")
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, NAME)
    np.savez_compressed(path, **rec)
    print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
