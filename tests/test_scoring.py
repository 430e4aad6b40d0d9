import math

import numpy as np
import pytest
import torch

from patchcore_milvus.images import Preprocess
from patchcore_milvus.scoring import anomaly_maps, gaussian_blur, reweighting_factor, to_original_size


def test_reweighting_matches_equation_7_by_hand():
    test_patch = np.zeros(3, dtype=np.float32)
    # m* at distance 1, its neighbours at distances 2 and 3.
    candidates = np.array([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0]], dtype=np.float32)
    expected = 1 - math.exp(1) / (math.exp(1) + math.exp(2) + math.exp(3))
    assert reweighting_factor(test_patch, candidates) == pytest.approx(expected, rel=1e-6)


def test_reweighting_is_smallest_in_a_dense_bank_region():
    test_patch = np.zeros(2, dtype=np.float32)
    dense = np.array([[1.0, 0.0]] * 10, dtype=np.float32)  # m* and 9 neighbours all equally close
    assert reweighting_factor(test_patch, dense) == pytest.approx(0.9, rel=1e-6)
    isolated = np.array([[1.0, 0.0]] + [[50.0, 0.0]] * 9, dtype=np.float32)
    assert reweighting_factor(test_patch, isolated) == pytest.approx(1.0, abs=1e-6)


def test_blur_keeps_a_constant_map_and_the_mass_of_a_peak():
    constant = torch.full((1, 40, 40), 7.0)
    assert torch.allclose(gaussian_blur(constant, 4.0), constant, atol=1e-5)
    peak = torch.zeros(1, 64, 64)
    peak[0, 32, 32] = 1.0
    blurred = gaussian_blur(peak, 2.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert blurred[0, 32, 32] < 0.1 and blurred.argmax().item() == 32 * 64 + 32


def test_maps_come_at_the_input_size_with_sigma_scaled():
    grid = torch.zeros(2, 32, 32)
    grid[1, 10, 10] = 5.0
    maps = anomaly_maps(grid, 256, 4.0)
    assert maps.shape == (2, 256, 256)
    assert maps[0].abs().max() == 0.0 and maps[1].max() > 0.0
    # Doubling the input size doubles the blur, so the peak keeps its shape relative to the image.
    larger = anomaly_maps(grid, 512, 4.0)
    assert larger[1].max().item() == pytest.approx(maps[1].max().item(), rel=0.05)


def test_original_size_and_cropped_border():
    half = (0.5, 0.5, 0.5)
    amap = torch.ones(48, 48)
    plain = to_original_size(amap, Preprocess(48, None, half, half), width=90, height=30)
    assert plain.shape == (30, 90) and np.allclose(plain, 1.0)
    cropped = to_original_size(amap, Preprocess(64, 48, half, half), width=64, height=64)
    assert cropped[0, 0] == 0.0 and cropped[32, 32] == pytest.approx(1.0)
