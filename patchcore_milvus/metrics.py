"""MVTec AD metrics: ROC (image and pixel level) and the per-region-overlap (PRO) curve.

Both curves come from one descending sort of the scores, so that millions of pixels cost
O(N log N), with one point per distinct score (ties are treated as sklearn does).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _descending_cumsums(scores: np.ndarray, *weights: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Thresholds (each distinct score, descending) and, per weight array, the sum of the
    weights of all elements scoring at or above each threshold; a (0, ...) point first."""
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(ordered)), ordered.size - 1]
    sums = [np.r_[0.0, np.cumsum(w[order], dtype=np.float64)[last_of_each]] for w in weights]
    return np.r_[np.inf, ordered[last_of_each]], sums


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate, thresholds); label 1 = anomalous."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores).ravel()
    if labels.all() or not labels.any():
        raise ValueError("a ROC curve needs both normal and anomalous samples")
    thresholds, (tps, fps) = _descending_cumsums(scores, labels.astype(np.float64), (~labels).astype(np.float64))
    return fps / fps[-1], tps / tps[-1], thresholds


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def pro_curve(masks: list[np.ndarray], maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, mean per-region overlap) over all thresholds.

    As in the MVTec AD protocol: each connected component (8-connected) of each ground-truth
    mask is one region; at a threshold, its overlap is the fraction of its pixels scoring at or
    above it, and PRO is the mean over all regions of all images. The FPR counts the pixels
    above the threshold among all defect-free pixels of all images.
    """
    region_weights, fp_weights = [], []
    n_regions = 0
    n_ok = sum(int((~mask.astype(bool)).sum()) for mask in masks)
    for mask in masks:
        mask = mask.astype(bool)
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        sizes = np.bincount(labelled.ravel())
        weights = np.where(mask, 1.0 / sizes[labelled], 0.0)
        region_weights.append(weights.ravel())
        fp_weights.append((~mask).ravel() / max(n_ok, 1))
        n_regions += count
    if n_regions == 0 or n_ok == 0:
        raise ValueError("a PRO curve needs defective regions and defect-free pixels")
    scores = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
    _, (fpr, overlap) = _descending_cumsums(scores, np.concatenate(fp_weights), np.concatenate(region_weights))
    return fpr, overlap / n_regions


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) from 0 to x_max (x ascending), interpolating y at x_max."""
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    if xs[-1] < x_max:
        after = np.flatnonzero(~inside)[0]
        y_at = y[after - 1] + (y[after] - y[after - 1]) * (x_max - x[after - 1]) / (x[after] - x[after - 1])
        xs, ys = np.r_[xs, x_max], np.r_[ys, y_at]
    return float(np.trapezoid(ys, xs))


def aupro(masks: list[np.ndarray], maps: list[np.ndarray], max_fpr: float = 0.3) -> float:
    """Area under the PRO curve up to `max_fpr`, normalised by `max_fpr` (1.0 = perfect)."""
    fpr, pro = pro_curve(masks, maps)
    return area_up_to(fpr, pro, max_fpr) / max_fpr


def f1_iou(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """F1 and intersection over union of boolean arrays (1.0 each when both are empty)."""
    tp = float(np.logical_and(predicted, truth).sum())
    fp = float(np.logical_and(predicted, ~truth).sum())
    fn = float(np.logical_and(~predicted, truth).sum())
    if tp + fp + fn == 0:
        return 1.0, 1.0
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)
