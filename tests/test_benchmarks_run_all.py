"""benchmarks.run_all's parsers on real outputs of the scripts (lines copied from
`.cache/benchmark_logs/*.log` of `python -m benchmarks.run_all --quick --threads 1`,
2026-11-26, and `benchmarks.train_step`), so a change of a script's printout that the runner
no longer understands fails here instead of silently dropping a row of the summary."""

import pytest

from benchmarks import run_all as R

LOGS = {
    "backbone": """\
ResNet-50 fwd+bwd, batch 2, 256x256, 2 steps; variant default: fgd_jax ResNet (Flax, NHWC, 1x1 as matmul); XLA_FLAGS=''
flax : build + jit compile  20.2 s
flax :  1.786 img/s  median    1120 ms/step  peak RSS +  329 MiB  [cpu, 0.10.2]
torch:  2.227 img/s  median     898 ms/step  peak RSS +  356 MiB  [torch 1 threads, channels_last]
flax / torch throughput: 0.80x
""",
    "retinanet": """\
| workload | fgd-jax img/s | torchvision img/s | ratio (jax/torch) |
|---|---|---|---|
| train step, batch 2, 512x512 | 0.166 | 0.241 | 0.69 |
| inference, batch 1, 800x1344 | 0.207 | 0.206 | 1.01 |
""",
    "fgd_loss": """\
batch 2, C 256, levels [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)], 10 boxes/image in 100 slots
JAX jit fwd+bwd:     109.70 ms/step (min 107.36)
PyTorch reference:  1761.67 ms/step (min 1652.24)
""",
    "data": """\
workers=0: 35.5 images/s wall, 18.0 images per CPU-second (this process + workers), 223x the train step, first batch after 0.3 s
""",
    "fcos": """\
FCOS R50-FPN, batch 1, 256x256, 80 classes, 1 CPU threads, jax 0.10.2 (cpu), torch 2.14.1+cu130
infer   jax               6.31     0.403     2.48
infer   torch             0.32     0.288     3.48
train   jax              16.18     1.055     0.95
train   torch             1.14     0.953     1.05
""",
    "train_step": """\
SUMMARY train_step | distill step, batch 2, 512x512 | img/s | 0.159 | 0.263 | 0.61
SUMMARY train_step | distill step, batch 2, 800x1344 | img/s | 0.029 | 0.049 | 0.59
""",
    # memory.py's lines (2026-12-06); the torch columns of the 512x512 line join the numbers
    # of a `--skip-jax` run of the same commit (the script prints that layout with both sides)
    "memory": """\
[800x1344 float32] fgd-jax: held 4.723 GiB (arguments 0.501, outputs 0.288, aliased 0.288, temporaries 4.223); code 0.0 MiB; compile 135.3 s, +1.00 GiB RSS
SUMMARY memory | distill step, batch 2, 800x1344, float32 | GiB | 4.723 | - | -
SUMMARY memory | distill step, batch 2, 512x512, float32 | GiB | 1.590 | 1.575 | 0.99
""",
    # deform_conv.py's lines (2026-12-06, a small --size 13 21 --channels 64 run)
    "deform_conv": """\
SUMMARY deform_conv | DCN v1 forward, batch 2, 64->64, 13x21, 3x3, groups 1, dg 1 | ms/step | 15.47 | 18.05 | 1.17
SUMMARY deform_conv | DCN v1 fwd+bwd, batch 2, 64->64, 13x21, 3x3, groups 1, dg 1 | ms/step | 28.93 | 196.44 | 6.79
""",
    # mask_rcnn.py's and gfl.py's tables (2026-12-06 smoke runs, --train-size 128)
    "mask_rcnn": """\
| workload | fgd-jax img/s | torchvision img/s | ratio (jax/torch) |
|---|---|---|---|
| train step, batch 2, 128x128 | 0.018 | 0.284 | 0.06 |
| inference + paste, batch 1, 128x192 | 0.065 | 1.140 | 0.06 |
""",
    "gfl": """\
| workload | fgd-jax img/s | mmdetection img/s | ratio (jax/torch) |
|---|---|---|---|
| train step, batch 2, 128x128 | 0.163 | 0.173 | 0.94 |
| inference, batch 1, 128x192 | 0.175 | 0.305 | 0.58 |
""",
    # yolox.py's table (2026-12-06 smoke run, --train-size 128 --infer-size 128 160)
    "yolox": """\
| workload | fgd-jax img/s | mmdetection img/s | ratio (jax/torch) |
|---|---|---|---|
| train step, batch 2, 128x128 | 5.652 | 5.073 | 1.11 |
| inference, batch 1, 128x160 | 10.128 | 13.418 | 0.75 |
""",
}  # fmt: skip

EXPECTED = {
    "backbone": [("ResNet-50 fwd+bwd, batch 2, 256x256", 1.786, 2.227)],
    "retinanet": [
        ("train step, batch 2, 512x512", 0.166, 0.241),
        ("inference, batch 1, 800x1344", 0.207, 0.206),
    ],
    "fgd_loss": [("FGD loss 5 levels fwd+bwd, 800x1344 canvas, batch 2, C 256", 109.70, 1761.67)],
    "data": [("input pipeline, 0 workers", 35.5, None)],
    "fcos": [
        ("FCOS train, batch 1, 256x256", 0.95, 1.05),
        ("FCOS infer, batch 1, 256x256", 2.48, 3.48),
    ],
    "memory": [
        ("FGD R101->R50 distill step, batch 2, 800x1344, float32", 4.723, None),
        ("FGD R101->R50 distill step, batch 2, 512x512, float32", 1.590, 1.575),
    ],
    "deform_conv": [
        ("DCN v1 forward, batch 2, 64->64, 13x21, 3x3, groups 1, dg 1", 15.47, 18.05),
        ("DCN v1 fwd+bwd, batch 2, 64->64, 13x21, 3x3, groups 1, dg 1", 28.93, 196.44),
    ],
    "mask_rcnn": [
        ("train step, batch 2, 128x128", 0.018, 0.284),
        ("inference + paste, batch 1, 128x192", 0.065, 1.140),
    ],
    "gfl": [
        ("train step, batch 2, 128x128", 0.163, 0.173),
        ("inference, batch 1, 128x192", 0.175, 0.305),
    ],
    "yolox": [
        ("train step, batch 2, 128x128", 5.652, 5.073),
        ("inference, batch 1, 128x160", 10.128, 13.418),
    ],
    "train_step": [
        ("FGD R101->R50 distill step, batch 2, 512x512", 0.159, 0.263),
        ("FGD R101->R50 distill step, batch 2, 800x1344", 0.029, 0.049),
    ],
}


@pytest.mark.parametrize("name", sorted(LOGS))
def test_parsers_read_the_scripts_real_output(name):
    bench = next(b for b in R.BENCHES if b.name == name)
    rows = bench.parse(LOGS[name])
    assert [(r.workload, r.jax, r.torch) for r in rows] == EXPECTED[name]
    for r in rows:
        if r.torch is None:
            assert r.speedup is None
        elif r.unit in ("ms/step", "GiB"):  # time or memory: torch / jax
            assert r.speedup == pytest.approx(r.torch / r.jax)
        else:  # throughput: jax / torch
            assert r.speedup == pytest.approx(r.jax / r.torch)


def test_every_benchmark_has_a_parser_test_and_threads_flag():
    assert {b.name for b in R.BENCHES} == set(LOGS) | {"faster_rcnn"}  # same table as retinanet
    assert R.BENCHES[[b.name for b in R.BENCHES].index("faster_rcnn")].parse is R.parse_md_table
    assert [b.name for b in R.BENCHES if not b.threads] == ["data"]


def test_a_skipped_script_says_why():
    out = "SKIPPED benchmarks.gfl: no oracle python at /x/bin/python (the mmdetection venv)\n"
    assert R.skip_reason(out) == "no oracle python at /x/bin/python (the mmdetection venv)"
    assert R.skip_reason(LOGS["gfl"]) is None
    out = "SKIPPED benchmarks.yolox: /x/bin/python cannot import mmdet / mmcv / torch: boom\n"
    assert R.skip_reason(out) == "/x/bin/python cannot import mmdet / mmcv / torch: boom"
