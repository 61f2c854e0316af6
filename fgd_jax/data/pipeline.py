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

The parts live beside this module: `sources` (which records), `schedule` (canvases and the
batch schedule), `example` (one record -> one example), `transforms` (per-image ops). This
module is the loader; `load_split` and `ensure_shapes_dataset` (from `sources`) and
`choose_canvas`, `max_resized_hw`, `make_example` are re-exported for the commands.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import logging
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from fgd_jax.config import complete_data_config
from fgd_jax.data import transforms as T
from fgd_jax.data.classes import check_classes
from fgd_jax.data.coco import CocoRecords
from fgd_jax.data.example import MULTISCALE_MODES, make_example, padding_example
from fgd_jax.data.schedule import (
    choose_canvas,
    epoch_schedule,
    eval_schedule,
    group_by_canvas,
    max_resized_hw,
)
from fgd_jax.data.sources import check_num_classes, ensure_shapes_dataset, load_split
from fgd_jax.data.yolox_aug import YOLOXAugCfg, make_yolox_example

__all__ = [
    "SKIPPED_KEY",
    "DetectionLoader",
    "build_eval_loader",
    "build_train_loader",
    "choose_canvas",
    "ensure_shapes_dataset",
    "load_split",
    "make_example",
    "max_resized_hw",
]

log = logging.getLogger(__name__)

_INFINITE_STEPS = 1 << 62
AUGMENTS = ("standard", "yolox")
SKIPPED_KEY = "_num_skipped"  # per-batch count of skipped images, popped by DetectionLoader


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
    mask_grid: int = 0  # > 0: `masks` / `mask_regions` keys (data.with_mask, data.mask_grid)
    pad_value: float = 0.0  # data.pad_value
    # data.augment='yolox': the YOLOX recipe's training examples (fgd_jax.data.yolox_aug)
    yolox: YOLOXAugCfg | None = None
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
            return padding_example(canvas_hw, self.max_boxes, self.max_ignore, self.mask_grid), 0
        tries = 0
        while True:
            rng = np.random.default_rng([self.seed, epoch, slot, tries])
            try:
                if self.train and self.yolox is not None:
                    ex = make_yolox_example(
                        self.records, i, canvas_hw, self.max_boxes, self.max_ignore,
                        self.yolox, rng, epoch, self.pixel_style,
                    )  # fmt: skip
                    return ex, tries
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
                    mask_grid=self.mask_grid,
                    pad_value=self.pad_value,
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
                    pad = padding_example(
                        canvas_hw, self.max_boxes, self.max_ignore, self.mask_grid
                    )
                    return pad, 1
                tries += 1
                group = np.flatnonzero(self.groups == self.groups[i])
                if tries >= min(16, len(group)):
                    raise T.BadImageError(f"too many unreadable images in a row; last: {e}") from e
                pos = int(np.searchsorted(group, i))
                i = int(group[(pos + 1) % len(group)])


def _own_shared_memory(batch: dict[str, Any]) -> None:
    """Unlink the shared-memory segments a batch from grain's worker processes lives in.

    With `num_workers > 0` grain copies each array of a batch into its own shared-memory
    segment and the consumer's array unlinks it when garbage-collected, through a thread
    pool. Arrays still referenced when the interpreter exits (the last batches, held by
    grain's iterators or by the caller) are never unlinked: Python's resource tracker then
    warns `There appear to be N leaked shared_memory objects`. Unlinking at receipt removes
    the names at once (no other process opens them again); the mapping stays valid until the
    array is freed, which then only unmaps it. grain >= 0.2: `SharedMemoryArray.shm` and its
    `_unlink_on_del` flag (checked, so another layout is left to grain).

    Batches stay zero-copy views of the shared memory (a copy of a COCO host batch costs tens
    of ms per step): one kept in a module global until the interpreter exits is unmapped by
    grain's destructor during teardown, which then prints an ignored exception (nothing
    leaks). Keep `np.array(batch[k])` copies if batches must outlive the program's end.
    """
    for value in batch.values():
        shm = getattr(value, "shm", None)
        if shm is not None and getattr(value, "_unlink_on_del", False):
            value._unlink_on_del = False
            shm.unlink()


def _wait_for_shared_memory_release() -> None:
    """Wait until grain has unlinked the segments of batches dropped unread at `close` (they
    are unlinked by a one-thread pool, in order: a no-op submitted now runs after them). At
    interpreter exit the pool would otherwise stop first and the segments leak."""
    pool = getattr(_shared_memory_array_class(), "_del_thread_pool", None)
    if pool is not None:
        pool.apply(int)


def _shared_memory_array_class() -> Any:
    """grain's `SharedMemoryArray` (grain >= 0.2 layout), or None for another layout: then
    there is nothing to wait for or to switch that we know of."""
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:
        return None
    return SharedMemoryArray


def _unlink_synchronously_from_now_on() -> None:
    """At exit, after the loaders are closed: arrays freed from now on unlink their segment in
    the freeing thread instead of queueing it to grain's deletion pool. multiprocessing's
    exit function terminates that pool (dropping whatever is queued) before it runs the
    remaining finalizers, so a segment queued then would leak."""
    cls = _shared_memory_array_class()
    pool = getattr(cls, "_del_thread_pool", None)  # taken first: disabling drops it
    disable = getattr(cls, "_disable_async_del", None)
    if disable is not None:
        disable()
    if pool is not None:
        pool.apply(int)  # what was queued before the switch is unlinked


# grain kills a worker that has not exited this many seconds after being asked to stop; the
# batch it holds then stays in shared memory (13 segments leaked when forced). Its default,
# 25 s, is within reach on a loaded machine: a worker asked to stop while it is still
# importing JAX took 12 s on 2 cores at load 16 (the test suite with other jobs running).
_WORKER_STOP_TIMEOUT_S = 120.0


def _allow_slow_worker_exit() -> None:
    try:
        from grain._src.python.dataset.transformations import process_prefetch
    except ImportError:  # another grain layout: its own timeout applies
        return
    current = getattr(process_prefetch, "_PROCESS_KILL_TIMEOUT_S", None)
    if isinstance(current, (int, float)) and current < _WORKER_STOP_TIMEOUT_S:
        process_prefetch._PROCESS_KILL_TIMEOUT_S = _WORKER_STOP_TIMEOUT_S


# loaders not closed yet, closed at exit (weak: a loader garbage-collected earlier drops out)
_OPEN_LOADERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    for loader in list(_OPEN_LOADERS):
        loader.close()
    _unlink_synchronously_from_now_on()


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
        _OPEN_LOADERS.add(self)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:  # closed (an exhausted eval loader closes itself)
            raise StopIteration
        try:
            batch = next(self._it)
        except StopIteration:
            self.close()  # eval loader exhausted: release the workers now
            raise
        _own_shared_memory(batch)
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
        return self._open_iterator().get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume from `get_state()` of a loader built with the same config and seed."""
        self._open_iterator().set_state(state)

    def _open_iterator(self):
        if self._it is None:
            raise RuntimeError("the loader is closed; build a new one")
        return self._it

    def close(self) -> None:
        """Stop the worker processes and release grain's iterator (idempotent; loaders still
        open when the interpreter exits are closed by an atexit hook, while grain's modules
        still exist: closing from a destructor at shutdown fails and prints)."""
        it, self._it, self._dataset = self._it, None, None
        _OPEN_LOADERS.discard(self)
        close = getattr(it, "close", None)
        if close is not None:
            close()
        del it
        # grain's iterators hold batches read ahead in reference cycles, and the finalizers
        # one collection runs (a closed iterator's) can free more: collect until none is left
        for _ in range(8):
            if not gc.collect():
                break
        _wait_for_shared_memory_release()

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


def _yolox_cfg(data_cfg) -> YOLOXAugCfg | None:
    """`data.augment`: None for 'standard', the `data.yolox` settings for 'yolox'."""
    if data_cfg.augment not in AUGMENTS:
        raise ValueError(f"data.augment must be one of {AUGMENTS}, got {data_cfg.augment!r}")
    if data_cfg.augment != "yolox":
        return None
    if data_cfg.with_mask:
        raise ValueError("data.augment='yolox' moves boxes only: it cannot carry masks")
    section = data_cfg.yolox
    return YOLOXAugCfg.from_config(section.to_dict() if hasattr(section, "to_dict") else section)


def _build(
    data_cfg, global_batch_size, seed, process_index, process_count, train, records, num_classes
):
    process_index, process_count = _resolve_hosts(process_index, process_count)
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by {process_count} hosts"
        )
    data_cfg = complete_data_config(data_cfg)
    recs = records if records is not None else load_split(data_cfg, train)
    if num_classes is not None:  # before any worker process starts
        check_num_classes(recs, num_classes)
    check_classes(data_cfg.classes, recs, "the model of this config (data.classes)")
    canvases = tuple(tuple(int(v) for v in c) for c in data_cfg.canvases)
    img_scale = tuple(int(v) for v in data_cfg.img_scale)
    ms = tuple(int(v) for v in data_cfg.multiscale_short) if train else ()
    ms_mode = str(data_cfg.multiscale_mode)
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
        pixel_style=data_cfg.pixel_style,
        flip_prob=float(data_cfg.flip_prob),
        max_boxes=int(data_cfg.max_boxes),
        max_ignore=int(data_cfg.max_ignore),
        on_bad_image=data_cfg.on_bad_image,
        # masks are training targets; evaluation compares with the json's segmentations
        mask_grid=int(data_cfg.mask_grid) if data_cfg.with_mask and train else 0,
        pad_value=float(data_cfg.pad_value),
        yolox=_yolox_cfg(data_cfg) if train else None,
    )
    if maker.mask_grid and recs.records and "masks" not in recs.records[0]:
        raise ValueError("data.with_mask: the records given were read without masks")
    T.pixel_stats(maker.pixel_style)  # validates the style before workers start
    if train:
        _, canvas_of_batch = epoch_schedule(groups, len(canvases), global_batch_size, 0, 0)
        maker.steps_per_epoch = len(canvas_of_batch)
        num_steps = _INFINITE_STEPS
    else:
        batches, canvas_of_batch = eval_schedule(groups, len(canvases), global_batch_size)
        maker.eval_batches, maker.eval_canvas = batches, canvas_of_batch
        maker.steps_per_epoch = num_steps = len(maker.eval_canvas)
    num_workers = int(data_cfg.num_workers)
    ds = grain.MapDataset.range(num_steps).map(maker)
    read = grain.ReadOptions(
        num_threads=int(data_cfg.read_threads) or (1 if num_workers else 2),
        prefetch_buffer_size=int(data_cfg.prefetch_batches),
    )
    ids = ds.to_iter_dataset(read)
    if num_workers > 0:
        _ensure_flags_parsed()
        _allow_slow_worker_exit()
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
