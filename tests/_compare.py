"""Comparison of two parameter trees from two training runs that should agree ("A equals B":
one vs two processes, 8 devices vs 1, ...), and the stability check those comparisons need.

Why a tree-scaled floor: a leaf's own max is a bad scale when the leaf is itself ~0 (a
BatchNorm bias after a few steps from zero init is ~1e-5): float32 reduction-order noise of
~1e-8 in absolute terms is then a "relative" difference of 1e-3 or more. Each leaf is therefore
compared against `max(max|leaf|, rms of the whole tree)`, so a tiny leaf is held to the
absolute accuracy of the tree's typical value, while a large leaf still to its own size.

Why the stability check: in a diverging run (gradient norm growing step after step) any
rounding difference is amplified exponentially, so two correct runs drift apart and the
comparison measures chaos, not correctness. A test that compares runs asserts first that the
run it compares was stable, so a config change that makes it diverge fails with that message
instead of flaking on some CPUs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def _leaves(tree: Any) -> list[tuple[str, np.ndarray]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(p), np.asarray(x, np.float64)) for p, x in flat]


def tree_scale(tree: Any) -> float:
    """Root mean square over every element of every floating leaf of `tree` (a float >= 0)."""
    leaves = [x for _, x in _leaves(tree) if x.size]
    n = sum(x.size for x in leaves)
    return float(np.sqrt(sum(float(np.sum(np.square(x))) for x in leaves) / max(n, 1)))


def tree_difference(actual: Any, desired: Any) -> tuple[float, str]:
    """Worst floored relative difference of two trees of the same structure.

    For each leaf: `max|a - d| / max(max|d|, rms(desired tree))`. Returns `(worst, path of the
    worst leaf)`. Raises `ValueError` when the structures or leaf shapes differ.
    """
    a_leaves, d_leaves = _leaves(actual), _leaves(desired)
    if [p for p, _ in a_leaves] != [p for p, _ in d_leaves]:
        raise ValueError("trees differ in structure")
    floor = tree_scale(desired)
    worst, where = 0.0, ""
    for (path, a), (_, d) in zip(a_leaves, d_leaves, strict=True):
        if a.shape != d.shape:
            raise ValueError(f"{path}: shape {a.shape} != {d.shape}")
        if not a.size:
            continue
        err = float(np.max(np.abs(a - d)))
        if not np.isfinite(err):
            return float("inf"), path
        scale = max(float(np.max(np.abs(d))), floor)
        rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
        if rel > worst:
            worst, where = rel, path
    return worst, where


def assert_trees_close(actual: Any, desired: Any, rtol: float, what: str = "params") -> float:
    """Assert `tree_difference(actual, desired) <= rtol`; returns the worst difference (for
    the test to print). The reference run is `desired`."""
    worst, where = tree_difference(actual, desired)
    assert worst <= rtol, (
        f"{what}: worst difference {worst:.3g} (relative to max(leaf max, tree rms "
        f"{tree_scale(desired):.3g})) at {where} exceeds {rtol:g}"
    )
    return worst


def assert_stable(
    grad_norms: Sequence[float], losses: Sequence[float], growth: float = 1.2
) -> None:
    """The compared run trained in a stable regime: the last step's gradient norm is at most
    `growth` x the first's and the loss fell (last < first). `grad_norms`, `losses`: one
    value per step, in step order."""
    g, loss = [float(x) for x in grad_norms], [float(x) for x in losses]
    assert len(g) >= 2 and len(loss) >= 2, "need at least two steps to judge stability"
    assert g[-1] <= growth * g[0], (
        f"the compared run is not stable (gradient norm {g[0]:.4g} -> {g[-1]:.4g} over "
        f"{len(g)} steps): float noise would be amplified; lower the lr or the steps"
    )
    assert loss[-1] < loss[0], f"the compared run's loss did not fall: {loss}"
