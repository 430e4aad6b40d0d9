"""Greedy k-centre coreset (PatchCore Algorithm 1) on a random linear projection."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm


def coreset_size(n_patches: int, ratio: float, size: int | None) -> int:
    """The number of picks: an absolute `size` wins over `ratio`; never more than there are patches."""
    wanted = size if size is not None else round(n_patches * ratio)
    return max(1, min(n_patches, wanted))


def projection_matrix(in_dim: int, out_dim: int, seed: int) -> torch.Tensor | None:
    """Johnson-Lindenstrauss Gaussian projection: distances kept up to a constant factor.
    None where `out_dim` would not reduce anything."""
    if out_dim >= in_dim:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(in_dim, out_dim, generator=generator) / out_dim**0.5


def random_projection(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """`features` projected to `dim` dims (unchanged if they have no more)."""
    matrix = projection_matrix(features.shape[1], dim, seed)
    return features.float() if matrix is None else features.float() @ matrix


# Relative and absolute slack in the pruning test, so that float rounding never prunes a row that might move.
_MARGIN = 1e-3


class Coreset(NamedTuple):
    picks: np.ndarray  # row indices, in the order picked
    radius: float  # the largest distance from any row to its nearest pick (the covering radius)


def greedy_coreset(projected: torch.Tensor, size: int, seed: int = 0, progress: bool = False) -> Coreset:
    """`size` rows of `projected` (see `random_projection`) chosen so that every row lies close
    to a chosen one, and how close: the covering radius.

    Each pick is the row farthest from all rows picked so far (minimax facility location),
    exactly as `greedy_coreset_plain` picks, but most distance computations are skipped:
    every row belongs to its nearest pick (its centre), and each centre knows the largest
    distance r of its rows. A new pick c can only come closer to a row x of centre a than a
    is if d(a, c) < 2 r (triangle inequality: d(x, c) >= d(a, c) - d(x, a)), so rows of all
    other centres are left alone. As the coreset grows, clusters shrink and a pick touches a
    small share of the rows. Memory stays O(N * projected dims).
    """
    n = projected.shape[0]
    size = min(size, n)
    squared_norms = row_norms_squared(projected)
    current = _first_pick(n, seed)
    picks = np.empty(size, dtype=np.int64)
    centres = torch.empty(size, projected.shape[1])
    centre_norms = torch.empty(size)
    radius = torch.zeros(size)  # largest distance from each centre to its rows
    owner = torch.zeros(n, dtype=torch.long)  # which centre each row belongs to
    with tqdm(total=size, desc="coreset", unit="pick", disable=not progress, miniters=max(1, size // 100)) as bar:
        # The first pick owns every row (computed in place: no gathered copy of the whole matrix).
        picks[0] = current
        centres[0], centre_norms[0] = projected[current], squared_norms[current]
        nearest = squared_norms - 2.0 * (projected @ centres[0]) + centre_norms[0]  # squared, to the owner
        nearest[current] = 0.0  # exact zero despite rounding, so a pick is never picked again
        radius[0] = nearest.max().clamp_min(0).sqrt()
        current = int(torch.argmax(nearest))
        bar.update()
        for i in range(1, size):
            picks[i] = current
            centre = projected[current]
            centres[i], centre_norms[i] = centre, squared_norms[current]
            to_centres = (centre_norms[:i] - 2.0 * (centres[:i] @ centre) + centre_norms[i]).clamp_min(0).sqrt()
            affected = to_centres < 2.0 * radius[:i] * (1 + _MARGIN) + _MARGIN
            rows = affected[owner].nonzero().squeeze(1)
            if len(rows) > n // 4:  # most rows: one product over the matrix beats gathering a copy of it
                distances = (squared_norms - 2.0 * (projected @ centre) + centre_norms[i])[rows]
            else:
                distances = squared_norms[rows] - 2.0 * (projected[rows] @ centre) + centre_norms[i]
            closer = distances < nearest[rows]
            moved = rows[closer]
            nearest[moved] = distances[closer]
            owner[moved] = i
            nearest[current] = 0.0
            radius[:i][affected] = 0.0
            radius.scatter_reduce_(0, owner[rows], nearest[rows].clamp_min(0).sqrt(), reduce="amax")
            current = int(torch.argmax(nearest))
            bar.update()
    return Coreset(picks, float(nearest[current].clamp_min(0).sqrt()))


def extend_coreset(projected: torch.Tensor, nearest: torch.Tensor, radius: float, limit: int) -> np.ndarray:
    """Greedy picks among `projected` rows whose squared distance to an existing coreset is
    `nearest`, until every row lies within `radius` of a pick or the old coreset (or `limit`
    picks are made): grows a bank by what new data adds, keeping its coverage."""
    nearest = nearest.clone()
    squared_norms = row_norms_squared(projected)
    picks: list[int] = []
    while len(picks) < limit:
        current = int(torch.argmax(nearest))
        if float(nearest[current]) <= radius**2:
            break
        picks.append(current)
        distances = squared_norms - 2.0 * (projected @ projected[current]) + squared_norms[current]
        torch.minimum(nearest, distances, out=nearest)
        nearest[current] = 0.0
    return np.array(picks, dtype=np.int64)


def row_norms_squared(vectors: torch.Tensor) -> torch.Tensor:
    """Row norms squared, without an N x dims temporary (that would double ingest's peak memory)."""
    return torch.linalg.vector_norm(vectors, dim=1).square()


def _first_pick(n: int, seed: int) -> int:
    return int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))


def greedy_coreset_plain(projected: torch.Tensor, size: int, seed: int = 0) -> np.ndarray:
    """The textbook loop: one distance per row per pick. The reference `greedy_coreset` must match."""
    n = projected.shape[0]
    size = min(size, n)
    squared_norms = row_norms_squared(projected)
    picks = np.empty(size, dtype=np.int64)
    nearest = torch.full((n,), float("inf"))
    current = _first_pick(n, seed)
    for i in range(size):
        picks[i] = current
        distances = squared_norms - 2.0 * (projected @ projected[current]) + squared_norms[current]
        torch.minimum(nearest, distances, out=nearest)
        nearest[current] = 0.0
        current = int(torch.argmax(nearest))
    return picks


def covering_radius(features: torch.Tensor, picks: np.ndarray, chunk: int = 4096) -> float:
    """Largest distance from any row to its nearest picked row: what a coreset minimises."""
    centres = features[torch.as_tensor(picks)].float()
    worst = 0.0
    for start in range(0, features.shape[0], chunk):
        block = features[start : start + chunk].float()
        worst = max(worst, float(torch.cdist(block, centres).min(dim=1).values.max()))
    return worst
