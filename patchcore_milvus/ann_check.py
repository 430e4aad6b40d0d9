"""How exact is the approximate search? Measured against exact search on real patches at ingest.

PatchCore's image score is the largest patch distance, so a single patch whose approximate
nearest neighbour is far from its true one makes a good image defective, and thresholds
calibrated through such a search rise until every defect passes. Measured on bottle
(benchmarks/ann_misses.py): Milvus 2.3.5's HNSW (M 16, ef 64) misses for 783 of 8,192 test
patches, reporting about 100 where the exact distance is 8-12; Milvus Lite's faiss HNSW misses
for 13, by up to 34. The search width is what helps (the description rows were ruled out:
searches stay in the bank partition).

So ingest measures the search it will publish (`choose_search_widths`): the width (HNSW `ef`,
IVF `nprobe`) that stations use for every patch must find the exact nearest neighbour of at least
`MIN_RECALL` of the probe patches, and the wider *recheck* search, which scoring uses to settle
each image's largest distances (`scoring.settle_largest`), must find it for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from patchcore_milvus.config import DEFAULT_INDEX_PARAMS, SEARCH_PARAM_RULES
from patchcore_milvus.errors import ConfigError, IndexTooPoorError
from patchcore_milvus.exact import ExactSearch

MIN_RECALL = 0.999
PROBE_PATCHES = 4096
# The widest HNSW search the recheck starts from, whatever the bank's own width. At ef 1024
# Lite's HNSW missed a bottle defect patch's exact neighbour (an outlier corner patch among the
# coreset's first picks; broken_small/018.png scored 77.85 instead of 75.35), found at 4096.
# Training probes, which the ingest check uses, are no such queries: a margin, not a proof.
RECHECK_MIN_EF = 4096

# (queries, top_k, search params) -> (Euclidean distances, ids), each (n, top_k).
Search = Callable[[np.ndarray, int, dict[str, Any]], tuple[np.ndarray, np.ndarray]]


def same_distance(found: np.ndarray, exact: np.ndarray, query_norms: np.ndarray) -> np.ndarray:
    """Whether a found distance equals the exact one up to float32 rounding.

    Milvus and the exact search both compute squared L2 in float32, as |q|^2 - 2 q.v + |v|^2
    or its equivalent, whose rounding grows with the norms (patch norms are about 100, so a
    distance of 1 can come back as 1.002): compared in squared distance, relative to |q|^2.
    """
    return np.abs(found.astype(np.float64) ** 2 - exact.astype(np.float64) ** 2) <= 1e-5 * query_norms**2 + 1e-6


def recall_at_1(
    found: np.ndarray, found_ids: np.ndarray, exact: np.ndarray, exact_ids: np.ndarray, query_norms: np.ndarray
) -> float:
    """Share of queries whose found nearest neighbour is an exact one: the same row, or a row at
    the same distance (a tie). Ids count too because quantised indexes (SQ) report distances
    on quantised vectors."""
    return float(((found_ids == exact_ids) | same_distance(found, exact, query_norms)).mean())


@dataclass(frozen=True)
class SearchWidths:
    """The search parameters a bank version was published with, and how they measured."""

    params: dict[str, Any]  # every patch
    recheck: dict[str, Any]  # the largest distances of each image, and the eq. 7 neighbours
    recall_at_1: float  # of `params`, on `probes` patches
    recheck_recall_at_1: float
    probes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SearchWidths:
        return cls(**values)


def recheck_params(index_type: str, index_params: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A much wider search than `params`: HNSW at 4 times the ef (at least `RECHECK_MIN_EF`),
    IVF over every list (exhaustive, so exact up to the quantisation of IVF_SQ8). Ingest widens it further
    where it misses a probe."""
    [(name, value)] = params.items()
    if name == "ef":
        return {"ef": min(SEARCH_PARAM_RULES[index_type]["ef"][1], max(RECHECK_MIN_EF, 4 * value))}
    return {"nprobe": _nlist(index_type, index_params)}


def _nlist(index_type: str, index_params: dict[str, Any]) -> int:
    return int({**DEFAULT_INDEX_PARAMS[index_type], **index_params}["nlist"])


def _wider(index_type: str, index_params: dict[str, Any], params: dict[str, Any]) -> dict[str, Any] | None:
    """Twice the width, None at the widest."""
    [(name, value)] = params.items()
    limit = SEARCH_PARAM_RULES[index_type][name][1] if name == "ef" else _nlist(index_type, index_params)
    return None if value >= limit else {name: min(limit, 2 * value)}


def choose_search_widths(
    search: Search,
    bank: np.ndarray,
    probes: np.ndarray,
    index_type: str,
    index_params: dict[str, Any],
    params: dict[str, Any],
    fixed: bool,
    say: Callable[[str], None] = lambda _: None,
) -> SearchWidths:
    """Measure `search` (a new bank version holding `bank`) against exact search on `probes`.

    `params` (the configured width) is widened, doubling, until its recall@1 reaches
    `MIN_RECALL`, unless `fixed` (the user chose it): then a shortfall is refused. The recheck
    width must find every probe's exact neighbour. Refused where the widest search cannot.
    """
    exact, exact_ids = ExactSearch(bank)(probes, 1)
    norms = np.linalg.norm(probes.astype(np.float64), axis=1)

    def hits(width: dict[str, Any], rows: np.ndarray) -> np.ndarray:
        """Whether each of `probes[rows]` finds an exact neighbour at `width`."""
        found, found_ids = search(probes[rows], 1, width)
        return (found_ids[:, 0] == exact_ids[rows, 0]) | same_distance(found[:, 0], exact[rows, 0], norms[rows])

    every = np.arange(len(probes))
    found = hits(params, every)
    recall = float(found.mean())
    while recall < MIN_RECALL:
        if fixed:
            raise ConfigError(
                f"search_params {params} find the exact nearest neighbour for only {recall:.2%} of {len(probes)} "
                f"patches of this bank (at least {MIN_RECALL:.1%} needed, since one missed patch can flip a "
                "verdict); leave search_params out to let ingest choose the width, or give a wider one"
            )
        wider = _wider(index_type, index_params, params)
        if wider is None:
            raise IndexTooPoorError(_too_narrow(index_type, params, recall, len(probes)))
        say(f"milvus: recall@1 {recall:.4f} at {params}, below {MIN_RECALL}; widening to {wider}")
        params, found = wider, hits(wider, every)
        recall = float(found.mean())
    # The recheck is measured on the probes the search width missed: a wider HNSW beam (or more
    # IVF lists) explores a superset, so a probe found at the search width is found at the recheck
    # width too, and a wide recheck (ef 4096) over every probe would cost Lite ~20 s per ingest.
    missed = np.flatnonzero(~found)
    recheck = recheck_params(index_type, index_params, params)

    def recheck_recall_at(width: dict[str, Any]) -> float:
        return 1.0 - float((~hits(width, missed)).sum()) / len(probes) if missed.size else 1.0

    recheck_recall = recheck_recall_at(recheck)
    while recheck_recall < 1.0:
        wider = _wider(index_type, index_params, recheck)
        if wider is None:
            raise IndexTooPoorError(_too_narrow(index_type, recheck, recheck_recall, len(probes)))
        recheck, recheck_recall = wider, recheck_recall_at(wider)
    return SearchWidths(params, recheck, recall, recheck_recall, len(probes))


def _too_narrow(index_type: str, params: dict[str, Any], recall: float, probes: int) -> str:
    return (
        f"the {index_type} index finds the exact nearest neighbour for only {recall:.2%} of {probes} patches even "
        f"at its widest search ({params}); the new version was not published. Build it with other index_params "
        "(e.g. a larger M), or use IVF_FLAT, whose widest search is exhaustive"
    )
