"""Train / eval loaders: grain, aspect-ratio canvases, per-host shards, static-shape batches.

Design (grain 0.2.18, `grain.MapDataset` API):
  - The batch *schedule* is computed up front in numpy, not by a grain sampler: per epoch, the
    images of each canvas group are shuffled with `default_rng([seed, epoch])`, each group is
    padded by wrapping around to a multiple of the global batch (mmdetection
    `DistributedGroupSampler`), chunked into global batches, and the batch order is shuffled.
    Every global batch therefore has one canvas, and all hosts agree on it (SPMD needs equal
    shapes); host `p` of `P` takes the contiguous slice `[p * B / P, (p + 1) * B / P)` of each
    global batch, so hosts read disjoint images.
  - `grain.MapDataset.range(num_steps).map(_BatchMaker)` turns a step index into a whole
    per-host batch (decode, resize, flip, normalize, pad, GT padding); training uses an
    effectively infinite range, step -> (epoch, batch) by division. Random choices (flip,
    multi-scale size) are drawn from `default_rng([seed, epoch, global slot])`, so a batch is a
    pure function of (config, seed, step): independent of `num_workers` and of resuming.
  - Images skipped as unreadable (`on_bad_image='skip'`) are counted per batch in the extra
    key `SKIPPED_KEY`, which `DetectionLoader` removes and adds to `num_skipped`: the count
    reaches the consumer from worker processes too.
  - `.to_iter_dataset().mp_prefetch(num_workers)` decodes in worker processes (grain spawns
    them, forwards their exceptions to the consumer, and checkpoints per-worker positions);
    `num_workers=0` runs in-process. `DetectionLoader.get_state / set_state` expose grain's
    iterator state, so a restored loader yields exactly the batch that would have come next.

Batches are dicts of numpy arrays with the keys of docs/contracts.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from fgd_jax.data import transforms as T
from fgd_jax.data.coco import CocoRecords, load_coco_records

log = logging.getLogger(__name__)

_INFINITE_STEPS = 1 << 62
SKIPPED_KEY = "_num_skipped"  # per-batch count of skipped images, popped by DetectionLoader
MULTISCALE_MODES = ("value", "range")
# kinds of boxes ('gt', 'ignore') whose overflow of max_boxes / max_ignore was already warned
# about in this process: one flag per kind, so one kind cannot hide the other's warning
_warned_overflow: set[str] = set()


# ------------------------------------------------------------------------------- records
def _cfg_get(cfg: Any, key: str, default: Any) -> Any:
    try:
        return cfg.get(key, default)
    except AttributeError:
        return getattr(cfg, key, default)


def load_split(data_cfg: Any, train: bool) -> CocoRecords:
    """Records of the train or val split named by a `coco_data` / `shapes_data` config.

    The shapes dataset is generated on first use (`fgd_jax.data.shapes.make_shapes_dataset`);
    `tfds` reads `coco/2017` through tensorflow-datasets (`fgd_jax.data.tfds_source`).
    """
    source = _cfg_get(data_cfg, "source", "coco")
    on_bad = _cfg_get(data_cfg, "on_bad_image", "error")
    root = os.fspath(data_cfg.root)
    if source == "shapes":
        ensure_shapes_dataset(data_cfg)
    elif source == "tfds":
        from fgd_jax.data.tfds_source import load_tfds_records

        return load_tfds_records(data_cfg, train=train)
    elif source != "coco":
        raise ValueError(f"data.source must be 'coco', 'shapes' or 'tfds', got {source!r}")
    ann = data_cfg.train_ann if train else data_cfg.val_ann
    imgs = data_cfg.train_images if train else data_cfg.val_images
    return load_coco_records(
        os.path.join(root, ann),
        os.path.join(root, imgs),
        filter_empty=train,
        min_size=int(_cfg_get(data_cfg, "min_size", 32)),
        on_bad_image=on_bad,
    )


def ensure_shapes_dataset(data_cfg: Any) -> dict[str, str]:
    """Generate (or reuse) the synthetic set a `shapes_data` config names, under
    `data_cfg.root`: variant, sizes, seed and smallest shape from the config. Returns its
    paths."""
    from fgd_jax.data import shapes

    image_size = _cfg_get(data_cfg, "image_size", 128)
    if isinstance(image_size, list | tuple):
        image_size = tuple(image_size)
    return shapes.make_shapes_dataset(
        os.fspath(data_cfg.root),
        num_train=int(_cfg_get(data_cfg, "num_train", 512)),
        num_val=int(_cfg_get(data_cfg, "num_val", 128)),
        image_size=image_size,
        seed=int(_cfg_get(data_cfg, "shapes_seed", 0)),
        min_size=_cfg_get(data_cfg, "shapes_min_size", None),
        variant=str(_cfg_get(data_cfg, "shapes_variant", "basic")),
    )


def check_num_classes(records: CocoRecords, num_classes: int) -> None:
    """Raise ValueError when the split's category count differs from the model's classes.

    A model with fewer classes than the data would see labels beyond its outputs as
    background (one-hot of an out-of-range label is all zeros): silently wrong training.
    """
    if records.num_classes != int(num_classes):
        raise ValueError(
            f"{records.ann_file}: {records.num_classes} categories "
            f"({', '.join(records.class_names[:12])}"
            f"{', ...' if records.num_classes > 12 else ''}) but model.num_classes="
            f"{int(num_classes)}; set --config.model.num_classes={records.num_classes} or use "
            "the matching annotation file"
        )


# ------------------------------------------------------------------------------- grouping
def choose_canvas(resized_hw: tuple[int, int], canvases: Sequence[tuple[int, int]]) -> int:
    """Index of the canvas for an image of resized size (h, w).

    Among the canvases the image fits, the smallest; ties go to the canvas of the same
    orientation (landscape is w > h; a square image counts as portrait, as mmdetection's
    `flag = w / h > 1`). Raises ValueError when none fits.
    """
    h, w = resized_hw
    fits = [i for i, (ch, cw) in enumerate(canvases) if h <= ch and w <= cw]
    if not fits:
        raise ValueError(f"resized image {(h, w)} fits none of the canvases {list(canvases)}")
    landscape = w > h

    def key(i):
        ch, cw = canvases[i]
        return (ch * cw, (cw > ch) != landscape, i)

    return min(fits, key=key)


def max_resized_hw(
    orig_hw: tuple[int, int], img_scale: Sequence[int], multiscale_short: Sequence[int] = ()
) -> tuple[int, int]:
    """Largest resized (h, w) an image can get (multi-scale: at the largest short side)."""
    scale = (max(img_scale), max(multiscale_short)) if multiscale_short else tuple(img_scale)
    return T.rescale_size(orig_hw, scale)[0]


def group_by_canvas(
    records: Sequence[dict], img_scale, canvases, multiscale_short=()
) -> np.ndarray:
    """`[N] int32` canvas index of every record (see `choose_canvas`)."""
    out = np.empty(len(records), np.int32)
    for i, r in enumerate(records):
        try:
            hw = max_resized_hw(r["orig_shape"], img_scale, multiscale_short)
            out[i] = choose_canvas(hw, canvases)
        except ValueError as e:
            raise ValueError(f"{r.get('file_name', r.get('image_id'))}: {e}") from None
    return out


def epoch_schedule(
    groups: np.ndarray, num_canvases: int, global_batch: int, seed: int, epoch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Global batches of one training epoch: `(indices [S, global_batch] int64, canvas [S])`.

    mmdetection `DistributedGroupSampler`: shuffle each group, pad it by wrapping around to a
    multiple of the global batch, chunk, shuffle the batch order. `S` is the same every epoch.
    """
    rng = np.random.default_rng([seed, epoch])
    batches, canvas = [], []
    for g in range(num_canvases):
        idx = np.flatnonzero(groups == g)
        if idx.size == 0:
            continue
        idx = idx[rng.permutation(idx.size)]
        n = -(-idx.size // global_batch) * global_batch
        idx = np.resize(idx, n)  # wraps around
        batches.append(idx.reshape(-1, global_batch))
        canvas.append(np.full(n // global_batch, g, np.int32))
    batches, canvas = np.concatenate(batches), np.concatenate(canvas)
    order = rng.permutation(len(batches))
    return batches[order].astype(np.int64), canvas[order]


def eval_schedule(groups: np.ndarray, num_canvases: int, global_batch: int):
    """Eval batches: each canvas group in image order, its last batch padded with -1."""
    batches, canvas = [], []
    for g in range(num_canvases):
        idx = np.flatnonzero(groups == g)
        if idx.size == 0:
            continue
        n = -(-idx.size // global_batch) * global_batch
        idx = np.concatenate([idx, np.full(n - idx.size, -1, np.int64)])
        batches.append(idx.reshape(-1, global_batch))
        canvas.append(np.full(n // global_batch, g, np.int32))
    return np.concatenate(batches).astype(np.int64), np.concatenate(canvas)


# ---------------------------------------------------------------------------- one example
def _pad_boxes(boxes, labels, n, name, kind="gt"):
    """Pad / truncate (keeping the largest) boxes to n: (boxes [n,4], labels [n], valid [n]).

    Warns once per process and `kind` ('gt': `max_boxes`, 'ignore': `max_ignore`)."""
    if len(boxes) > n:
        if kind not in _warned_overflow:
            _warned_overflow.add(kind)
            limit = "max_boxes" if kind == "gt" else "max_ignore"
            warnings.warn(
                f"{name}: {len(boxes)} {kind} boxes exceed {limit}={n}; keeping the {n} largest "
                f"(warned once for {kind} boxes)",
                stacklevel=2,
            )
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = np.sort(np.argsort(-area, kind="stable")[:n])
        boxes, labels = boxes[keep], labels[keep]
    k = len(boxes)
    ob = np.zeros((n, 4), np.float32)
    ol = np.full((n,), -1, np.int32)
    ov = np.zeros((n,), bool)
    ob[:k], ol[:k], ov[:k] = boxes, labels, True
    return ob, ol, ov


def load_image(record: dict) -> np.ndarray:
    """Decode a record's image: `file_name` on disk, `image_bytes`, or a tfds reference."""
    if "file_name" in record:
        return T.decode_image(record["file_name"])
    if "image_bytes" in record:
        return T.decode_image_bytes(record["image_bytes"], str(record.get("image_id")))
    if "tfds_ref" in record:
        from fgd_jax.data.tfds_source import load_tfds_image

        return load_tfds_image(record)
    raise ValueError(f"record of image {record.get('image_id')} has no image source")


def sample_short_side(shorts: Sequence[int], mode: str, rng: np.random.Generator) -> int:
    """Multi-scale training: the short-side limit (px) of one image (mmdetection `Resize`).

    'value' (`multiscale_mode='value'`, mmdetection FCOS `img_scale=[(1333, 640),
    (1333, 800)]`): one of `shorts`, uniformly. 'range': an integer uniform in
    [min(shorts), max(shorts)], both ends included.
    """
    if mode == "value":
        return int(shorts[int(rng.integers(len(shorts)))])
    if mode == "range":
        return int(rng.integers(min(shorts), max(shorts) + 1))
    raise ValueError(f"multiscale_mode must be one of {MULTISCALE_MODES}, got {mode!r}")


def make_example(
    record: dict,
    canvas_hw: tuple[int, int],
    img_scale: Sequence[int],
    pixel_style: str,
    max_boxes: int,
    max_ignore: int,
    flip_prob: float = 0.0,
    rng: np.random.Generator | None = None,
    multiscale_short: Sequence[int] = (),
    multiscale_mode: str = "value",
) -> dict[str, np.ndarray]:
    """One record -> one example with the per-image keys of the batch contract.

    Steps (mmdetection 2.x train pipeline): decode, `Resize(keep_ratio)` at `img_scale` (or,
    with `multiscale_short`, at (max(img_scale), short) with the short side drawn by
    `sample_short_side`), `RandomFlip`, `Normalize`, pad to `canvas_hw`.
    Raises `transforms.BadImageError` for unreadable images.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    img = load_image(record)
    oh, ow = img.shape[:2]
    if multiscale_short:
        short = sample_short_side(multiscale_short, multiscale_mode, rng)
        scale = (max(img_scale), short)
    else:
        scale = tuple(img_scale)
    nb = len(record["boxes"])
    all_boxes = np.concatenate([record["boxes"], record["ignore_boxes"]]).astype(np.float32)
    img, all_boxes, sf = T.resize_keep_ratio(img, all_boxes, scale, max_hw=canvas_hw)
    img, all_boxes, flipped = T.random_flip(img, all_boxes, flip_prob, rng)
    h, w = img.shape[:2]
    img = T.normalize_pad(img, canvas_hw, pixel_style)
    name = str(record.get("file_name", record.get("image_id")))
    boxes, labels, valid = _pad_boxes(all_boxes[:nb], record["labels"], max_boxes, name, "gt")
    ign, _, ign_valid = _pad_boxes(
        all_boxes[nb:], np.zeros(len(all_boxes) - nb, np.int32), max_ignore, name, "ignore"
    )
    return dict(
        image=img,
        boxes=boxes,
        labels=labels,
        valid=valid,
        ignore_boxes=ign,
        ignore_valid=ign_valid,
        img_shape=np.array([h, w], np.int32),
        pad_shape=np.array(canvas_hw, np.int32),
        scale_factor=sf.astype(np.float32),
        orig_shape=np.array([oh, ow], np.int32),
        flip=np.array(flipped),
        image_id=np.array(record["image_id"], np.int64),
    )


def padding_example(canvas_hw, max_boxes: int, max_ignore: int) -> dict[str, np.ndarray]:
    """A filler example (last eval batch): zeros, nothing valid, image_id -1, scale 1."""
    hw = np.array(canvas_hw, np.int32)
    return dict(
        image=np.zeros((*canvas_hw, 3), np.float32),
        boxes=np.zeros((max_boxes, 4), np.float32),
        labels=np.full((max_boxes,), -1, np.int32),
        valid=np.zeros((max_boxes,), bool),
        ignore_boxes=np.zeros((max_ignore, 4), np.float32),
        ignore_valid=np.zeros((max_ignore,), bool),
        img_shape=hw.copy(),
        pad_shape=hw.copy(),
        scale_factor=np.ones((4,), np.float32),
        orig_shape=hw.copy(),
        flip=np.array(False),
        image_id=np.array(-1, np.int64),
    )


# ------------------------------------------------------------------------------ batches
@dataclasses.dataclass
class _BatchMaker:
    """Picklable step -> per-host batch function (runs inside grain workers)."""

    records: list
    groups: np.ndarray
    canvases: tuple
    global_batch: int
    process_index: int
    process_count: int
    seed: int
    train: bool
    img_scale: tuple
    multiscale_short: tuple
    multiscale_mode: str
    pixel_style: str
    flip_prob: float
    max_boxes: int
    max_ignore: int
    on_bad_image: str
    eval_batches: np.ndarray | None = None
    eval_canvas: np.ndarray | None = None
    steps_per_epoch: int = 0

    def __post_init__(self):
        # (epoch, batches, canvas) of the last epoch used; read threads share it, so it is
        # read once into a local and replaced by a single assignment (never mutated)
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self.num_skipped = 0

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_cache"] = None
        return d

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """`epoch_schedule` of `epoch`, cached (thread-safe: one read, one atomic swap)."""
        cache = self._cache
        if cache is None or cache[0] != epoch:
            b, c = epoch_schedule(
                self.groups, len(self.canvases), self.global_batch, self.seed, epoch
            )
            cache = (epoch, b, c)
            self._cache = cache
        return cache[1], cache[2]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        step = int(step)
        per_host = self.global_batch // self.process_count
        lo = self.process_index * per_host
        if self.train:
            epoch, s = divmod(step, self.steps_per_epoch)
            batches, canvas = self._epoch(epoch)
            idx, cid = batches[s, lo : lo + per_host], int(canvas[s])
        else:
            epoch = 0
            idx = self.eval_batches[step, lo : lo + per_host]
            cid = int(self.eval_canvas[step])
        canvas_hw = tuple(self.canvases[cid])
        examples, skipped = [], 0
        for j, i in enumerate(idx):
            slot = step * self.global_batch + lo + j
            ex, bad = self._example(int(i), canvas_hw, epoch, slot)
            examples.append(ex)
            skipped += bad
        batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        batch[SKIPPED_KEY] = np.array(skipped, np.int64)
        return batch

    def _example(self, i, canvas_hw, epoch, slot) -> tuple[dict[str, np.ndarray], int]:
        """(example, number of unreadable images skipped to make it)."""
        if i < 0:
            return padding_example(canvas_hw, self.max_boxes, self.max_ignore), 0
        tries = 0
        while True:
            rng = np.random.default_rng([self.seed, epoch, slot, tries])
            try:
                ex = make_example(
                    self.records[i],
                    canvas_hw,
                    self.img_scale,
                    self.pixel_style,
                    self.max_boxes,
                    self.max_ignore,
                    flip_prob=self.flip_prob if self.train else 0.0,
                    rng=rng,
                    multiscale_short=self.multiscale_short if self.train else (),
                    multiscale_mode=self.multiscale_mode,
                )
                return ex, tries
            except T.BadImageError as e:
                if self.on_bad_image != "skip":
                    raise
                self.num_skipped += 1
                warnings.warn(
                    f"skipping bad image ({self.num_skipped} so far in this process): {e}",
                    stacklevel=2,
                )
                if not self.train:
                    return padding_example(canvas_hw, self.max_boxes, self.max_ignore), 1
                tries += 1
                group = np.flatnonzero(self.groups == self.groups[i])
                if tries >= min(16, len(group)):
                    raise T.BadImageError(f"too many unreadable images in a row; last: {e}") from e
                pos = int(np.searchsorted(group, i))
                i = int(group[(pos + 1) % len(group)])


class DetectionLoader:
    """Iterator of per-host batches with a checkpointable state.

    Attributes:
      records: the `CocoRecords` of the split (label <-> category id mapping, pycocotools GT).
      steps_per_epoch: global batches per epoch (train) or in total (eval).
      canvases: the (h, w) canvases batches are padded to.
      num_skipped: unreadable images skipped (`on_bad_image='skip'`) while making the batches
        this loader has returned so far, counted in every worker process (a training image
        is replaced by the next of its canvas group, an eval image by a padding example).
        Not part of `get_state()`. Images missing at load time are in `num_missing`.
    """

    def __init__(self, dataset, records: CocoRecords, steps_per_epoch: int, canvases, maker):
        self._dataset = dataset
        self.records = records
        self.steps_per_epoch = steps_per_epoch
        self.canvases = canvases
        self._maker = maker
        self._it = iter(dataset)
        self.num_skipped = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            batch = next(self._it)
        except StopIteration:
            self.close()  # eval loader exhausted: release the workers now
            raise
        self.num_skipped += int(batch.pop(SKIPPED_KEY, 0))
        return batch

    @property
    def num_missing(self) -> int:
        """Images dropped at load time because their file is missing (`on_bad_image='skip'`)."""
        return self.records.num_skipped

    def __len__(self) -> int:
        return self.steps_per_epoch

    def get_state(self) -> dict[str, Any]:
        """grain iterator state (JSON-serialisable dict): where the next batch comes from.

        Restore it into a loader built with the same config, seed, batch size, host layout and
        `num_workers` (the state records per-worker positions)."""
        return self._it.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume from `get_state()` of a loader built with the same config and seed."""
        self._it.set_state(state)

    def close(self) -> None:
        """Stop the worker processes (also done at garbage collection)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    @property
    def label_to_cat_id(self) -> list[int]:
        return self.records.label_to_cat_id

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _ensure_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside an absl app mark them parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _resolve_hosts(process_index, process_count):
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return int(process_index), int(process_count)


def _build(
    data_cfg, global_batch_size, seed, process_index, process_count, train, records, num_classes
):
    process_index, process_count = _resolve_hosts(process_index, process_count)
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by {process_count} hosts"
        )
    recs = records if records is not None else load_split(data_cfg, train)
    if num_classes is not None:  # before any worker process starts
        check_num_classes(recs, num_classes)
    canvases = tuple(tuple(int(v) for v in c) for c in data_cfg.canvases)
    img_scale = tuple(int(v) for v in data_cfg.img_scale)
    ms = tuple(int(v) for v in _cfg_get(data_cfg, "multiscale_short", ())) if train else ()
    ms_mode = str(_cfg_get(data_cfg, "multiscale_mode", "value"))
    if ms_mode not in MULTISCALE_MODES:
        raise ValueError(f"data.multiscale_mode must be one of {MULTISCALE_MODES}, got {ms_mode!r}")
    groups = group_by_canvas(recs.records, img_scale, canvases, ms)
    maker = _BatchMaker(
        records=recs.records,
        groups=groups,
        canvases=canvases,
        global_batch=int(global_batch_size),
        process_index=process_index,
        process_count=process_count,
        seed=int(seed),
        train=train,
        img_scale=img_scale,
        multiscale_short=ms,
        multiscale_mode=ms_mode,
        pixel_style=_cfg_get(data_cfg, "pixel_style", "pytorch"),
        flip_prob=float(_cfg_get(data_cfg, "flip_prob", 0.5)),
        max_boxes=int(data_cfg.max_boxes),
        max_ignore=int(_cfg_get(data_cfg, "max_ignore", 32)),
        on_bad_image=_cfg_get(data_cfg, "on_bad_image", "error"),
    )
    T.pixel_stats(maker.pixel_style)  # validates the style before workers start
    if train:
        _, canvas_of_batch = epoch_schedule(groups, len(canvases), global_batch_size, 0, 0)
        maker.steps_per_epoch = len(canvas_of_batch)
        num_steps = _INFINITE_STEPS
    else:
        batches, canvas_of_batch = eval_schedule(groups, len(canvases), global_batch_size)
        maker.eval_batches, maker.eval_canvas = batches, canvas_of_batch
        maker.steps_per_epoch = num_steps = len(maker.eval_canvas)
    num_workers = int(_cfg_get(data_cfg, "num_workers", 2))
    ds = grain.MapDataset.range(num_steps).map(maker)
    read = grain.ReadOptions(
        num_threads=int(_cfg_get(data_cfg, "read_threads", 1 if num_workers else 2)),
        prefetch_buffer_size=int(_cfg_get(data_cfg, "prefetch_batches", 2)),
    )
    ids = ds.to_iter_dataset(read)
    if num_workers > 0:
        _ensure_flags_parsed()
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return DetectionLoader(ids, recs, maker.steps_per_epoch, canvases, maker)


def build_train_loader(
    data_cfg: Any,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    records: CocoRecords | None = None,
    num_classes: int | None = None,
) -> DetectionLoader:
    """Infinite iterator of this host's training batches (global batch / process_count each).

    Args:
      data_cfg: a `coco_data()` / `shapes_data()` config (root, canvases, img_scale, ...).
      global_batch_size: images per step over all hosts (divisible by `process_count`).
      seed: shuffling / flip / multi-scale seed; epoch e uses `default_rng([seed, e])`.
      process_index, process_count: default `jax.process_index()` / `jax.process_count()`.
      records: already loaded records (skips reading the json again).
      num_classes: the model's class count; a split with another number of categories is
        refused (`check_num_classes`).
    """
    return _build(
        data_cfg, global_batch_size, seed, process_index, process_count, True, records, num_classes
    )


def build_eval_loader(
    data_cfg: Any,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    records: CocoRecords | None = None,
    num_classes: int | None = None,
) -> DetectionLoader:
    """One pass over every val image (global `batch_size` per step, this host's slice).

    Images are grouped by canvas and kept in json order within a group; each group's last
    batch is padded with `image_id = -1` examples. No flip, single scale `img_scale`.
    `num_classes`: as in `build_train_loader`.
    """
    return _build(
        data_cfg, batch_size, 0, process_index, process_count, False, records, num_classes
    )
