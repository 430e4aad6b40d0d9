"""Nearest-neighbour distances -> anomaly map and image score (PatchCore section 3.3)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from patchcore_milvus.images import Preprocess

REFERENCE_SIZE = 256  # the input size at which the paper's blur sigma of 4 applies


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps, reflecting at the border."""
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = maps.unsqueeze(1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def anomaly_maps(patch_scores: torch.Tensor, input_size: int, blur_sigma: float) -> torch.Tensor:
    """Patch grid (B, h, w) -> smooth maps (B, S, S) at the network input size.

    The sigma is given for a 256-pixel input and scaled with the actual input size, so a
    map looks the same whatever resolution the bank was built at.
    """
    maps = F.interpolate(patch_scores.unsqueeze(1), size=(input_size, input_size), mode="bilinear", align_corners=False)
    return gaussian_blur(maps.squeeze(1), blur_sigma * input_size / REFERENCE_SIZE)


def to_original_size(amap: torch.Tensor, preprocess: Preprocess, width: int, height: int) -> np.ndarray:
    """A map at the input size back onto the original image; a cropped-away border scores 0."""
    if preprocess.center_crop is not None:
        full = torch.zeros(preprocess.image_size, preprocess.image_size)
        offset = (preprocess.image_size - preprocess.center_crop) // 2
        full[offset : offset + preprocess.center_crop, offset : offset + preprocess.center_crop] = amap
        amap = full
    resized = F.interpolate(amap[None, None], size=(height, width), mode="bilinear", align_corners=False)
    return resized[0, 0].numpy()


# Patches per image settled in one round of `settle_largest`.
SETTLE_PER_ROUND = 16


def settle_largest(
    distances: np.ndarray,
    ids: np.ndarray,
    patches: np.ndarray,
    precise: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    per_round: int = SETTLE_PER_ROUND,
) -> np.ndarray:
    """Make each image's largest patch distance rest on a precise search, not an approximate one.

    `distances`, `ids` (n images, p patches): each patch's approximate nearest bank vector, updated
    in place; `patches` (n, p, dim); `precise(vectors) -> (distances, ids)`, each (m, 1).

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
        closer = found[:, 0] < distances[rows, cols]
        distances[rows[closer], cols[closer]] = found[closer, 0]
        ids[rows[closer], cols[closer]] = found_ids[closer, 0]
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
    distances = torch.from_numpy(np.linalg.norm(candidates - test_patch[None], axis=1).astype(np.float32))
    return float(1.0 - torch.softmax(distances, dim=0)[0])
