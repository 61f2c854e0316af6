"""The label -> (COCO category id, name) table of a dataset, recorded with every model.

Label order (mmdetection 2.x, `CocoDataset.load_annotations`): `cat_ids =
coco.get_cat_ids(cat_names=CLASSES)`, `cat2label = {cat_id: i}`. pycocotools' `getCatIds`
filters the json's `categories` list and never sorts it, so for a dataset whose CLASSES are
the json's names, label i is the i-th category the json lists (`fgd_jax.data.coco`).

The table is stored in the run's config as `data.classes`, a tuple of `(category_id, name)`
pairs in label order, so checkpoints, exports and converted teachers carry it with their
config (`fgd_jax.checkpoint` saves the config as JSON). A category id of -1 means unknown:
mmdetection checkpoints record names only (`meta['CLASSES']` in 2.x,
`meta['dataset_meta']['classes']` in 3.x). Two tables agree when they have the same names
in the same order (compared without case, '_' as ' ') and the same ids wherever both know
them.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

from fgd_jax.data.coco import CocoRecords

ClassTable = tuple[tuple[int, str], ...]
UNKNOWN_ID = -1


def class_table(records: CocoRecords) -> ClassTable:
    """`((category_id, name), ...)` of a split in label order."""
    return tuple(
        (int(cid), str(name))
        for cid, name in zip(records.label_to_cat_id, records.class_names, strict=True)
    )


def as_table(classes: Sequence[Any]) -> ClassTable:
    """A class table from its stored form: `(id, name)` pairs (lists after JSON) or bare
    names (ids unknown)."""
    out = []
    for entry in classes:
        if isinstance(entry, str):
            out.append((UNKNOWN_ID, entry))
        else:
            cid, name = entry
            out.append((int(cid), str(name)))
    return tuple(out)


def recorded_classes(cfg: Any) -> ClassTable:
    """The table a run or model config records in `data.classes` (empty if none)."""
    data = cfg.get("data") if hasattr(cfg, "get") else None
    if data is None:
        return ()
    return as_table(data.get("classes", ()) or ())


def table_differences(a: Sequence[Any], b: Sequence[Any], limit: int = 5) -> list[str]:
    """Why two tables disagree (empty list if they agree): count, names or known ids."""
    a, b = as_table(a), as_table(b)
    problems = []
    if len(a) != len(b):
        problems.append(f"{len(a)} classes vs {len(b)}")
    for label, ((ia, na), (ib, nb)) in enumerate(zip(a, b, strict=False)):
        if _same_name(na) != _same_name(nb) or (UNKNOWN_ID not in (ia, ib) and ia != ib):
            problems.append(f"label {label}: {_entry(ia, na)} vs {_entry(ib, nb)}")
    if len(problems) > limit:
        problems = problems[:limit] + [f"... ({len(problems) - limit} more)"]
    return problems


def _same_name(name: str) -> str:
    """Names compare without case and with '_' as ' ' (mmdetection 1.x wrote 'traffic_light'
    where COCO's json and mmdetection 2.x write 'traffic light')."""
    return name.replace("_", " ").lower()


def _entry(cid: int, name: str) -> str:
    return repr(name) if cid == UNKNOWN_ID else f"{name!r} (id {cid})"


def check_classes(recorded: Sequence[Any], records: CocoRecords, what: str) -> None:
    """Raise ValueError when a recorded table (non-empty) differs from the split's.

    `what` names whose table it is (e.g. 'the teacher checkpoint X'); the message names the
    annotation file and the first differences."""
    if not recorded:
        return
    problems = table_differences(recorded, class_table(records))
    if problems:
        raise ValueError(
            f"{what} was trained on other classes than {records.ann_file} "
            "(labels follow the order of the json's 'categories', as mmdetection): "
            + "; ".join(problems)
            + ". Use the annotation file it was trained with, or list its categories in "
            "the same order"
        )


def with_classes(cfg: Any, records: CocoRecords) -> Any:
    """A copy of a run config recording the split's table in `data.classes`, after checking
    it against a table the config already records."""
    check_classes(recorded_classes(cfg), records, "the model of this config (data.classes)")
    out = copy.deepcopy(cfg)
    with _unlocked(out):
        out.data.classes = class_table(records)
    return out


def with_recorded_names(cfg: Any, names: Sequence[str] | None) -> Any:
    """A copy of a model config recording `names` (ids unknown) as its `data.classes`, as a
    converted mmdetection checkpoint's `meta` gives them; `cfg` itself if `names` is None."""
    if names is None:
        return cfg
    out = copy.deepcopy(cfg)
    with _unlocked(out):
        out.data.classes = as_table([str(n) for n in names])
    return out


def check_model_classes(model_cfg: Any, run_cfg: Any, source: str) -> None:
    """Refuse a model (e.g. the FGD teacher) whose config records other classes than the
    run's `data.classes`; nothing to check when either records none."""
    recorded, ours = recorded_classes(model_cfg), recorded_classes(run_cfg)
    if not recorded or not ours:
        return
    problems = table_differences(recorded, ours)
    if problems:
        raise ValueError(
            f"{source} was trained on other classes than this run's data "
            "(labels follow the order of the json's 'categories', as mmdetection): "
            + "; ".join(problems)
            + ". Convert or train the teacher on the same annotation file"
        )


def names_from_torch_meta(meta: Any) -> tuple[str, ...] | None:
    """Class names an mmdetection checkpoint's `meta` records: `meta['CLASSES']` (2.x) or
    `meta['dataset_meta']['classes']` (3.x); None when it records none."""
    if not isinstance(meta, Mapping):
        return None
    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), Mapping):
        names = meta["dataset_meta"].get("classes")
    if names is None:
        return None
    if isinstance(names, str):
        names = (names,)
    return tuple(str(n) for n in names)


def names_from_torch_checkpoint(path: str | os.PathLike) -> tuple[str, ...] | None:
    """`names_from_torch_meta` of a `.pth` file (read safely, `convert.torch_io`)."""
    from fgd_jax.convert.torch_io import load_torch_meta

    return names_from_torch_meta(load_torch_meta(path))


def torch_meta(cfg: Any) -> dict[str, Any]:
    """`{'CLASSES': names}` for an exported `.pth`'s meta (mmdetection 2.x's key), or {}."""
    table = recorded_classes(cfg)
    return {"CLASSES": tuple(name for _, name in table)} if table else {}


def _unlocked(cfg: Any):
    """`cfg.unlocked()` for a ConfigDict (a locked one accepts the new key), else nothing."""
    return cfg.unlocked() if hasattr(cfg, "unlocked") else contextlib.nullcontext()
