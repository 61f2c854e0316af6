"""Metric logging and the NaN guard.

References: the values written are read back with `json` and compared exactly to the logged
inputs (float32 -> float is exact); TensorBoard events are parsed back from the event file
with tensorboardX's protobuf definitions.
"""

import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from fgd_jax import logging_utils


def test_check_finite_names_bad_losses():
    logging_utils.check_finite({"loss": 1.0, "loss_cls": jnp.float32(0.5), "lr": 0.01}, 3)
    with pytest.raises(FloatingPointError) as err:
        logging_utils.check_finite(
            {"loss_cls": jnp.float32(np.nan), "loss_bbox": 0.3, "loss_fgd_fpn_2": np.inf}, 1234
        )
    msg = str(err.value)
    assert "step 1234" in msg and "loss_cls=nan" in msg and "loss_fgd_fpn_2=inf" in msg
    assert "loss_bbox" not in msg
    # Non-scalar entries (e.g. per-class arrays) are not judged.
    logging_utils.check_finite({"hist": np.array([np.nan, 1.0])}, 0)


def test_metric_logger_jsonl_and_tensorboard(tmp_path):
    with logging_utils.MetricLogger(tmp_path, total_steps=10, is_main=True, progress=False) as lg:
        lg.log(1, {"loss": jnp.float32(0.25), "lr": 0.01, "vec": np.zeros(3)})
        lg.update(3)
        lg.log(4, {"loss": np.float32(0.125)}, prefix="train/")
    recs = logging_utils.read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 4]
    assert recs[0]["loss"] == 0.25 and recs[0]["lr"] == 0.01 and "vec" not in recs[0]
    assert recs[1]["train/loss"] == 0.125
    assert recs[0]["host_rss_mib"] > 10 and recs[1]["time"] >= recs[0]["time"]
    tb_files = os.listdir(tmp_path / "tb")
    assert any(f.startswith("events.out.tfevents") for f in tb_files)
    # Read the TFRecord event file back with tensorboardX's own protobuf definitions.
    from tensorboardX.proto import event_pb2

    path = tmp_path / "tb" / next(f for f in tb_files if f.startswith("events"))
    data, events, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length]))
        pos += 12 + length + 4
    loss = [(e.step, v.simple_value) for e in events for v in e.summary.value if v.tag == "loss"]
    assert loss == [(1, 0.25)]


def test_metric_logger_non_main_writes_nothing(tmp_path):
    lg = logging_utils.MetricLogger(tmp_path / "w", total_steps=5, is_main=False)
    assert lg.log(1, {"loss": 1.0}) == {}
    lg.close()
    assert not (tmp_path / "w").exists()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        logging_utils.read_metrics(tmp_path / "w")


def test_metric_logger_progress_bar(tmp_path, capsys):
    with logging_utils.MetricLogger(tmp_path, total_steps=4, is_main=True, tensorboard=False) as lg:
        for s in range(1, 5):
            lg.update(s)
        lg.log(4, {"loss": 0.5})
        lg.write("done")
    err = capsys.readouterr()
    assert "4/4" in err.err and "done" in (err.out + err.err)
    assert math.isclose(logging_utils.read_metrics(tmp_path)[0]["loss"], 0.5)
