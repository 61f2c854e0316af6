"""Checkpoints with orbax: the training state (async, keep last K) and standalone model exports.

Layout of a training checkpoint directory (`workdir/checkpoints/<step>/`), one orbax
composite checkpoint per step:
  state/        the train-state pytree (params, optimizer state, step, ...), sharded arrays
                written by every process for its shards (orbax OCDBT format);
  data_state/   `process_<i>.json`: the input-iterator state of process i (each host
                reads its own shard of the data, so each resumes its own iterator);
  config/       the experiment `ConfigDict` as JSON, so eval / export can rebuild the model
                from the checkpoint alone;
  metrics/      the scalars logged at that step (optional).

Crash safety: orbax writes a step into a temporary directory and renames it (or writes
`commit_success.txt` on object stores) only after every item and every process has finished,
so a crash or SIGKILL mid-save leaves the previous complete step as `latest_step()`;
incomplete temporary directories are ignored and removed on the next start.

A standalone export (`save_variables` / `load_variables`) holds one model's variables
(`{'params': ..., 'batch_stats': ...}`) plus its config, for converted teachers and exported
students.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any
ConfigDict = ml_collections.ConfigDict

_ITEMS = ("state", "data_state", "config", "metrics")


# ------------------------------------------------------------------------ config <-> json
def _tuplify(x):
    if isinstance(x, list):
        return tuple(_tuplify(v) for v in x)
    if isinstance(x, dict):
        return {k: _tuplify(v) for k, v in x.items()}
    return x


def config_to_json_dict(config: ConfigDict | Mapping | None) -> dict | None:
    """ConfigDict -> plain JSON-compatible dict (tuples become lists)."""
    if config is None:
        return None
    if isinstance(config, ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config)))


def config_from_json_dict(d: Mapping | None) -> ConfigDict | None:
    """The inverse of `config_to_json_dict`; lists come back as tuples (as the factories in
    `fgd_jax.config` write them)."""
    if d is None:
        return None
    return ConfigDict(_tuplify(dict(d)))


# ------------------------------------------------------------ per-process data iterator state
def _encode_data_state(state: Mapping | bytes | str | None) -> dict:
    if state is None:
        return {"kind": "none"}
    if isinstance(state, bytes | bytearray):
        return {"kind": "bytes", "base64": base64.b64encode(bytes(state)).decode("ascii")}
    if isinstance(state, str):
        return {"kind": "str", "value": state}
    if isinstance(state, Mapping):
        return {"kind": "json", "value": json.loads(json.dumps(dict(state)))}
    raise TypeError(f"data_state must be a dict, bytes, str or None, got {type(state).__name__}")


def _decode_data_state(d: Mapping) -> Mapping | bytes | str | None:
    kind = d.get("kind")
    if kind == "none":
        return None
    if kind == "bytes":
        return base64.b64decode(d["base64"])
    if kind in ("str", "json"):
        return d["value"]
    raise ValueError(f"unknown data_state encoding {kind!r}")


class ProcessDataStateHandler(ocp.CheckpointHandler):
    """Saves each process's data-iterator state as `process_<index>.json` in the item dir."""

    def save(self, directory: epath.Path, args: ProcessDataStateSave) -> None:
        payload = dict(_encode_data_state(args.state), process_count=jax.process_count())
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"process_{jax.process_index()}.json").write_text(json.dumps(payload))

    def restore(self, directory: epath.Path, args: ProcessDataStateRestore | None = None):
        path = epath.Path(directory) / f"process_{jax.process_index()}.json"
        if not path.exists():
            saved = sorted(p.name for p in epath.Path(directory).glob("process_*.json"))
            raise FileNotFoundError(
                f"{path}: no data state for process {jax.process_index()} "
                f"(saved: {saved}); was the checkpoint written with a different process count?"
            )
        payload = json.loads(path.read_text())
        if payload.get("process_count", 1) != jax.process_count():
            raise ValueError(
                f"{path}: data state saved by {payload.get('process_count')} processes, "
                f"restoring with {jax.process_count()}; the input pipeline cannot resume "
                "exactly (restore the train state only, with data_state=False)"
            )
        return _decode_data_state(payload)


@ocp.args.register_with_handler(ProcessDataStateHandler, for_save=True)
class ProcessDataStateSave(ocp.args.CheckpointArgs):
    def __init__(self, state: Mapping | bytes | str | None):
        self.state = state


@ocp.args.register_with_handler(ProcessDataStateHandler, for_restore=True)
class ProcessDataStateRestore(ocp.args.CheckpointArgs):
    pass


# ------------------------------------------------------------------------ abstract targets
def abstract_tree(tree: PyTree, sharding: jax.sharding.Sharding | None = None) -> PyTree:
    """Arrays -> `jax.ShapeDtypeStruct`s (keeping each array's sharding, or `sharding`)."""

    def f(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            if sharding is None:
                return x
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        if not hasattr(x, "dtype"):
            x = np.asarray(x)
        x_sharding = sharding if sharding is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x_sharding)

    return jax.tree.map(f, tree)


# ---------------------------------------------------------------------- training checkpoints
class CheckpointManager:
    """Train-state checkpoints in `directory/<step>`: async writes, keep the last `keep`.

    Every process must call `save` / `restore` / `wait` (orbax coordinates the processes;
    process 0 writes metadata and the config, every process writes its own array shards and
    data state).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int = 3,
        async_save: bool = True,
        save_interval_steps: int = 1,
    ):
        if keep is not None and keep < 1:
            raise ValueError(f"keep_ckpts must be >= 1 (or None for all), got {keep}")
        self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data_state": ProcessDataStateHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "metrics": ocp.JsonCheckpointHandler(),
            },
        )

    # -- writing
    def save(
        self,
        step: int,
        state: PyTree,
        data_state: Mapping | bytes | str | None = None,
        config: ConfigDict | Mapping | None = None,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Start saving `step` (returns once the arrays are copied off the devices; the write
        continues in the background: call `wait()` before reading it or exiting).

        Returns False when the step was skipped (`save_interval_steps`, or already saved).
        """
        items = {
            "state": ocp.args.StandardSave(state),
            "data_state": ProcessDataStateSave(data_state),
        }
        cfg = config_to_json_dict(config)
        if cfg is not None:
            items["config"] = ocp.args.JsonSave(cfg)
        if metrics is not None:
            items["metrics"] = ocp.args.JsonSave(
                {k: float(np.asarray(v)) for k, v in dict(metrics).items()}
            )
        return self._mngr.save(int(step), args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        """Block until every pending async save is complete (and old steps are deleted)."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading
    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def _has_item(self, step: int, name: str) -> bool:
        return (self.directory / str(step) / name).exists()

    def restore(
        self,
        step: int | None = None,
        target: PyTree | None = None,
        data_state: bool = True,
    ) -> tuple[PyTree, Mapping | bytes | str | None, ConfigDict | None]:
        """Restore `(state, data_state, config)` of `step` (default: the latest).

        Args:
          target: a tree like the saved state of `jax.ShapeDtypeStruct`s (with `sharding`)
            or of arrays: arrays are restored with those shapes, dtypes and shardings
            (e.g. replicated on a new mesh). None: restore with the saved shardings, which
            needs the same device topology as when saved.
          data_state: False skips the data-iterator state (returns None for it).
        Raises:
          FileNotFoundError: no checkpoint in the directory, or no such step.
        """
        steps = self.all_steps()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory} (available: {steps})"
            )
        items = {
            "state": ocp.args.StandardRestore(None if target is None else abstract_tree(target))
        }
        if data_state and self._has_item(step, "data_state"):
            items["data_state"] = ProcessDataStateRestore()
        if self._has_item(step, "config"):
            items["config"] = ocp.args.JsonRestore()
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        ds = out["data_state"] if "data_state" in items else None
        cfg = config_from_json_dict(out["config"]) if "config" in items else None
        return out["state"], ds, cfg

    def restore_config(self, step: int | None = None) -> ConfigDict | None:
        """Only the config stored with `step` (default latest), None if none was saved."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if not self._has_item(step, "config"):
            return None
        out = self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return config_from_json_dict(out["config"])

    def metrics(self, step: int) -> dict | None:
        """The metrics saved with `step`, or None."""
        if not self._has_item(step, "metrics"):
            return None
        out = self._mngr.restore(step, args=ocp.args.Composite(metrics=ocp.args.JsonRestore()))
        return dict(out["metrics"])


# --------------------------------------------------------------------- standalone variables
def _composite_checkpointer() -> ocp.Checkpointer:
    # Handlers named up front so a fresh process can read the metadata of both items.
    return ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(
            variables=ocp.PyTreeCheckpointHandler(), config=ocp.JsonCheckpointHandler()
        )
    )


def save_variables(
    path: str | os.PathLike,
    variables: PyTree,
    config: ConfigDict | Mapping | None = None,
    overwrite: bool = False,
) -> str:
    """Write one model's variables (+ its config as JSON) to directory `path`.

    Writes atomically (temporary directory + rename). Returns the absolute path.
    Raises FileExistsError if `path` exists and `overwrite` is False.
    """
    path = epath.Path(os.path.abspath(os.fspath(path)))
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    items = {"variables": ocp.args.PyTreeSave(variables)}
    cfg = config_to_json_dict(config)
    if cfg is not None:
        items["config"] = ocp.args.JsonSave(cfg)
    ckptr = _composite_checkpointer()
    ckptr.save(path, args=ocp.args.Composite(**items), force=overwrite)
    return os.fspath(path)


def _flatten_with_paths(tree: PyTree) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = {}
    for path, leaf in flat:
        parts = []
        for k in path:
            parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
        out["/".join(parts)] = leaf
    return out


def tree_mismatches(saved: PyTree, expected: PyTree, limit: int = 20) -> list[str]:
    """Human-readable differences (missing / unexpected leaves, shapes, dtypes) between two
    trees of arrays / ShapeDtypeStructs / orbax ArrayMetadata."""
    a, b = _flatten_with_paths(saved), _flatten_with_paths(expected)
    problems = [
        f"missing in checkpoint: {k} {tuple(b[k].shape)}" for k in sorted(b.keys() - a.keys())
    ]
    problems += [f"unexpected in checkpoint: {k}" for k in sorted(a.keys() - b.keys())]
    for k in sorted(a.keys() & b.keys()):
        sa, sb = tuple(a[k].shape), tuple(b[k].shape)
        if sa != sb:
            problems.append(f"shape of {k}: checkpoint {sa}, expected {sb}")
        elif np.dtype(a[k].dtype) != np.dtype(b[k].dtype):
            problems.append(f"dtype of {k}: checkpoint {a[k].dtype}, expected {b[k].dtype}")
    if len(problems) > limit:
        problems = problems[:limit] + [f"... and {len(problems) - limit} more"]
    return problems


def _check_export_dir(path: epath.Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not path.is_dir() or not (path / "variables").is_dir():
        raise ValueError(
            f"{path} is not a variables checkpoint written by fgd_jax.checkpoint.save_variables "
            "(expected a directory with a 'variables' subdirectory)"
        )


def load_variables(
    path: str | os.PathLike, expected: PyTree | None = None
) -> tuple[PyTree, ConfigDict | None]:
    """Read a `save_variables` directory -> `(variables, config)`.

    Args:
      expected: optional tree of arrays / `jax.ShapeDtypeStruct`s the variables must match
        (e.g. `jax.eval_shape(model.init, ...)`); a mismatch raises listing every difference.
        Leaves with a `sharding` are restored onto it; otherwise numpy arrays are returned.
    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: not such a checkpoint, or its tree does not match `expected`.
    """
    path = epath.Path(os.path.abspath(os.fspath(path)))
    _check_export_dir(path)
    ckptr = _composite_checkpointer()
    try:
        meta = ckptr.metadata(path).item_metadata["variables"]
    except Exception as e:  # noqa: BLE001 - orbax raises several types for unreadable dirs
        raise ValueError(f"{path}: cannot read checkpoint metadata ({e})") from e
    saved_tree = meta.tree if hasattr(meta, "tree") else meta
    if not saved_tree:
        raise ValueError(f"{path}: the checkpoint's 'variables' item holds no arrays")
    if expected is not None:
        problems = tree_mismatches(saved_tree, expected)
        if problems:
            raise ValueError(
                f"{path}: the checkpoint does not match the expected model (another "
                "architecture or config?):\n  " + "\n  ".join(problems)
            )

        def restore_arg(x):
            sharding = getattr(x, "sharding", None)
            if isinstance(sharding, jax.sharding.Sharding):
                return ocp.ArrayRestoreArgs(
                    sharding=sharding, global_shape=tuple(x.shape), dtype=x.dtype
                )
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)

        restore_args = jax.tree.map(restore_arg, expected)
    else:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved_tree)
    items = {"variables": ocp.args.PyTreeRestore(restore_args=restore_args)}
    has_config = (path / "config").exists()
    if has_config:
        items["config"] = ocp.args.JsonRestore()
    out = ckptr.restore(path, args=ocp.args.Composite(**items))
    config = config_from_json_dict(out["config"]) if has_config else None
    return out["variables"], config
