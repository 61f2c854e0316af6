"""mmdetection 2.x `RandomSampler` (neg_pos_ub=-1) with static shapes, and `add_gt_as_proposals`.

Assignment encoding as in `fgd_jax.ops.assign`: `k >= 0` positive (GT k), -1 negative,
-2 ignore. A uniform random subset is drawn by giving every candidate a random priority and
taking `top_k`; the result is reproducible for a given key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from fgd_jax.ops.assign import IGNORE, NEGATIVE
from fgd_jax.ops.dtypes import float_dtype


def add_gt_as_proposals(
    proposals: Array,
    proposal_valid: Array,
    assigned: Array,
    max_overlaps: Array,
    gt: Array,
    gt_valid: Array,
) -> tuple[Array, Array, Array, Array, Array]:
    """mmdet `BaseSampler.sample(add_gt_as_proposals=True)` + `AssignResult.add_gt_`.

    The GT boxes are prepended to the proposals and assigned to themselves (max overlap 1).
    The assignment of the proposals must have been computed against the GTs *before* this call,
    as mmdetection does. Padded GT rows are invalid (`IGNORE`, never sampled).

    Args: proposals `[P, 4]`, proposal_valid `[P]` bool, assigned `[P]` int32, max_overlaps
      `[P]`, gt `[G, 4]`, gt_valid `[G]` bool.
    Returns: boxes `[G+P, 4]`, valid `[G+P]`, assigned `[G+P]`, max_overlaps `[G+P]`,
      is_gt `[G+P]` bool (valid GT rows).
    """
    gt_valid = jnp.asarray(gt_valid, bool)
    g = gt_valid.shape[0]
    gt_assigned = jnp.where(gt_valid, jnp.arange(g, dtype=jnp.int32), IGNORE)
    dt = float_dtype(gt, proposals)
    boxes = jnp.concatenate([jnp.asarray(gt, dt), jnp.asarray(proposals, dt)])
    valid = jnp.concatenate([gt_valid, jnp.asarray(proposal_valid, bool)])
    assigned = jnp.concatenate([gt_assigned, jnp.asarray(assigned, jnp.int32)])
    max_overlaps = jnp.concatenate([gt_valid.astype(dt), jnp.asarray(max_overlaps, dt)])
    is_gt = jnp.concatenate([gt_valid, jnp.zeros(jnp.shape(proposal_valid), bool)])
    return boxes, valid, assigned, max_overlaps, is_gt


def _random_top(key: Array, candidate: Array, k: int) -> Array:
    """`k` distinct indices, candidates first in random order (non-candidates after them)."""
    prio = jnp.where(candidate, jax.random.uniform(key, candidate.shape), -1.0)
    return jax.lax.top_k(prio, k)[1].astype(jnp.int32)


def random_sample(
    assigned: Array,
    valid: Array | None,
    num: int,
    pos_fraction: float,
    key: Array,
) -> tuple[Array, Array, Array]:
    """Sample `num` candidates: positives first, then negatives (mmdet RandomSampler counts).

    num_pos = min(#pos, int(num * pos_fraction)); num_neg = min(#neg, num - num_pos).

    Args:
      assigned: `[N]` int32 (k >= 0 positive, -1 negative, -2 ignore).
      valid: optional `[N]` bool; invalid (padded) entries are never sampled.
      num, pos_fraction: static. key: a PRNG key.
    Returns:
      indices `[num]` int32 into the N candidates (slots `[0, num_pos)` positives, then
      `[num_pos, num_pos + num_neg)` negatives, then padding with index 0);
      is_pos `[num]` bool; sample_valid `[num]` bool (True for the first num_pos + num_neg).
    """
    assigned = jnp.asarray(assigned, jnp.int32)
    n = assigned.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
    pos = valid & (assigned >= 0)
    neg = valid & (assigned == NEGATIVE)
    # top_k needs k <= length: pad the candidate masks with non-candidates.
    m = max(n, num)
    pos = jnp.zeros((m,), bool).at[:n].set(pos)
    neg = jnp.zeros((m,), bool).at[:n].set(neg)
    expected_pos = int(num * pos_fraction)
    num_pos = jnp.minimum(jnp.sum(pos), expected_pos).astype(jnp.int32)
    num_neg = jnp.minimum(jnp.sum(neg), num - num_pos).astype(jnp.int32)
    k_pos, k_neg = jax.random.split(key)
    slots = jnp.arange(num, dtype=jnp.int32)
    neg_idx = _random_top(k_neg, neg, num)
    neg_part = neg_idx[jnp.clip(slots - num_pos, 0, num - 1)]
    if expected_pos > 0:
        pos_idx = _random_top(k_pos, pos, expected_pos)
        pos_part = pos_idx[jnp.clip(slots, 0, expected_pos - 1)]
        idx = jnp.where(slots < num_pos, pos_part, neg_part)
    else:
        idx = neg_part
    is_pos = slots < num_pos
    sample_valid = slots < num_pos + num_neg
    idx = jnp.where(sample_valid, idx, 0)
    return idx, is_pos, sample_valid


def sample_assigned(
    assigned: Array, num: int, pos_fraction: float, key: Array
) -> tuple[Array, Array, Array]:
    """mmdetection `RandomSampler` (neg_pos_ub=-1) on one image's assignment.

    Args: assigned `[N] int32` (`fgd_jax.ops.assign` encoding: k >= 0 positive, -1 negative,
      -2 ignored/padding); num, pos_fraction: sampler settings; key: PRNG key.
    Returns: (inds `[num] int32` into N, positives first; valid `[num] bool`; pos `[num] bool`).
      Exactly `min(#pos, int(num*pos_fraction))` positives and `min(#neg, num - n_pos)`
      negatives are valid; ignored entries are never sampled.
    """
    inds, pos, valid = random_sample(assigned, None, num=num, pos_fraction=pos_fraction, key=key)
    return inds.astype(jnp.int32), valid, pos & valid
