"""Images to patch features: preprocessing and an extractor on a runtime, torch-free at a station.

The reference extractor is torch (`torch_extractor.py`); ingest exports it to ONNX and the bank
carries the model (see milvus/rows.py), so that a station builds its extractor from the bank:
`FeaturePipeline.from_model` needs only ONNX Runtime and numpy, never torch or the weights.
`runtime: torch` runs the torch reference instead.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import numpy as np

from patchcore_milvus.config import Config, stage_threads
from patchcore_milvus.description import ExtractorDescription, ExtractorModel
from patchcore_milvus.errors import BankMismatchError
from patchcore_milvus.images import Preprocess
from patchcore_milvus.tiling import run_tiled, tile_shape


class FeaturePipeline:
    """Preprocessing plus extractor: (B, 3, H, W) float32 batches -> (B, H/8, W/8, D) patch
    features (tile by tile where the description has a tile, see tiling.py); with the description
    a bank records to refuse mismatches, and, on ONNX Runtime, the model itself."""

    def __init__(
        self,
        description: ExtractorDescription,
        run: Callable[[np.ndarray], np.ndarray],
        model: bytes | None = None,
    ):
        self.description = description
        self.preprocess = preprocess_of(description)
        self.run = run
        self.model = model  # the ONNX model run, or None on torch

    @classmethod
    def from_config(cls, config: Config, image_shape: tuple[int, int] | None = None) -> FeaturePipeline:
        """The configured backbone and weights (torch), run on the configured runtime, for images
        resized to `image_shape` (height, width; default `image_size` squared). On ONNX Runtime, an
        extractor exported before on this machine is taken from the cache (see exported.py),
        without torch."""
        from patchcore_milvus import exported

        key = exported.cache_key(config, image_shape) if config.runtime == "onnx" else None  # hashes the weights
        if key is not None:
            cached = exported.load(key)
            if cached is not None:
                description, model = cached
                return cls(description, _onnx_session(model, config.num_threads), model)
        import torch

        from patchcore_milvus import torch_extractor

        torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
        extractor, description = torch_extractor.build(config, image_shape)
        if config.runtime == "torch":

            def run(batch: np.ndarray) -> np.ndarray:
                return extractor(torch.from_numpy(batch)).numpy()

            return cls(description, run)
        shape = preprocess_of(description).input_shape
        if description.tile is not None:
            shape = tile_shape(shape, description.tile)
        model = torch_extractor.export_onnx(extractor, shape)
        if key is not None:
            exported.save(key, description, model)
        return cls(description, _onnx_session(model, config.num_threads), model)

    @classmethod
    def from_model(
        cls, description: ExtractorDescription, stored: ExtractorModel, model: bytes, config: Config
    ) -> FeaturePipeline:
        """A bank's own extractor, from the ONNX model it carries (checked against its checksum)."""
        checksum = hashlib.sha256(model).hexdigest()
        if checksum != stored.sha256:
            raise BankMismatchError(
                f"the extractor model stored with the bank is damaged (checksum {checksum[:12]}, recorded "
                f"{stored.sha256[:12]}); re-ingest the category"
            )
        return cls(description, _onnx_session(model, config.num_threads), model)

    @property
    def dim(self) -> int:
        return self.description.dim

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.description.tile is not None:
            return run_tiled(self.run, batch, self.description.tile)
        return self.run(batch)


def preprocess_of(description: ExtractorDescription) -> Preprocess:
    """How the extractor described wants its images: size, crop and normalisation."""
    normalization = description.normalization
    return Preprocess(
        description.image_size,
        description.center_crop,
        tuple(normalization["mean"]),
        tuple(normalization["std"]),
        description.shape,
    )


def _onnx_session(model: bytes, threads: int | None) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or stage_threads()
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {"images": batch})[0]

    return run
