"""Grain loaders: batch contract, end-to-end pixels and boxes against an independent
PIL + torch (`F.interpolate` bilinear, no antialias = cv2) + torchvision-normalize reference,
host sharding, determinism, checkpoint/resume, eval coverage, bad input."""

import dataclasses
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps

from fgd_jax.config import PYTORCH_PIXEL_MEAN, PYTORCH_PIXEL_STD, coco_data, shapes_data
from fgd_jax.data.coco import load_coco_records
from fgd_jax.data.example import make_example
from fgd_jax.data.pipeline import _BatchMaker, build_eval_loader, build_train_loader
from fgd_jax.data.schedule import choose_canvas, epoch_schedule, group_by_canvas
from fgd_jax.data.transforms import BadImageError
from tests.test_data_fixtures import write_coco_fixture

KEYS = {
    "image": np.float32,
    "boxes": np.float32,
    "labels": np.int32,
    "valid": np.bool_,
    "ignore_boxes": np.float32,
    "ignore_valid": np.bool_,
    "img_shape": np.int32,
    "pad_shape": np.int32,
    "scale_factor": np.float32,
    "orig_shape": np.int32,
    "flip": np.bool_,
    "image_id": np.int64,
}


def _fixture_cfg(root, **kw):
    cfg = coco_data(
        root=str(root), img_scale=(133, 80), canvases=((80, 144), (144, 80)), max_boxes=4
    )
    cfg.train_ann = cfg.val_ann = "annotations/instances.json"
    cfg.train_images = cfg.val_images = "images"
    cfg.max_ignore = 2
    cfg.num_workers = 0
    for k, v in kw.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def shapes_cfg(tmp_path_factory):
    cfg = shapes_data(
        root=str(tmp_path_factory.mktemp("shapes") / "ds"), num_train=24, num_val=10, image_size=48
    )
    cfg.num_workers = 0
    return cfg


def _reference_example(path, record, scale, flip):
    """Independent mmdet pipeline: PIL decode + EXIF, torch bilinear, flip, torchvision norm."""
    im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    img = np.array(im)
    h, w = img.shape[:2]
    s = min(max(scale) / max(h, w), min(scale) / min(h, w))
    nh, nw = int(h * s + 0.5), int(w * s + 0.5)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=False)
    x = torch.floor(x + 0.5).clamp(0, 255)[0]
    sf = np.array([nw / w, nh / h] * 2, np.float32)
    boxes = record["boxes"] * sf
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, nw)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, nh)
    if flip:
        x = torch.flip(x, dims=[2])
        boxes = np.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], 1)
    x = TF.normalize(x, PYTORCH_PIXEL_MEAN, PYTORCH_PIXEL_STD).permute(1, 2, 0).numpy()
    return x, boxes.reshape(-1, 4), (nh, nw), sf


def test_train_batches_match_independent_reference(tmp_path):
    p = write_coco_fixture(tmp_path)
    cfg = _fixture_cfg(tmp_path)
    recs = load_coco_records(p["ann_file"], p["image_dir"], filter_empty=True)
    by_id = {r["image_id"]: r for r in recs.records}
    loader = build_train_loader(cfg, 2, seed=3, process_index=0, process_count=1)
    assert len(loader) == 4  # 3 landscape (2 batches), 3 portrait/square (2 batches)
    seen = []
    max_err = 0.0
    for _ in range(len(loader)):
        b = next(loader)
        assert set(b) == set(KEYS)  # the loader's private skip count is not handed on
        for k, dt in KEYS.items():
            assert b[k].dtype == dt, k
        H, W = b["image"].shape[1:3]
        assert (H, W) in [(80, 144), (144, 80)] and (b["pad_shape"] == (H, W)).all()
        assert b["boxes"].shape == (2, 4, 4) and b["ignore_boxes"].shape == (2, 2, 4)
        for j in range(2):
            r = by_id[int(b["image_id"][j])]
            seen.append(r["image_id"])
            img, boxes, (nh, nw), sf = _reference_example(
                r["file_name"], r, (133, 80), b["flip"][j]
            )
            assert tuple(b["img_shape"][j]) == (nh, nw)
            assert tuple(b["orig_shape"][j]) == tuple(r["orig_shape"])
            np.testing.assert_allclose(b["scale_factor"][j], sf, rtol=1e-6)
            # canvas orientation: landscape images (w > h) in the landscape canvas
            assert (W > H) == (nw > nh)
            err = np.abs(b["image"][j, :nh, :nw] - img).max()
            max_err = max(max_err, err)
            assert err <= 1.0 / 57.0 + 1e-5  # one grey level (PIL vs float rounding)
            assert not b["image"][j, nh:].any() and not b["image"][j, :, nw:].any()
            n = len(boxes)
            np.testing.assert_allclose(b["boxes"][j, :n], boxes, atol=1e-4)
            assert b["valid"][j].sum() == n and not b["boxes"][j, n:].any()
            np.testing.assert_array_equal(b["labels"][j, :n], r["labels"])
            assert (b["labels"][j, n:] == -1).all()
            assert b["ignore_valid"][j].sum() == len(r["ignore_boxes"])
    # every training image in the epoch (6 images, 4 batches of 2: groups padded by wrapping)
    assert set(seen) == set(by_id)
    assert b["flip"].dtype == np.bool_
    print(f"max |pipeline - reference| = {max_err:.3g}")


def test_choose_canvas_orientation():
    cans = ((800, 1344), (1344, 800))
    assert choose_canvas((800, 1067), cans) == 0
    assert choose_canvas((1199, 800), cans) == 1
    assert choose_canvas((800, 800), cans) == 1  # square counts as portrait, as mmdet
    with pytest.raises(ValueError, match="fits none"):
        choose_canvas((900, 1400), cans)


def test_epoch_schedule_groups_and_pads():
    groups = np.array([0] * 5 + [1] * 3)
    b, c = epoch_schedule(groups, 2, 2, seed=0, epoch=0)
    assert b.shape == (5, 2)  # ceil(5/2) + ceil(3/2)
    for row, g in zip(b, c, strict=True):
        assert (groups[row] == g).all()
    assert set(b.ravel()) == set(range(8))
    b2, _ = epoch_schedule(groups, 2, 2, seed=0, epoch=1)
    assert not np.array_equal(b, b2)


def _ids(loader, n):
    return [next(loader)["image_id"].tolist() for _ in range(n)]


def test_two_hosts_disjoint_and_covering(shapes_cfg):
    l0 = build_train_loader(shapes_cfg, 8, seed=1, process_index=0, process_count=2)
    l1 = build_train_loader(shapes_cfg, 8, seed=1, process_index=1, process_count=2)
    assert len(l0) == len(l1) == 3
    a, b = _ids(l0, 3), _ids(l1, 3)
    flat_a, flat_b = sum(a, []), sum(b, [])
    assert len(flat_a) == 12 and not set(flat_a) & set(flat_b)
    assert sorted(flat_a + flat_b) == list(range(1, 25))  # shapes train ids 1..24
    # the two hosts together are the single-host global batches
    g = _ids(build_train_loader(shapes_cfg, 8, seed=1, process_index=0, process_count=1), 3)
    assert [x + y for x, y in zip(a, b, strict=True)] == g


def test_deterministic_and_epoch_dependent(shapes_cfg):
    first = _ids(build_train_loader(shapes_cfg, 4, seed=5, process_index=0, process_count=1), 12)
    again = _ids(build_train_loader(shapes_cfg, 4, seed=5, process_index=0, process_count=1), 12)
    other = _ids(build_train_loader(shapes_cfg, 4, seed=6, process_index=0, process_count=1), 12)
    assert first == again and first != other
    e0, e1 = sum(first[:6], []), sum(first[6:], [])  # infinite: epoch 1 follows epoch 0
    assert sorted(e0) == sorted(e1) == list(range(1, 25)) and e0 != e1


def _resume_check(cfg, reference_cfg=None):
    """Resume from a saved state; optionally check the first batches against another config
    (the in-process loader) so worker output is shown identical to in-process output."""
    ref = build_train_loader(cfg, 4, seed=2, process_index=0, process_count=1)
    first = [next(ref) for _ in range(4)]
    state = ref.get_state()
    expect = [next(ref) for _ in range(4)]  # crosses the epoch boundary (6 steps per epoch)
    ref.close()
    if reference_cfg is not None:
        other = build_train_loader(reference_cfg, 4, seed=2, process_index=0, process_count=1)
        for e in first:
            got = next(other)
            for k in e:
                np.testing.assert_array_equal(got[k], e[k])
    new = build_train_loader(cfg, 4, seed=2, process_index=0, process_count=1)
    new.set_state(state)
    for e in expect:
        got = next(new)
        for k in e:
            np.testing.assert_array_equal(got[k], e[k])
    new.close()


def test_state_resume_in_process(shapes_cfg):
    _resume_check(shapes_cfg)


@pytest.mark.slow
def test_state_resume_with_workers(shapes_cfg):
    cfg = shapes_cfg.copy_and_resolve_references()
    cfg.num_workers = 2
    _resume_check(cfg, reference_cfg=shapes_cfg)


def test_eval_covers_every_image_once(tmp_path, shapes_cfg):
    ev = build_eval_loader(shapes_cfg, 4, process_index=0, process_count=1)
    batches = list(ev)
    ids = np.concatenate([b["image_id"] for b in batches])
    assert len(batches) == 3 and ids.tolist() == list(range(1_000_001, 1_000_011)) + [-1, -1]
    assert not any(b["flip"].any() for b in batches)
    last = batches[-1]
    assert not last["valid"][2:].any() and not last["image"][2:].any()
    # fixture: two canvases, every image (also empty / tiny / crowd-only) exactly once
    write_coco_fixture(tmp_path)
    cfg = _fixture_cfg(tmp_path)
    ids = []
    for h in range(2):
        for b in build_eval_loader(cfg, 4, process_index=h, process_count=2):
            ids += [i for i in b["image_id"].tolist() if i >= 0]
    assert sorted(ids) == [3, 4, 5, 6, 7, 8, 11, 25]


def test_max_boxes_overflow_keeps_largest(tmp_path):
    import fgd_jax.data.example as P

    write_coco_fixture(tmp_path)
    cfg = _fixture_cfg(tmp_path, max_boxes=1, flip_prob=0.0)
    P._warned_overflow.clear()
    with pytest.warns(UserWarning, match="max_boxes=1"):
        ev = list(build_eval_loader(cfg, 8, process_index=0, process_count=1))
    for b in ev:
        for j in np.flatnonzero(b["image_id"] == 11):
            # land.png: boxes 30.5x20 and 39x29 -> the second (larger) is kept, label 2
            assert b["labels"][j, 0] == 2 and b["valid"][j].tolist() == [True]


def test_overflow_warning_once_per_kind(tmp_path):
    """An ignore-box overflow must not use up the GT overflow warning (nor the reverse)."""
    import fgd_jax.data.example as P

    p = write_coco_fixture(tmp_path)
    path = os.path.join(p["image_dir"], "land.png")
    three = np.array([[0, 0, 10, 10], [0, 0, 20, 20], [0, 0, 30, 30]], np.float32)
    none = np.zeros((0, 4), np.float32)

    def record(boxes, ignore):
        labels = np.zeros(len(boxes), np.int32)
        return dict(file_name=path, image_id=1, boxes=boxes, labels=labels, ignore_boxes=ignore)

    P._warned_overflow.clear()
    args = ((80, 144), (133, 80), "pytorch", 2, 2)
    with pytest.warns(UserWarning, match="ignore boxes exceed max_ignore=2"):
        make_example(record(none, three), *args)
    with pytest.warns(UserWarning, match="gt boxes exceed max_boxes=2") as got:
        make_example(record(three, three), *args)
    assert len(got) == 1  # the ignore warning is not repeated
    ex = make_example(record(three, none), *args)  # both warned already: silent
    assert ex["valid"].all() and ex["boxes"][:, 2].max() > 0


def _shorts(cfg, seed, steps=6):
    loader = build_train_loader(cfg, 4, seed=seed, process_index=0, process_count=1)
    return np.concatenate([next(loader)["img_shape"].min(1) for _ in range(steps)]).tolist()


def test_multiscale_short_side_range(shapes_cfg):
    cfg = shapes_cfg.copy_and_resolve_references()
    cfg.img_scale = (96, 64)
    cfg.multiscale_short = (32, 64)
    cfg.multiscale_mode = "range"
    cfg.canvases = ((64, 64),)
    shorts = _shorts(cfg, 0)  # shapes images are square: the short side is the drawn scale
    assert min(shorts) >= 32 and max(shorts) <= 64 and len(set(shorts)) > 3
    assert len(set(shorts) - {32, 64}) > 2  # values between the ends, not only the ends
    assert _shorts(cfg, 0) == shorts and _shorts(cfg, 1) != shorts  # a function of the seed
    # canvases too small for the largest scale are refused up front
    cfg.canvases = ((48, 48),)
    with pytest.raises(ValueError, match="fits none"):
        build_train_loader(cfg, 4, seed=0, process_index=0, process_count=1)


def test_multiscale_short_side_value(shapes_cfg):
    """mmdetection `multiscale_mode='value'` (the default): one of the listed scales."""
    cfg = shapes_cfg.copy_and_resolve_references()
    assert cfg.multiscale_mode == "value"
    cfg.img_scale = (96, 64)
    cfg.multiscale_short = (32, 40, 64)
    cfg.canvases = ((64, 64),)
    shorts = _shorts(cfg, 0)
    assert set(shorts) == {32, 40, 64}  # only listed values, each of them drawn
    assert _shorts(cfg, 0) == shorts and _shorts(cfg, 1) != shorts
    # eval ignores multi-scale
    ev = next(build_eval_loader(cfg, 4, process_index=0, process_count=1))
    assert (ev["img_shape"] == 64).all()
    cfg.multiscale_mode = "ranges"
    with pytest.raises(ValueError, match="multiscale_mode"):
        build_train_loader(cfg, 4, seed=0, process_index=0, process_count=1)


def test_epoch_cache_read_once(shapes_cfg):
    """`_BatchMaker._epoch` reads the shared cache once: another read thread replacing it
    between two reads (simulated here: every read after the first sees epoch 1's schedule)
    must not give this call the other epoch's batches."""
    maker = build_train_loader(shapes_cfg, 4, seed=0, process_index=0, process_count=1)._maker
    b0, c0 = epoch_schedule(maker.groups, 1, 4, 0, 0)
    b1, c1 = epoch_schedule(maker.groups, 1, 4, 0, 1)
    assert not np.array_equal(b0, b1)

    class Swapped(_BatchMaker):
        reads = 0

        @property
        def _cache(self):
            self.reads += 1
            return (0, b0, c0) if self.reads == 1 else (1, b1, c1)

        @_cache.setter
        def _cache(self, value):
            pass

    m = Swapped(**{f.name: getattr(maker, f.name) for f in dataclasses.fields(maker)})
    b, c = m._epoch(0)
    np.testing.assert_array_equal(b, b0)
    np.testing.assert_array_equal(c, c0)


def _corrupt(p, name):
    path = os.path.join(p["image_dir"], name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
    return path


def test_bad_image_error_or_skip(tmp_path):
    p = write_coco_fixture(tmp_path)
    _corrupt(p, "land.png")
    cfg = _fixture_cfg(tmp_path)
    # one loader, several batches: the error comes whichever batch holds land.png
    for seed in range(3):
        loader = build_train_loader(cfg, 2, seed=seed, process_index=0, process_count=1)
        with pytest.raises(BadImageError, match="land.png"):
            for _ in range(len(loader)):
                next(loader)
    cfg.on_bad_image = "skip"
    loader = build_train_loader(cfg, 2, seed=0, process_index=0, process_count=1)
    assert loader.num_skipped == 0
    with pytest.warns(UserWarning, match="land.png"):
        ids = sum(_ids(loader, 4), [])
    assert 11 not in ids and len(ids) == 8
    # the count: every slot of the epoch that held land.png (groups wrap, so maybe twice)
    recs = load_coco_records(p["ann_file"], p["image_dir"], filter_empty=True)
    land = [r["image_id"] for r in recs.records].index(11)
    groups = group_by_canvas(recs.records, cfg.img_scale, cfg.canvases)
    slots, _ = epoch_schedule(groups, 2, 2, seed=0, epoch=0)
    assert (slots == land).sum() >= 1 and loader.num_skipped == (slots == land).sum()
    assert loader.num_missing == 0
    with pytest.warns(UserWarning, match="land.png"):
        ev_loader = build_eval_loader(cfg, 8, process_index=0, process_count=1)
        ev = list(ev_loader)
    ev_ids = [i for b in ev for i in b["image_id"].tolist() if i >= 0]
    assert 11 not in ev_ids and len(ev_ids) == 7 and ev_loader.num_skipped == 1


@pytest.mark.slow
def test_skip_count_with_workers(tmp_path):
    """The skip count reaches the loader from worker processes too."""
    p = write_coco_fixture(tmp_path)
    _corrupt(p, "land.png")
    os.remove(os.path.join(p["image_dir"], "port.png"))
    cfg = _fixture_cfg(tmp_path, num_workers=2, on_bad_image="skip")
    with build_eval_loader(cfg, 4, process_index=0, process_count=1) as ev:
        ids = [i for b in ev for i in b["image_id"].tolist() if i >= 0]
    assert sorted(ids) == [4, 5, 6, 7, 8, 25] and ev.num_skipped == 1 and ev.num_missing == 1


@pytest.mark.slow
def test_worker_error_propagates(tmp_path):
    p = write_coco_fixture(tmp_path)
    _corrupt(p, "land.png")
    cfg = _fixture_cfg(tmp_path, num_workers=2)
    loader = build_train_loader(cfg, 6, seed=0, process_index=0, process_count=1)
    with pytest.raises(Exception, match="land.png"):
        for _ in range(4):
            next(loader)
    loader.close()


def test_config_errors(tmp_path, shapes_cfg):
    with pytest.raises(ValueError, match="divisible"):
        build_train_loader(shapes_cfg, 5, seed=0, process_index=0, process_count=2)
    cfg = _fixture_cfg(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="instances.json"):
        build_train_loader(cfg, 2, seed=0, process_index=0, process_count=1)


def test_shapes_variant_config_sets_classes_and_loader_checks_them(tmp_path):
    cfg = shapes_data(
        root=str(tmp_path / "look"), num_train=12, num_val=2, image_size=48, variant="lookalike"
    )
    cfg.num_workers = 0
    assert cfg.num_classes == 10 and cfg.shapes_min_size == 10
    loader = build_train_loader(cfg, 2, seed=0, num_classes=cfg.num_classes)
    assert int(next(loader)["labels"].max()) < 10
    with pytest.raises(ValueError, match=r"instances_train.json: 10 categories .*num_classes=6"):
        build_train_loader(cfg, 2, seed=0, num_classes=6)


LEAK_SCRIPT = """
import sys
from fgd_jax.config import shapes_data
from fgd_jax.data.pipeline import build_eval_loader, build_train_loader


KEEP = []  # the loaders live until the interpreter exits, as in a command's frame


def main(root):
    cfg = shapes_data(root=root, num_train=8, num_val=8, image_size=32)
    cfg.num_workers = 2
    ev = build_eval_loader(cfg, 2, process_index=0, process_count=1)
    n = sum(1 for _ in ev)  # exhausted: closes itself
    train = build_train_loader(cfg, 2, seed=0, process_index=0, process_count=1)
    for _ in range(3):  # stopped mid-epoch, with batches in flight
        next(train)
    train.close()
    # never closed, batches in flight: closed at exit
    open_ev = build_eval_loader(cfg, 2, process_index=0, process_count=1)
    open_train = build_train_loader(cfg, 2, seed=1, process_index=0, process_count=1)
    next(open_ev), next(open_train)
    KEEP.extend([ev, train, open_ev, open_train])
    print("batches", n)


if __name__ == "__main__":
    main(sys.argv[1])
"""


@pytest.mark.slow
def test_loader_workers_leak_no_shared_memory(tmp_path):
    """Every run with loader workers used to end with `resource_tracker: There appear to be N
    leaked shared_memory objects` (grain's batches stay in shared memory the consumer never
    unlinked). A full eval pass, a train loader closed early and loaders left open at exit
    leave nothing behind and print nothing."""
    import subprocess
    import sys

    script = tmp_path / "leak.py"
    script.write_text(LEAK_SCRIPT)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "shapes")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "batches 4" in out.stdout
    assert "leaked shared_memory" not in out.stderr, out.stderr[-3000:]
    assert "Exception ignored" not in out.stderr, out.stderr[-3000:]


def test_old_saved_data_config_gets_the_factory_values(shapes_cfg):
    """A data config saved before a key existed (no min_size, read_threads, prefetch_batches,
    on_unknown_category, classes, tfds_*) builds the same loader: the factory fills them."""
    from fgd_jax.config import complete_data_config

    old = shapes_cfg.copy_and_resolve_references()
    new_keys = ("min_size", "read_threads", "prefetch_batches", "on_unknown_category", "classes")
    for key in new_keys + ("tfds_name", "tfds_data_dir"):
        del old[key]
    full = complete_data_config(old)
    assert [full[k] for k in new_keys] == [32, 0, 2, "warn", ()]
    assert "min_size" not in old  # the caller's config is not changed
    a = next(build_train_loader(old, 4, seed=0, process_index=0, process_count=1))
    b = next(build_train_loader(shapes_cfg, 4, seed=0, process_index=0, process_count=1))
    for k in b:
        np.testing.assert_array_equal(a[k], b[k])
