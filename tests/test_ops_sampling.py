"""fgd_jax.ops.sampling vs a numpy transcription of mmdetection 2.x RandomSampler.

The random draws differ from torch's randperm, so we compare what is deterministic: the number
of positives / negatives (exact), the sampled sets being subsets of the right candidates without
duplicates, padding never drawn, positives first; plus reproducibility for one key and
uniformity of the draw (each candidate's empirical frequency over 400 keys within 5 sigma of
the expected k / n). `add_gt_as_proposals` vs mmdet `AssignResult.add_gt_` transcribed below.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgd_jax.ops import sampling as S
from fgd_jax.ops.assign import IGNORE, NEGATIVE


def _mmdet_counts(gt_inds, num, pos_fraction):
    """RandomSampler._sample_pos/_sample_neg counts (mmdet encoding: >0 pos, 0 neg)."""
    pos = np.nonzero(gt_inds > 0)[0]
    neg = np.nonzero(gt_inds == 0)[0]
    num_expected_pos = int(num * pos_fraction)
    n_pos = min(len(pos), num_expected_pos)
    n_neg = min(len(neg), num - n_pos)  # neg_pos_ub = -1
    return n_pos, n_neg


def _assigned(rng, n, p_pos, p_neg):
    u = rng.uniform(0, 1, n)
    return np.where(u < p_pos, rng.integers(0, 5, n), np.where(u < p_pos + p_neg, NEGATIVE, IGNORE))


_sample = jax.jit(S.random_sample, static_argnames=("num", "pos_fraction"))


@pytest.mark.parametrize(
    "n,p_pos,p_neg,num,frac",
    [
        (600, 0.05, 0.8, 128, 0.25),
        (600, 0.5, 0.4, 128, 0.25),
        (300, 0.01, 0.05, 256, 0.5),
        (100, 0.3, 0.5, 256, 0.5),
        (300, 0.3, 0.6, 64, 0.0),
    ],
)
def test_counts_sets_and_order(n, p_pos, p_neg, num, frac):
    rng = np.random.default_rng(n + num)
    assigned = _assigned(rng, n, p_pos, p_neg)
    valid = rng.uniform(0, 1, n) > 0.1
    mm = np.where(valid, np.where(assigned >= 0, assigned + 1, np.where(assigned == -1, 0, -1)), -1)
    n_pos, n_neg = _mmdet_counts(mm, num, frac)
    idx, is_pos, sv = (
        np.asarray(x) for x in _sample(assigned, valid, num, frac, jax.random.key(0))
    )
    assert is_pos.sum() == n_pos and sv.sum() == n_pos + n_neg
    assert sv[: n_pos + n_neg].all() and is_pos[:n_pos].all() and not is_pos[n_pos:].any()
    picked = idx[sv]
    assert len(np.unique(picked)) == len(picked) and valid[picked].all()
    assert (assigned[idx[is_pos]] >= 0).all()
    assert (assigned[idx[sv & ~is_pos]] == NEGATIVE).all()
    assert (idx[~sv] == 0).all()


def test_reproducible_and_uniform():
    rng = np.random.default_rng(1)
    assigned = _assigned(rng, 60, 0.3, 0.6)
    valid = np.ones(60, bool)
    a = _sample(assigned, valid, 16, 0.25, jax.random.key(3))
    b = _sample(assigned, valid, 16, 0.25, jax.random.key(3))
    c = _sample(assigned, valid, 16, 0.25, jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    keys = jax.random.split(jax.random.key(0), 400)
    idx, is_pos, sv = jax.jit(jax.vmap(lambda k: S.random_sample(assigned, valid, 16, 0.25, k)))(
        keys
    )
    idx, is_pos, sv = np.asarray(idx), np.asarray(is_pos), np.asarray(sv)
    for cand, sel in ((assigned >= 0, is_pos), (assigned == NEGATIVE, sv & ~is_pos)):
        k = sel[0].sum()
        p = k / cand.sum()
        freq = np.bincount(idx[sel], minlength=60)[cand] / 400
        assert np.abs(freq - p).max() < 5 * np.sqrt(p * (1 - p) / 400)


def test_add_gt_as_proposals_mmdet():
    rng = np.random.default_rng(2)
    props = rng.uniform(0, 50, (8, 4)).astype(np.float32)
    gt = rng.uniform(0, 50, (4, 4)).astype(np.float32)
    gt_valid = np.array([True, True, True, False])
    assigned = np.array([0, -1, -2, 2, 1, -1, -1, 0], np.int32)
    max_ov = rng.uniform(0, 1, 8).astype(np.float32)
    pv = np.ones(8, bool)
    boxes, valid, asg, mo, is_gt = S.add_gt_as_proposals(props, pv, assigned, max_ov, gt, gt_valid)
    # mmdet: bboxes = cat([gt, bboxes]); gt_inds = cat([arange(1, G+1), gt_inds]);
    # max_overlaps = cat([ones(G), max_overlaps])
    np.testing.assert_array_equal(np.asarray(boxes), np.concatenate([gt, props]))
    np.testing.assert_array_equal(np.asarray(asg), np.concatenate([[0, 1, 2, IGNORE], assigned]))
    np.testing.assert_array_equal(np.asarray(mo), np.concatenate([[1, 1, 1, 0], max_ov]))
    np.testing.assert_array_equal(np.asarray(valid), np.concatenate([gt_valid, pv]))
    np.testing.assert_array_equal(np.asarray(is_gt), np.concatenate([gt_valid, np.zeros(8, bool)]))
    idx, is_pos, sv = S.random_sample(asg, valid, 12, 0.5, jax.random.key(0))
    assert int(jnp.sum(is_pos)) == 6 and 3 not in np.asarray(idx)[np.asarray(sv)]
