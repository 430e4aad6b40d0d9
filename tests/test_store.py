"""The Milvus facade against a real embedded Milvus Lite, never a mock."""

from pathlib import Path

import numpy as np
import pytest
from conftest import sample_description

from patchcore_milvus.errors import BankNotFoundError, StoreError
from patchcore_milvus.milvus import BankRows, BankStore, category_of, sidecar, validate_category


@pytest.fixture
def store(tmp_path: Path):
    bank_store = BankStore(str(tmp_path / "store.db"), timeout=60)
    yield bank_store
    bank_store.close()


def rows_of(vectors: np.ndarray, images: list[str] | None = None) -> BankRows:
    n = len(vectors)
    positions = np.stack([np.arange(n), np.zeros(n, int)], axis=1)
    return BankRows(np.arange(n), vectors, images or [f"img{i // 10}.png" for i in range(n)], positions)


def fill(store: BankStore, category: str, vectors: np.ndarray) -> str:
    collection = store.create_version(category, vectors.shape[1])
    store.insert(collection, rows_of(vectors))
    store.build_index(collection, "HNSW", {"M": 8, "efConstruction": 64})
    store.write_description(collection, sample_description(category))
    store.verify(collection, len(vectors), probe_id=0, search_params={"ef": 64})
    return collection


def test_search_returns_euclidean_not_squared_distances(store: BankStore):
    vectors = np.zeros((50, 4), dtype=np.float32)
    vectors[:, 0] = np.arange(50) * 100.0  # far apart, so the nearest one is certain
    collection = fill(store, "geometry", vectors)
    query = np.array([[3.0, 4.0, 0.0, 0.0], [200.0, 0.0, 0.0, 12.0]], dtype=np.float32)
    distances, ids = store.search(collection, query, 1, {"ef": 32})
    np.testing.assert_allclose(distances[:, 0], [5.0, 12.0], rtol=1e-5)  # squared would be 25 and 144
    assert ids[:, 0].tolist() == [0, 2]


def test_rows_keep_their_source_image_and_patch_position(store: BankStore):
    vectors = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    collection = fill(store, "sources", vectors)
    np.testing.assert_allclose(store.get_vectors(collection, [17, 3, 17]), vectors[[17, 3, 17]], rtol=1e-6)
    provenance = store.read_provenance(collection)
    assert provenance.source(17) == {"image": "img1.png", "patch_y": 17, "patch_x": 0}
    rows = store.read_rows(collection)
    assert rows.images == [f"img{i // 10}.png" for i in range(30)] and rows.positions[29].tolist() == [29, 0]
    np.testing.assert_array_equal(rows.vectors, vectors)


def test_the_bank_collection_holds_only_ids_and_vectors(store: BankStore):
    # Milvus Lite builds every field of every search hit: nothing but the vector may sit beside it.
    collection = fill(store, "slim", np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32))
    fields = [field["name"] for field in store.client.describe_collection(collection)["fields"]]
    assert fields == ["id", "embedding"]
    assert store.client.has_collection(sidecar.name_of(collection))
    store.drop_version(collection)
    assert not store.client.has_collection(collection) and not store.client.has_collection(sidecar.name_of(collection))


def test_more_queries_than_one_call_takes(store: BankStore):
    vectors = np.random.default_rng(1).normal(size=(200, 8)).astype(np.float32)
    collection = fill(store, "many", vectors)
    queries = vectors[np.random.default_rng(2).integers(0, 200, 16384 + 300)]
    distances, ids = store.search(collection, queries, 1, {"ef": 64})
    assert ids.shape == (16684, 1) and (ids >= 0).all()
    assert float(np.median(distances)) < 1e-3


def test_publish_moves_the_alias_keeps_n_versions_and_removes_leftovers(store: BankStore):
    vectors = np.random.default_rng(3).normal(size=(40, 8)).astype(np.float32)
    first = fill(store, "bottle", vectors)
    store.publish("bottle", first, keep=2)
    assert store.resolve("bottle") == first
    leftover = store.create_version("bottle", 8)  # like an ingest killed before it published
    second = fill(store, "bottle", vectors)
    assert store.resolve("bottle") == first  # unpublished versions are never what the name resolves to
    assert store.publish("bottle", second, keep=2) == [leftover]
    assert store.resolve("bottle") == second
    third = fill(store, "bottle", vectors * 2)
    assert store.publish("bottle", third, keep=2) == [first]  # the oldest complete one beyond the 2 kept
    history = store.versions("bottle")
    assert [(h.version, h.current, h.description is not None, h.vectors) for h in history] == [
        (second, False, True, 40),
        (third, True, True, 40),
    ]
    assert history[0].description.training_images[0].bank == ["ünïcode ok.png"]
    store.drop("bottle")
    with pytest.raises(BankNotFoundError, match="no bank for category 'bottle'"):
        store.resolve("bottle")
    assert store.client.list_collections() == []


def test_rollback_repoints_the_alias_to_an_older_complete_version(store: BankStore):
    vectors = np.random.default_rng(3).normal(size=(40, 8)).astype(np.float32)
    first = fill(store, "bottle", vectors)
    store.publish("bottle", first, keep=3)
    with pytest.raises(StoreError, match="no complete version older"):
        store.rollback("bottle")
    second = fill(store, "bottle", vectors + 1)
    store.publish("bottle", second, keep=3)
    assert store.rollback("bottle") == first and store.follow_alias("bottle") == first
    distances, _ = store.search("bottle", vectors[:3], 1, {"ef": 32})  # through the alias
    np.testing.assert_allclose(distances, 0.0, atol=1e-3)
    assert store.rollback("bottle", second.removeprefix("bottle__")) == second
    with pytest.raises(StoreError, match="has no version 'v2000'"):
        store.rollback("bottle", "v2000")


def test_descriptions_longer_than_one_varchar_and_damaged_ones(store: BankStore):
    vectors = np.random.default_rng(3).normal(size=(20, 8)).astype(np.float32)
    collection = fill(store, "long", vectors)
    records = sidecar.name_of(collection)
    store.client.delete(records, ids=[-1], partition_name="description")
    names = [f"image_{i:06d}.png" for i in range(10000)]
    store.write_description(collection, sample_description("long", names))  # ~190 kB
    assert len(store.read_description(collection).training_images[0].bank) == 10000
    store.client.delete(records, ids=[-2])  # a chunk goes missing
    store.client.flush(records)
    with pytest.raises(StoreError, match="damaged"):
        store.read_description(collection)


def test_a_description_from_a_newer_release_says_to_upgrade(store: BankStore):
    from dataclasses import replace

    from patchcore_milvus.description import SCHEMA

    vectors = np.random.default_rng(3).normal(size=(20, 8)).astype(np.float32)
    collection = fill(store, "newer", vectors)
    store.client.delete(sidecar.name_of(collection), ids=[-1], partition_name="description")
    store.write_description(collection, replace(sample_description("newer", ["a.png"]), schema=SCHEMA + 1))
    with pytest.raises(StoreError, match=r"written by a newer patchcore-milvus .*upgrade patchcore-milvus"):
        store.read_description(collection)


def test_verification_refuses_an_incomplete_version(store: BankStore):
    vectors = np.random.default_rng(3).normal(size=(20, 8)).astype(np.float32)
    collection = fill(store, "short", vectors)
    with pytest.raises(StoreError, match="20 vectors stored, 21 expected"):
        store.verify(collection, 21, probe_id=0, search_params={"ef": 64})


def test_unknown_category_lists_the_known_ones(store: BankStore):
    with pytest.raises(BankNotFoundError, match="known: none yet"):
        store.resolve("cable")


@pytest.mark.parametrize("name", ["9lives", "metal-nut", "a b", "x__v1", "", "é", "a" * 240])
def test_category_names_follow_milvus_rules(name: str):
    with pytest.raises(StoreError, match="letters, digits and underscores"):
        validate_category(name)


def test_valid_names_and_version_parsing():
    assert validate_category("metal_nut") == "metal_nut"
    assert category_of("metal_nut__v20261130T120000123456") == "metal_nut"
    assert category_of("metal_nut") is None


def test_a_lite_file_held_by_another_process_is_explained(store: BankStore):
    import subprocess
    import sys

    opener = f"from patchcore_milvus.milvus import BankStore; BankStore({store.uri!r})"
    result = subprocess.run([sys.executable, "-c", opener], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "serves one process at a time" in result.stderr and "http://host:port" in result.stderr
    command = [sys.executable, "-c", "from patchcore_milvus.cli import main; main()", "collections", "--uri", store.uri]
    cli = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "serves one process at a time" in cli.stderr
    assert "Traceback" not in cli.stderr and "DataDirLockedError" not in cli.stderr  # Milvus Lite's own log


@pytest.mark.parametrize("index_type", ["HNSW", "HNSW_SQ", "IVF_FLAT", "IVF_SQ8"])
def test_every_offered_index_type_builds_and_finds_neighbours(store: BankStore, index_type: str):
    from patchcore_milvus.config import Config

    config = Config(index_type=index_type, index_params={"nlist": 16} if index_type.startswith("IVF") else {})
    vectors = np.random.default_rng(4).normal(size=(500, 16)).astype(np.float32)
    collection = store.create_version("indexed", 16)
    store.insert(collection, rows_of(vectors, ["x.png"] * 500))
    store.build_index(collection, index_type, config.effective_index_params)
    _, ids = store.search(collection, vectors[:50], 1, config.effective_search_params)
    assert (ids[:, 0] == np.arange(50)).mean() >= 0.9


def test_exact_search_over_vectors_read_back_agrees_with_milvus(store: BankStore):
    from patchcore_milvus.exact import ExactSearch

    vectors = np.random.default_rng(5).normal(size=(12000, 8)).astype(np.float32)  # more than one read chunk
    collection = fill(store, "exact", vectors)
    read_back = store.read_vectors(collection)
    np.testing.assert_array_equal(read_back, vectors)
    queries = np.random.default_rng(6).normal(size=(200, 8)).astype(np.float32)
    exact_distances, exact_ids = ExactSearch(read_back)(queries, 3)
    reference = np.linalg.norm(queries[:, None] - vectors[None], axis=2)
    np.testing.assert_array_equal(exact_ids, np.argsort(reference, axis=1)[:, :3])
    np.testing.assert_allclose(exact_distances, np.sort(reference, axis=1)[:, :3], rtol=1e-4)
    milvus_distances, _ = store.search(collection, queries, 1, {"ef": 128})
    np.testing.assert_allclose(milvus_distances[:, 0], exact_distances[:, 0], rtol=1e-4)


def test_an_unreachable_server_is_named_within_a_bounded_time():
    import socket
    import time

    from patchcore_milvus.errors import StoreUnavailableError

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=f"Milvus at http://127.0.0.1:{port} kept failing") as error:
        BankStore(f"http://127.0.0.1:{port}", timeout=2, retry_seconds=3)
    assert time.monotonic() - started < 30
    assert "tls_ca_cert" in str(error.value)  # the message says what to check


def test_a_collection_without_our_description_is_refused_with_the_reason(store: BankStore):
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=4)
    store.client.create_collection("foreign__v20200101T000000000000", schema=schema)  # looks like a version
    with pytest.raises(StoreError, match="has no patchcore-milvus description"):
        store.read_description("foreign__v20200101T000000000000")


def test_descriptions_are_read_in_ranges_of_chunks(store: BankStore, monkeypatch):
    monkeypatch.setattr(sidecar, "_CHUNKS_PER_READ", 2)  # 4 chunks: two reads
    vectors = np.random.default_rng(3).normal(size=(20, 8)).astype(np.float32)
    collection = fill(store, "ranged", vectors)
    records = sidecar.name_of(collection)
    store.client.delete(records, ids=[-1], partition_name="description")
    names = [f"image_{i:06d}.png" for i in range(10000)]
    store.write_description(collection, sample_description("ranged", names))
    assert store.read_description(collection).training_images[0].bank == names
    store.client.delete(records, ids=[-2])  # a chunk of the first range goes missing
    store.client.flush(records)
    with pytest.raises(StoreError, match="3 of 4 parts found"):
        store.read_description(collection)


@pytest.mark.parametrize("bounded", [None, ValueError("1 of 2 parts found")])
def test_a_text_missing_or_incomplete_at_bounded_consistency_is_read_again_at_strong(monkeypatch, bounded):
    levels = []

    def read_at(connection, layout, partition, level):
        levels.append(level)
        if level == "Strong":
            return "the whole text"
        if isinstance(bounded, Exception):
            raise bounded
        return bounded

    monkeypatch.setattr(sidecar, "_read_text_at", read_at)
    assert sidecar._read_text(None, None, "description") == "the whole text"
    assert levels == ["Bounded", "Strong"]


def _single_layout_version(store: BankStore, category: str, vectors: np.ndarray) -> str:
    """A version as patchcore-milvus wrote them before the sidecar: everything in one collection."""
    from pymilvus import DataType, MilvusClient

    name = f"{category}__v20260101T000000000000"
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=vectors.shape[1])
    schema.add_field("image", DataType.VARCHAR, max_length=2048)
    schema.add_field("patch_y", DataType.INT32)
    schema.add_field("patch_x", DataType.INT32)
    schema.add_field("description", DataType.VARCHAR, max_length=65535)
    store.client.create_collection(name, schema=schema)
    for partition in ("description", "extractor"):
        store.client.create_partition(name, partition)
    bank = [
        {"id": i, "embedding": v.tolist(), "image": f"old{i // 10}.png", "patch_y": i, "patch_x": 1, "description": ""}
        for i, v in enumerate(vectors)
    ]
    store.client.insert(name, bank)
    text = sample_description(category).to_json()
    chunks = [text[i : i + 1000] for i in range(0, len(text), 1000)]
    zeros = [0.0] * vectors.shape[1]
    rows = [
        {"id": -1 - k, "embedding": zeros, "image": "", "patch_y": len(chunks), "patch_x": k, "description": chunk}
        for k, chunk in enumerate(chunks)
    ]
    store.client.insert(name, rows, partition_name="description")
    store.build_index(name, "HNSW", {"M": 8, "efConstruction": 64})
    return name


def test_a_version_from_before_the_sidecar_is_still_read_and_never_taken_for_a_leftover(store: BankStore):
    vectors = np.random.default_rng(7).normal(size=(30, 8)).astype(np.float32)
    old = _single_layout_version(store, "legacy", vectors)
    store.publish("legacy", old, keep=2)
    assert store.read_description(old).category == "legacy"
    assert store.read_provenance(old).source(12) == {"image": "old1.png", "patch_y": 12, "patch_x": 1}
    np.testing.assert_array_equal(store.read_vectors(old), vectors)
    assert store.leftovers() == []
    new = fill(store, "legacy", vectors)
    assert store.publish("legacy", new, keep=2) == []  # the old one is complete: kept for rollback
    assert store.rollback("legacy") == old
    distances, ids = store.search("legacy", vectors[:5], 1, {"ef": 32})
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4] and float(distances.max()) < 1e-3


def test_a_sidecar_left_without_its_version_is_a_leftover(store: BankStore):
    vectors = np.random.default_rng(8).normal(size=(20, 8)).astype(np.float32)
    version = fill(store, "orphan", vectors)
    store.publish("orphan", version, keep=2)
    killed = store.create_version("orphan", 8)
    store.client.drop_collection(killed)  # a kill between dropping the collection and its sidecar
    assert store.leftovers() == [killed]
    store.drop_version(killed)
    assert store.leftovers() == [] and not store.client.has_collection(sidecar.name_of(killed))
    assert store.resolve("orphan") == version
