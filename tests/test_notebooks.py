"""The analysis notebooks and their helpers (`fgd_jax.analysis`).

References: the FGD maps against a torch transcription of the original `FeatureLoss`
(`get_attention`, `get_mask` loop, `spatial_pool`) written here, fp32, rtol 1e-5; the
log helpers against a direct `json` parse; `example_batch` against the eval loader;
`load_train_state` against `fgd_jax.experiment.load_model`; the notebooks are executed with
nbclient on the tiny `fgd_run` workdir and must produce figures without errors.
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fgd_jax import analysis
from fgd_jax.distill.fgd import FGDLoss
from fgd_jax.models import init_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")


# ------------------------------------------------------------------------- log helpers
def test_metric_series_and_loss_groups(tmp_path):
    from fgd_jax.logging_utils import MetricLogger, read_metrics

    rng = np.random.default_rng(0)
    keys = ["loss", "loss_cls", "loss_bbox", "lr", "images_per_s"]
    for i in (0, 1, 2, 10):  # level 10 must sort after 2
        keys.append(f"loss_fgd_fpn_{i}")
        keys += [f"loss_fgd_fpn_{i}/{p}" for p in ("fg", "bg", "mask", "relation")]
    with MetricLogger(
        tmp_path, total_steps=6, is_main=True, tensorboard=False, progress=False
    ) as lg:
        for step in range(1, 6):
            lg.log(step, {k: float(rng.normal()) for k in keys})
            if step % 2 == 0:
                lg.log(step, {"AP": float(rng.uniform())}, prefix="eval/")
    records = read_metrics(tmp_path)
    # Independent parse of the same file.
    with open(tmp_path / "metrics.jsonl") as f:
        raw = [json.loads(line) for line in f]
    for key in ("loss_cls", "eval/AP", "loss_fgd_fpn_10/relation"):
        steps, values = analysis.metric_series(records, key)
        ref = [(r["step"], r[key]) for r in raw if key in r]
        np.testing.assert_array_equal(steps, [s for s, _ in ref])
        np.testing.assert_array_equal(values, [v for _, v in ref])
    assert analysis.metric_series(records, "eval/AP")[0].tolist() == [2, 4]
    assert analysis.metric_series(records, "missing")[0].size == 0

    groups = analysis.loss_groups(records)
    assert groups["detector"] == ["loss_bbox", "loss_cls"]
    assert groups["total"] == ["loss"]
    assert groups["fgd_levels"] == [f"loss_fgd_fpn_{i}" for i in (0, 1, 2, 10)]
    assert set(groups["fgd_parts"]) == {"fg", "bg", "mask", "relation"}
    assert groups["fgd_parts"]["bg"] == [f"loss_fgd_fpn_{i}/bg" for i in (0, 1, 2, 10)]
    # A baseline log has no FGD groups.
    base = analysis.loss_groups([{"step": 1, "loss": 1.0, "loss_cls": 0.5}])
    assert base["fgd_levels"] == [] and base["fgd_parts"] == {}


def test_read_eval_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval/metrics.json"):
        analysis.read_eval_metrics(tmp_path)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"per_class_AP": {}}))
    with pytest.raises(ValueError, match="no 'AP' key"):
        analysis.read_eval_metrics(tmp_path)
    m = {"AP": 0.25, "AP50": 0.5, "per_class_AP": {"circle": 0.3}}
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(m))
    assert analysis.read_eval_metrics(tmp_path) == m


# ------------------------------------------------------------------- FGD maps vs torch
def _torch_attention(x: torch.Tensor, temp: float):
    """The original `get_attention` (NCHW)."""
    n, c, h, w = x.shape
    value = torch.abs(x)
    fea_map = value.mean(axis=1, keepdim=True)
    s_att = (h * w * F.softmax((fea_map / temp).view(n, -1), dim=1)).view(n, h, w)
    channel_map = value.mean(axis=2, keepdim=False).mean(axis=2, keepdim=False)
    c_att = c * F.softmax(channel_map / temp, dim=1)
    return s_att, c_att


def _torch_masks(boxes, valid, frame_hw, h, w):
    """The original mask loop (boxes scaled by `frame_hw` per image)."""
    n = boxes.shape[0]
    fg = torch.zeros(n, h, w)
    bg = torch.zeros(n, h, w)
    for i in range(n):
        b = boxes[i][valid[i]]
        fh, fw = float(frame_hw[i][0]), float(frame_hw[i][1])
        x1, x2 = b[:, 0] / fw * w, b[:, 2] / fw * w
        y1, y2 = b[:, 1] / fh * h, b[:, 3] / fh * h
        wmin, wmax = torch.floor(x1).int(), torch.ceil(x2).int()
        hmin, hmax = torch.floor(y1).int(), torch.ceil(y2).int()
        area = 1.0 / (hmax + 1 - hmin) / (wmax + 1 - wmin)
        for j in range(len(b)):
            sl = fg[i][hmin[j] : hmax[j] + 1, wmin[j] : wmax[j] + 1]
            fg[i][hmin[j] : hmax[j] + 1, wmin[j] : wmax[j] + 1] = torch.maximum(sl, area[j])
        bg[i] = torch.where(fg[i] > 0, 0.0, 1.0)
        if torch.sum(bg[i]):
            bg[i] /= torch.sum(bg[i])
    return fg, bg


def _torch_conv1x1(p, x):
    weight = torch.from_numpy(np.array(p["kernel"])).permute(3, 2, 0, 1)  # HWIO -> OIHW
    return F.conv2d(x, weight, torch.from_numpy(np.array(p["bias"])))


@pytest.mark.parametrize("box_scale", ["img_shape", "pad_shape"])
def test_fgd_level_maps_vs_torch(box_scale):
    rng = np.random.default_rng(1)
    b, h, w, cs, ct, temp = 2, 6, 10, 8, 12, 0.5
    feat_s = rng.normal(size=(b, h, w, cs)).astype(np.float32)
    feat_t = rng.normal(size=(b, h, w, ct)).astype(np.float32) * 2
    # Canvas 48x80 (stride 8); image 0 is smaller than the canvas, image 1 fills it.
    img_shape = np.array([[40, 56], [48, 80]], np.int32)
    pad_shape = np.array([[48, 80], [48, 80]], np.int32)
    boxes = np.array(
        [
            [[3.0, 5.0, 20.5, 30.0], [30.0, 10.0, 55.0, 39.0], [0, 0, 0, 0]],
            [[10.0, 8.0, 18.0, 16.0], [0, 0, 0, 0], [0, 0, 0, 0]],
        ],
        np.float32,
    )
    valid = np.array([[True, True, False], [True, False, False]])
    batch = dict(boxes=boxes, valid=valid, img_shape=img_shape, pad_shape=pad_shape)
    module = FGDLoss(student_channels=cs, teacher_channels=ct, temp=temp, box_scale=box_scale)
    args = tuple(jnp.asarray(a) for a in (feat_s, feat_t, boxes, valid, img_shape, pad_shape))
    params = init_module(module, jax.random.PRNGKey(0), *args)["params"]
    maps = analysis.fgd_level_maps(params, feat_s, feat_t, batch, temp, box_scale)

    # torch reference, NCHW
    s = _torch_conv1x1(params["align"], torch.from_numpy(feat_s).permute(0, 3, 1, 2))
    t = torch.from_numpy(feat_t).permute(0, 3, 1, 2)
    s_att_t, c_att_t = _torch_attention(t, temp)
    s_att_s, c_att_s = _torch_attention(s, temp)
    frame = img_shape if box_scale == "img_shape" else pad_shape
    fg, bg = _torch_masks(torch.from_numpy(boxes), torch.from_numpy(valid), frame, h, w)
    diff2 = (s - t) ** 2
    weighted = (diff2 * c_att_t[:, :, None, None]).sum(1) * s_att_t

    def context(p, x):
        return F.softmax(_torch_conv1x1(p, x).view(b, 1, h * w), dim=2).view(b, h, w)

    ref = dict(
        fg=fg,
        bg=bg,
        spatial_s=s_att_s,
        spatial_t=s_att_t,
        channel_s=c_att_s,
        channel_t=c_att_t,
        gap=diff2.sum(1),
        fg_term=weighted * fg,
        bg_term=weighted * bg,
        context_s=context(params["conv_mask_s"], s),
        context_t=context(params["conv_mask_t"], t),
    )
    assert set(maps) == set(ref)
    for k, v in ref.items():
        np.testing.assert_allclose(maps[k], v.detach().numpy(), rtol=1e-5, atol=1e-7, err_msg=k)
    # The two frames really differ on image 0 (smaller than its canvas), not on image 1.
    other = "pad_shape" if box_scale == "img_shape" else "img_shape"
    maps2 = analysis.fgd_level_maps(params, feat_s, feat_t, batch, temp, other)
    assert not np.array_equal(maps["fg"][0], maps2["fg"][0])
    np.testing.assert_array_equal(maps["fg"][1], maps2["fg"][1])
    # The per-cell terms add up to the loss module's unweighted fg / bg parts.
    out = module.apply({"params": params}, *args)
    np.testing.assert_allclose(maps["fg_term"].sum() / b, float(out["fg"]), rtol=1e-5)
    np.testing.assert_allclose(maps["bg_term"].sum() / b, float(out["bg"]), rtol=1e-5)


def test_fgd_level_maps_errors():
    feat = np.zeros((1, 4, 4, 8), np.float32)
    batch = dict(
        boxes=np.zeros((1, 1, 4), np.float32),
        valid=np.zeros((1, 1), bool),
        img_shape=np.array([[32, 32]]),
        pad_shape=np.array([[32, 32]]),
    )
    with pytest.raises(KeyError, match="conv_mask_s"):
        analysis.fgd_level_maps({}, feat, feat, batch, 0.5)
    p = {"kernel": np.zeros((1, 1, 8, 1), np.float32), "bias": np.zeros((1,), np.float32)}
    params = {"conv_mask_s": p, "conv_mask_t": p}
    with pytest.raises(ValueError, match="no 'align' conv"):
        analysis.fgd_level_maps(params, feat, np.zeros((1, 4, 4, 6), np.float32), batch, 0.5)
    with pytest.raises(ValueError, match="box_scale"):
        analysis.fgd_level_maps(params, feat, feat, batch, 0.5, box_scale="canvas")


@pytest.mark.parametrize("style", ["pytorch", "caffe"])
def test_denormalize_inverts_the_pipeline(style):
    from fgd_jax.data.transforms import normalize_pad

    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    out = analysis.denormalize(normalize_pad(img, (8, 9), style), style)
    assert out.dtype == np.uint8 and out.shape == (8, 9, 3)
    np.testing.assert_array_equal(out[:5, :7], img)  # exact after rounding


# ------------------------------------------------------------------------ example batch
def test_example_batch_matches_eval_loader(tmp_path):
    from fgd_jax.data.pipeline import build_eval_loader
    from tests._tiny import tiny_config

    cfg = tiny_config(str(tmp_path / "data"), "baseline")
    cfg.data.num_workers = 0
    loader = build_eval_loader(cfg.data, batch_size=1, process_index=0, process_count=1)
    batches = [next(loader) for _ in range(3)]
    loader.close()
    for i in (0, 2):
        ex = analysis.example_batch(cfg.data, i)
        assert set(ex) == set(batches[i])
        for k, v in batches[i].items():
            np.testing.assert_array_equal(ex[k], v, err_msg=k)
    # A smaller resize inside the same canvas: img_shape < pad_shape, zero padding beyond.
    small = analysis.example_batch(cfg.data, 0, img_scale=(40, 40))
    ih, iw = small["img_shape"][0]
    assert (ih, iw) == (40, 40) and small["pad_shape"][0].tolist() == [64, 64]
    assert np.all(small["image"][0, ih:] == 0) and np.all(small["image"][0, :, iw:] == 0)
    boxes = small["boxes"][0][small["valid"][0]]
    assert boxes.size and boxes[:, 2].max() <= iw and boxes[:, 3].max() <= ih
    with pytest.raises(IndexError, match="8 val images"):
        analysis.example_batch(cfg.data, 8)


def test_image_file_batch_equals_example_batch_for_a_val_image(tmp_path):
    """A user's image file (here: a val image given by path with its boxes) goes through the
    same eval transform as `example_batch` (the reference): identical arrays but the id."""
    from fgd_jax.data.pipeline import load_split
    from fgd_jax.data.transforms import BadImageError
    from tests._tiny import tiny_config

    cfg = tiny_config(str(tmp_path / "data"), "baseline")
    rec = load_split(cfg.data, train=False).records[3]
    assert len(rec["boxes"])
    ours = analysis.image_file_batch(cfg.data, rec["file_name"], rec["boxes"], rec["labels"])
    ref = analysis.example_batch(cfg.data, 3)
    assert set(ours) == set(ref)
    for k in ref:
        if k != "image_id":
            np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    empty = analysis.image_file_batch(cfg.data, rec["file_name"])
    assert not empty["valid"].any()
    with pytest.raises(BadImageError, match="nope.png"):
        analysis.image_file_batch(cfg.data, tmp_path / "nope.png")
    with pytest.raises(ValueError, match="labels"):
        analysis.image_file_batch(cfg.data, rec["file_name"], [[0, 0, 4, 4]], [1, 2])


def test_notebooks_are_stored_without_outputs():
    """Outputs are stripped in the repository (they are produced by running them)."""
    import nbformat

    for name in sorted(os.listdir(NOTEBOOKS)):
        if name.endswith(".ipynb"):
            nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
            for cell in nb.cells:
                if cell.cell_type == "code":
                    assert cell.outputs == [] and cell.execution_count is None, name


# --------------------------------------------------------------------- train state + notebooks
@pytest.mark.slow
def test_load_train_state(fgd_run):
    from fgd_jax.experiment import load_model

    cfg, workdir, _ = fgd_run
    params, model_state, cfg2, step = analysis.load_train_state(workdir)
    assert step == cfg.train.num_steps
    assert cfg2.model.to_json() == cfg.model.to_json()
    levels = sorted(params["distill_losses"])
    assert levels == [f"loss_fgd_fpn_{i}" for i in range(cfg.distill.num_levels)]
    student, _ = load_model(workdir)
    flat_a = jax.tree_util.tree_leaves_with_path(params["student"])
    flat_b = jax.tree_util.tree_leaves_with_path(student["params"])
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, a), (_, b_) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b_), err_msg=str(path))
    with pytest.raises(FileNotFoundError, match="not a training workdir"):
        analysis.load_train_state(os.path.dirname(workdir))


def _execute(name: str, env: dict[str, str], tmp_path) -> list:
    """Run notebooks/<name> with nbclient in a kernel of this interpreter; return its cells."""
    import nbformat
    from jupyter_client import AsyncKernelManager
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    # A kernelspec pointing at this Python (the venv), installed into a private folder.
    kdir = tmp_path / "kernels" / "fgd-test"
    kdir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fgd-test",
        "language": "python",
    }
    (kdir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    km = AsyncKernelManager(kernel_name="fgd-test", kernel_spec_manager=ksm)
    with open(os.path.join(NOTEBOOKS, name)) as f:
        nb = nbformat.read(f, as_version=4)
    client = NotebookClient(
        nb,
        km=km,
        timeout=600,
        kernel_name="fgd-test",
        resources={"metadata": {"path": NOTEBOOKS}},  # the kernel's working directory
    )
    client.execute(env=dict(os.environ, **env))
    return nb.cells


def _pngs(cells) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for c in cells
        if c.cell_type == "code"
        for out in c.get("outputs", [])
    )


def _errors(cells) -> list[str]:
    return [
        f"{out.get('ename')}: {out.get('evalue')}"
        for c in cells
        if c.cell_type == "code"
        for out in c.get("outputs", [])
        if out.get("output_type") == "error"
    ]


_KERNEL_ENV = {
    "JAX_PLATFORMS": "cpu",
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    "FGD_JAX_COMPILATION_CACHE": "",
}


@pytest.fixture(scope="module")
def baseline_run(fgd_run, tmp_path_factory):
    """A 6-step tiny baseline (no FGD) on the same data as `fgd_run`: (workdir, metrics)."""
    from fgd_jax.trainer import train
    from tests._tiny import tiny_config

    cfg, _, _ = fgd_run
    workdir = str(tmp_path_factory.mktemp("baseline_run") / "work")
    return workdir, train(tiny_config(cfg.data.root, "baseline", steps=6), workdir)


def _text(cells) -> str:
    return "".join(
        out.get("text", "") for c in cells if c.cell_type == "code" for out in c.get("outputs", [])
    )


@pytest.mark.slow
def test_fgd_anatomy_notebook(fgd_run, baseline_run, tmp_path):
    """On a user's image file (a val image given by path, with its boxes), with a baseline."""
    from fgd_jax.data.pipeline import load_split

    cfg, workdir, _ = fgd_run
    rec = load_split(cfg.data, train=False).records[1]
    env = dict(
        _KERNEL_ENV,
        FGD_NOTEBOOK_WORKDIR=workdir,
        FGD_NOTEBOOK_BASELINE=baseline_run[0],
        FGD_NOTEBOOK_IMAGE_FILE=rec["file_name"],
        FGD_NOTEBOOK_IMAGE_BOXES=json.dumps(np.asarray(rec["boxes"]).tolist()),
    )
    cells = _execute("fgd_anatomy.ipynb", env, tmp_path)
    assert not _errors(cells)
    # masks, attentions, feature gap, context weights, img_shape vs pad_shape at least
    assert _pngs(cells) >= 5
    text = _text(cells)
    assert rec["file_name"] in text and "baseline student" in text


@pytest.mark.slow
def test_training_report_notebook(fgd_run, baseline_run, tmp_path):
    _, workdir, metrics = fgd_run
    base_dir, base_metrics = baseline_run
    runs = {"baseline": base_dir, "fgd": workdir}
    env = dict(_KERNEL_ENV, FGD_NOTEBOOK_RUNS=json.dumps(runs))
    cells = _execute("training_report.ipynb", env, tmp_path)
    assert not _errors(cells)
    assert _pngs(cells) >= 5
    # The printed table quotes both runs' final AP (percent, one decimal); the baseline is
    # recognized as having no FGD terms.
    text = _text(cells)
    assert f"{100 * metrics['AP']:5.1f}" in text and f"{100 * base_metrics['AP']:5.1f}" in text
    assert "no FGD terms" in text
    assert not math.isnan(metrics["AP"])
