"""The search read as arrays returns exactly what `MilvusClient.search` returns, on Milvus Lite
and on a real Milvus server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import sample_description

from patchcore_milvus.config import Config
from patchcore_milvus.milvus import BankRows, BankStore
from patchcore_milvus.milvus.columnar import columnar_search
from patchcore_milvus.milvus.rows import BANK_PARTITION, VECTOR_FIELD
from patchcore_milvus.testing.milvus_server import ROOT_TOKEN


def small_bank(store: BankStore, count: int) -> str:
    """`count` clustered vectors with exact duplicates (ties), indexed with HNSW."""
    rng = np.random.default_rng(7)
    vectors = (rng.normal(size=(count, 12)) + rng.integers(0, 4, (count, 1)) * 5).astype(np.float32)
    vectors[count // 2 :: 7] = vectors[0]
    collection = store.create_version("columnar", 12)
    positions = np.zeros((count, 2), dtype=int)
    store.insert(collection, BankRows(np.arange(count), vectors, ["a.png"] * count, positions))
    store.build_index(collection, "HNSW", {"M": 8, "efConstruction": 64})
    store.write_description(collection, sample_description("columnar"))
    store.verify(collection, count, probe_id=0, search_params={"ef": 64})
    return collection


def client_search(store: BankStore, collection: str, queries: np.ndarray, top_k: int):
    hits = store.client.search(
        collection,
        data=queries,
        anns_field=VECTOR_FIELD,
        limit=top_k,
        partition_names=[BANK_PARTITION],
        search_params={"metric_type": "L2", "params": {"ef": 64}},
        timeout=60,
    )
    squared = np.full((len(queries), top_k), np.inf, dtype=np.float32)
    ids = np.full((len(queries), top_k), -1, dtype=np.int64)
    for row, neighbours in enumerate(hits):
        squared[row, : len(neighbours.ids)] = neighbours.distances
        ids[row, : len(neighbours.ids)] = neighbours.ids
    return squared, ids


def assert_same_as_the_client(store: BankStore) -> None:
    collection = small_bank(store, 400)
    queries = np.random.default_rng(8).normal(size=(700, 12)).astype(np.float32) * 6
    queries[:20] = store.get_vectors(collection, range(20))  # distance 0, and ties with the duplicates
    for top_k in (1, 9):
        found = columnar_search(
            store.client, collection, queries, top_k, {"ef": 64}, VECTOR_FIELD, BANK_PARTITION, "id", 60
        )
        assert found is not None, "this pymilvus should be driven without per-hit objects"
        expected = client_search(store, collection, queries, top_k)
        np.testing.assert_array_equal(found[1], expected[1])
        np.testing.assert_array_equal(found[0], expected[0])
    few = small_bank(store, 5)  # fewer rows than top_k: the rest stays inf / -1 in both
    found = columnar_search(store.client, few, queries[:30], 8, {"ef": 64}, VECTOR_FIELD, BANK_PARTITION, "id", 60)
    expected = client_search(store, few, queries[:30], 8)
    assert (expected[1][:, 5:] == -1).all()
    np.testing.assert_array_equal(found[1], expected[1])
    np.testing.assert_array_equal(found[0], expected[0])


def test_columnar_search_equals_milvus_client_search_on_lite(tmp_path: Path):
    store = BankStore(str(tmp_path / "columnar.db"), timeout=60)
    try:
        assert_same_as_the_client(store)
    finally:
        store.close()


@pytest.mark.server
def test_columnar_search_equals_milvus_client_search_on_the_server(milvus_server, monkeypatch):
    monkeypatch.setenv("MILVUS_TOKEN", ROOT_TOKEN)
    config = Config(uri=milvus_server.uri, **milvus_server.client_options, milvus_timeout=60)
    store = BankStore.from_config(config)
    try:
        assert_same_as_the_client(store)
    finally:
        for version in store.versions("columnar"):
            store.drop_version(version.version)
        store.close()
