"""Safe loading of PyTorch checkpoints (`.pth`) into flat `{key: np.ndarray}` dicts.

`torch.load(weights_only=True)` never runs code from the pickle; we additionally allow only
the few numpy globals that real mmdetection/mmcv checkpoints hold in their `meta` (numpy
scalars, dtypes and arrays) and refuse anything else before unpickling, naming the global.
torch is imported lazily: it is an optional dependency (`pip install fgd-jax[torch]`).
"""

from __future__ import annotations

import importlib
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

# Globals a checkpoint may reference besides torch's own weights-only set. numpy 1.x pickles
# name `numpy.core.*`, numpy 2.x `numpy._core.*`.
SAFE_NUMPY_GLOBALS = (
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
)
_NUMPY_DTYPE_CLASS_PREFIX = "numpy.dtypes."  # e.g. numpy.dtypes.Float64DType (numpy >= 1.25)


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle references globals outside the allowed set."""


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading .pth checkpoints needs PyTorch: pip install 'fgd-jax[torch]'"
        ) from e
    return torch


def _is_allowed(name: str) -> bool:
    return name in SAFE_NUMPY_GLOBALS or (
        name.startswith(_NUMPY_DTYPE_CLASS_PREFIX) and name.endswith("DType")
    )


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    if module.startswith("numpy.core"):
        module = module.replace("numpy.core", "numpy._core", 1)  # numpy 2 name, no warning
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def load_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `.pth` file: a raw state dict, or a dict holding `state_dict` / `model`.

    Returns `{key: np.ndarray}` (tensors only; other entries such as `meta` are dropped).
    Raises:
      FileNotFoundError: no such file.
      UnsafeCheckpointError: the pickle references a global that is not allowed (e.g. one
        whose `__reduce__` would call `os.system`); nothing from the file is executed.
      ValueError: the file is not a torch checkpoint, or holds no state dict.
    """
    return state_dict_to_numpy(_load_safely(path), source=os.fspath(path))


def load_torch_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The `meta` dict of a `.pth` file (mmdetection: `CLASSES`, `epoch`, ...), read as safely
    as `load_torch_file`; {} when the file has none."""
    obj = _load_safely(path)
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    return dict(meta) if isinstance(meta, Mapping) else {}


def _load_safely(path: str | os.PathLike) -> Any:
    """The unpickled object of a `.pth` file (errors as `load_torch_file`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    torch = _torch()
    ser = torch.serialization
    if zipfile.is_zipfile(path):  # torch >= 1.6 format: list the globals before unpickling
        try:
            names = ser.get_unsafe_globals_in_checkpoint(path)
        except Exception as e:
            raise ValueError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {e})") from e
        refused = [g for g in names if not _is_allowed(g)]
        if refused:
            raise UnsafeCheckpointError(
                f"{path}: refusing to load, the pickle references globals that could run "
                f"code: {', '.join(refused)}"
            )
    else:  # legacy format: the weights-only unpickler refuses unknown globals itself
        names = list(SAFE_NUMPY_GLOBALS)
    allowed = []
    for name in names:
        obj = _resolve(name)
        if obj is not None:
            allowed.append((obj, name))
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        # Unpickling a numpy dtype instantiates its class (e.g. numpy.dtypes.Int64DType),
        # which the scan does not list; these classes are plain data types.
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    try:
        with ser.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        m = re.search(r"GLOBAL (\S+)", msg) or re.search(r"got <class '([^']+)'>", msg)
        if m:
            raise UnsafeCheckpointError(
                f"{path}: refusing to load, the pickle references a global that is not "
                f"allowed: {m.group(1)}"
            ) from None
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from e
    return obj


def state_dict_to_numpy(obj: Any, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """`{key: np.ndarray}` from a state dict or a dict holding `state_dict` / `model`."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"{source}: expected a state dict (or a dict with 'state_dict' / 'model'), "
            f"got {type(obj).__name__}"
        )
    out = {}
    for k, v in obj.items():
        if hasattr(v, "detach"):
            out[str(k)] = v.detach().cpu().numpy()
        elif isinstance(v, np.ndarray):
            out[str(k)] = v
    if not out:
        raise ValueError(f"{source}: the state dict holds no tensors (keys: {list(obj)[:5]})")
    return out
