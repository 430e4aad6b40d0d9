"""Approximate search may not decide a verdict: its misses are settled, its width is measured
against exact search before a bank is published, and no setting can make every image OK."""

from pathlib import Path

import numpy as np
import pytest
from conftest import textured_image

from patchcore_milvus import Bank, BankStore, Config, fit_bank
from patchcore_milvus.ann_check import MIN_RECALL, recall_at_1, same_distance
from patchcore_milvus.errors import CalibrationError, ConfigError, IndexTooPoorError
from patchcore_milvus.exact import ExactSearch
from patchcore_milvus.images import list_images
from patchcore_milvus.scoring import reweighting_factor, settle_largest
from patchcore_milvus.thresholds import calibrate


def test_settling_finds_the_true_largest_distance_behind_approximate_misses():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(500, 16)).astype(np.float32)
    patches = rng.normal(size=(3, 64, 16)).astype(np.float32)
    exact = ExactSearch(bank)
    true, true_ids = exact(patches.reshape(-1, 16), 1)
    true, true_ids = true[:, 0].reshape(3, 64), true_ids[:, 0].reshape(3, 64)
    # An approximate search that missed for 20 patches of each image: it returned a real bank
    # vector far from them (as the Milvus 2.3.5 server did on bottle), never one that is too close.
    distances, ids = true.copy(), true_ids.copy()
    far = np.argsort(-np.linalg.norm(bank, axis=1))[0]
    for i in range(3):
        missed = rng.choice(64, size=20, replace=False)
        ids[i, missed] = far
        distances[i, missed] = np.linalg.norm(patches[i, missed] - bank[far], axis=1)
    assert (distances.max(axis=1) > true.max(axis=1) + 1).all()  # the miss would decide the score

    rechecked = settle_largest(distances, ids, patches, lambda vectors: exact(vectors, 1), per_round=4)
    np.testing.assert_allclose(distances.max(axis=1), true.max(axis=1), rtol=1e-6)
    assert (ids[np.arange(3), distances.argmax(axis=1)] == true_ids[np.arange(3), true.argmax(axis=1)]).all()
    assert (rechecked >= 20).all() and (rechecked < 64).all()  # the misses, not every patch


def test_settling_stops_at_once_when_the_search_was_exact():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(200, 8)).astype(np.float32)
    patches = rng.normal(size=(2, 30, 8)).astype(np.float32)
    exact = ExactSearch(bank)
    distances, ids = (a[:, 0].reshape(2, 30) for a in exact(patches.reshape(-1, 8), 1))
    rechecked = settle_largest(distances, ids, patches, lambda vectors: exact(vectors, 1), per_round=4)
    assert rechecked.tolist() == [4, 4]  # one round: the largest was already right


def test_a_rechecked_patch_takes_the_exact_distance_also_where_the_index_reported_less():
    """SQ indexes report distances on quantised vectors, which can be too small: a rechecked patch
    must end at its exact distance either way."""
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(200, 8)).astype(np.float32)
    patches = rng.normal(size=(1, 30, 8)).astype(np.float32)
    exact = ExactSearch(bank)
    true, true_ids = (a[:, 0].reshape(1, 30) for a in exact(patches.reshape(-1, 8), 1))
    distances, ids = true * 0.9, true_ids.copy()  # every distance 10 % too small
    settle_largest(distances, ids, patches, lambda vectors: exact(vectors, 1), per_round=4)
    worst = true.argmax()
    assert distances[0, worst] == pytest.approx(true[0, worst], rel=1e-6)


def test_the_reweighting_refuses_to_run_without_neighbours():
    with pytest.raises(ValueError, match="at least one of its neighbours"):
        reweighting_factor(np.zeros(3, np.float32), np.ones((1, 3), np.float32))


def test_float32_rounding_is_no_miss_but_a_farther_neighbour_is():
    norms = np.array([100.0, 100.0])
    assert same_distance(np.array([1.0479]), np.array([1.0458]), norms[:1]).all()  # seen: Milvus vs torch
    assert not same_distance(np.array([10.5]), np.array([10.0]), norms[:1]).any()
    assert recall_at_1(np.array([1.0, 9.0]), np.array([3, 4]), np.array([1.0, 2.0]), np.array([3, 5]), norms) == 0.5


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"search_params": {"ef": 0}}, "ef must be a whole number from 1"),
        ({"search_params": {"eff": 16}}, "did you mean 'ef'"),
        ({"search_params": {"ef": "abc"}}, "ef must be a whole number"),
        ({"index_params": {"M": 0}}, "M must be a whole number from 2"),
        ({"index_params": {"M": "abc"}}, "M must be a whole number"),
        ({"index_params": {"nlist": 8}}, "HNSW takes no parameter 'nlist'"),
        ({"image_threshold": float("nan")}, "image_threshold must be a finite number"),
        ({"pixel_threshold": float("inf")}, "pixel_threshold must be a finite number"),
        ({"threshold_sigma": float("inf")}, "threshold_sigma must be a finite number"),
        ({"milvus_timeout": 1e-9}, "milvus_timeout must be at least 0.1"),
    ],
)
def test_settings_that_could_make_every_verdict_ok_are_refused(settings: dict, fragment: str):
    with pytest.raises(ConfigError, match=fragment):
        Config(**settings)


def test_calibration_refuses_non_finite_scores():
    with pytest.raises(CalibrationError, match="finite"):
        calibrate(np.array([1.0, np.nan]), 4.0)


@pytest.fixture
def ivf_bank(good_folder: Path, small_config: Config) -> Config:
    config = small_config.replace(index_type="IVF_FLAT", index_params={"nlist": 16})
    fit_bank("texture", list_images(good_folder), config)
    return config


def test_ingest_widens_a_search_that_misses_and_records_what_it_measured(ivf_bank: Config):
    store = BankStore(ivf_bank.uri)
    search = store.read_description(store.resolve("texture")).search
    assert search.recall_at_1 >= MIN_RECALL and search.probes > 0


def test_a_chosen_search_too_narrow_for_the_bank_is_refused_at_ingest(good_folder: Path, small_config: Config):
    config = small_config.replace(index_type="IVF_FLAT", index_params={"nlist": 16}, search_params={"nprobe": 1})
    with pytest.raises(ConfigError, match="find the exact nearest neighbour for only"):
        fit_bank("texture", list_images(good_folder), config)
    assert BankStore(config.uri).list_banks() == []  # nothing published


def test_a_query_with_the_narrowest_search_still_scores_as_exact_search(ivf_bank: Config, tmp_path: Path):
    paths = []
    for i, defect in [(100, False), (101, True), (102, False)]:
        paths.append(tmp_path / f"{i}.png")
        textured_image(i, defect=defect).save(paths[-1])
    narrow = Bank.open("texture", ivf_bank.replace(search_params={"nprobe": 1}))
    exact = Bank.open("texture", ivf_bank).with_exact_search()
    for (_, got), (_, want) in zip(narrow.score_paths(paths), exact.score_paths(paths)):
        assert got.image_score == pytest.approx(want.image_score, rel=1e-4)
        assert got.verdict == want.verdict


def test_search_params_of_another_index_type_are_refused_for_the_bank(ivf_bank: Config):
    with pytest.raises(ConfigError, match="IVF_FLAT takes no parameter 'ef'"):
        Bank.open("texture", ivf_bank.replace(index_type="HNSW", index_params={}, search_params={"ef": 16}))


def test_a_quantised_distance_too_small_cannot_hide_the_worst_patch(
    good_folder: Path, small_config: Config, tmp_path: Path
):
    """An SQ index compares quantised vectors, so it may report the worst patch closer than the
    others: the score must still be exact search's."""
    config = small_config.replace(index_type="IVF_SQ8", index_params={"nlist": 16})
    fit_bank("texture", list_images(good_folder), config)
    bank, exact = Bank.open("texture", config), Bank.open("texture", config).with_exact_search()
    milvus = bank.search

    def quantised(version: str, vectors: np.ndarray, top_k: int, params: dict) -> tuple[np.ndarray, np.ndarray]:
        distances, ids = milvus(version, vectors, top_k, params)
        distances[distances[:, 0].argmax(), 0] *= 0.1  # the worst patch reported far too close
        return distances, ids

    bank.search = quantised
    path = tmp_path / "bad.png"
    textured_image(101, defect=True).save(path)
    [(_, got)], [(_, want)] = bank.score_paths([path]), exact.score_paths([path])
    assert got.image_score == pytest.approx(want.image_score, rel=1e-4)


def test_a_quantised_index_that_moves_nearest_neighbours_is_refused_with_the_reason(
    good_folder: Path, small_config: Config
):
    config = small_config.replace(index_type="HNSW_SQ")  # on these patches: 99.74 % at ef 32768
    with pytest.raises(IndexTooPoorError, match=r"compares quantised vectors.*use HNSW or IVF_FLAT"):
        fit_bank("texture", list_images(good_folder), config)
    assert BankStore(config.uri).list_banks() == []
