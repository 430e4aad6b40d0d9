"""Metrics against hand-computed cases and against scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from patchcore_milvus.metrics import area_up_to, aupro, auroc, f1_iou, pro_curve, roc_curve


@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_scikit_learn_with_ties(seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.random(500) < 0.3
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes many ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(labels, scores)
    ref_fpr, ref_tpr, _ = sklearn_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)


def two_images() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Image 1: region A (2 pixels) and region B (1 pixel), 13 good pixels; image 2: 16 good."""
    mask = np.zeros((4, 4), bool)
    mask[0, 0:2] = True  # A
    mask[3, 3] = True  # B, not 8-connected to A
    first = np.full((4, 4), 0.1)
    first[0, 0], first[0, 1], first[3, 3] = 0.9, 0.5, 0.7
    second = np.full((4, 4), 0.1)
    second[2, 2] = 0.8  # one false positive among 29 good pixels
    return [mask, np.zeros((4, 4), bool)], [first, second]


def test_pro_curve_by_hand():
    masks, maps = two_images()
    fpr, pro = pro_curve(masks, maps)
    # Thresholds 0.9, 0.8, 0.7, 0.5, 0.1: A half covered; + one FP; B covered; A covered; all.
    np.testing.assert_allclose(fpr, [0, 0, 1 / 29, 1 / 29, 1 / 29, 1])
    np.testing.assert_allclose(pro, [0, 0.25, 0.25, 0.75, 1.0, 1.0])


def test_aupro_by_hand():
    masks, maps = two_images()
    # Area up to FPR 0.3: 0.25 wide 1/29, then 1.0 from 1/29 to 0.3; normalised by 0.3.
    expected = (0.25 / 29 + (0.3 - 1 / 29)) / 0.3
    assert aupro(masks, maps) == pytest.approx(expected)


def test_regions_count_equally_whatever_their_size():
    """A large region fully found and a small one missed: PRO 0.5, although 90% of defect pixels are found."""
    mask = np.zeros((10, 10), bool)
    mask[0:3, 0:3] = True  # 9 pixels
    mask[8, 8] = True  # 1 pixel
    amap = np.zeros((10, 10))
    amap[0:3, 0:3] = 1.0
    fpr, pro = pro_curve([mask], [amap])
    assert pro[1] == pytest.approx(0.5) and fpr[1] == 0.0


def test_area_interpolates_at_the_limit():
    x = np.array([0.0, 0.2, 0.6])
    y = np.array([0.0, 1.0, 1.0])
    assert area_up_to(x, y, 0.3) == pytest.approx(0.1 + 0.1)
    assert area_up_to(x, y, 0.2) == pytest.approx(0.1)


def test_f1_and_iou():
    truth = np.array([1, 1, 0, 0], bool)
    assert f1_iou(np.array([1, 0, 1, 0], bool), truth) == pytest.approx((0.5, 1 / 3))
    assert f1_iou(np.zeros(4, bool), np.zeros(4, bool)) == (1.0, 1.0)


def test_degenerate_inputs_are_refused():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        auroc(np.ones(4), np.arange(4))
    with pytest.raises(ValueError, match="defective regions"):
        aupro([np.zeros((3, 3), bool)], [np.zeros((3, 3))])
