"""benchmarks/common.py: the alternating timer, the synthetic batch, argument checks."""

import argparse

import numpy as np
import pytest

from benchmarks import common


def test_time_interleaved_alternates_and_warms_up():
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    out = common.time_interleaved(fns, iters=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # one warm-up each, then alternating
    assert set(out) == {"a", "b"} and all(v >= 0 for v in out.values())


def test_synthetic_batch_follows_the_batch_contract():
    b = common.synthetic_batch(3, 64, 96, g=5, seed=1)
    assert b["image"].shape == (3, 64, 96, 3) and b["image"].dtype == np.float32
    assert b["boxes"].shape == (3, 5, 4) and b["valid"].all()
    x1, y1, x2, y2 = np.moveaxis(b["boxes"], -1, 0)
    assert np.all((0 <= x1) & (x1 < x2) & (x2 <= 96) & (0 <= y1) & (y1 < y2) & (y2 <= 64))
    assert np.all(b["img_shape"] == [64, 96]) and b["labels"].max() < 80
    np.testing.assert_array_equal(b["boxes"], common.synthetic_batch(3, 64, 96, 5, 1)["boxes"])


def test_setup_rejects_a_bad_thread_count():
    p = argparse.ArgumentParser()
    common.add_common_args(p)
    with pytest.raises(SystemExit, match="--threads must be in"):
        common.setup(p.parse_args(["--threads", "0"]))


def test_memory_peak_breakdown_reads_xla_live_ranges(tmp_path):
    """benchmarks.memory.peak_breakdown on a hand-written dump (the format XLA writes with
    --xla_dump_to): the buffers live at the peak, grouped by their op_name's first levels."""
    from benchmarks import memory

    stem = tmp_path / "module_0002.jit_step_fn.cpu_after_optimizations"
    (tmp_path / f"{stem.name}.txt").write_text(
        "ENTRY %main {\n"
        '  %a.1 = f32[4]{0} fusion(%p), metadata={op_name="jit(step_fn)/jvp(M)/s/t/u/layer2_3/c"}\n'
        '  %b = f32[8]{0} fusion(%p), metadata={op_name="jit(step_fn)/jvp(M)/s/t/u/layer2_0/c"}\n'
        "  %c = f32[2]{0} copy(%p)\n"
        "}\n"
    )
    (tmp_path / f"{stem.name}-live-range.txt").write_text(
        "HloLiveRange (max 9):\n  BufferLiveRange:\n    a.1{}:1-5\n"
        "  Live ranges at 4 (peak):\n"
        "    b{}: 32 bytes (cumulative: 32 bytes)\n"
        "    a.1{}: 16 bytes (cumulative: 48 bytes)\n"
        "    c{}: 8 bytes (cumulative: 56 bytes)\n"
    )
    total, groups = memory.peak_breakdown(str(tmp_path), top=5)
    assert total == 56
    assert groups == [(48, "jvp(M)/s/t/u/layer2_*"), (8, "(no op_name)")]
    with pytest.raises(FileNotFoundError, match="no step live-range dump"):
        memory.peak_breakdown(str(tmp_path / "missing"))
