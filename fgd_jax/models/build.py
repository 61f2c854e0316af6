"""Modules from config groups, and config groups from modules: the defaults live once, on the
fields of the Flax modules (and of the frozen settings dataclasses the detectors hold).

- `build_module(cls, cfg, where=..., **given)`: `cls(**cfg, **given)`, passing only the fields
  `cls` declares; a key `cls` does not declare is refused with an error naming it and `cls`.
- `module_config(cls, skip=..., **differs)`: a `ConfigDict` of every configurable field of
  `cls` at its default, with `differs` set on top: what a config factory returns, so every key
  a run reads is visible and overridable, and the factory's source shows only what differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

# Fields of every Flax module that no config sets.
_NOT_CONFIGURABLE = ("parent", "name", "dtype")


def config_fields(cls: type) -> tuple[str, ...]:
    """The fields of the dataclass (or Flax module) `cls` a config may set, in order."""
    return tuple(
        f.name for f in dataclasses.fields(cls) if f.init and f.name not in _NOT_CONFIGURABLE
    )


def _frozen(value: Any) -> Any:
    """Config values as module fields: lists (and tuples of lists) become tuples."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def check_keys(
    cls: type, cfg: Mapping[str, Any] | None, where: str = "", allowed: Iterable[str] = ()
) -> None:
    """Raise ValueError naming the keys of `cfg` that are neither fields of `cls` nor in
    `allowed` (keys another part reads), with `where` (the group's dotted name) and `cls`."""
    known = set(config_fields(cls)) | set(allowed)
    unknown = sorted(k for k in (cfg or {}).keys() if k not in known)
    if unknown:
        raise ValueError(
            f"model config{' ' + where if where else ''}: unknown keys {unknown} for "
            f"{cls.__name__}; it takes {sorted(known)}"
        )


def build_module(
    cls: type,
    cfg: Mapping[str, Any] | None,
    where: str = "",
    ignore: Iterable[str] = (),
    **given: Any,
) -> Any:
    """`cls(**cfg, **given)` for a Flax module or settings dataclass `cls`.

    Args:
      cfg: a config group (ConfigDict or dict); None or absent keys take `cls`'s defaults.
      where: the group's dotted name in the model config, for error messages (e.g. 'head').
      ignore: keys of `cfg` that another part reads (e.g. a backbone's `norm_requires_grad`).
      given: fields the caller sets (submodules, dtype, values derived from other groups);
        `cfg` may not set them too.
    Raises ValueError naming every unknown key, `where` and `cls`.
    """
    known = set(config_fields(cls))
    keys = [k for k in (cfg or {}).keys() if k not in set(ignore)]
    unknown = sorted(k for k in keys if k not in known or k in given)
    if unknown:
        settable = sorted(known - set(given))
        raise ValueError(
            f"model config{' ' + where if where else ''}: unknown keys {unknown} for "
            f"{cls.__name__}; it takes {settable}"
        )
    defaults = _field_defaults(cls)
    kwargs = {k: _value(cfg[k], defaults.get(k), f"{where}.{k}" if where else k) for k in keys}
    return cls(**kwargs, **given)


def _is_group(value: Any) -> bool:
    return isinstance(value, Mapping | ml_collections.ConfigDict)


def _is_settings(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _field_defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _value(value: Any, default: Any, where: str) -> Any:
    """A config value as a field value: a nested group over a settings-dataclass default
    (e.g. `train_cfg.rpn`) replaces that default's fields; lists become tuples."""
    if _is_group(value) and _is_settings(default):
        check_keys(type(default), value, where)
        sub = _field_defaults(type(default))
        return dataclasses.replace(
            default, **{k: _value(value[k], sub.get(k), f"{where}.{k}") for k in value.keys()}
        )
    return _frozen(value)


def module_config(cls: type, skip: Iterable[str] = (), **differs: Any) -> ml_collections.ConfigDict:
    """Every configurable field of `cls` (less `skip`) at its default, then `differs` on top.

    Raises ValueError when `differs` names a field `cls` does not have (or one in `skip`)."""
    fields = [
        f
        for f in dataclasses.fields(cls)
        if f.init and f.name not in _NOT_CONFIGURABLE and f.name not in set(skip)
    ]
    names = {f.name for f in fields}
    unknown = sorted(set(differs) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no configurable fields {unknown}")
    defaults = _field_defaults(cls)
    out = {}
    for f in fields:
        if f.name in differs:
            out[f.name] = differs[f.name]
        elif f.name not in defaults:
            raise ValueError(f"module_config: {cls.__name__}.{f.name} has no default; set it")
        else:
            out[f.name] = _as_config(defaults[f.name])
    return ml_collections.ConfigDict(out)


def _as_config(value: Any) -> Any:
    """A field default as a config value: a settings dataclass becomes a nested group."""
    if _is_settings(value):
        return ml_collections.ConfigDict(
            {f.name: _as_config(getattr(value, f.name)) for f in dataclasses.fields(value)}
        )
    return value
