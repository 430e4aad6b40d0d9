"""Thresholds from good images only: what a normal image's scores look like, plus a margin."""

from __future__ import annotations

import numpy as np

from patchcore_milvus.errors import CalibrationError

RULE = "mean + sigma * std over held-out good images, at least their maximum"


def calibrate(values: np.ndarray, sigma: float) -> float:
    """Threshold above which a score is called anomalous.

    `values` are scores of good images that the bank has not seen (held out at ingest): the
    image scores for the image threshold, each image's anomaly-map maximum for the pixel
    threshold. The threshold is mean + sigma * std (sample std), and never below the largest
    held-out value, so that no held-out good image would be called defective.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("calibration needs at least one held-out score")
    if not np.isfinite(values).all() or not np.isfinite(sigma):
        raise CalibrationError(f"held-out scores {values.tolist()} and margin {sigma} must be finite numbers")
    spread = float(values.std(ddof=1)) if values.size > 1 else 0.0
    threshold = float(max(values.mean() + sigma * spread, values.max()))
    if not np.isfinite(threshold):
        raise CalibrationError(f"threshold_sigma {sigma} makes the threshold {threshold}; use a smaller margin")
    return threshold


def holdout_split(n_images: int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (bank, held out): a seeded random `ratio` of the images, at least one when
    ratio > 0 and at least two images exist, and never all of them."""
    order = np.random.default_rng(seed).permutation(n_images)
    n_held = 0 if ratio == 0 or n_images < 2 else min(n_images - 1, max(1, round(n_images * ratio)))
    return np.sort(order[n_held:]), np.sort(order[:n_held])
