import numpy as np
import pytest
import torch

from patchcore_milvus.coreset import (
    coreset_size,
    covering_radius,
    extend_coreset,
    greedy_coreset,
    greedy_coreset_plain,
    random_projection,
)


def clustered(n: int = 3000, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Clusters of unequal weight on a 6-dim subspace, plus a little noise: like patch features,
    whose variation is far lower-dimensional than their number of channels."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, 6, generator=generator) * 5
    weights = torch.tensor([40.0, 20, 10, 5, 5, 5, 4, 3, 3, 2, 2, 1])
    labels = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=generator)
    latent = centres[labels] + torch.randn(n, 6, generator=generator)
    embedding = torch.randn(6, dim, generator=generator)
    return latent @ embedding + 0.05 * torch.randn(n, dim, generator=generator)


def test_same_seed_same_picks_other_seed_other_picks():
    features = clustered()
    first = greedy_coreset(random_projection(features, 16, 3), 100, seed=3).picks
    again = greedy_coreset(random_projection(features, 16, 3), 100, seed=3).picks
    other = greedy_coreset(random_projection(features, 16, 4), 100, seed=4).picks
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_picks_are_distinct_and_in_range():
    features = clustered()
    picks = greedy_coreset(random_projection(features, 32, 0), 300).picks
    assert len(picks) == 300 == len(set(picks.tolist()))
    assert picks.min() >= 0 and picks.max() < len(features)


def test_covering_radius_beats_a_random_subset_of_the_same_size():
    features = clustered()
    picks = greedy_coreset(random_projection(features, 32, 0), 150, seed=0).picks
    greedy_radius = covering_radius(features, picks)
    random_radii = [
        covering_radius(features, np.random.default_rng(s).choice(len(features), 150, replace=False)) for s in range(5)
    ]
    assert greedy_radius < min(random_radii)


def test_each_pick_is_the_farthest_point_from_the_previous_picks():
    """Algorithm 1, checked against a direct computation without projection."""
    features = clustered(n=400, dim=8)
    picks = greedy_coreset(features, 20).picks
    for i in range(1, 20):
        distances = torch.cdist(features, features[torch.as_tensor(picks[:i])]).min(dim=1).values
        assert distances[picks[i]] >= distances.max() - 1e-3


def test_projection_keeps_small_features_and_reduces_large_ones():
    features = clustered(n=50, dim=64)
    assert random_projection(features, 128, 0).shape == (50, 64)
    assert random_projection(features, 16, 0).shape == (50, 16)


def test_size_from_ratio_or_count():
    assert coreset_size(1000, 0.1, None) == 100
    assert coreset_size(1000, 0.1, 37) == 37
    assert coreset_size(10, 0.001, None) == 1
    assert coreset_size(10, 0.5, 500) == 10


def test_pruning_skips_work_but_not_picks():
    """The triangle-inequality pruning is exact: the same picks as the textbook loop."""
    features = clustered(n=5000, dim=32, seed=1)
    projected = random_projection(features, 16, 2)
    np.testing.assert_array_equal(
        greedy_coreset(projected, 400, seed=2).picks, greedy_coreset_plain(projected, 400, seed=2)
    )
    # Exact duplicates: the 100 distinct rows come first and alike; beyond them every distance is 0
    # up to rounding, so which duplicate comes next is a tie that rounding decides.
    duplicated = torch.cat([features[:100]] * 3)
    projected = random_projection(duplicated, 16, 0)
    pruned, plain = greedy_coreset(projected, 150).picks, greedy_coreset_plain(projected, 150)
    np.testing.assert_array_equal(pruned[:100] % 100, plain[:100] % 100)
    assert covering_radius(duplicated, pruned) == pytest.approx(covering_radius(duplicated, plain))


def test_picks_split_between_threads_are_the_same():
    """Picks that look at more rows than PARALLEL_ROWS are split between threads: still the
    textbook loop's picks (scattered rows: the first picks re-examine nearly all of them)."""
    from patchcore_milvus.coreset import _PARALLEL_ROWS

    projected = torch.randn(_PARALLEL_ROWS + 20000, 12, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(greedy_coreset(projected, 60).picks, greedy_coreset_plain(projected, 60))


def test_pruned_loop_matches_the_reference_through_many_picks():
    """Half the rows picked: clusters shrink to single rows, the pool of row blocks is compacted
    many times, and every row is picked once when all are asked for."""
    projected = random_projection(clustered(n=3000, dim=24, seed=5), 20, 1)
    np.testing.assert_array_equal(
        greedy_coreset(projected, 1500, seed=1).picks, greedy_coreset_plain(projected, 1500, 1)
    )
    everything = greedy_coreset(projected, 3000, seed=1)
    assert sorted(everything.picks) == list(range(3000))
    assert everything.radius == 0.0


def test_the_coreset_reports_its_covering_radius():
    projected = random_projection(torch.randn(3000, 24), 8, 0)
    coreset = greedy_coreset(projected, 200)
    assert coreset.radius == pytest.approx(covering_radius(projected, coreset.picks), rel=1e-4)


def test_extending_a_coreset_covers_new_rows_as_well_as_the_old_ones():
    old_rows = torch.randn(2000, 8)
    new_rows = torch.cat([torch.randn(500, 8), torch.randn(300, 8) + 6.0])  # partly like the old, partly new
    coreset = greedy_coreset(old_rows, 100)
    centres = old_rows[torch.as_tensor(coreset.picks)]
    nearest = torch.cdist(new_rows, centres).min(dim=1).values.square()
    added = extend_coreset(new_rows, nearest, coreset.radius, limit=800)
    assert 0 < len(added) < 400
    assert (added >= 0).all() and len(set(added.tolist())) == len(added)
    everything = torch.cat([centres, new_rows[torch.as_tensor(added)]])
    assert float(torch.cdist(new_rows, everything).min(dim=1).values.max()) <= coreset.radius + 1e-5
    # Most additions serve the shifted rows the old coreset did not cover.
    assert (added >= 500).mean() > 0.8
    assert len(extend_coreset(new_rows, nearest, coreset.radius, limit=5)) == 5
