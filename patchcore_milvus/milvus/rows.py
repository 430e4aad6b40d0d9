"""A bank version's collection: its schema, its vectors in and out, and its search.

Fields: `id` (0..n-1) and `embedding` (the patch feature), in the `_default` partition, and
nothing else: every other field would slow down each search hit on Milvus Lite. What the version
records about itself (description, extractor, where each vector came from) is in its sidecar
collection (sidecar.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient

from patchcore_milvus.errors import StoreError
from patchcore_milvus.milvus import sidecar
from patchcore_milvus.milvus.columnar import columnar_search
from patchcore_milvus.milvus.connection import Connection
from patchcore_milvus.milvus.sidecar import Provenance

VECTOR_FIELD = "embedding"
BANK_PARTITION = "_default"
INSERT_BYTES = 32 * 1024 * 1024  # well under Milvus' 64 MiB message limit
MAX_NQ = 16384  # Milvus' limit on queries per search call


@dataclass(frozen=True)
class BankRows:
    """Bank vectors and where each came from, as columns; row i has id i."""

    ids: np.ndarray  # (n,) int64
    vectors: np.ndarray  # (n, dim) float32
    images: list[str]  # the training image of each vector, relative to its root
    positions: np.ndarray  # (n, 2) int: patch y, x in that image's grid

    def __len__(self) -> int:
        return len(self.ids)

    def concatenate(self, other: BankRows) -> BankRows:
        """These rows, then `other`'s renumbered to follow them."""
        return BankRows(
            ids=np.arange(len(self) + len(other)),
            vectors=np.concatenate([self.vectors, other.vectors]),
            images=[*self.images, *other.images],
            positions=np.concatenate([self.positions, other.positions]),
        )


def create_collection(connection: Connection, name: str, category: str, dim: int) -> None:
    """The sidecar first, then the bank collection: a version that exists has both."""
    sidecar.create(connection, name, category)
    schema = MilvusClient.create_schema(auto_id=False, description=f"patchcore-milvus bank of {category}")
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
    connection.call("create_collection", lambda c, t: c.create_collection(name, schema=schema, timeout=t))


def drop_collection(connection: Connection, name: str) -> None:
    """The bank collection, then its sidecar (the order that never leaves a version without one)."""
    if connection.call("has_collection", lambda c, t: c.has_collection(name, timeout=t)):
        connection.call("drop_collection", lambda c, t: c.drop_collection(name, timeout=t))
    sidecar.drop(connection, name)


def insert(connection: Connection, collection: str, rows: BankRows) -> None:
    """The vectors in batches under the message size limit; where they came from in the sidecar."""
    if not np.array_equal(rows.ids, np.arange(len(rows))):
        raise ValueError("bank rows must be numbered 0..n-1")
    per_batch = max(1, INSERT_BYTES // (rows.vectors.shape[1] * 4 + 16))
    for start in range(0, len(rows), per_batch):
        stop = min(start + per_batch, len(rows))
        batch = [
            {"id": i, VECTOR_FIELD: vector} for i, vector in zip(range(start, stop), rows.vectors[start:stop].tolist())
        ]
        connection.call(
            "insert", lambda c, t, batch=batch: c.insert(collection, batch, partition_name=BANK_PARTITION, timeout=t)
        )
    sidecar.write_provenance(connection, collection, Provenance.of(rows.images, rows.positions))


def build_index(connection: Connection, collection: str, index_type: str, params: dict[str, Any]) -> None:
    """Flush (unflushed rows would be searched by brute force), index, load."""
    connection.call("flush", lambda c, t: c.flush(collection, timeout=t), long=True)
    index = connection.client.prepare_index_params()
    # As one JSON "params" entry: pymilvus 3 would send each parameter as its own key, which
    # Milvus Lite 3.2 ignores (it built IVF with its default nlist and HNSW with its default M
    # whatever was asked); Milvus servers read both forms.
    index.add_index(VECTOR_FIELD, index_type=index_type, metric_type="L2", params={"params": params})
    connection.call("create_index", lambda c, t: c.create_index(collection, index, timeout=t), long=True)
    load(connection, collection)


def drop_index(connection: Connection, collection: str) -> None:
    """Release and drop the vector index, so that another can be built."""
    connection.call("release_collection", lambda c, t: c.release_collection(collection, timeout=t), long=True)
    connection.call("drop_index", lambda c, t: c.drop_index(collection, VECTOR_FIELD, timeout=t))


def load(connection: Connection, collection: str) -> None:
    """Load into memory for search (a no-op when loaded); Milvus Lite releases every collection
    when its file is reopened."""
    connection.call("load_collection", lambda c, t: c.load_collection(collection, timeout=t), long=True)


def search(
    connection: Connection, collection: str, vectors: np.ndarray, top_k: int, search_params: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest bank rows of each vector: (Euclidean distances, ids), each (n, top_k).

    Milvus reports squared L2; the square root turns it into PatchCore's distance. An HNSW
    search explores at least `top_k` candidates (Milvus refuses ef < top_k, and Milvus Lite
    would return fewer hits). Queries without a hit keep distance inf and id -1. Results are read
    as arrays (`columnar_search`) where this pymilvus allows it.
    """
    if "ef" in search_params:
        search_params = {**search_params, "ef": max(int(search_params["ef"]), top_k)}
    params = {"metric_type": "L2", "params": search_params}
    squared = np.full((len(vectors), top_k), np.inf, dtype=np.float32)
    ids = np.full((len(vectors), top_k), -1, dtype=np.int64)
    for start in range(0, len(vectors), MAX_NQ):
        block = vectors[start : start + MAX_NQ]
        rows = slice(start, start + len(block))
        found = connection.call(
            "search",
            lambda c, t, block=block: columnar_search(
                c, collection, block, top_k, search_params, VECTOR_FIELD, BANK_PARTITION, "id", t
            ),
        )
        if found is not None:
            squared[rows], ids[rows] = found
            continue
        hits = connection.call(
            "search",
            lambda c, t, block=block: c.search(
                collection,
                data=block,
                anns_field=VECTOR_FIELD,
                limit=top_k,
                output_fields=["id"],
                partition_names=[BANK_PARTITION],
                search_params=params,
                timeout=t,
            ),
        )
        for row, neighbours in enumerate(hits, start=start):
            count = len(neighbours.ids)
            squared[row, :count] = neighbours.distances
            ids[row, :count] = neighbours.ids
    return np.sqrt(np.maximum(squared, 0.0)), ids


def get_vectors(connection: Connection, collection: str, ids: Iterable[int]) -> np.ndarray:
    """Stored vectors for `ids`, in the order given (repeats allowed): (len(ids), dim)."""
    wanted = [int(i) for i in ids]
    unique = sorted(set(wanted))
    found = connection.call("get", lambda c, t: c.get(collection, ids=unique, output_fields=[VECTOR_FIELD], timeout=t))
    by_id = {row["id"]: row[VECTOR_FIELD] for row in found}
    missing = sorted(set(wanted) - set(by_id))
    if missing:
        raise StoreError(f"collection {collection} has no rows with ids {missing[:5]}")
    return np.array([by_id[i] for i in wanted], dtype=np.float32).reshape(len(wanted), -1)


def read_vectors(connection: Connection, collection: str, chunk: int = 10000) -> np.ndarray:
    """Every bank vector of a collection, row i = id i (ingest numbers them 0..n-1)."""
    load(connection, collection)  # a Lite file opened again starts with its collections released
    rows: list[dict[str, Any]] = []
    for start in range(0, vector_count(connection, collection), chunk):
        part = connection.call(
            "query",
            lambda c, t, start=start: c.query(
                collection,
                filter=f"id >= {start} and id < {start + chunk}",
                output_fields=[VECTOR_FIELD],
                partition_names=[BANK_PARTITION],
                limit=chunk,
                timeout=t,
            ),
        )
        rows.extend(sorted(part, key=lambda row: row["id"]))
    if not rows:
        raise StoreError(f"collection {collection} holds no vectors")
    if [row["id"] for row in rows] != list(range(len(rows))):
        raise StoreError(f"collection {collection} is not numbered 0..n-1; re-ingest the category")
    return np.array([row[VECTOR_FIELD] for row in rows], dtype=np.float32).reshape(len(rows), -1)


def read_rows(connection: Connection, collection: str) -> BankRows:
    """Every row with where it came from."""
    vectors = read_vectors(connection, collection)
    provenance = sidecar.read_provenance(connection, collection, len(vectors))
    return BankRows(np.arange(len(vectors)), vectors, provenance.images(), provenance.positions)


def vector_count(connection: Connection, collection: str) -> int:
    stats = connection.call(
        "get_partition_stats", lambda c, t: c.get_partition_stats(collection, BANK_PARTITION, timeout=t)
    )
    return int(stats["row_count"])
