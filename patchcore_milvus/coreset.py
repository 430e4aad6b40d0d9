"""Greedy k-centre coreset (PatchCore Algorithm 1) on a random linear projection."""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
import torch
from tqdm import tqdm

from patchcore_milvus.exact import ExactSearch


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


class Coreset(NamedTuple):
    picks: np.ndarray  # row indices, in the order picked
    radius: float  # the largest distance from any row to its nearest pick (the covering radius)


def greedy_coreset(projected: torch.Tensor, size: int, seed: int = 0, progress: bool = False) -> Coreset:
    """`size` rows of `projected` (see `random_projection`) chosen so that every row lies close
    to a chosen one, and how close: the covering radius.

    Each pick is the row farthest from all rows picked so far (minimax facility location),
    exactly as `greedy_coreset_plain` picks, but most distance computations are skipped. Every
    row belongs to its nearest pick (its centre); each centre keeps its rows and their largest
    distance r. A new pick c can only come closer to a row x of centre a than a is if
    d(a, c) < 2 r, and only to rows with d(x, a) > d(a, c) / 2 (triangle inequality), so the
    rows of all other centres are left alone. What remains is first tested on the top
    principal components of the rows (a projection never lengthens a distance), and only rows
    that may move get their exact distance, in float64. Compiled with numba; memory stays
    O(N * projected dims).
    """
    rows = np.ascontiguousarray(projected.numpy(), dtype=np.float32)
    size = min(size, len(rows))
    state = _KCentreState.empty(len(rows), rows.shape[1], size)
    lead = _principal_components(rows, _LEAD_DIMS)
    first, step = _first_pick(len(rows), seed), max(1, size // 100)
    with tqdm(total=size, desc="coreset", unit="pick", disable=not progress) as bar:
        for begin in range(0, size, step):
            end = min(size, begin + step)
            _kcentre_picks(rows, lead, first, begin, end, numba.get_num_threads(), *state)
            bar.update(end - begin)
    return Coreset(state.picks, float(np.sqrt(state.radius_squared.max())))


# Principal components used to rule rows out cheaply: on bottle the top 16 of 128 carry 92 % of the variance.
_LEAD_DIMS = 16
# Rows below which a pick's distances are not split between threads: each parallel pass waits for
# its slowest thread, which on busy cores costs more than a small pass saves (bottle's picks look
# at some 23,000 rows each, the magnetic tiles' at 215,000).
_PARALLEL_ROWS = 65536
# Relative and absolute slack in every test that rules work out, far above float32 rounding: a row
# that might move is never skipped, so only the exact float64 distances decide.
_MARGIN = 1e-3


class _KCentreState(NamedTuple):
    """The greedy loop's state between compiled calls. Each centre's rows sit in one block of a
    pool (row index, squared distance); a new centre's rows are appended at the pool's top and
    the pool is compacted in place when it runs out."""

    picks: np.ndarray
    centres: np.ndarray  # the picked rows, contiguous
    centre_leads: np.ndarray  # their principal components
    radius_squared: np.ndarray  # per centre: the largest squared distance of its rows
    farthest: np.ndarray  # per centre: the lowest row index at that distance
    block_start: np.ndarray
    block_size: np.ndarray
    pool_rows: np.ndarray
    pool_distances: np.ndarray
    pool_leads: np.ndarray  # each entry's row's principal components: read in order, not by row
    pool_top: np.ndarray  # one element

    @classmethod
    def empty(cls, n: int, dim: int, size: int) -> _KCentreState:
        return cls(
            np.empty(size, np.int64),
            np.empty((size, dim), np.float32),
            np.empty((size, min(_LEAD_DIMS, dim)), np.float32),
            np.zeros(size, np.float64),
            np.zeros(size, np.int64),
            np.zeros(size, np.int64),
            np.zeros(size, np.int64),
            np.empty(2 * n, np.int64),
            np.empty(2 * n, np.float64),
            np.empty((2 * n, min(_LEAD_DIMS, dim)), np.float32),
            np.zeros(1, np.int64),
        )


def _principal_components(rows: np.ndarray, dims: int, chunk: int = 65536) -> np.ndarray:
    """`rows` in the basis of their top `dims` principal components (float32, N x dims), built
    chunk by chunk so that no float64 copy of all rows is ever made."""
    dim = rows.shape[1]
    gram, total = np.zeros((dim, dim)), np.zeros(dim)
    for begin in range(0, len(rows), chunk):
        block = rows[begin : begin + chunk].astype(np.float64)
        gram += block.T @ block
        total += block.sum(axis=0)
    mean = total / len(rows)
    _, vectors = np.linalg.eigh(gram / len(rows) - np.outer(mean, mean))
    basis = np.ascontiguousarray(vectors[:, ::-1][:, :dims], dtype=np.float32)
    out = np.empty((len(rows), basis.shape[1]), np.float32)
    for begin in range(0, len(rows), chunk):
        out[begin : begin + chunk] = rows[begin : begin + chunk] @ basis
    return out


@numba.njit(cache=True, fastmath=True)
def _squared32(u: np.ndarray, v: np.ndarray) -> float:
    """Squared distance in float32, for the tests that rule work out (with `_MARGIN`)."""
    total = np.float32(0.0)
    for k in range(u.shape[0]):
        difference = u[k] - v[k]
        total += difference * difference
    return total


@numba.njit(cache=True)
def _squared64(u: np.ndarray, v: np.ndarray) -> float:
    """Squared distance in float64: the exact value every decision is made on."""
    total = 0.0
    for k in range(u.shape[0]):
        difference = np.float64(u[k]) - np.float64(v[k])
        total += difference * difference
    return total


@numba.njit(cache=True)
def _compact(
    block_start: np.ndarray,
    block_size: np.ndarray,
    pool_rows: np.ndarray,
    pool_distances: np.ndarray,
    pool_leads: np.ndarray,
    blocks: int,
) -> int:
    """Close the gaps left in the pool by rows that moved; blocks keep their order."""
    top = 0
    for a in range(blocks):
        begin, count = block_start[a], block_size[a]
        for j in range(count):
            pool_rows[top + j] = pool_rows[begin + j]
            pool_distances[top + j] = pool_distances[begin + j]
            pool_leads[top + j] = pool_leads[begin + j]
        block_start[a] = top
        top += count
    return top


@numba.njit(cache=True)
def _kcentre_picks(
    rows: np.ndarray,
    lead: np.ndarray,
    first: int,
    begin: int,
    end: int,
    threads: int,
    picks: np.ndarray,
    centres: np.ndarray,
    centre_leads: np.ndarray,
    radius_squared: np.ndarray,
    farthest: np.ndarray,
    block_start: np.ndarray,
    block_size: np.ndarray,
    pool_rows: np.ndarray,
    pool_distances: np.ndarray,
    pool_leads: np.ndarray,
    pool_top: np.ndarray,
) -> None:
    """Picks number `begin` to `end` - 1 of the greedy loop, continuing from the state.

    Each pick runs in two phases: the distances of every row that may move to the new centre,
    on all cores (`_new_distances`), then one pass that keeps or moves them, in the order one
    thread would, so the picks do not depend on the number of threads."""
    n = rows.shape[0]
    capacity = pool_rows.shape[0]
    top = pool_top[0]
    moved = np.empty(capacity, np.float64)  # per pool slot: the new distance, or -1 (stays)
    moving_rows, moving_distances = np.empty(n, np.int64), np.empty(n, np.float64)
    candidates = np.empty(end, np.int64)
    stays_squared = np.empty(end, np.float64)
    for i in range(begin, end):
        if i == 0:
            new = first
        else:  # the farthest row of all: the lowest index among the farthest, as an argmax finds it
            best, new = -1.0, 0
            for a in range(i):
                if radius_squared[a] > best or (radius_squared[a] == best and farthest[a] < new):
                    best, new = radius_squared[a], farthest[a]
        picks[i] = new
        centre = rows[new]
        centres[i] = centre
        centre_lead = lead[new]
        centre_leads[i] = centre_lead
        if i == 0:  # the first centre owns every row
            _first_distances(rows, lead, centre, pool_rows, pool_distances, pool_leads, top)
            block_start[0], block_size[0] = top, n
            top += n
            radius_squared[0], farthest[0] = _farthest(pool_rows, pool_distances, block_start[0], top)
            continue
        # The centres whose rows the new one may take: d(a, c) < 2 r(a).
        count = 0
        for a in range(i):
            if radius_squared[a] <= 0.0:
                continue
            reach = 2.0 * np.sqrt(radius_squared[a]) * (1.0 + _MARGIN) + _MARGIN
            if _squared32(centre_leads[a], centre_lead) >= reach * reach:
                continue
            between = _squared32(centres[a], centre)
            if between >= reach * reach:
                continue
            stays = (np.sqrt(between) / 2.0 - _MARGIN) / (1.0 + _MARGIN)  # rows this close to a stay
            candidates[count], stays_squared[count] = a, stays * stays if stays > 0.0 else -1.0
            count += 1
        offsets = np.zeros(count + 1, np.int64)
        for k in range(count):
            offsets[k + 1] = offsets[k] + block_size[candidates[k]]
        arguments = (
            rows, centre, centre_lead, pool_rows, pool_distances, pool_leads, block_start, candidates[:count],
            stays_squared[:count], offsets, moved,
        )  # fmt: skip
        if threads > 1 and offsets[count] >= _PARALLEL_ROWS:
            _new_distances(*arguments, threads)
        else:  # a few rows: starting the threads would cost more than they save
            _new_distances_between(0, offsets[count], *arguments)
        moving = 0
        for k in range(count):
            a = candidates[k]
            kept = block_start[a]
            for j in range(block_start[a], block_start[a] + block_size[a]):
                if moved[j] >= 0.0:
                    moving_rows[moving], moving_distances[moving] = pool_rows[j], moved[j]
                    moving += 1
                else:
                    if kept != j:
                        pool_rows[kept], pool_distances[kept] = pool_rows[j], pool_distances[j]
                        pool_leads[kept] = pool_leads[j]
                    kept += 1
            block_size[a] = kept - block_start[a]
            radius_squared[a], farthest[a] = _farthest(pool_rows, pool_distances, block_start[a], kept)
        if capacity - top < moving:
            top = _compact(block_start, block_size, pool_rows, pool_distances, pool_leads, i)
        block_start[i] = top
        for m in range(moving):
            pool_rows[top + m], pool_distances[top + m] = moving_rows[m], moving_distances[m]
            pool_leads[top + m] = lead[moving_rows[m]]
        top += moving
        block_size[i] = moving
        radius_squared[i], farthest[i] = _farthest(pool_rows, pool_distances, block_start[i], top)
    pool_top[0] = top


@numba.njit(cache=True, parallel=True)
def _first_distances(
    rows: np.ndarray,
    lead: np.ndarray,
    centre: np.ndarray,
    pool_rows: np.ndarray,
    pool_distances: np.ndarray,
    pool_leads: np.ndarray,
    top: int,
) -> None:
    for r in numba.prange(rows.shape[0]):
        pool_rows[top + r] = r
        pool_distances[top + r] = _squared64(rows[r], centre)
        pool_leads[top + r] = lead[r]


@numba.njit(cache=True, parallel=True)
def _new_distances(
    rows: np.ndarray,
    centre: np.ndarray,
    centre_lead: np.ndarray,
    pool_rows: np.ndarray,
    pool_distances: np.ndarray,
    pool_leads: np.ndarray,
    block_start: np.ndarray,
    candidates: np.ndarray,
    stays_squared: np.ndarray,
    offsets: np.ndarray,
    moved: np.ndarray,
    threads: int,
) -> None:
    """`_new_distances_between` over all the candidates' rows, in `threads` equal chunks."""
    total = offsets[-1]
    step = (total + threads - 1) // threads
    for chunk in numba.prange(threads):
        _new_distances_between(
            chunk * step, min(total, (chunk + 1) * step), rows, centre, centre_lead, pool_rows, pool_distances,
            pool_leads, block_start, candidates, stays_squared, offsets, moved,
        )  # fmt: skip


@numba.njit(cache=True)
def _new_distances_between(
    t: int,
    stop: int,
    rows: np.ndarray,
    centre: np.ndarray,
    centre_lead: np.ndarray,
    pool_rows: np.ndarray,
    pool_distances: np.ndarray,
    pool_leads: np.ndarray,
    block_start: np.ndarray,
    candidates: np.ndarray,
    stays_squared: np.ndarray,
    offsets: np.ndarray,
    moved: np.ndarray,
) -> None:
    """For the rows `t` to `stop` - 1 of the candidate centres' blocks (laid end to end,
    `offsets`): each one's exact distance to the new centre where that is smaller than its
    current one, else -1. Rows closer to their centre than half the way to the new one cannot
    move; the principal components and float32 rule out most of the rest before the float64
    distance decides."""
    if t >= stop:
        return
    k = np.searchsorted(offsets, t, side="right") - 1
    while t < stop:  # block by block: one search, then plain loops
        first = block_start[candidates[k]]
        upto = min(stop, offsets[k + 1])
        for j in range(first + t - offsets[k], first + upto - offsets[k]):
            r, current = pool_rows[j], pool_distances[j]
            result = -1.0
            if current > stays_squared[k]:
                bound = current * (1.0 + _MARGIN) + _MARGIN
                if _squared32(pool_leads[j], centre_lead) <= bound and _squared32(rows[r], centre) <= bound:
                    distance = _squared64(rows[r], centre)
                    if distance < current:
                        result = distance
            moved[j] = result
        t, k = upto, k + 1


@numba.njit(cache=True)
def _farthest(pool_rows: np.ndarray, pool_distances: np.ndarray, begin: int, end: int) -> tuple[float, int]:
    """The largest squared distance in a block, and the lowest row index at it (for an empty
    block: 0 and an index past every row, so that it never wins the argmax)."""
    best, row = -1.0, pool_rows.shape[0]
    for j in range(begin, end):
        if pool_distances[j] > best or (pool_distances[j] == best and pool_rows[j] < row):
            best, row = pool_distances[j], pool_rows[j]
    return max(best, 0.0), row


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


def greedy_coreset_plain(
    projected: torch.Tensor, size: int, seed: int = 0, dtype: torch.dtype = torch.float64
) -> np.ndarray:
    """The textbook loop: one distance per row per pick (a matrix-vector product). In float64 it
    is the reference that `greedy_coreset` must match; in float32 it is the usual fast loop,
    whose rounding (norms minus twice the product) already changes picks on real data."""
    projected = projected.to(dtype)
    n = projected.shape[0]
    size = min(size, n)
    squared_norms = row_norms_squared(projected)
    picks = np.empty(size, dtype=np.int64)
    nearest = torch.full((n,), float("inf"), dtype=dtype)
    current = _first_pick(n, seed)
    for i in range(size):
        picks[i] = current
        distances = squared_norms - 2.0 * (projected @ projected[current]) + squared_norms[current]
        torch.minimum(nearest, distances, out=nearest)
        nearest[current] = 0.0
        current = int(torch.argmax(nearest))
    return picks


def covering_radius(features: torch.Tensor, picks: np.ndarray) -> float:
    """Largest distance from any row to its nearest picked row: what a coreset minimises."""
    nearest, _ = ExactSearch(features[torch.as_tensor(picks)].float().numpy())(features.float().numpy(), 1)
    return float(nearest.max())
