"""Fit a bank: good images -> patch features -> coreset -> Milvus -> calibrated thresholds."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from patchcore_milvus import __version__
from patchcore_milvus.ann_check import PROBE_PATCHES, SearchWidths, choose_search_widths
from patchcore_milvus.bank import Bank, check_extractor
from patchcore_milvus.config import Config
from patchcore_milvus.coreset import (
    coreset_size,
    extend_coreset,
    greedy_coreset,
    projection_matrix,
)
from patchcore_milvus.errors import BankMismatchError, ImageError, StoreError
from patchcore_milvus.exact import ExactSearch
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
    search: SearchWidths | None  # as measured against exact search before publishing; None if nothing was
    skipped: list[str] = field(default_factory=list)  # unusable files left out, with the reason
    # Set by `append_to_bank`: the version grown, new patches outside its coverage, vectors now.
    appended_to: str | None = None
    far_patches: int = 0
    bank_size: int = 0

    def lines(self) -> list[str]:
        def fmt(value: float | None) -> str:
            return "none (no held-out images)" if value is None else f"{value:.4f}"

        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        if self.search is None:  # an append that found nothing new
            return [
                *(f"skipped {reason}" for reason in self.skipped),
                f"nothing to add: all {self.patches} new patches lie within the covering radius of "
                f"{self.collection}, which stays as it is (no new version)",
                f"time: {stages}",
            ]
        if self.appended_to is None:
            bank = f"patches: {self.patches}, coreset: {self.coreset_size} x {self.dim} dims, index {self.index}"
        else:
            bank = (
                f"patches: {self.patches} new, {self.far_patches} farther than the bank's covering radius, "
                f"{self.coreset_size} added to {self.appended_to}: {self.bank_size} x {self.dim} dims, "
                f"index {self.index}"
            )
        return [
            *(f"skipped {reason}" for reason in self.skipped),
            f"bank {self.category} -> collection {self.collection}",
            f"images: {self.images} in the bank, {self.holdout_images} held out for thresholds"
            + (f", {len(self.skipped)} unusable files skipped" if self.skipped else ""),
            bank,
            f"search: {_params(self.search.params)} (recall@1 {self.search.recall_at_1:.4f} against exact search on "
            f"{self.search.probes} patches), worst patches rechecked at {_params(self.search.recheck)}",
            f"thresholds: image {fmt(self.image_threshold)}, pixel {fmt(self.pixel_threshold)}",
            f"time: {stages}",
        ]


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in params.items())


@dataclass
class BankContents:
    """What a new bank version holds, and the patches its search is checked on before publishing."""

    vectors: np.ndarray  # (n, dim) float32
    sources: list[str]  # the training image of each vector
    positions: np.ndarray  # (n, 2) int: patch y, x of each vector in its image
    probes: np.ndarray  # (m, dim) training patches the coreset left out: real queries with known answers


def probe_rows(n_rows: int, picks: np.ndarray, seed: int, count: int = PROBE_PATCHES) -> np.ndarray:
    """A seeded sample of the rows not picked for the bank (all rows where every one was picked)."""
    left = np.setdiff1d(np.arange(n_rows), picks)
    left = left if left.size else np.arange(n_rows)
    chosen = np.random.default_rng(seed).choice(left, size=min(count, left.size), replace=False)
    return np.sort(chosen)


@dataclass
class PatchSet:
    """Patch features of the bank images: full dims on disk, only the coreset's projection in RAM,
    so that ingest memory grows with the projected dims, not the feature dims."""

    full: np.ndarray  # (N, D) float32, memory-mapped read-only from a file
    projected: torch.Tensor  # (N, p) float32
    positions: np.ndarray  # (N, 3) int32: image index, patch y, patch x
    skipped: list[str]  # why each unusable file was left out


def extract_patches(
    features: FeaturePipeline,
    paths: list[Path],
    batch_size: int,
    projection_dim: int,
    seed: int,
    folder: Path,
    progress: bool,
    strict: bool = False,
) -> PatchSet:
    """Features of every patch of `paths`, appended to `folder/patches.f32` batch by batch.

    A file that is not a usable image is skipped, its reason kept in `skipped` (`strict`: raised).
    Plain file writes, not a writable memory map: written pages stay in the page cache, which
    the kernel can drop, instead of in the process' resident memory.
    """
    matrix = projection_matrix(features.dim, projection_dim, seed)
    target = folder / "patches.f32"
    projected = torch.empty(0)  # allocated once the first batch shows the patch grid
    positions: list[np.ndarray] = []
    skipped: list[str] = []
    rows = 0
    with target.open("wb") as handle, tqdm(total=len(paths), desc="features", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            loaded, indices = [], []
            for index in range(start, min(start + batch_size, len(paths))):
                try:
                    loaded.append(features.preprocess(load_rgb(paths[index])))
                    indices.append(index)
                except ImageError as exc:
                    if strict:
                        raise
                    skipped.append(str(exc))
            bar.update(min(batch_size, len(paths) - start))
            if not loaded:
                continue
            patches = features(torch.stack(loaded))
            n, h, w, d = patches.shape
            flat = patches.reshape(-1, d)
            handle.write(flat.numpy().tobytes())
            if rows == 0:  # every image gives the same grid: allocate once, no concatenation later
                projected = torch.empty(len(paths) * h * w, d if matrix is None else matrix.shape[1])
            projected[rows : rows + n * h * w] = flat if matrix is None else flat @ matrix
            rows += n * h * w
            grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), axis=-1).reshape(-1, 2)
            image = np.repeat(np.array(indices), h * w)
            positions.append(np.column_stack([image, np.tile(grid, (n, 1))]).astype(np.int32))
    if rows == 0:
        raise ImageError(f"none of the {len(paths)} images could be used:\n  " + "\n  ".join(skipped))
    return PatchSet(
        full=np.memmap(target, dtype=np.float32, mode="r", shape=(rows, features.dim)),
        projected=projected[:rows],
        positions=np.concatenate(positions),
        skipped=skipped,
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
    root, names = _names(images, root)
    bank_idx, held_idx = holdout_split(len(images), config.holdout_ratio, config.seed)
    seconds: dict[str, float] = {}
    features = FeaturePipeline(config)
    with tempfile.TemporaryDirectory(prefix="patchcore-ingest-") as work:
        patches = _bank_patches(features, [images[i] for i in bank_idx], config, Path(work), seconds)

        t = time.perf_counter()
        n_patches = len(patches.positions)
        size = coreset_size(n_patches, config.coreset_ratio, config.coreset_size)
        picks, radius = greedy_coreset(patches.projected, size, config.seed, config.progress)
        seconds["coreset"] = time.perf_counter() - t

        contents = BankContents(
            vectors=patches.full[picks],  # the coreset, read back from disk
            sources=[names[bank_idx[patches.positions[i, 0]]] for i in picks],
            positions=patches.positions[picks, 1:],
            probes=patches.full[probe_rows(n_patches, picks, config.seed)],
        )
        used, skipped = np.unique(patches.positions[:, 0]), patches.skipped
    del patches  # the projected features go; the memory-mapped file went with the folder

    description: dict[str, Any] = {
        "category": category,
        "package_version": __version__,
        "created": _now(),
        "origin": "ingest",
        "extractor": features.description,
        "coreset": {
            "projection_dim": config.projection_dim,
            "projection_seed": config.seed,
            "ratio": config.coreset_ratio,
            "size": int(size),
            "patches": n_patches,
            "radius": radius,
        },
        "index": {"type": config.index_type, "params": config.effective_index_params},
        "training_images": [{"root": str(root), "bank": [names[bank_idx[i]] for i in used]}],
    }
    held_out = [(images[i], names[i]) for i in held_idx]
    collection = _publish(store, category, features, config, contents, description, held_out, [], seconds)
    return _summary(
        category,
        collection,
        features,
        config,
        description,
        seconds,
        skipped,
        images=len(used),
        holdout_images=len(description["thresholds"]["holdout"]),
        patches=n_patches,
        coreset_size=int(size),
    )


def append_to_bank(
    category: str, images: list[Path], config: Config, store: BankStore | None = None, root: Path | None = None
) -> IngestSummary:
    """Grow `category`'s bank with new good `images` without re-reading the old ones.

    The new version holds the old bank plus greedy picks among the new patches that lie farther
    from the bank than its covering radius, until they too are covered that well (at most
    `coreset_ratio` of the new patches). Thresholds are re-derived from the old and the new
    held-out images.
    """
    validate_category(category)
    if not images:
        raise ImageError(f"no images to append to category {category!r}")
    store = store or BankStore.from_config(config)
    old = store.resolve(category)
    old_description = store.read_description(old)
    features = FeaturePipeline(config)
    check_extractor(category, old_description, features)
    old_coreset = old_description["coreset"]
    if "radius" not in old_coreset:
        raise BankMismatchError(f"bank {old} predates --append (no covering radius recorded); re-ingest it once")
    root, names = _names(images, root)
    bank_idx, held_idx = holdout_split(len(images), config.holdout_ratio, config.seed)
    seconds: dict[str, float] = {}
    old_rows = store.read_rows(old)
    with tempfile.TemporaryDirectory(prefix="patchcore-append-") as work:
        # The old bank's projection, so that distances compare with its radius.
        projection = config.replace(projection_dim=old_coreset["projection_dim"], seed=old_coreset["projection_seed"])
        patches = _bank_patches(features, [images[i] for i in bank_idx], projection, Path(work), seconds)

        t = time.perf_counter()
        matrix = projection_matrix(features.dim, old_coreset["projection_dim"], old_coreset["projection_seed"])
        old_vectors = torch.from_numpy(np.stack([row["vector"] for row in old_rows]))
        old_projected = old_vectors if matrix is None else old_vectors @ matrix
        nearest = torch.from_numpy(ExactSearch(old_projected.numpy())(patches.projected.numpy(), 1)[0][:, 0]) ** 2
        radius = float(old_coreset["radius"])
        n_patches = len(patches.positions)
        # Beyond the radius by more than float32 rounding: the patch that defines the radius, extracted
        # again in another batch and measured by another routine, lands a hair either side of it.
        far = (nearest > radius**2 * (1 + RADIUS_TOLERANCE)).nonzero().squeeze(1)
        if len(far) == 0:
            seconds["coreset"] = time.perf_counter() - t
            return IngestSummary(
                category=category,
                collection=old,
                images=len(np.unique(patches.positions[:, 0])),
                holdout_images=len(held_idx),
                patches=n_patches,
                coreset_size=0,
                dim=features.dim,
                index=old_description["index"]["type"],
                image_threshold=(old_description.get("thresholds") or {}).get("image"),
                pixel_threshold=(old_description.get("thresholds") or {}).get("pixel"),
                seconds=seconds,
                search=None,
                skipped=patches.skipped,
                appended_to=old,
                bank_size=len(old_rows),
            )
        limit = coreset_size(n_patches, config.coreset_ratio, config.coreset_size)
        picks = far[torch.as_tensor(extend_coreset(patches.projected[far], nearest[far], radius, limit))].numpy()
        seconds["coreset"] = time.perf_counter() - t

        contents = BankContents(
            vectors=np.concatenate([old_vectors.numpy(), patches.full[picks]]),
            sources=[row["image"] for row in old_rows] + [names[bank_idx[patches.positions[i, 0]]] for i in picks],
            positions=np.concatenate(
                [np.array([[row["patch_y"], row["patch_x"]] for row in old_rows]), patches.positions[picks, 1:]]
            ),
            probes=patches.full[probe_rows(n_patches, picks, config.seed)],
        )
        used, skipped = np.unique(patches.positions[:, 0]), patches.skipped
    del patches

    description = {
        **old_description,
        "created": _now(),
        "package_version": __version__,
        "origin": f"append to {old}",
        "coreset": {**old_coreset, "size": len(contents.vectors), "patches": old_coreset["patches"] + n_patches},
        "index": {"type": config.index_type, "params": config.effective_index_params},
        "training_images": [
            *old_description["training_images"],
            {
                "root": str(root),
                "bank": [names[bank_idx[i]] for i in used],
                "far_patches": len(far),
                "added": len(picks),
            },
        ],
    }
    old_holdout = (old_description.get("thresholds") or {}).get("holdout", [])
    held_out = [(images[i], names[i]) for i in held_idx]
    collection = _publish(store, category, features, config, contents, description, held_out, old_holdout, seconds)
    return _summary(
        category,
        collection,
        features,
        config,
        description,
        seconds,
        skipped,
        images=len(used),
        holdout_images=len(description["thresholds"]["holdout"]) - len(old_holdout),
        patches=n_patches,
        coreset_size=len(picks),
        appended_to=old,
        far_patches=len(far),
        bank_size=len(contents.vectors),
    )


def _bank_patches(
    features: FeaturePipeline, paths: list[Path], config: Config, work: Path, seconds: dict[str, float]
) -> PatchSet:
    """`extract_patches` with the config's batch size, projection, progress and strictness, timed."""
    t = time.perf_counter()
    patches = extract_patches(
        features,
        paths,
        config.batch_size,
        config.projection_dim,
        config.seed,
        work,
        config.progress,
        config.strict,
    )
    seconds["features"] = time.perf_counter() - t
    return patches


def _summary(
    category: str,
    collection: str,
    features: FeaturePipeline,
    config: Config,
    description: dict[str, Any],
    seconds: dict[str, float],
    skipped: list[str],
    **counts: Any,
) -> IngestSummary:
    """What fit_bank and append_to_bank report alike; `counts` holds what differs."""
    thresholds = description["thresholds"]
    return IngestSummary(
        category=category,
        collection=collection,
        dim=features.dim,
        index=config.index_type,
        image_threshold=thresholds["image"],
        pixel_threshold=thresholds["pixel"],
        seconds=seconds,
        search=SearchWidths.from_dict(description["search"]),
        skipped=skipped + thresholds["skipped"],
        **counts,
    )


def _publish(
    store: BankStore,
    category: str,
    features: FeaturePipeline,
    config: Config,
    contents: BankContents,
    description: dict[str, Any],
    held_out: list[tuple[Path, str]],
    earlier_holdout: list[dict[str, Any]],
    seconds: dict[str, float],
) -> str:
    """Store the vectors as a new version, check its search against exact search, calibrate its
    thresholds (both recorded in `description`), verify it, then point the category at it. On
    any failure the new version is dropped and the old one serves on."""
    t = time.perf_counter()
    vectors = contents.vectors
    collection = store.create_version(category, features.dim)
    try:
        _say(config, f"milvus: inserting {len(vectors)} vectors into {collection}")
        store.insert(collection, vectors, contents.sources, contents.positions)
        _say(config, f"milvus: building the {config.index_type} index")
        store.build_index(collection, config.index_type, config.effective_index_params)
        seconds["milvus"] = time.perf_counter() - t
        t = time.perf_counter()
        _say(config, f"milvus: checking the search on {len(contents.probes)} patches against exact search")
        widths = choose_search_widths(
            lambda queries, k, params: store.search(collection, queries, k, params),
            vectors,
            contents.probes,
            config.index_type,
            config.effective_index_params,
            config.effective_search_params,
            fixed=bool(config.search_params),
            say=lambda message: _say(config, message),
        )
        description["search"] = widths.to_dict()
        seconds["search check"] = time.perf_counter() - t
        t = time.perf_counter()
        exact = ExactSearch(vectors)
        description["thresholds"] = _calibrate_thresholds(
            Bank.pinned(store, collection, description, features, config, lambda _, q, k, __: exact(q, k)),
            Bank.pinned(store, collection, description, features, config),
            held_out,
            earlier_holdout,
            config,
        )
        seconds["thresholds"] = time.perf_counter() - t
        _say(config, f"milvus: verifying {collection}, then publishing it as {category}")
        store.write_description(collection, description)
        store.verify(collection, len(vectors), probe_id=len(vectors) // 2, search_params=widths.params)
        store.publish(category, collection, keep=config.keep_versions)
    except BaseException:
        store.drop_version(collection)
        raise
    return collection


# Relative slack on the squared covering radius when deciding which new patches lie outside it.
RADIUS_TOLERANCE = 1e-3

# Largest relative difference allowed between a held-out image's score through Milvus and
# through exact search (float32 rounding is about 1e-4 at these distances).
SCORE_TOLERANCE = 1e-3


def _calibrate_thresholds(
    exact_bank: Bank, milvus_bank: Bank, held_out: list[tuple[Path, str]], earlier: list[dict[str, Any]], config: Config
) -> dict[str, Any]:
    """Score the held-out good images against the new version and derive both thresholds.

    The thresholds come from exact search over the version's vectors; the same images scored
    through Milvus must agree with it (`SCORE_TOLERANCE`), or the version is not published.
    `earlier`: held-out images of the bank this one grows (`append`): re-scored where their files
    are still at their recorded path, else their recorded scores stand (the bank only grew, so
    those can only be too high: the thresholds err on the side of fewer false alarms).
    Unusable files are skipped and listed (`strict`: raised)."""
    rescored = [(Path(e["path"]), e["image"]) for e in earlier if Path(e.get("path", "")).is_file()]
    kept = [e for e in earlier if not Path(e.get("path", "")).is_file()]
    to_score = [*held_out, *rescored]
    entries, skipped = [], []
    for start in range(0, len(to_score), config.batch_size):
        batch = dict((str(path), name) for path, name in to_score[start : start + config.batch_size])
        extracted = exact_bank.load_and_extract([Path(path) for path in batch])
        for _, error in extracted.errors:
            if config.strict:
                raise error
            skipped.append(str(error))
        if not extracted.names:
            continue
        for exact, milvus in zip(exact_bank.score_extracted(extracted), milvus_bank.score_extracted(extracted)):
            if abs(milvus.image_score - exact.image_score) > SCORE_TOLERANCE * max(1.0, exact.image_score):
                raise StoreError(
                    f"new bank version {milvus_bank.version} scores held-out image {exact.path} at "
                    f"{milvus.image_score:.4f} through Milvus, {exact.image_score:.4f} by exact search; not published"
                )
            score, map_max = round(exact.image_score, 6), round(float(exact.anomaly_map.max()), 6)
            entries.append({"image": batch[exact.path], "path": exact.path, "score": score, "map_max": map_max})
    entries += kept
    sigma = config.threshold_sigma
    image = calibrate(np.array([e["score"] for e in entries]), sigma) if entries else None
    pixel = calibrate(np.array([e["map_max"] for e in entries]), sigma) if entries else None
    return {"image": image, "pixel": pixel, "rule": RULE, "sigma": sigma, "holdout": entries, "skipped": skipped}


def _names(images: list[Path], root: Path | None) -> tuple[Path, list[str]]:
    """Image names as recorded in the bank: relative to `root` (default: the images' common folder)."""
    root = root or Path(os.path.commonpath([Path(p).parent for p in images]))
    return root, [str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else str(p) for p in images]


def _say(config: Config, message: str) -> None:
    """A stage of ingest, on stderr beside the progress bars (which the stages without a bar lack)."""
    if config.progress:
        print(message, file=sys.stderr, flush=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
