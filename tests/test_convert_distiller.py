"""Import a PyTorch FGD distiller checkpoint (`student.*`, `teacher.*`,
`distill_losses.loss_fgd_fpn_i.*`). References: the detectors' own variables (exported to
mmdetection names) and the torch transcription of the original FeatureLoss, whose loss on
random features our FGDLoss must reproduce with the imported parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks.fgd_torch_reference import FeatureLossReference
from fgd_jax.convert import export_torch_state_dict
from fgd_jax.convert.distiller import import_distiller_checkpoint
from fgd_jax.distill.fgd import FGDLoss
from fgd_jax.models import build_detector

from ._tiny import tiny_config


def _torch_fgd(ch, seed):
    torch.manual_seed(seed)
    ref = FeatureLossReference(ch, ch, temp=0.5, gamma_fgd=0.0005)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(
                1.0 + 0.3 * torch.randn_like(p)
                if ".1.weight" in name
                else 0.3 * torch.randn_like(p)
            )
    return ref.double()


def test_distiller_checkpoint_round_trip(tmp_path):
    cfg = tiny_config(str(tmp_path / "data"), "fgd")
    x = jnp.zeros((1, 64, 64, 3))
    student = build_detector(cfg.model).init(jax.random.PRNGKey(0), x)
    teacher = build_detector(cfg.teacher.model).init(jax.random.PRNGKey(1), x)
    refs = [_torch_fgd(32, i) for i in range(cfg.distill.num_levels)]
    sd = {}
    sd.update(
        {
            f"student.{k}": torch.from_numpy(np.array(v))
            for k, v in export_torch_state_dict(student).items()
        }
    )
    sd.update(
        {
            f"teacher.{k}": torch.from_numpy(np.array(v))
            for k, v in export_torch_state_dict(teacher).items()
        }
    )
    for i, ref in enumerate(refs):
        sd.update(
            {f"distill_losses.loss_fgd_fpn_{i}.{k}": v.float() for k, v in ref.state_dict().items()}
        )
    path = tmp_path / "fgd_distiller.pth"
    torch.save({"state_dict": sd, "meta": {"epoch": 24}}, path)

    got = import_distiller_checkpoint(str(path), cfg)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, student), got["student"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, teacher), got["teacher"])

    # the imported FGD params give the original's loss (float64 on both sides)
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 8, 8, 32))
    t = rng.normal(size=(2, 8, 8, 32))
    boxes = np.array(
        [[[4.0, 4.0, 30.0, 40.0], [0, 0, 0, 0]], [[10.0, 20.0, 60.0, 64.0], [1, 1, 9, 9]]]
    )
    valid = np.array([[True, False], [True, True]])
    shape = np.array([[64, 64], [64, 64]], np.int32)
    with jax.enable_x64(True):
        params = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64), got["distill_losses"]["loss_fgd_fpn_2"]
        )
        ours = FGDLoss(32, 32, temp=0.5, gamma_fgd=0.0005).apply(
            {"params": params},
            jnp.asarray(s),
            jnp.asarray(t),
            jnp.asarray(boxes),
            jnp.asarray(valid),
            jnp.asarray(shape),
            jnp.asarray(shape),
        )
        ours = {k: float(v) for k, v in ours.items()}
    gt = [torch.tensor(boxes[i][valid[i]]) for i in range(2)]
    metas = [{"img_shape": (64, 64, 3)}] * 2
    ref_out = refs[2](
        torch.tensor(s.transpose(0, 3, 1, 2)), torch.tensor(t.transpose(0, 3, 1, 2)), gt, metas
    )
    for k in ("loss", "fg", "bg", "mask", "relation"):
        # the checkpoint stores float32 weights: compare at float32 accuracy
        np.testing.assert_allclose(ours[k], float(ref_out[k].detach()), rtol=1e-5, err_msg=k)


def test_distiller_checkpoint_errors_name_the_part(tmp_path):
    cfg = tiny_config(str(tmp_path / "data"), "fgd")
    with pytest.raises(ValueError, match="no 'student"):
        import_distiller_checkpoint({"backbone.conv1.weight": np.zeros((1,))}, cfg)
    student = build_detector(cfg.model).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    sd = {f"student.{k}": v for k, v in export_torch_state_dict(student).items()}
    with pytest.raises(ValueError, match="distill_losses part"):
        import_distiller_checkpoint(sd, cfg)
