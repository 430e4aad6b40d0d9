"""Greedy k-centre coreset (PatchCore Algorithm 1) on a random linear projection."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm


def coreset_size(n_patches: int, ratio: float, size: int | None) -> int:
    """The number of picks: an absolute `size` wins over `ratio`; never more than there are patches."""
    wanted = size if size is not None else round(n_patches * ratio)
    return max(1, min(n_patches, wanted))


def random_projection(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Johnson-Lindenstrauss projection to `dim` dims; distances are kept up to a constant factor."""
    if dim >= features.shape[1]:
        return features.float()
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=generator) / dim**0.5
    return features.float() @ matrix


def greedy_coreset(
    features: torch.Tensor, size: int, projection_dim: int = 128, seed: int = 0, progress: bool = False
) -> np.ndarray:
    """Indices of `size` rows chosen so that every row lies close to a chosen one.

    Each pick is the row farthest from all rows picked so far (minimax facility location).
    Memory stays O(N * projection_dim): one running vector of squared distances to the
    nearest pick, updated by one matrix-vector product per pick; no N x N matrix.
    """
    projected = random_projection(features, projection_dim, seed)
    n = projected.shape[0]
    size = min(size, n)
    squared_norms = (projected * projected).sum(dim=1)
    first = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    picks = np.empty(size, dtype=np.int64)
    nearest = torch.full((n,), float("inf"))
    current = first
    with tqdm(total=size, desc="coreset", unit="pick", disable=not progress, miniters=max(1, size // 100)) as bar:
        for i in range(size):
            picks[i] = current
            centre = projected[current]
            distances = squared_norms - 2.0 * (projected @ centre) + squared_norms[current]
            torch.minimum(nearest, distances, out=nearest)
            nearest[current] = 0.0  # exact zero despite rounding, so a pick is never picked again
            current = int(torch.argmax(nearest))
            bar.update()
    return picks


def covering_radius(features: torch.Tensor, picks: np.ndarray, chunk: int = 4096) -> float:
    """Largest distance from any row to its nearest picked row: what a coreset minimises."""
    centres = features[torch.as_tensor(picks)].float()
    worst = 0.0
    for start in range(0, features.shape[0], chunk):
        block = features[start : start + chunk].float()
        worst = max(worst, float(torch.cdist(block, centres).min(dim=1).values.max()))
    return worst
