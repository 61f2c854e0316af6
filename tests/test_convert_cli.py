"""scripts/convert_torch_teacher.py: a torchvision RetinaNet .pth -> orbax -> eval.

Reference: the same state dict converted in memory by `import_torch_checkpoint`.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn

from fgd_jax import checkpoint as ckpt_lib
from fgd_jax.config import load_config
from fgd_jax.convert import import_torch_checkpoint
from fgd_jax.data.pipeline import build_eval_loader
from fgd_jax.data.shapes import class_names
from fgd_jax.eval import main as eval_main
from fgd_jax.models import build_detector

from ._tiny import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import convert_torch_teacher  # noqa: E402

pytestmark = pytest.mark.slow

CONFIG = """
from fgd_jax import config as C

def get_config():
    cfg = C.ConfigDict()
    cfg.model = C.retinanet_model(depth=50, num_classes=6)
    cfg.model.neck.add_extra_convs = "on_output"   # torchvision's LastLevelP6P7 on P5
    cfg.model.neck.relu_before_extra_convs = True
    cfg.data = C.shapes_data(root={root!r}, num_train=8, num_val=4, image_size=64, max_boxes=8)
    cfg.eval = C.eval_settings(batch_size=2)
    cfg.seed = 0
    return cfg
"""


def test_convert_then_eval(tmp_path, capsys):
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=6).eval()
    with torch.no_grad():  # make a few boxes pass the 0.05 threshold
        tv.head.classification_head.cls_logits.bias.fill_(-2.0)
    pth = tmp_path / "tv_retinanet.pth"
    names = tuple(class_names("basic"))  # what an mmdetection checkpoint's meta records
    meta = {"epoch": np.int64(12), "CLASSES": names}
    torch.save({"state_dict": tv.state_dict(), "meta": meta}, pth)
    cfg_file = tmp_path / "tv_cfg.py"
    cfg_file.write_text(CONFIG.format(root=str(tmp_path / "data")))
    out = tmp_path / "teacher"

    assert (
        convert_torch_teacher.main(
            ["--src", str(pth), "--config", str(cfg_file), "--out", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "parameters" in printed and "checksum" in printed and str(out) in printed

    cfg = load_config(str(cfg_file))
    saved, saved_cfg = ckpt_lib.load_variables(str(out))
    assert saved_cfg.model.neck.add_extra_convs == "on_output"
    assert saved_cfg.data.classes == tuple((-1, n) for n in names)  # checked by eval's loader
    in_memory = import_torch_checkpoint(str(pth), cfg.model)
    jax.tree.map(np.testing.assert_array_equal, in_memory, saved)

    # eval runs on the orbax checkpoint, and its detections equal the in-memory model's
    assert eval_main(["--ckpt", str(out), "--out", str(tmp_path / "eval")]) == 0
    dets = json.loads((tmp_path / "eval" / "detections.json").read_text())
    assert dets, "the converted model should detect something with bias -2"
    model = build_detector(cfg.model)
    batch = next(iter(build_eval_loader(cfg.data, batch_size=2, process_index=0, process_count=1)))
    args = [jnp.asarray(batch[k]) for k in ("image", "img_shape", "scale_factor")]
    predict = jax.jit(lambda v, *a: model.apply(v, *a, method="predict"))
    a, b = predict(in_memory, *args), predict(saved, *args)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # the eval json's detections of the first image are the in-memory model's, box by box
    first = [d for d in dets if d["image_id"] == int(batch["image_id"][0])]
    keep = np.asarray(a["valid"][0])
    assert len(first) == int(keep.sum()) > 0
    boxes = np.asarray(a["boxes"][0])[keep]
    want = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    got = np.array([d["bbox"] for d in first])
    np.testing.assert_allclose(got, want, atol=2e-3)  # the json rounds to 3 decimals
    np.testing.assert_allclose(
        [d["score"] for d in first], np.asarray(a["scores"][0])[keep], atol=1e-5
    )


def test_mismatched_architecture_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    pth = tmp_path / "tv3.pth"
    torch.save(tv.state_dict(), pth)
    cfg_file = tmp_path / "tv_cfg.py"
    cfg_file.write_text(CONFIG.format(root=str(tmp_path / "data")))  # 6 classes: mismatch
    rc = convert_torch_teacher.main(
        ["--src", str(pth), "--config", str(cfg_file), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "retina_cls" in err and "shape" in err
    assert not (tmp_path / "o").exists()
