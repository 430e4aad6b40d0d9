"""Nearest-neighbour distances -> anomaly map and image score (PatchCore section 3.3)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from patchcore_milvus.images import Preprocess

REFERENCE_SIZE = 256  # the input size at which the paper's blur sigma of 4 applies


def _bilinear(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) matrix of bilinear interpolation with half-pixel centres, clamped at
    the border (torch's `interpolate(..., mode="bilinear", align_corners=False)`)."""
    source = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    weight = source - low
    matrix = np.zeros((size_out, size_in))
    matrix[np.arange(size_out), low] += 1 - weight
    matrix[np.arange(size_out), high] += weight
    return matrix


def _gaussian(size: int, sigma: float) -> np.ndarray:
    """(size, size) matrix of a 1-D Gaussian blur that reflects at the border (edge not repeated)."""
    if sigma <= 0:
        return np.eye(size)
    radius = min(int(4 * sigma + 0.5), size - 1)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    matrix = np.zeros((size, size))
    for i in range(size):
        j = np.abs(i + offsets)  # reflect below 0
        j = np.where(j > size - 1, 2 * (size - 1) - j, j)  # and above size - 1
        np.add.at(matrix[i], j, kernel)
    return matrix


@functools.lru_cache(maxsize=64)
def _axis(grid: int, resized: int, crop: int | None, sigma: float, out: int) -> np.ndarray:
    """(out, grid) float32: one axis of the whole chain from patch grid to original image.
    Patch grid -> network input (bilinear), Gaussian blur (`sigma` in input pixels), cropped
    border filled with 0, original size (bilinear): each step is linear along each axis, so the
    chain is one matrix a side."""
    size = crop or resized
    chain = _gaussian(size, sigma) @ _bilinear(grid, size)
    if crop is not None:
        embed = np.zeros((resized, crop))
        offset = (resized - crop) // 2
        embed[offset : offset + crop] = np.eye(crop)
        chain = embed @ chain
    return (_bilinear(resized, out) @ chain).astype(np.float32)


def anomaly_map(
    patch_scores: np.ndarray, preprocess: Preprocess, blur_sigma: float, width: int, height: int
) -> np.ndarray:
    """Patch grid (h, w) -> the anomaly map (height, width) on the original image (PatchCore 3.3):
    upsampled bilinearly to the network input, Gaussian-blurred (`blur_sigma` at a 256-pixel
    input, scaled with the input's short side, so a map looks the same whatever resolution the
    bank was built at, and alike along both axes), a cropped-away border scoring 0, resized
    bilinearly to the original size."""
    h, w = patch_scores.shape
    sigma = float(blur_sigma) * min(preprocess.input_shape) / REFERENCE_SIZE
    crop = preprocess.crop or (None, None)
    rows = _axis(h, preprocess.size[0], crop[0], sigma, height)
    columns = _axis(w, preprocess.size[1], crop[1], sigma, width)
    return rows @ patch_scores.astype(np.float32) @ columns.T


# Patches per image settled in one round of `settle_largest`: each costs a pass of the exact
# search over the bank, and most images settle in the first round.
SETTLE_PER_ROUND = 4


def settle_largest(
    distances: np.ndarray,
    ids: np.ndarray,
    patches: np.ndarray,
    precise: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    per_round: int = SETTLE_PER_ROUND,
) -> np.ndarray:
    """Make each image's largest patch distance rest on a precise search, not an approximate one.

    `distances`, `ids` (n images, p patches): each patch's approximate nearest bank vector, updated
    in place; `patches` (n, p, dim); `precise(vectors) -> (distances, ids)`, each (m, 1), an exact
    search.

    An approximate search returns a real bank vector, so its distance can only be too large:
    a patch not rechecked lies at most at its approximate distance. The image score,
    max_p d(p), is therefore settled once the largest rechecked distance of an image is at least
    every approximate distance left: round by round, the `per_round` largest unsettled patches of
    each image are searched precisely (all images in one call), until that holds. Returns the
    number of patches rechecked per image.
    """
    n, p = distances.shape
    checked = np.zeros((n, p), dtype=bool)
    while True:
        settled = np.where(checked, distances, -np.inf).max(axis=1)
        open_rows, open_cols = [], []
        for i in range(n):
            pending = np.flatnonzero(~checked[i] & (distances[i] > settled[i]))
            if pending.size:
                top = pending[np.argsort(-distances[i, pending], kind="stable")[:per_round]]
                open_rows.append(np.full(top.size, i))
                open_cols.append(top)
        if not open_rows:
            return checked.sum(axis=1)
        rows, cols = np.concatenate(open_rows), np.concatenate(open_cols)
        found, found_ids = precise(patches[rows, cols])
        # The exact answer wins, also where it is larger: an SQ index reports distances on
        # quantised vectors, which can be too small.
        distances[rows, cols] = found[:, 0]
        ids[rows, cols] = found_ids[:, 0]
        checked[rows, cols] = True


def image_scores(distances: np.ndarray, worst: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """PatchCore's image score (eq. 6 and 7): s = w * s*, with s* = max_p d(p) the distance of the
    most anomalous patch m_test* (index `worst` of each image's row in `distances`, (n, p)) and w
    its re-weighting (1 where re-weighting is off)."""
    return distances[np.arange(len(distances)), worst] * weights


def reweighting_factor(test_patch: np.ndarray, candidates: np.ndarray) -> float:
    """Weight of the image score, PatchCore eq. 7.

    With m_test* the most anomalous test patch, m* its nearest bank entry and N_b(m*) the
    b nearest bank neighbours of m*, `candidates` holds m* in row 0 followed by N_b(m*):

        s = (1 - exp(||m_test* - m*||) / sum_{m in {m*} + N_b(m*)} exp(||m_test* - m||)) * s*

    i.e. one minus the softmax, taken at m*, of the distances from m_test* to the candidates.
    The weight lies in [b/(b+1), 1): near b/(b+1) where m* sits in a dense region of the bank
    (its neighbours are about as close to m_test* as m* is), near 1 where m* is itself a rare
    nominal feature far from its neighbours, so that a test patch close to such an outlier of
    the bank still scores high (the paper's argument for the re-weighting).
    """
    if len(candidates) < 2:
        raise ValueError("the re-weighting needs m* and at least one of its neighbours")
    distances = np.linalg.norm(candidates.astype(np.float64) - test_patch[None], axis=1)
    weights = np.exp(distances - distances.max())  # softmax, shifted so that no exp overflows
    return float(1.0 - weights[0] / weights.sum())
