"""Tiled extraction: where the tiles lie, that stitching puts each patch in its place, and a tiled
bank from ingest to map on real Milvus Lite."""

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from conftest import score_good_and_bad, textured_image

from patchcore_milvus import Bank, Config, fit_bank
from patchcore_milvus.errors import BankMismatchError, ConfigError
from patchcore_milvus.features import FeaturePipeline
from patchcore_milvus.images import list_images, load_rgb
from patchcore_milvus.tiling import axis_tiles, margin, run_tiled


@pytest.mark.parametrize("tile", [64, 128, 256])
@pytest.mark.parametrize("length", [64, 128, 144, 256, 272, 512, 640, 1008, 2048])
def test_tiles_cover_the_axis_once_and_keep_their_margin(length: int, tile: int):
    tiles = axis_tiles(length, tile)
    assert tiles[0][1] == 0 and tiles[-1][2] == length
    for (_, _, end), (_, first, _) in pairwise(tiles):
        assert end == first  # each patch from exactly one tile
    for origin, first, end in tiles:
        assert origin % 16 == 0 and first % 8 == 0 and end % 8 == 0
        assert 0 <= origin <= first < end <= origin + min(tile, length) <= length
        # No patch is taken from within the margin of a tile edge, except where that edge is the image's.
        assert first == 0 or first - origin >= margin(tile)
        assert end == length or origin + tile - end >= margin(tile)
    if length > tile:
        assert len(tiles) == -(-(length - tile) // (tile - 2 * margin(tile))) + 1  # the fewest that keep the margin


def test_stitching_puts_every_patch_where_the_whole_image_has_it():
    """With an extractor that sees nothing but each patch's own pixels, tiles stitched are exactly
    the whole image; with one that reports where in its tile a patch lies, none comes from a tile's
    margin."""
    rng = np.random.default_rng(0)
    batch = rng.random((2, 3, 272, 528), dtype=np.float32)

    def own_pixels(x: np.ndarray) -> np.ndarray:
        b, c, h, w = x.shape
        return x.reshape(b, c, h // 8, 8, w // 8, 8).mean(axis=(3, 5)).transpose(0, 2, 3, 1)

    assert np.array_equal(run_tiled(own_pixels, batch, 128), own_pixels(batch))
    narrow = batch[:, :, :96]  # shorter than a tile on one axis: one row of tiles, 96 x 128 each
    assert np.array_equal(run_tiled(own_pixels, narrow, 128), own_pixels(narrow))

    def place_in_tile(x: np.ndarray) -> np.ndarray:
        b, _, h, w = x.shape
        y, x_ = np.mgrid[0 : h // 8, 0 : w // 8]
        return np.broadcast_to(np.stack([y, x_, h // 8 - 1 - y, w // 8 - 1 - x_], -1), (b, h // 8, w // 8, 4))

    distances = run_tiled(place_in_tile, batch, 128)  # cells from each tile edge
    inner = distances[:, 4:-4, 4:-4]  # away from the image's own edges (margin 16 px = 2 cells)
    assert inner.min() >= margin(128) // 8


def test_tiled_features_on_onnx_runtime_match_torch_and_the_whole_image_on_real_images(bottle_root: Path):
    """bottle at 512 px in 256 px tiles: ONNX Runtime gives the torch reference's tiled features,
    and those lie near the whole image's (the network sees less context at tile edges)."""
    paths = list_images(bottle_root / "test" / "broken_large")[:2]
    tiled = FeaturePipeline.from_config(Config(image_size=512, tile=256))
    reference = FeaturePipeline.from_config(Config(image_size=512, tile=256, runtime="torch"))
    whole = FeaturePipeline.from_config(Config(image_size=512, runtime="torch"))
    assert tiled.description.tile == 256 and whole.description.tile is None
    batch = np.stack([tiled.preprocess(load_rgb(path)) for path in paths])
    ours, theirs, full = tiled(batch), reference(batch), whole(batch)
    assert ours.shape == full.shape == (2, 64, 64, 152)
    assert float(np.abs(ours - theirs).max()) <= 1e-5 * float(np.abs(theirs).max())
    relative = np.linalg.norm(ours - full, axis=-1) / np.linalg.norm(full, axis=-1)
    assert float(np.median(relative)) < 0.1  # measured: 0.027 (the same tiles, torch)
    assert not np.allclose(ours, full)  # the tiles are what ran, not the whole image


def test_a_tiled_bank_scores_at_its_finer_scale_and_refuses_another_tile(small_config: Config, tmp_path: Path):
    """96 px images at image_size 128 in 64 px tiles: the grid is the whole input's (16 x 16), the
    model carried by the bank has the tile's shape, the defect is found where it was painted."""
    folder = tmp_path / "good"
    folder.mkdir()
    for seed in range(8):
        textured_image(seed).save(folder / f"{seed:03d}.png")
    config = small_config.replace(image_size=128, tile=64)
    summary = fit_bank("tiled", list_images(folder), config)
    assert summary.patches == 8 * 16 * 16
    bank = Bank.open("tiled", config.replace(tile=None))  # the bank carries its tiling
    assert bank.description.extractor.tile == 64 and bank.description.schema == 6
    good, bad = score_good_and_bad(bank, tmp_path)
    assert bad.patch_distances.shape == (16, 16) and bad.anomaly_map.shape == (96, 96)
    assert bad.verdict == "DEFECT" and good.verdict == "OK"
    peak_y, peak_x = np.unravel_index(bad.anomaly_map.argmax(), bad.anomaly_map.shape)
    assert 28 <= peak_y <= 55 and 44 <= peak_x <= 70  # the painted square spans y 32-51, x 48-67
    reference = Bank.open("tiled", config.replace(runtime="torch"))
    [(_, again)] = reference.score_paths([tmp_path / "bad.png"])
    assert again.image_score == pytest.approx(bad.image_score, rel=1e-4)
    with pytest.raises(BankMismatchError, match="tile: bank has 64, this query uses 128"):
        Bank.open("tiled", config.replace(tile=128))


def test_ingest_takes_the_tile_as_a_flag(good_folder: Path, tmp_path: Path):
    from click.testing import CliRunner

    from patchcore_milvus.cli import main
    from patchcore_milvus.milvus import BankStore

    uri = str(tmp_path / "flag.db")
    settings = ["--images", str(good_folder), "--uri", uri, "--image-size", "128", "--tile", "64", "--no-progress"]
    result = CliRunner().invoke(main, ["ingest", "--category", "flagged", *settings, "--coreset-ratio", "0.25"])
    assert result.exit_code == 0, result.output
    store = BankStore(uri)
    assert store.read_description(store.resolve("flagged")).extractor.tile == 64


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tile": 100}, "tile must be a multiple of 16"),
        ({"tile": 32}, "tile must be a multiple of 16 from 64"),
        ({"tile": 128, "image_size": 300}, "with tile, image_size and center_crop must be multiples of 16"),
        ({"tile": 128, "center_crop": 250}, "with tile, image_size and center_crop must be multiples of 16"),
    ],
)
def test_a_tile_that_cannot_lie_on_the_grid_is_refused(options: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        Config(**options)


def test_a_tile_covering_the_whole_input_is_refused_at_ingest_before_milvus(good_folder: Path, small_config: Config):
    config = small_config.replace(image_size=128, tile=128)
    with pytest.raises(ConfigError, match="tile 128 is not smaller than the 128 x 128 input"):
        fit_bank("whole", list_images(good_folder), config)
    assert not Path(config.uri).exists()
