"""The comparison helper of the "A equals B" training tests (tests/_compare.py) can fail:
a 1% change of a large leaf is caught, float32 noise on a ~0 leaf is not, and a diverging
run is refused before any comparison (reference: hand-computed differences)."""

import numpy as np
import pytest

from ._compare import assert_stable, assert_trees_close, tree_difference, tree_scale


def _tree(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "conv": {"kernel": rng.normal(0, 0.05, (3, 3, 8, 8)).astype(np.float32)},
        "bn": {
            "scale": np.ones(8, np.float32),
            "bias": rng.normal(0, 5e-5, 8).astype(np.float32),  # ~0, as after a few steps
        },
    }


def test_one_percent_change_of_a_large_leaf_is_caught():
    ref = _tree()
    got = _tree()
    got["conv"]["kernel"] = got["conv"]["kernel"] * np.float32(1.01)
    worst, where = tree_difference(got, ref)
    assert where == "['conv']['kernel']" and 0.009 < worst < 0.011
    with pytest.raises(AssertionError, match=r"conv.*kernel.*exceeds 0.0001"):
        assert_trees_close(got, ref, rtol=1e-4)
    # one element of the BN scale (the largest leaf) moved by 1%
    got = _tree()
    got["bn"]["scale"][3] = 1.01
    with pytest.raises(AssertionError, match="scale"):
        assert_trees_close(got, ref, rtol=1e-4)


def test_noise_on_a_leaf_near_zero_is_measured_against_the_tree():
    ref = _tree()
    got = _tree()
    got["bn"]["bias"] = got["bn"]["bias"] + np.float32(1e-8)  # 2e-4 of the bias' own max
    own = float(
        np.max(np.abs(got["bn"]["bias"] - ref["bn"]["bias"])) / np.abs(ref["bn"]["bias"]).max()
    )
    assert own > 1e-4
    floor = tree_scale(ref)
    want = float(np.max(np.abs(got["bn"]["bias"] - ref["bn"]["bias"]))) / floor
    assert assert_trees_close(got, ref, rtol=1e-4) == pytest.approx(want, rel=1e-6)
    # but a change comparable to the tree's scale on that same leaf is caught
    got["bn"]["bias"] = ref["bn"]["bias"] + np.float32(0.01 * floor)
    with pytest.raises(AssertionError, match="bias"):
        assert_trees_close(got, ref, rtol=1e-3)


def test_nan_structure_and_shape_are_failures():
    ref = _tree()
    got = _tree()
    got["conv"]["kernel"][0, 0, 0, 0] = np.nan
    assert tree_difference(got, ref)[0] == float("inf")
    with pytest.raises(ValueError, match="structure"):
        tree_difference({"a": np.zeros(2)}, {"b": np.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        tree_difference({"a": np.zeros(2)}, {"a": np.zeros(3)})
    assert tree_difference(ref, ref) == (0.0, "")


def test_assert_stable():
    assert_stable([6.8, 6.5, 4.8, 4.4], [3.26, 2.60, 2.65, 2.56])
    with pytest.raises(AssertionError, match=r"not stable \(gradient norm 6.834 -> 32.94"):
        assert_stable([6.834, 6.46, 5.42, 6.88, 12.2, 32.94], [3.3, 2.6, 2.6, 2.4, 2.6, 2.5])
    with pytest.raises(AssertionError, match="loss did not fall"):
        assert_stable([1.0, 1.0], [2.0, 2.1])
