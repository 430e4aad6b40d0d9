import math

import numpy as np
import pytest
import torch

from patchcore_milvus.images import Preprocess
from patchcore_milvus.scoring import anomaly_map, reweighting_factor


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


HALF = (0.5, 0.5, 0.5)


def test_a_constant_grid_gives_a_constant_map_and_a_peak_stays_in_place():
    preprocess = Preprocess(256, None, HALF, HALF)
    constant = anomaly_map(np.full((32, 32), 7.0, dtype=np.float32), preprocess, 4.0, 300, 200)
    assert constant.shape == (200, 300) and np.allclose(constant, 7.0, atol=1e-4)
    grid = np.zeros((32, 32), dtype=np.float32)
    grid[10, 20] = 5.0
    peaked = anomaly_map(grid, preprocess, 4.0, 256, 256)
    y, x = np.unravel_index(peaked.argmax(), peaked.shape)
    assert abs(y - 10.5 * 8) <= 1 and abs(x - 20.5 * 8) <= 1  # the patch's centre at 8 px a patch
    assert 0 < peaked.max() < 5.0  # blurred


def test_the_blur_scales_with_the_input_size():
    grid = np.zeros((32, 32), dtype=np.float32)
    grid[10, 10] = 5.0
    small = anomaly_map(grid, Preprocess(256, None, HALF, HALF), 4.0, 256, 256)
    # Doubling the input size doubles the blur, so the peak keeps its shape relative to the image.
    large = anomaly_map(grid, Preprocess(512, None, HALF, HALF), 4.0, 512, 512)
    assert large.max() == pytest.approx(small.max(), rel=0.05)


def test_a_cropped_away_border_scores_zero():
    amap = anomaly_map(np.ones((6, 6), dtype=np.float32), Preprocess(64, 48, HALF, HALF), 4.0, 64, 64)
    assert amap[0, 0] == 0.0 and amap[32, 32] == pytest.approx(1.0, abs=1e-4)


def test_maps_equal_the_torch_reference():
    """Numpy's one matrix a side gives what the earlier torch chain gave: interpolate to the
    input, a reflect-padded separable Gaussian convolution, interpolate to the original size."""
    import torch.nn.functional as F

    grid = np.random.default_rng(0).random((32, 24)).astype(np.float32) * 30
    sigma = 4.0
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = F.interpolate(torch.from_numpy(grid)[None, None], size=(256, 256), mode="bilinear", align_corners=False)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    reference = F.interpolate(x, size=(900, 700), mode="bilinear", align_corners=False)[0, 0].numpy()
    ours = anomaly_map(grid, Preprocess(256, None, HALF, HALF), sigma, 700, 900)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-3)


def test_a_non_square_input_maps_each_axis_on_its_own_and_blurs_alike():
    grid = np.zeros((8, 20), dtype=np.float32)  # a 64 x 160 input
    grid[2, 15] = 5.0
    wide = Preprocess(64, None, HALF, HALF, shape=(64, 160))
    amap = anomaly_map(grid, wide, 4.0, 500, 200)
    assert amap.shape == (200, 500)
    y, x = np.unravel_index(amap.argmax(), amap.shape)
    assert abs(y - 2.5 / 8 * 200) <= 4 and abs(x - 15.5 / 20 * 500) <= 4
    # The blur is 1 px of the 64 px short side in both directions: as wide as it is tall, in input pixels.
    rows, columns = amap[:, x] / amap.max(), amap[y, :] / amap.max()
    assert (rows > 0.5).sum() / 200 * 64 == pytest.approx((columns > 0.5).sum() / 500 * 160, rel=0.1)
