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
`MIN_RECALL` of the probe patches. Each image's largest distances, which make its score, are
then searched exactly at the station (`scoring.settle_largest`, mirror.py): a wider HNSW search
measured on training probes would be a margin, not a guarantee, for defect patches unlike them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from patchcore_milvus.config import DEFAULT_INDEX_PARAMS, QUANTISED_INDEX_TYPES, SEARCH_PARAM_RULES
from patchcore_milvus.errors import ConfigError, IndexTooPoorError
from patchcore_milvus.exact import ExactSearch

MIN_RECALL = 0.999
PROBE_PATCHES = 4096

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
    recall_at_1: float  # of `params`, on `probes` patches
    probes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SearchWidths:
        """Also from a description before schema 4, whose recheck width no station uses now."""
        return cls(values["params"], values["recall_at_1"], values["probes"])


def _wider(index_type: str, index_params: dict[str, Any], params: dict[str, Any]) -> dict[str, Any] | None:
    """Twice the width, None at the widest (HNSW's largest ef; IVF: every list)."""
    [(name, value)] = params.items()
    if name == "ef":
        limit = SEARCH_PARAM_RULES[index_type]["ef"][1]
    else:
        limit = int({**DEFAULT_INDEX_PARAMS[index_type], **index_params}["nlist"])
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
    `MIN_RECALL`, unless `fixed` (the user chose it): then a shortfall is refused. Refused where
    the widest search cannot reach it.
    """
    exact, exact_ids = ExactSearch(bank)(probes, 1)
    norms = np.linalg.norm(probes.astype(np.float64), axis=1)

    def recall_at(width: dict[str, Any]) -> float:
        found, found_ids = search(probes, 1, width)
        return recall_at_1(found[:, 0], found_ids[:, 0], exact[:, 0], exact_ids[:, 0], norms)

    recall = recall_at(params)
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
        params, recall = wider, recall_at(wider)
    return SearchWidths(params, recall, len(probes))


def _too_narrow(index_type: str, params: dict[str, Any], recall: float, probes: int) -> str:
    found = (
        f"the {index_type} index finds the exact nearest neighbour for only {recall:.2%} of {probes} patches even "
        f"at its widest search ({params}); the new version was not published. "
    )
    if index_type in QUANTISED_INDEX_TYPES:  # bottle: 99.83 % (IVF_SQ8) and 99.51 % (HNSW_SQ)
        return found + "It compares quantised vectors, which moves some patches' nearest one: use HNSW or IVF_FLAT"
    return found + "Build it with a larger M or efConstruction, or use IVF_FLAT, whose widest search is exhaustive"
