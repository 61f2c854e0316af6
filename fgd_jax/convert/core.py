"""Strict, generic mapping between mmdetection-layout flat state dicts and Flax variables.

One rule (docs/contracts.md): a key `a.b.0.c.weight` names the Flax path `a/b_0/c` (list
indices joined to the preceding name with `_`) and its leaf:

| torch leaf | Flax leaf | value |
|---|---|---|
| `weight` of a conv | `params/.../kernel` | OIHW -> HWIO (1-D conv OIW -> WIO) |
| `weight` of a linear | `params/.../kernel` | [out, in] -> [in, out] |
| `weight` of BN/GN/LayerNorm | `params/.../scale` | squeezed to the target ([C,1,1] -> [C]) |
| `bias` | `params/.../bias` | as is |
| `running_mean` / `running_var` | `batch_stats/.../mean` / `var` | as is |
| `num_batches_tracked` | (ignored) | |
| `integral.project` (GFL's fixed bins) | (ignored) | checked to be `0, 1, ..., reg_max` |
| any other leaf, e.g. `scales.0.scale` | `params/scales_0/scale` | as is (size-1 reshape) |

Whether `weight` is a kernel or a norm scale is read from the target tree. A `rename` (a
callable or a table of `(regex, replacement | None)` rules, first match wins, None drops the
key) is applied to the source keys first, so other layouts (torchvision) become mmdetection
names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

RenameRules = Sequence[tuple[str, str | None]]
Rename = Callable[[str], str | None] | RenameRules | None
Path = tuple[str, ...]

_IGNORED_LEAVES = ("num_batches_tracked",)
# Constant buffers a module rebuilds itself (key suffix): checked, then ignored.
_CONSTANT_BUFFERS = ("integral.project",)
_STATS = {"running_mean": "mean", "running_var": "var"}


@dataclass
class ConversionReport:
    """What a conversion did. Keys are source keys after renaming (and prefix removal)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # target leaves ('params/a/b/kernel')
    unexpected: list[str] = field(default_factory=list)  # source keys with no target leaf
    mismatched: list[str] = field(default_factory=list)  # 'key: source [..] -> target [..]'
    duplicated: list[str] = field(default_factory=list)  # two source keys for one target
    dropped: list[str] = field(default_factory=list)  # removed by the rename rules
    ignored: list[str] = field(default_factory=list)  # num_batches_tracked, outside prefix

    def problems(self, strict: bool, limit: int = 12) -> list[str]:
        """Error lines, at most `limit` keys per kind (then '... and N more')."""
        groups = []
        if strict:
            groups.append(("missing in the checkpoint", self.missing))
            groups.append(("unexpected in the checkpoint", self.unexpected))
        groups.append(("wrong shape", self.mismatched))
        groups.append(("several source keys for one target", self.duplicated))
        lines = []
        for title, keys in groups:
            if not keys:
                continue
            lines.append(f"{title} ({len(keys)}):")
            lines += [f"  {k}" for k in keys[:limit]]
            if len(keys) > limit:
                lines.append(f"  ... and {len(keys) - limit} more")
        return lines


# ------------------------------------------------------------------------------- renaming
def compile_rules(rules: RenameRules) -> list[tuple[re.Pattern, str | None]]:
    """Compile `(regex, replacement | None)` rules; raises on a bad regex naming it."""
    out = []
    for pattern, repl in rules:
        try:
            out.append((re.compile(pattern), repl))
        except re.error as e:
            raise ValueError(f"rename rule {pattern!r}: bad regular expression: {e}") from e
    return out


def make_renamer(rename: Rename) -> Callable[[str], str | None]:
    """A `key -> new key | None` function from a callable, a rule table or None."""
    if rename is None:
        return lambda k: k
    if callable(rename):
        return rename
    compiled = compile_rules(rename)

    def apply(key: str) -> str | None:
        for pattern, repl in compiled:
            if pattern.search(key):
                return None if repl is None else pattern.sub(repl, key, count=1)
        return key

    return apply


# ----------------------------------------------------------------------------- name rules
def module_path(torch_module: str) -> Path:
    """`'layer1.0.downsample.0'` -> `('layer1_0', 'downsample_0')`."""
    path: list[str] = []
    for tok in torch_module.split(".") if torch_module else []:
        if tok.isdigit() and path:
            path[-1] = f"{path[-1]}_{tok}"
        else:
            path.append(tok)
    return tuple(path)


_INDEX = re.compile(r"^(.*?)((?:_\d+)+)$")


def torch_module_name(path: Sequence[str]) -> str:
    """Inverse of `module_path`: `('layer1_0', 'downsample_0')` -> `'layer1.0.downsample.0'`.

    Every trailing `_<digits>` group of a name becomes a list index (true for all detector
    modules; a module whose own name ends in `_<digits>` would need a rename)."""
    toks = []
    for name in path:
        m = _INDEX.match(name)
        if m and m.group(1):
            toks.append(m.group(1))
            toks += m.group(2)[1:].split("_")
        else:
            toks.append(name)
    return ".".join(toks)


def _flatten(tree: Mapping) -> dict[Path, Any]:
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        flat[tuple(str(getattr(p, "key", p)) for p in path)] = leaf
    return flat


def _unflatten(flat: Mapping[Path, Any]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = leaf
    return tree


def _target_for(key: str, targets: Mapping[Path, Any]) -> Path | None:
    """The target path a (renamed) mmdetection key maps to, or None if it has none."""
    module, _, leaf = key.rpartition(".")
    mod = module_path(module)
    if leaf in _STATS:
        cands = [("batch_stats", *mod, _STATS[leaf])]
    elif leaf == "weight":
        cands = [("params", *mod, "kernel"), ("params", *mod, "scale")]
    else:
        cands = [("params", *mod, leaf)]
    for c in cands:
        if c in targets:
            return c
    return None


def _transform(value: np.ndarray, target_path: Path, target_shape: tuple[int, ...]) -> np.ndarray:
    if target_path[-1] == "kernel":
        if value.ndim == 4:  # conv OIHW -> HWIO
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 3:  # conv1d OIW -> WIO
            value = value.transpose(2, 1, 0)
        elif value.ndim == 2:  # linear [out, in] -> [in, out]
            value = value.T
    if value.shape != tuple(target_shape) and value.size == int(np.prod(target_shape)):
        squeezed = tuple(d for d in value.shape if d != 1)
        if squeezed == tuple(d for d in target_shape if d != 1):
            value = value.reshape(target_shape)  # LayerNorm [C,1,1] -> [C], scalar (1,) -> ()
    return value


def _describe(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# ------------------------------------------------------------------------------ conversion
def convert_state_dict(
    state_dict: Mapping[str, Any],
    target: Mapping,
    *,
    rename: Rename = None,
    prefix: str | None = None,
    strict: bool = True,
    return_report: bool = False,
) -> dict | tuple[dict, ConversionReport]:
    """Flax variables from a flat torch state dict.

    Args:
      state_dict: `{key: array}` (numpy or torch tensors), mmdetection names after `rename`.
      target: the variables to fill, e.g. `jax.eval_shape(module.init, ...)` (leaves with
        `.shape`/`.dtype`) or real initialized variables.
      rename: callable or `(regex, replacement | None)` table applied to every source key
        (after the prefix is removed); None drops a key.
      prefix: take only keys starting with it (e.g. 'backbone.' or 'student.'), removed.
      strict: every target leaf filled and every source key used exactly once. With
        `strict=False` missing/unexpected keys are logged and reported, not raised; missing
        leaves keep the target's value when it is an array, else are left out.
    Returns:
      `{'params': ..., 'batch_stats': ...}` of float numpy arrays in the target's dtypes
      (plus the `ConversionReport` when `return_report`).
    Raises:
      ValueError: one error listing ALL missing, unexpected, wrongly shaped and duplicated keys
        (shape errors and duplicates are raised also when not strict).
    """
    renamer = make_renamer(rename)
    targets = _flatten(target)
    report = ConversionReport()
    filled: dict[Path, np.ndarray] = {}
    source_of: dict[Path, str] = {}
    for raw_key, value in state_dict.items():
        key = raw_key
        if prefix:
            if not key.startswith(prefix):
                report.ignored.append(raw_key)
                continue
            key = key[len(prefix) :]
        new = renamer(key)
        if new is None:
            report.dropped.append(key)
            continue
        key = new
        if key.rpartition(".")[2] in _IGNORED_LEAVES:
            report.ignored.append(key)
            continue
        if key.endswith(_CONSTANT_BUFFERS):
            bins = _to_numpy(value)
            if not np.array_equal(bins, np.arange(bins.size, dtype=bins.dtype)):
                raise ValueError(f"{key}: expected the bins 0..{bins.size - 1}, got {bins}")
            report.ignored.append(key)
            continue
        arr = _to_numpy(value)
        tpath = _target_for(key, targets)
        if tpath is None:
            report.unexpected.append(f"{key} {_describe(arr.shape)}")
            continue
        if tpath in source_of:
            report.duplicated.append(f"{'/'.join(tpath)} <- {source_of[tpath]} and {key}")
            continue
        tleaf = targets[tpath]
        out = _transform(arr, tpath, tuple(tleaf.shape))
        if out.shape != tuple(tleaf.shape):
            report.mismatched.append(
                f"{key}: checkpoint {_describe(arr.shape)} -> {'/'.join(tpath)} "
                f"expects {_describe(tleaf.shape)}"
            )
            continue
        # an owned copy: a 1-D leaf passes through `_transform` as a view of the torch
        # tensor, and jax may wrap host numpy memory without copying, so an in-place update
        # of the source module (a BN running stat in train mode) would leak into the params
        filled[tpath] = np.array(out, dtype=tleaf.dtype, copy=True)
        source_of[tpath] = key
        report.loaded.append(key)
    for tpath, tleaf in targets.items():
        if tpath not in filled and tpath not in source_of:
            report.missing.append(f"{'/'.join(tpath)} {_describe(tleaf.shape)}")
            if not strict and isinstance(tleaf, np.ndarray | jax.Array):
                filled[tpath] = tleaf
    problems = report.problems(strict)
    if problems:
        where = f" (prefix {prefix!r})" if prefix else ""
        msg = "checkpoint does not match the model" + where + ":\n" + "\n".join(problems)
        raise ValueError(msg)
    if not strict and (report.missing or report.unexpected):
        log.warning(
            "non-strict load: %d loaded, %d missing (kept), %d unexpected (skipped): %s",
            len(report.loaded),
            len(report.missing),
            len(report.unexpected),
            report.unexpected[:10],
        )
    variables = _unflatten(filled)
    return (variables, report) if return_report else variables


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def export_state_dict(variables: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """mmdetection-named flat state dict from Flax variables (inverse of `convert_state_dict`
    without renames): HWIO -> OIHW, [in, out] -> [out, in], norm `scale` -> `weight`,
    `mean`/`var` -> `running_mean`/`running_var`. A `scale` leaf without a `bias` sibling
    (FCOS `Scale`) keeps its name and its shape `()`."""
    flat = _flatten(variables)
    out: dict[str, np.ndarray] = {}
    for path, leaf in flat.items():
        coll, mod, name = path[0], path[1:-1], path[-1]
        value = np.asarray(leaf)
        if coll == "batch_stats":
            name = {"mean": "running_mean", "var": "running_var"}.get(name, name)
        elif coll == "params":
            if name == "kernel":
                name = "weight"
                if value.ndim == 4:
                    value = value.transpose(3, 2, 0, 1)
                elif value.ndim == 3:
                    value = value.transpose(2, 1, 0)
                elif value.ndim == 2:
                    value = value.T
            elif name == "scale" and ("params", *mod, "bias") in flat:
                name = "weight"
        else:
            raise ValueError(f"export: unsupported variable collection {coll!r} at {path}")
        key = prefix + ".".join(filter(None, [torch_module_name(mod), name]))
        if key in out:
            raise ValueError(f"export: two variables map to the torch key {key!r}")
        # np.asarray, not np.ascontiguousarray: the latter turns 0-d leaves (mmcv `Scale`) into
        # shape (1,), which a strict torch load of the exported dict rejects
        out[key] = np.asarray(value, order="C")
    return out
