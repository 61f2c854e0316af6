"""The label -> (category id, name) table: recorded in configs, checkpoints and exports;
a model whose recorded classes differ from the dataset's is refused (issue 17 item 1)."""

import numpy as np
import pytest
import torch

from fgd_jax.config import coco_data
from fgd_jax.convert.torch_io import load_torch_meta
from fgd_jax.data import classes as C
from fgd_jax.data.coco import load_coco_records
from fgd_jax.data.pipeline import build_eval_loader
from fgd_jax.models import init_module
from tests.test_data_fixtures import write_coco_fixture

# the fixture's json lists categories 7, 2, 40 in that order: mmdetection's labels 0, 1, 2
FIXTURE_TABLE = ((7, "seven"), (2, "two"), (40, "forty"))


def _cfg(root):
    cfg = coco_data(root=str(root), img_scale=(133, 80), canvases=((80, 144), (144, 80)))
    cfg.train_ann = cfg.val_ann = "annotations/instances.json"
    cfg.train_images = cfg.val_images = "images"
    cfg.max_boxes, cfg.max_ignore, cfg.num_workers = 4, 2, 0
    return cfg


@pytest.mark.filterwarnings("ignore:.*category_id 99")
def test_table_in_json_order_and_recorded_in_a_copy(tmp_path):
    p = write_coco_fixture(tmp_path)
    recs = load_coco_records(p["ann_file"], p["image_dir"], filter_empty=False)
    assert C.class_table(recs) == FIXTURE_TABLE
    cfg = {"data": _cfg(tmp_path)}
    from fgd_jax.config import ConfigDict

    cfg = ConfigDict(cfg)
    run = C.with_classes(cfg, recs)
    assert cfg.data.classes == () and run.data.classes == FIXTURE_TABLE
    assert C.recorded_classes(run) == FIXTURE_TABLE
    assert C.torch_meta(run) == {"CLASSES": ("seven", "two", "forty")}
    # the table survives the checkpoint's JSON round trip
    from fgd_jax.checkpoint import config_from_json_dict, config_to_json_dict

    back = config_from_json_dict(config_to_json_dict(run))
    assert C.recorded_classes(back) == FIXTURE_TABLE


@pytest.mark.filterwarnings("ignore:.*category_id 99")
def test_loader_refuses_a_model_recorded_with_other_classes(tmp_path):
    write_coco_fixture(tmp_path)
    cfg = _cfg(tmp_path)
    assert cfg.classes == ()  # nothing recorded: nothing checked
    build_eval_loader(cfg, 2, process_index=0, process_count=1).close()
    cfg.classes = FIXTURE_TABLE
    build_eval_loader(cfg, 2, process_index=0, process_count=1).close()
    cfg.classes = tuple([n for _, n in FIXTURE_TABLE])  # names only (mmdetection meta)
    build_eval_loader(cfg, 2, process_index=0, process_count=1).close()
    # the same categories in sorted-id order (this project's earlier labels): refused
    cfg.classes = ((2, "two"), (7, "seven"), (40, "forty"))
    with pytest.raises(ValueError, match=r"instances.json.*label 0: 'two' \(id 2\) vs 'seven'"):
        build_eval_loader(cfg, 2, process_index=0, process_count=1)
    cfg.classes = ((7, "seven"), (2, "two"))
    with pytest.raises(ValueError, match="2 classes vs 3"):
        build_eval_loader(cfg, 2, process_index=0, process_count=1)
    cfg.classes = ((7, "seven"), (3, "two"), (40, "forty"))  # same names, another id
    with pytest.raises(ValueError, match=r"label 1: 'two' \(id 3\) vs 'two' \(id 2\)"):
        build_eval_loader(cfg, 2, process_index=0, process_count=1)


def test_table_differences_rules():
    assert C.table_differences([(1, "traffic_light")], [(1, "Traffic light")]) == []
    assert C.table_differences(["a", "b"], [(5, "a"), (6, "b")]) == []
    assert C.table_differences(["b", "a"], [(5, "a"), (6, "b")]) == [
        "label 0: 'b' vs 'a' (id 5)",
        "label 1: 'a' vs 'b' (id 6)",
    ]


@pytest.mark.parametrize(
    "meta, names",
    [
        ({"CLASSES": ("cat", "dog"), "epoch": np.int64(24)}, ("cat", "dog")),  # mmdetection 2.x
        ({"dataset_meta": {"classes": ["cat", "dog"]}}, ("cat", "dog")),  # 3.x
        ({"epoch": 12}, None),
    ],
)
def test_names_from_torch_checkpoint_meta(tmp_path, meta, names):
    path = tmp_path / "m.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": meta}, path)
    assert C.names_from_torch_meta(load_torch_meta(path)) == names
    assert C.names_from_torch_checkpoint(path) == names


@pytest.mark.slow
def test_teacher_recorded_with_other_classes_is_refused(tmp_path):
    import jax

    from fgd_jax import checkpoint as ckpt_lib
    from fgd_jax.config import ConfigDict
    from fgd_jax.data.sources import load_split
    from fgd_jax.experiment import Experiment, load_teacher
    from fgd_jax.models import build_detector
    from tests._tiny import tiny_config

    cfg = tiny_config(str(tmp_path / "shapes"), "fgd")
    records = load_split(cfg.data, train=True)
    run = C.with_classes(cfg, records)
    assert cfg.data.classes == ()  # the caller's config is left as it was
    table = C.class_table(records)
    assert run.data.classes == table and table[0] == (1, "circle")
    teacher = build_detector(cfg.teacher.model)
    h, w = cfg.data.canvases[0]
    v = init_module(teacher, jax.random.PRNGKey(0), jax.numpy.zeros((1, h, w, 3)))
    exp = Experiment(run)

    def save(names):
        tcfg = C.with_recorded_names(
            ConfigDict({"model": cfg.teacher.model, "data": cfg.data}), names
        )
        path = str(tmp_path / "teacher")
        ckpt_lib.save_variables(path, v, tcfg, overwrite=True)
        run.teacher.ckpt = path

    save([n for _, n in table])  # as converted from an mmdetection .pth: names only
    load_teacher(exp)
    save(None)  # an export of an older version records nothing: not checked
    load_teacher(exp)
    save([n for _, n in table][::-1])
    with pytest.raises(ValueError, match="the teacher .*other classes than this run's data"):
        load_teacher(exp)
