import numpy as np
import pytest

from patchcore_milvus.thresholds import calibrate, holdout_split


def test_threshold_is_mean_plus_sigma_std():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    assert calibrate(values, 3.0) == pytest.approx(2.5 + 3 * np.std(values, ddof=1))


def test_threshold_never_below_a_held_out_good_score():
    values = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 10.0])
    assert calibrate(values, 0.0) == 10.0
    assert calibrate(np.array([5.0]), 3.0) == 5.0


def test_no_values_no_threshold():
    with pytest.raises(ValueError):
        calibrate(np.array([]), 3.0)


def test_holdout_split_is_seeded_disjoint_and_complete():
    bank, held = holdout_split(209, 0.1, seed=0)
    assert len(held) == 21 and len(bank) == 188
    assert sorted([*bank, *held]) == list(range(209))
    again, _ = holdout_split(209, 0.1, seed=0)
    np.testing.assert_array_equal(bank, again)


@pytest.mark.parametrize(("n", "ratio", "expected"), [(1, 0.1, 0), (2, 0.1, 1), (5, 0.0, 0), (3, 0.9, 2)])
def test_holdout_keeps_at_least_one_image_in_the_bank(n, ratio, expected):
    bank, held = holdout_split(n, ratio, seed=0)
    assert len(held) == expected and len(bank) == n - expected
