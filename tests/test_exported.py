"""The on-disk cache of exported extractors: used when it matches, rebuilt when it does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from patchcore_milvus import exported, torch_extractor
from patchcore_milvus.config import Config
from patchcore_milvus.features import FeaturePipeline


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "patchcore-milvus" / "extractors"


def _no_torch_build(config: Config):
    raise AssertionError("the extractor was built with torch although it was cached")


def test_the_second_extractor_comes_from_the_cache_without_torch(cache: Path, monkeypatch: pytest.MonkeyPatch):
    first = FeaturePipeline.from_config(Config(image_size=64))
    assert len(list(cache.glob("*.onnx"))) == 1
    monkeypatch.setattr(torch_extractor, "build", _no_torch_build)
    second = FeaturePipeline.from_config(Config(image_size=64))
    assert second.model == first.model and second.description == first.description


def test_a_damaged_entry_is_rebuilt(cache: Path):
    first = FeaturePipeline.from_config(Config(image_size=64))
    [model] = cache.glob("*.onnx")
    model.write_bytes(model.read_bytes()[:1000])
    key = exported.cache_key(Config(image_size=64))
    assert key is not None and exported.load(key) is None
    again = FeaturePipeline.from_config(Config(image_size=64))
    assert again.model == first.model and model.read_bytes() == first.model


def test_the_key_follows_the_options_and_the_weights_file(cache: Path, tmp_path: Path):
    base = exported.cache_key(Config(image_size=64))
    assert base is not None
    assert exported.cache_key(Config(image_size=96)) != base
    assert exported.cache_key(Config(image_size=64, border="inside")) != base
    assert exported.cache_key(Config(image_size=64, seed=1)) == base  # the seed only matters for random weights
    assert exported.cache_key(Config(image_size=64, weights="random")) != exported.cache_key(
        Config(image_size=64, weights="random", seed=1)
    )
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"one")
    one = exported.cache_key(Config(image_size=64, weights=str(weights)))
    weights.write_bytes(b"two")
    assert exported.cache_key(Config(image_size=64, weights=str(weights))) != one
    assert exported.cache_key(Config(backbone="wide_resnet50_2")) is None  # its weights need torch to find
