"""Fit a bank: good images -> patch features -> coreset -> Milvus -> calibrated thresholds."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from patchcore_milvus import __version__
from patchcore_milvus.bank import Bank
from patchcore_milvus.config import Config
from patchcore_milvus.coreset import coreset_size, greedy_coreset, projection_matrix
from patchcore_milvus.errors import ImageError
from patchcore_milvus.features import FeaturePipeline
from patchcore_milvus.images import load_rgb
from patchcore_milvus.store import BankStore, validate_category
from patchcore_milvus.thresholds import RULE, calibrate, holdout_split


@dataclass
class IngestSummary:
    category: str
    collection: str
    images: int
    holdout_images: int
    patches: int
    coreset_size: int
    dim: int
    index: str
    image_threshold: float | None
    pixel_threshold: float | None
    seconds: dict[str, float]

    def lines(self) -> list[str]:
        def fmt(value: float | None) -> str:
            return "none (no held-out images)" if value is None else f"{value:.4f}"

        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        return [
            f"bank {self.category} -> collection {self.collection}",
            f"images: {self.images} in the bank, {self.holdout_images} held out for thresholds",
            f"patches: {self.patches}, coreset: {self.coreset_size} x {self.dim} dims, index {self.index}",
            f"thresholds: image {fmt(self.image_threshold)}, pixel {fmt(self.pixel_threshold)}",
            f"time: {stages}",
        ]


@dataclass
class PatchSet:
    """Patch features of the bank images: full dims on disk, only the coreset's projection in RAM,
    so that ingest memory grows with the projected dims, not the feature dims."""

    full: np.ndarray  # (N, D) float32, memory-mapped read-only from a file
    projected: torch.Tensor  # (N, p) float32
    positions: np.ndarray  # (N, 3) int32: image index, patch y, patch x


def extract_patches(
    features: FeaturePipeline,
    paths: list[Path],
    batch_size: int,
    projection_dim: int,
    seed: int,
    folder: Path,
    progress: bool,
) -> PatchSet:
    """Features of every patch of `paths`, appended to `folder/patches.f32` batch by batch.

    Plain file writes, not a writable memory map: written pages stay in the page cache, which
    the kernel can drop, instead of in the process' resident memory.
    """
    matrix = projection_matrix(features.dim, projection_dim, seed)
    target = folder / "patches.f32"
    projected = torch.empty(0)  # allocated once the first batch shows the patch grid
    positions: list[np.ndarray] = []
    with target.open("wb") as handle, tqdm(total=len(paths), desc="features", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([features.preprocess(load_rgb(p)) for p in paths[start : start + batch_size]])
            patches = features(batch)
            n, h, w, d = patches.shape
            flat = patches.reshape(-1, d)
            handle.write(flat.numpy().tobytes())
            if start == 0:  # every image gives the same grid: allocate once, no concatenation later
                projected = torch.empty(len(paths) * h * w, d if matrix is None else matrix.shape[1])
            projected[start * h * w : (start + n) * h * w] = flat if matrix is None else flat @ matrix
            grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), axis=-1).reshape(-1, 2)
            image = np.repeat(np.arange(start, start + n), h * w)
            positions.append(np.column_stack([image, np.tile(grid, (n, 1))]).astype(np.int32))
            bar.update(n)
    return PatchSet(
        full=np.memmap(target, dtype=np.float32, mode="r", shape=(len(projected), features.dim)),
        projected=projected,
        positions=np.concatenate(positions),
    )


def fit_bank(
    category: str, images: list[Path], config: Config, store: BankStore | None = None, root: Path | None = None
) -> IngestSummary:
    """Build `category`'s bank from good `images` and publish it; the previous bank serves until then.

    `root`: image names are recorded relative to it (default: the images' common folder).
    """
    validate_category(category)
    if not images:
        raise ImageError(f"no images to ingest for category {category!r}")
    store = store or BankStore.from_config(config)
    root = root or Path(os.path.commonpath([Path(p).parent for p in images]))
    names = [str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else str(p) for p in images]
    bank_idx, held_idx = holdout_split(len(images), config.holdout_ratio, config.seed)
    seconds: dict[str, float] = {}

    features = FeaturePipeline(config)
    with tempfile.TemporaryDirectory(prefix="patchcore-ingest-") as work:
        t = time.perf_counter()
        patches = extract_patches(
            features,
            [images[i] for i in bank_idx],
            config.batch_size,
            config.projection_dim,
            config.seed,
            Path(work),
            config.progress,
        )
        seconds["features"] = time.perf_counter() - t

        t = time.perf_counter()
        n_patches = len(patches.positions)
        size = coreset_size(n_patches, config.coreset_ratio, config.coreset_size)
        picks = greedy_coreset(patches.projected, size, config.seed, config.progress)
        seconds["coreset"] = time.perf_counter() - t

        vectors = patches.full[picks]  # the coreset, read back from disk
        sources = [names[bank_idx[patches.positions[i, 0]]] for i in picks]
        positions = patches.positions[picks, 1:]
    del patches  # the projected features go; the memory-mapped file went with the folder

    t = time.perf_counter()
    collection = store.create_version(category, features.dim)
    try:
        store.insert(collection, vectors, sources, positions)
        store.build_index(collection, config.index_type, config.effective_index_params)
        seconds["milvus"] = time.perf_counter() - t

        description: dict[str, Any] = {
            "category": category,
            "package_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "extractor": features.description,
            "coreset": {
                "projection_dim": config.projection_dim,
                "projection_seed": config.seed,
                "ratio": config.coreset_ratio,
                "size": int(size),
                "patches": n_patches,
            },
            "index": {"type": config.index_type, "params": config.effective_index_params},
            "training_images": {"root": str(root), "bank": [names[i] for i in bank_idx]},
        }
        t = time.perf_counter()
        description["thresholds"] = _calibrate_thresholds(
            Bank(store, None, collection, description, features, config),
            [images[i] for i in held_idx],
            [names[i] for i in held_idx],
            config.threshold_sigma,
        )
        seconds["thresholds"] = time.perf_counter() - t
        store.write_description(collection, description)
        store.verify(collection, len(vectors), probe_id=len(vectors) // 2, search_params=config.effective_search_params)
        store.publish(category, collection, keep=config.keep_versions)
    except BaseException:
        store.drop_version(collection)
        raise
    return IngestSummary(
        category=category,
        collection=collection,
        images=len(bank_idx),
        holdout_images=len(held_idx),
        patches=n_patches,
        coreset_size=int(size),
        dim=features.dim,
        index=config.index_type,
        image_threshold=description["thresholds"]["image"],
        pixel_threshold=description["thresholds"]["pixel"],
        seconds=seconds,
    )


def _calibrate_thresholds(bank: Bank, paths: list[Path], names: list[str], sigma: float) -> dict[str, Any]:
    """Score the held-out good images against the new bank and derive both thresholds."""
    if not paths:
        return {"image": None, "pixel": None, "rule": RULE, "sigma": sigma, "holdout": []}
    image_scores, map_maxima = [], []
    for _path, result in bank.score_paths(paths):
        if isinstance(result, ImageError):
            raise result
        image_scores.append(result.image_score)
        map_maxima.append(float(result.anomaly_map.max()))
    return {
        "image": calibrate(np.array(image_scores), sigma),
        "pixel": calibrate(np.array(map_maxima), sigma),
        "rule": RULE,
        "sigma": sigma,
        "holdout": [
            {"image": name, "score": round(s, 6), "map_max": round(m, 6)}
            for name, s, m in zip(names, image_scores, map_maxima)
        ],
    }
