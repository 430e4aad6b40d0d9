"""A bank version's collection: its schema, its rows in and out, its search, and the rows that
hold its description.

Fields: `id` (0..n-1 for bank vectors), `embedding` (the patch feature), `image`, `patch_y`,
`patch_x` (where it came from), `description` (empty for bank rows). The bank's vectors live in
the `_default` partition; the description, as ASCII JSON in chunks under Milvus' VARCHAR limit,
in rows with negative ids of the `description` partition, and the extractor's ONNX model, base64
in chunks, in the `extractor` partition: so that both are created and dropped with the vectors
they describe (Milvus 2.3 forgets collection properties on restart).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient

from patchcore_milvus.description import BankDescription
from patchcore_milvus.errors import StoreError, StoreUnavailableError
from patchcore_milvus.milvus.columnar import columnar_search
from patchcore_milvus.milvus.connection import Connection

VECTOR_FIELD = "embedding"
DESCRIPTION_FIELD = "description"
DESCRIPTION_PARTITION = "description"
EXTRACTOR_PARTITION = "extractor"
BANK_PARTITION = "_default"
_MODEL_FIRST_ID = -1_000_000  # extractor chunks: ids -1,000,000 down; description chunks: -1 down
DESCRIPTION_CHUNK = 60000  # characters of ASCII JSON per row, under Milvus' 65,535-byte VARCHAR limit
INSERT_BYTES = 32 * 1024 * 1024  # well under Milvus' 64 MiB message limit
MAX_NQ = 16384  # Milvus' limit on queries per search call
_ROW_FIELDS = [VECTOR_FIELD, "image", "patch_y", "patch_x"]


@dataclass(frozen=True)
class BankRows:
    """Bank vectors and where each came from, as columns."""

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

    def source(self, i: int) -> dict[str, Any]:
        """Where row i came from: image and patch position (for JSON)."""
        return {"image": self.images[i], "patch_y": int(self.positions[i, 0]), "patch_x": int(self.positions[i, 1])}

    @classmethod
    def from_milvus(cls, rows: list[dict[str, Any]]) -> BankRows:
        return cls(
            ids=np.array([row["id"] for row in rows], dtype=np.int64),
            vectors=np.array([row[VECTOR_FIELD] for row in rows], dtype=np.float32).reshape(len(rows), -1),
            images=[row["image"] for row in rows],
            positions=np.array([[row["patch_y"], row["patch_x"]] for row in rows], dtype=np.int32).reshape(-1, 2),
        )


def create_collection(connection: Connection, name: str, category: str, dim: int) -> None:
    schema = MilvusClient.create_schema(auto_id=False, description=f"patchcore-milvus bank of {category}")
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("image", DataType.VARCHAR, max_length=2048)
    schema.add_field("patch_y", DataType.INT32)
    schema.add_field("patch_x", DataType.INT32)
    schema.add_field(DESCRIPTION_FIELD, DataType.VARCHAR, max_length=65535)
    connection.call("create_collection", lambda c, t: c.create_collection(name, schema=schema, timeout=t))
    for partition in (DESCRIPTION_PARTITION, EXTRACTOR_PARTITION):
        connection.call(
            "create_partition", lambda c, t, partition=partition: c.create_partition(name, partition, timeout=t)
        )


def insert(connection: Connection, collection: str, rows: BankRows) -> None:
    """In batches under the message size limit."""
    per_batch = max(1, INSERT_BYTES // (rows.vectors.shape[1] * 4 + 2048 + 16))
    for start in range(0, len(rows), per_batch):
        batch = [
            {
                "id": int(rows.ids[i]),
                VECTOR_FIELD: rows.vectors[i].tolist(),
                "image": rows.images[i],
                "patch_y": int(rows.positions[i, 0]),
                "patch_x": int(rows.positions[i, 1]),
                DESCRIPTION_FIELD: "",
            }
            for i in range(start, min(start + per_batch, len(rows)))
        ]
        connection.call(
            "insert", lambda c, t, batch=batch: c.insert(collection, batch, partition_name=BANK_PARTITION, timeout=t)
        )


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


def get_rows(connection: Connection, collection: str, ids: Iterable[int]) -> BankRows:
    """Stored rows for `ids`, in the order given (repeats allowed)."""
    wanted = [int(i) for i in ids]
    unique = sorted(set(wanted))
    found = connection.call("get", lambda c, t: c.get(collection, ids=unique, output_fields=_ROW_FIELDS, timeout=t))
    by_id = {row["id"]: row for row in found}
    missing = sorted(set(wanted) - set(by_id))
    if missing:
        raise StoreError(f"collection {collection} has no rows with ids {missing[:5]}")
    return BankRows.from_milvus([by_id[i] for i in wanted])


def read_rows(connection: Connection, collection: str, chunk: int = 10000) -> BankRows:
    """Every bank row of a collection, in id order (ingest numbers them 0..n-1)."""
    load(connection, collection)  # a Lite file opened again starts with its collections released
    rows: list[dict[str, Any]] = []
    for start in range(0, vector_count(connection, collection), chunk):
        part = connection.call(
            "query",
            lambda c, t, start=start: c.query(
                collection,
                filter=f"id >= {start} and id < {start + chunk}",
                output_fields=_ROW_FIELDS,
                partition_names=[BANK_PARTITION],
                limit=chunk,
                timeout=t,
            ),
        )
        rows.extend(sorted(part, key=lambda row: row["id"]))
    if not rows:
        raise StoreError(f"collection {collection} holds no vectors")
    return BankRows.from_milvus(rows)


def vector_count(connection: Connection, collection: str) -> int:
    stats = connection.call(
        "get_partition_stats", lambda c, t: c.get_partition_stats(collection, BANK_PARTITION, timeout=t)
    )
    return int(stats["row_count"])


def dim(connection: Connection, collection: str) -> int:
    fields = connection.call("describe_collection", lambda c, t: c.describe_collection(collection, timeout=t))["fields"]
    return int(next(f["params"]["dim"] for f in fields if f["name"] == VECTOR_FIELD))


def _write_text(connection: Connection, collection: str, text: str, partition: str, first_id: int) -> None:
    """ASCII `text` in rows with ids first_id, first_id - 1, ...; each row knows the number of
    chunks (in `patch_y`), so that a lost one is noticed."""
    chunks = [text[i : i + DESCRIPTION_CHUNK] for i in range(0, len(text), DESCRIPTION_CHUNK)]
    zeros = [0.0] * dim(connection, collection)
    rows = [
        {
            "id": first_id - k,
            VECTOR_FIELD: zeros,
            "image": "",
            "patch_y": len(chunks),
            "patch_x": k,
            DESCRIPTION_FIELD: chunk,
        }
        for k, chunk in enumerate(chunks)
    ]
    per_batch = max(1, INSERT_BYTES // (DESCRIPTION_CHUNK + len(zeros) * 4 + 64))
    for start in range(0, len(rows), per_batch):
        batch = rows[start : start + per_batch]
        connection.call(
            "insert", lambda c, t, batch=batch: c.insert(collection, batch, partition_name=partition, timeout=t)
        )
    connection.call("flush", lambda c, t: c.flush(collection, timeout=t), long=True)


# Chunks read per query: about 15 MB of text, well under gRPC's and Milvus' message limits.
_CHUNKS_PER_READ = 256


def _read_text(connection: Connection, collection: str, partition: str, first_id: int) -> str | None:
    """The text `_write_text` stored from `first_id` down, None if there is none; ValueError if a
    chunk is missing.

    Read first at Bounded consistency: a Milvus server answers at once, where a Strong read waits
    for its next time tick. A text is written once and never changed, so a bounded read can only
    miss it, or some of its chunks (the chunk count shows it), if it was written moments ago; then
    it is read again at Strong consistency."""
    try:
        text = _read_text_at(connection, collection, partition, first_id, "Bounded")
    except ValueError:
        text = None
    return text if text is not None else _read_text_at(connection, collection, partition, first_id, "Strong")


def _read_text_at(connection: Connection, collection: str, partition: str, first_id: int, level: str) -> str | None:
    """`_read_text` at one consistency level, in ranges of ids, so that a large model never makes
    one huge answer."""
    rows: list[dict[str, Any]] = []
    expected, read = None, 0  # chunks the text has; ids read through so far
    while expected is None or read < expected:
        high = first_id - read
        read += _CHUNKS_PER_READ
        part = connection.call(
            "query",
            lambda c, t, high=high: c.query(
                collection,
                filter=f"id <= {high} and id > {high - _CHUNKS_PER_READ}",
                output_fields=[DESCRIPTION_FIELD, "patch_y"],
                partition_names=[partition],
                consistency_level=level,
                timeout=t,
            ),
        )
        if expected is None:
            if not part:
                break
            expected = part[0]["patch_y"]
        rows.extend(part)
    if not rows:
        return None
    if any(row["patch_y"] != len(rows) for row in rows):
        raise ValueError(f"{len(rows)} of {rows[0]['patch_y']} parts found")
    return "".join(row[DESCRIPTION_FIELD] for row in sorted(rows, key=lambda row: -row["id"]))


def write_description(connection: Connection, collection: str, description: BankDescription) -> None:
    """As ASCII JSON in rows with ids -1, -2, ... (never pickle)."""
    _write_text(connection, collection, description.to_json(), DESCRIPTION_PARTITION, -1)


def write_model(connection: Connection, collection: str, model: bytes) -> None:
    """The extractor's ONNX model, base64, in rows with ids -1,000,000, -1,000,001, ..."""
    _write_text(connection, collection, base64.b64encode(model).decode("ascii"), EXTRACTOR_PARTITION, _MODEL_FIRST_ID)


def read_model(connection: Connection, collection: str) -> bytes:
    try:
        text = _read_text(connection, collection, EXTRACTOR_PARTITION, _MODEL_FIRST_ID)
        if text is None:
            raise ValueError("no extractor rows")
        return base64.b64decode(text, validate=True)
    except ValueError as exc:  # binascii.Error is one
        raise StoreError(f"the extractor model of {collection} is damaged ({exc}); re-ingest the category") from exc


def read_description(connection: Connection, collection: str) -> BankDescription | None:
    """None for a version that never got its description (its ingest was interrupted, or
    another tool made it); a damaged one is an error."""
    try:
        load(connection, collection)
    except StoreUnavailableError:
        raise
    except StoreError as exc:
        # No index yet: interrupted before indexing. Any other failure is not a verdict on the
        # version (publish would drop it as incomplete), so it is raised.
        if exc.code == 700 or "index" in str(exc).lower():
            return None
        raise
    has = connection.call("has_partition", lambda c, t: c.has_partition(collection, DESCRIPTION_PARTITION, timeout=t))
    if not has:
        return None  # not made by this patchcore-milvus (another tool, or a version before 0.2)
    try:
        text = _read_text(connection, collection, DESCRIPTION_PARTITION, -1)
        return None if text is None else BankDescription.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise StoreError(f"the description of {collection} is damaged ({exc!r}); re-ingest the category") from exc
