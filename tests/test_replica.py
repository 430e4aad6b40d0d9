"""A station's copies of the bank version (its vectors for the exact recheck; `search: local`'s
index), against a real Milvus Lite file."""

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import textured_image

from patchcore_milvus import Bank, BankStore, Config, fit_bank, replica
from patchcore_milvus.exact import ExactSearch
from patchcore_milvus.images import list_images
from patchcore_milvus.mirror import VersionVectors, digest


@pytest.fixture
def local(good_folder: Path, small_config: Config, tmp_path: Path, monkeypatch) -> Config:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fit_bank("texture", list_images(good_folder), small_config)
    return small_config.replace(search="local")


def queries(folder: Path) -> list[Path]:
    paths = []
    for seed, defect in [(100, False), (101, True), (102, False)]:
        paths.append(folder / f"{seed}.png")
        textured_image(seed, defect=defect).save(paths[-1])
    return paths


@pytest.mark.parametrize("kind", ["exhaustive", "HNSW"])
def test_local_search_scores_as_exact_search_and_caches_its_replica(
    local: Config, tmp_path: Path, monkeypatch, kind: str
):
    """A bank this small is searched exhaustively; HNSW is what a larger one gets."""
    if kind == "HNSW":
        monkeypatch.setattr(replica, "EXACT_UP_TO", 0)
    paths = queries(tmp_path)
    bank = Bank.open("texture", local)
    built = replica.Replica.load(next((tmp_path / "cache").rglob("*.faiss")))
    assert built is not None and built.exhaustive == (kind == "exhaustive")
    exact = Bank.open("texture", local.replace(search="milvus")).with_exact_search()
    for (_, got), (_, want) in zip(bank.score_paths(paths), exact.score_paths(paths)):
        assert got.image_score == pytest.approx(want.image_score, rel=1e-4) and got.verdict == want.verdict
        np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, rtol=1e-3, atol=1e-3)
    [index] = (tmp_path / "cache").rglob("*.faiss")
    [vectors] = (tmp_path / "cache").rglob(f"{bank.version}.*.npy")
    assert index.name == vectors.name.replace(".npy", ".faiss")  # the index names the vectors it was built from
    written = index.stat().st_mtime_ns
    Bank.open("texture", local)  # loaded from the cache, checked, not rebuilt
    assert index.stat().st_mtime_ns == written


def test_a_cached_index_of_the_other_kind_is_built_again(local: Config, tmp_path: Path, monkeypatch):
    """An HNSW index cached for a bank that is now small enough to search exhaustively (or the
    reverse, after EXACT_UP_TO changed) is not used as it is."""
    default = replica.EXACT_UP_TO
    monkeypatch.setattr(replica, "EXACT_UP_TO", 0)
    Bank.open("texture", local)
    [cached] = (tmp_path / "cache").rglob("*.faiss")
    assert not replica.Replica.load(cached).exhaustive
    monkeypatch.setattr(replica, "EXACT_UP_TO", default)
    Bank.open("texture", local)
    assert replica.Replica.load(cached).exhaustive


def test_the_recheck_of_a_milvus_bank_is_exact_over_the_version_s_vectors(local: Config, tmp_path: Path):
    bank = Bank.open("texture", local.replace(search="milvus"))
    vectors = BankStore(local.uri).read_vectors(bank.version)
    rng = np.random.default_rng(0)
    # Patches like the bank's and far from all of it (as a defect's are): exact for both.
    near = vectors[:50] + rng.normal(0, 0.1, (50, vectors.shape[1]))
    probes = np.concatenate([near, rng.normal(0, 30, (50, vectors.shape[1]))])
    got, got_ids = bank.precise(bank.version, probes, 3, {})
    want, want_ids = ExactSearch(vectors)(probes, 3)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert len(list((tmp_path / "cache").rglob(f"{bank.version}.*.npy"))) == 1  # cached for the next process


@pytest.mark.parametrize("damage", ["a row short", "another middle vector", "another row", "empty", "not an array"])
def test_a_cached_copy_that_no_longer_matches_milvus_is_read_again(local: Config, damage: str):
    store = BankStore(local.uri)
    version = store.resolve("texture")
    mirror = VersionVectors(store)
    good = mirror.vectors(version)
    path = mirror.folder / f"{version}.{digest(good)}.npy"
    assert path.is_file()
    path.unlink()
    if damage == "a row short":  # an intact file (its checksum right) that is not this version
        np.save(mirror.folder / f"{version}.{digest(good[:-1])}.npy", good[:-1])
    elif damage == "another middle vector":
        changed = good.copy()
        changed[len(good) // 2] += 1
        np.save(mirror.folder / f"{version}.{digest(changed)}.npy", changed)
    elif damage == "another row":  # damaged on disk: the checksum in its name no longer fits
        changed = good.copy()
        changed[0] += 1
        np.save(path, changed)
    elif damage == "empty":  # a rename that reached the disk before the data did
        path.write_bytes(b"")
    else:
        path.write_bytes(b"\x93NUMPY damaged")
    np.testing.assert_array_equal(VersionVectors(store).vectors(version), store.read_vectors(version))
    [cached] = mirror.folder.glob(f"{version}.*.npy")  # cached again, the bad copy gone
    assert cached == path
    np.testing.assert_array_equal(np.load(path), good)


def test_a_cache_that_cannot_be_written_still_scores(local: Config, tmp_path: Path, monkeypatch):
    (tmp_path / "readonly").write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "readonly"))
    bank = Bank.open("texture", local.replace(search="milvus"))
    exact = bank.with_exact_search()
    for (_, got), (_, want) in zip(bank.score_paths(queries(tmp_path)), exact.score_paths(queries(tmp_path))):
        assert got.image_score == pytest.approx(want.image_score, rel=1e-5)


def test_when_the_alias_moves_milvus_answers_until_the_new_replica_is_ready(
    local: Config, good_folder: Path, tmp_path: Path
):
    paths = queries(tmp_path)
    bank = Bank.open("texture", local)
    first = bank.version
    fit_bank("texture", list_images(good_folder), local.replace(search="milvus", coreset_size=40))
    results = [result for _, result in bank.score_paths(paths)]  # the new version, through Milvus meanwhile
    second = results[0].bank_version
    assert second != first and {r.bank_version for r in results} == {second}
    deadline = time.monotonic() + 120
    while not list((tmp_path / "cache").rglob(f"{second}.*.faiss")):
        assert time.monotonic() < deadline, "the new replica was never built"
        time.sleep(0.2)
    again = [result for _, result in bank.score_paths(paths)]
    for before, after in zip(results, again):
        assert after.image_score == pytest.approx(before.image_score, rel=1e-4)
