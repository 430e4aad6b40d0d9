"""`search: local`: a station's replica of the bank version, against a real Milvus Lite file."""

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import textured_image

from patchcore_milvus import Bank, BankStore, Config, fit_bank
from patchcore_milvus.images import list_images
from patchcore_milvus.replica import LocalReplicas, Replica


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


def test_local_search_scores_as_exact_search_and_caches_its_replica(local: Config, tmp_path: Path):
    paths = queries(tmp_path)
    bank = Bank.open("texture", local)
    exact = Bank.open("texture", local.replace(search="milvus")).with_exact_search()
    for (_, got), (_, want) in zip(bank.score_paths(paths), exact.score_paths(paths)):
        assert got.image_score == pytest.approx(want.image_score, rel=1e-4) and got.verdict == want.verdict
        np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, rtol=1e-3, atol=1e-3)
    [index] = (tmp_path / "cache").rglob("*.faiss")
    assert index.stem == bank.version and index.with_suffix(".npy").is_file()
    written = index.stat().st_mtime_ns
    Bank.open("texture", local)  # loaded from the cache, checked, not rebuilt
    assert index.stat().st_mtime_ns == written


def test_a_replica_that_no_longer_matches_milvus_is_rebuilt(local: Config, tmp_path: Path):
    store = BankStore(local.uri)
    version = store.resolve("texture")
    replicas = LocalReplicas(store)
    good = replicas.prepare(version)
    Replica(good.index, good.vectors[:-1]).save(replicas.cache, version)  # a row short
    rebuilt = LocalReplicas(store).prepare(version)
    assert len(rebuilt.vectors) == len(good.vectors)
    np.testing.assert_array_equal(rebuilt.vectors, store.read_vectors(version))


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
    while not list((tmp_path / "cache").rglob(f"{second}.faiss")):
        assert time.monotonic() < deadline, "the new replica was never built"
        time.sleep(0.2)
    again = [result for _, result in bank.score_paths(paths)]
    for before, after in zip(results, again):
        assert after.image_score == pytest.approx(before.image_score, rel=1e-4)
