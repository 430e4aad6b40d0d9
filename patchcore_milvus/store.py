"""One small facade over Milvus: a collection per bank version, an alias per category.

A category's alias (e.g. `bottle`) points at its current collection (`bottle__v<UTC time>`).
Ingest builds a new collection completely, then moves the alias, so a half-built bank is
never what a category name resolves to, and an interrupted ingest leaves the old one serving.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient

from patchcore_milvus.errors import BankNotFoundError, StoreError

VECTOR_FIELD = "embedding"
DESCRIPTION_KEY = "patchcore_milvus.bank"
INSERT_BYTES = 32 * 1024 * 1024  # well under Milvus' 64 MiB message limit
MAX_NQ = 16384  # Milvus' limit on queries per search call
_NAME_RULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VERSION_SUFFIX = re.compile(r"^(?P<category>.+)__v(?P<stamp>\d{8}T\d{12})$")
_MAX_NAME = 255
_SUFFIX_LENGTH = len("__v20260101T000000000000")


def validate_category(name: str) -> str:
    """Category names become Milvus collection names and aliases, and must obey their rule."""
    if not _NAME_RULE.match(name) or "__v" in name or len(name) > _MAX_NAME - _SUFFIX_LENGTH:
        raise StoreError(
            f"invalid category name {name!r}: it must start with a letter or underscore, contain only "
            f"letters, digits and underscores (Milvus' rule for collection names), not contain '__v', "
            f"and be at most {_MAX_NAME - _SUFFIX_LENGTH} characters long"
        )
    return name


def category_of(collection: str) -> str | None:
    match = _VERSION_SUFFIX.match(collection)
    return match.group("category") if match else None


class BankStore:
    """Collections, aliases, vectors and the JSON bank description, over one reused connection."""

    def __init__(self, uri: str, token: str = "", timeout: float = 600.0):
        self.uri = uri
        self.timeout = timeout
        # Milvus Lite's embedded server answers pymilvus' idle keep-alive pings (every 10 s) with
        # GOAWAY "too_many_pings" and a logged error; it is in-process, so idle pings buy nothing.
        is_lite = not uri.startswith(("http://", "https://"))
        options = {"grpc.keepalive_permit_without_calls": 0, "grpc.keepalive_time_ms": 60000} if is_lite else {}
        try:
            self.client = MilvusClient(uri=uri, token=token, timeout=timeout, grpc_options=options)
        except Exception as exc:  # pymilvus and milvus-lite raise several types here
            hint = (
                "A Milvus Lite file serves one process at a time: is another ingest or query using it? "
                "For several processes, run a Milvus server and pass its http://host:port as --uri."
                if is_lite
                else "Is the server running and reachable from here, and is MILVUS_TOKEN right?"
            )
            raise StoreError(f"cannot open Milvus at {uri}: {getattr(exc, 'message', exc)}. {hint}") from exc

    def close(self) -> None:
        self.client.close()

    # Building a version -------------------------------------------------------------------

    def create_version(self, category: str, dim: int) -> str:
        validate_category(category)
        name = f"{category}__v{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%f')}"
        schema = MilvusClient.create_schema(auto_id=False, description=f"patchcore-milvus bank of {category}")
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("image", DataType.VARCHAR, max_length=2048)
        schema.add_field("patch_y", DataType.INT32)
        schema.add_field("patch_x", DataType.INT32)
        self.client.create_collection(name, schema=schema, timeout=self.timeout)
        return name

    def insert(self, collection: str, vectors: np.ndarray, images: list[str], positions: np.ndarray) -> None:
        """Rows get ids 0..n-1 in order; inserted in batches under the message size limit."""
        rows_per_batch = max(1, INSERT_BYTES // (vectors.shape[1] * 4 + 2048 + 16))
        for start in range(0, len(vectors), rows_per_batch):
            stop = min(start + rows_per_batch, len(vectors))
            rows = [
                {
                    "id": i,
                    VECTOR_FIELD: vectors[i].tolist(),
                    "image": images[i],
                    "patch_y": int(positions[i, 0]),
                    "patch_x": int(positions[i, 1]),
                }
                for i in range(start, stop)
            ]
            self.client.insert(collection, rows, timeout=self.timeout)

    def build_index(self, collection: str, index_type: str, params: dict[str, Any]) -> None:
        """Flush (unflushed rows would be searched by brute force), index, load."""
        self.client.flush(collection, timeout=self.timeout)
        index = self.client.prepare_index_params()
        index.add_index(VECTOR_FIELD, index_type=index_type, metric_type="L2", params=params)
        self.client.create_index(collection, index, timeout=self.timeout)
        self.ensure_loaded(collection)

    def write_description(self, collection: str, description: dict[str, Any]) -> None:
        """The bank's model description, as JSON in a collection property (never pickle)."""
        self.client.alter_collection_properties(
            collection, properties={DESCRIPTION_KEY: json.dumps(description)}, timeout=self.timeout
        )

    def publish(self, category: str, collection: str) -> None:
        """Point the category at `collection`, then drop its other versions."""
        current = self._alias_target(category)
        if current is None:
            self.client.create_alias(collection, category, timeout=self.timeout)
        else:
            self.client.alter_alias(collection, category, timeout=self.timeout)
        self.remove_versions(category, keep=collection)

    def drop_version(self, collection: str) -> None:
        self.client.drop_collection(collection, timeout=self.timeout)

    def remove_versions(self, category: str, keep: str | None = None) -> list[str]:
        """Drop every collection version of `category` except `keep` (e.g. leftovers of a crash)."""
        dropped = []
        for name in self.client.list_collections(timeout=self.timeout):
            if category_of(name) == category and name != keep:
                self.drop_version(name)
                dropped.append(name)
        return dropped

    # Reading a bank ------------------------------------------------------------------------

    def resolve(self, category: str) -> str:
        """The collection a category's alias points at, or a clear error listing what exists."""
        target = self._alias_target(category)
        if target is None:
            known = ", ".join(sorted(b["category"] for b in self.list_banks())) or "none yet"
            raise BankNotFoundError(
                f"no bank for category {category!r} at {self.uri} (known: {known}); create it with "
                f"`patchcore-milvus ingest DATA_ROOT --category {category}`"
            )
        return target

    def ensure_loaded(self, collection: str) -> None:
        """Load into memory for search (a no-op when loaded); Milvus Lite releases every
        collection when its file is reopened."""
        self.client.load_collection(collection, timeout=self.timeout)

    def read_description(self, collection: str) -> dict[str, Any]:
        properties = self.client.describe_collection(collection, timeout=self.timeout).get("properties", {})
        if DESCRIPTION_KEY not in properties:
            raise StoreError(f"collection {collection} has no patchcore-milvus description; re-ingest it")
        return json.loads(properties[DESCRIPTION_KEY])

    def search(
        self, collection: str, vectors: np.ndarray, top_k: int, search_params: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest bank rows of each vector: (Euclidean distances, ids), each (n, top_k).

        Milvus reports squared L2; the square root turns it into PatchCore's distance.
        """
        squared = np.full((len(vectors), top_k), np.inf, dtype=np.float32)
        ids = np.full((len(vectors), top_k), -1, dtype=np.int64)
        for start in range(0, len(vectors), MAX_NQ):
            hits = self.client.search(
                collection,
                data=vectors[start : start + MAX_NQ],
                anns_field=VECTOR_FIELD,
                limit=top_k,
                search_params={"metric_type": "L2", "params": search_params},
                timeout=self.timeout,
            )
            for row, neighbours in enumerate(hits, start=start):
                for k, hit in enumerate(neighbours):
                    squared[row, k] = hit["distance"]
                    ids[row, k] = hit["id"]
        return np.sqrt(np.maximum(squared, 0.0)), ids

    def get_rows(self, collection: str, ids: Iterable[int]) -> list[dict[str, Any]]:
        """Stored rows for `ids`, in the order given: id, vector, source image and patch position."""
        wanted = [int(i) for i in ids]
        rows = self.client.get(
            collection,
            ids=sorted(set(wanted)),
            output_fields=[VECTOR_FIELD, "image", "patch_y", "patch_x"],
            timeout=self.timeout,
        )
        by_id = {
            row["id"]: {
                "id": row["id"],
                "vector": np.asarray(row[VECTOR_FIELD], dtype=np.float32),
                "image": row["image"],
                "patch_y": row["patch_y"],
                "patch_x": row["patch_x"],
            }
            for row in rows
        }
        return [by_id[i] for i in wanted]

    def read_vectors(self, collection: str, chunk: int = 10000) -> np.ndarray:
        """All vectors of a collection, row i = id i (ingest numbers them 0..n-1)."""
        n = int(self.client.get_collection_stats(collection, timeout=self.timeout)["row_count"])
        vectors = None
        for start in range(0, n, chunk):
            rows = self.client.query(
                collection,
                filter=f"id >= {start} and id < {start + chunk}",
                output_fields=[VECTOR_FIELD],
                limit=chunk,
                timeout=self.timeout,
            )
            for row in rows:
                if vectors is None:
                    vectors = np.empty((n, len(row[VECTOR_FIELD])), dtype=np.float32)
                vectors[row["id"]] = row[VECTOR_FIELD]
        if vectors is None:
            raise StoreError(f"collection {collection} holds no vectors")
        return vectors

    def list_banks(self) -> list[dict[str, Any]]:
        """Every published bank: category, collection, vectors, dim, index and description."""
        banks = []
        for name in sorted(self.client.list_collections(timeout=self.timeout)):
            category = category_of(name)
            if category is None or self._alias_target(category) != name:
                continue
            description = self.read_description(name)
            stats = self.client.get_collection_stats(name, timeout=self.timeout)
            banks.append(
                {
                    "category": category,
                    "collection": name,
                    "vectors": int(stats["row_count"]),
                    "dim": description["extractor"]["dim"],
                    "index": description["index"]["type"],
                    "backbone": description["extractor"]["backbone"],
                    "created": description["created"],
                }
            )
        return banks

    def drop(self, category: str) -> list[str]:
        """Remove a category: its alias and every version."""
        self.resolve(category)
        self.client.drop_alias(category, timeout=self.timeout)
        return self.remove_versions(category)

    def _alias_target(self, category: str) -> str | None:
        # Looked up through the category's versions: asking Milvus for a missing alias logs an error.
        validate_category(category)
        for name in self.client.list_collections(timeout=self.timeout):
            if category_of(name) == category:
                aliases = self.client.list_aliases(name, timeout=self.timeout)["aliases"]
                if category in aliases:
                    return name
        return None
