"""Fit a bank: good images -> patch features -> coreset -> Milvus -> calibrated thresholds."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from patchcore_milvus import __version__
from patchcore_milvus.ann_check import PROBE_PATCHES, SearchWidths, choose_search_widths
from patchcore_milvus.bank import Bank, SearchFunction, bank_extractor, check_extractor
from patchcore_milvus.config import Config, is_server_uri
from patchcore_milvus.coreset import (
    coreset_size,
    extend_coreset,
    greedy_coreset,
    projection_matrix,
)
from patchcore_milvus.description import (
    BankDescription,
    CoresetDescription,
    ExtractorModel,
    HeldOutImage,
    IndexDescription,
    Thresholds,
    TrainingImages,
)
from patchcore_milvus.errors import BankMismatchError, ConfigError, ImageError, IndexTooPoorError, StoreError
from patchcore_milvus.exact import ExactSearch
from patchcore_milvus.features import FeaturePipeline
from patchcore_milvus.files import process_running
from patchcore_milvus.images import aspect_ratio, input_shape, load_rgb
from patchcore_milvus.milvus import BankRows, BankStore, validate_category
from patchcore_milvus.thresholds import RULE, calibrate, holdout_split

THRESHOLD_RISE_WARNING = 5.0  # percent: an append that raises a threshold more than this says so


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
    joined: int | None = None  # bank vectors picked from the held-out images (holdout_joins)
    # Set by `append_to_bank`: the version grown, new patches outside its coverage, vectors now,
    # whether the picks stopped at the cap, and the grown version's thresholds (image, pixel).
    appended_to: str | None = None
    far_patches: int = 0
    bank_size: int = 0
    capped: bool = False
    previous_thresholds: tuple[float | None, float | None] | None = None

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
            if self.capped:
                bank += (
                    " (stopped at the cap, coreset_ratio of the new patches: some of them stay less well "
                    "covered than the old ones; --coreset-ratio or --coreset-size raises it)"
                )
        thresholds = f"thresholds: image {fmt(self.image_threshold)}, pixel {fmt(self.pixel_threshold)}"
        warnings = []
        if self.previous_thresholds is not None:
            moves = []
            now = (self.image_threshold, self.pixel_threshold)
            for name, old, new in zip(("image", "pixel"), self.previous_thresholds, now):
                if old is None or new is None:
                    continue
                change = (new - old) / old * 100 if old else 0.0
                moves.append(f"{name} {old:.4f} -> {new:.4f} ({change:+.1f} %)")
                if change > THRESHOLD_RISE_WARNING:
                    warnings.append(
                        f"warning: the {name} threshold rose {change:.1f} %: a part scoring between the old "
                        f"and the new one now passes as OK. Check with `evaluate`, or go back with "
                        f"`patchcore-milvus rollback {self.category}`"
                    )
            if moves:
                thresholds = f"thresholds: {', '.join(moves)}"
        return [
            *(f"skipped {reason}" for reason in self.skipped),
            f"bank {self.category} -> collection {self.collection}",
            f"images: {self.images} in the bank, {self.holdout_images} held out for thresholds"
            + ("" if self.joined is None else f", their patches in the coreset too ({self.joined} of its vectors)")
            + (f", {len(self.skipped)} unusable files skipped" if self.skipped else ""),
            bank,
            f"search: {_params(self.search.params)} (recall@1 {self.search.recall_at_1:.4f} against exact search on "
            f"{self.search.probes} patches), each image's worst patches rechecked by exact search",
            thresholds,
            *warnings,
            f"time: {stages}",
        ]


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in params.items())


@dataclass
class BankContents:
    """What a new bank version holds, and the patches its search is checked on before publishing."""

    rows: BankRows
    probes: np.ndarray  # (m, dim) training patches the coreset left out: real queries with known answers
    calibration: np.ndarray  # the rows the thresholds are set against: all but the held-out images' picks


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
    held_out: int = 0,
    bank_images: int | None = None,
) -> PatchSet:
    """Features of every patch of `paths`, appended to `folder/patches.f32` batch by batch.

    A file that is not a usable image is skipped, its reason kept in `skipped` (`strict`: raised).
    `held_out`: how many images the caller set aside, and `bank_images` how many of `paths` are
    not those (default: all), for the message when none is usable.
    Plain file writes, not a writable memory map: written pages stay in the page cache, which
    the kernel can drop, instead of in the process' resident memory.
    """
    matrix = projection_matrix(features.dim, projection_dim, seed)
    target = folder / "patches.f32"
    projected = torch.empty(0)  # allocated once the first batch shows the patch grid
    positions: list[np.ndarray] = []
    skipped: list[str] = []
    rows = 0

    def decode(start: int) -> tuple[list[np.ndarray], list[int], list[str]]:
        loaded, indices, unusable = [], [], []
        for index in range(start, min(start + batch_size, len(paths))):
            try:
                loaded.append(features.preprocess(load_rgb(paths[index])))
                indices.append(index)
            except ImageError as exc:
                if strict:
                    raise
                unusable.append(str(exc))
        return loaded, indices, unusable

    starts = iter(range(0, len(paths), batch_size))
    first = next(starts, None)
    with (
        target.open("wb") as handle,
        tqdm(total=len(paths), desc="features", unit="img", disable=not progress) as bar,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchcore-decode") as decoder,
    ):
        # The next batch is decoded (PIL releases the GIL) while this one goes through the network.
        pending = None if first is None else decoder.submit(decode, first)
        while pending is not None:
            loaded, indices, unusable = pending.result()
            start = next(starts, None)
            pending = None if start is None else decoder.submit(decode, start)
            skipped += unusable
            bar.update(len(loaded) + len(unusable))
            if not loaded:
                continue
            patches = features(np.stack(loaded))
            n, h, w, d = patches.shape
            handle.write(patches.tobytes())  # row-major: the same bytes as the (N, d) rows
            flat = torch.from_numpy(patches.reshape(-1, d))
            if rows == 0:  # every image gives the same grid: allocate once, no concatenation later
                projected = torch.empty(len(paths) * h * w, d if matrix is None else matrix.shape[1])
            projected[rows : rows + n * h * w] = flat if matrix is None else flat @ matrix
            rows += n * h * w
            grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), axis=-1).reshape(-1, 2)
            image = np.repeat(np.array(indices), h * w)
            positions.append(np.column_stack([image, np.tile(grid, (n, 1))]).astype(np.int32))
    if rows == 0:
        raise _none_usable(len(paths) if bank_images is None else bank_images, held_out, skipped)
    return PatchSet(
        full=np.memmap(target, dtype=np.float32, mode="r", shape=(rows, features.dim)),
        projected=projected[:rows],
        positions=np.concatenate(positions),
        skipped=skipped,
    )


def _size(size: float) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def check_tile(config: Config, network_input: tuple[int, int]) -> None:
    """Refuse a `tile` that covers the whole input: it would change nothing but the bank's
    extractor, which every query would then have to ask for."""
    if config.tile is not None and config.tile >= max(network_input):
        height, width = network_input
        raise ConfigError(
            f"tile {config.tile} is not smaller than the {height} x {width} input, so the network would see each "
            f"image whole, as without tile; leave tile out, or give an image_size above {config.tile}"
        )


def bank_shape(images: list[Path], config: Config) -> tuple[int, int] | None:
    """(height, width) the bank's images are resized to (see `images.input_shape`), from the
    files' headers; None: `image_size` squared."""
    if config.aspect == "square":
        return None
    ratios = [ratio for ratio in map(aspect_ratio, images) if ratio is not None]
    return input_shape(ratios, config.image_size, config.aspect)


def _none_usable(bank_images: int, held_out: int, reasons: list[str]) -> ImageError:
    aside = f" ({held_out} more set aside for the thresholds)" if held_out else ""
    listed = "\n  ".join(reasons)
    return ImageError(f"none of the {bank_images} images for the bank could be used{aside}:\n  {listed}")


# Bytes each training patch holds in memory during an ingest besides its projection: its position
# (3 int32), its leading principal components (16 float32), and in the coreset's pool (room for
# two entries) its index and distance (int64 + float64), a copy of those components, and a pick's
# scratch (the new distance, float64; a moving row's index and distance).
_BYTES_PER_PATCH = 12 + 64 + 2 * (16 + 64 + 8) + 16


def check_resources(images: int, features: FeaturePipeline, projection_dim: int) -> None:
    """Refuse, before any work, an ingest whose patches would not fit: their projections in
    memory, their full features in the temporary folder."""
    height, width = features.preprocess.input_shape
    patches = images * -(-height // 8) * -(-width // 8)  # the stride-8 patch grid
    memory = patches * (4 * min(projection_dim, features.dim) + _BYTES_PER_PATCH)
    disk = patches * features.dim * 4
    folder = Path(tempfile.gettempdir())
    available, free = _available_memory(), shutil.disk_usage(folder).free
    short = []
    if available is not None and memory > available:
        short.append(f"about {_size(memory)} of memory ({_size(available)} available)")
    if disk > free:
        short.append(f"about {_size(disk)} of temporary disk in {folder} ({_size(free)} free)")
    if short:
        raise ConfigError(
            f"this ingest of {images} images ({patches} patches of {features.dim} dims) needs "
            + " and ".join(short)
            + "; nothing was started. Use fewer images, a smaller image_size, target_dim or projection_dim, "
            "or point TMPDIR at a larger disk"
        )


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


WORK_PREFIX = "patchcore-ingest-"  # then the PID of the ingest that made the folder


def remove_stale_work_folders() -> list[Path]:
    """Remove the temporary folders (patch features, hundreds of MB) of ingests killed before they
    could clean up: those whose process is no longer running. Returns what was removed."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{WORK_PREFIX}*"):
        pid = folder.name[len(WORK_PREFIX) :].split("-", 1)[0]
        if not folder.is_dir() or not pid.isdigit() or process_running(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def fit_bank(
    category: str, images: list[Path], config: Config, store: BankStore | None = None, root: Path | None = None
) -> IngestSummary:
    """Build `category`'s bank from good `images` and publish it; the previous bank serves until then.

    `root`: image names are recorded relative to it (default: the images' common folder).
    """
    return _ingest(category, images, config, store, root, append=False)


def append_to_bank(
    category: str, images: list[Path], config: Config, store: BankStore | None = None, root: Path | None = None
) -> IngestSummary:
    """Grow `category`'s bank with new good `images` without re-reading the old ones.

    The new version holds the old bank plus greedy picks among the new patches that lie farther
    from the bank than its covering radius, until they too are covered that well (at most
    `coreset_ratio` of the new patches). Thresholds are re-derived from the old and the new
    held-out images. Where no new patch lies outside the radius, nothing is published.
    """
    return _ingest(category, images, config, store, root, append=True)


@dataclass
class _Grown:
    """The bank an append grows: its version, description and rows."""

    version: str
    description: BankDescription
    rows: BankRows

    @classmethod
    def read(cls, store: BankStore, category: str) -> _Grown:
        version = store.resolve(category)
        description = store.read_description(version)
        if description.coreset.radius is None:
            raise BankMismatchError(
                f"bank {version} predates --append (no covering radius recorded); re-ingest it once"
            )
        return cls(version, description, store.read_rows(version))


def _ingest(
    category: str, images: list[Path], config: Config, store: BankStore | None, root: Path | None, append: bool
) -> IngestSummary:
    """One pipeline for both: patches of the bank images -> selection -> new version -> publish.
    Only the selection differs: a fresh coreset, or what the new patches add to the old bank."""
    validate_category(category)
    if not images:
        raise ImageError(f"no images to {'append to' if append else 'ingest for'} category {category!r}")
    if not append:  # before Milvus is touched: unusable weights or settings leave no empty bank file
        features = FeaturePipeline.from_config(config, bank_shape(images, config))
        check_tile(config, features.preprocess.input_shape)
        check_resources(len(images), features, config.projection_dim)
    grown = None
    # Before the work: a server that does not answer, a Lite file another process holds. A Lite
    # file that does not exist yet is made only after the features (none is left if they fail).
    if append or is_server_uri(config.uri) or Path(config.uri).exists():
        store = store or BankStore.from_config(config, existing=append)
    if append:
        assert store is not None
        grown = _Grown.read(store, category)
    if grown is not None:  # the grown bank's own extractor
        features = bank_extractor(store, grown.version, grown.description, config)
        check_extractor(category, grown.description, features)
        check_resources(len(images), features, grown.description.coreset.projection_dim)
    root, names = _names(images, root)
    bank_idx, held_idx = holdout_split(len(images), config.holdout_ratio, config.seed)
    # An append projects with the old bank's projection, so that distances compare with its radius.
    projection = (
        config
        if grown is None
        else config.replace(
            projection_dim=grown.description.coreset.projection_dim, seed=grown.description.coreset.projection_seed
        )
    )
    seconds: dict[str, float] = {}
    remove_stale_work_folders()
    # Joining: the held-out images' patches go into the coreset selection too (last, so that image
    # index >= len(bank_idx) marks them); the thresholds come from the bank without their picks.
    joins = config.holdout_joins and held_idx.size > 0
    order = np.concatenate([bank_idx, held_idx]) if joins else bank_idx
    with tempfile.TemporaryDirectory(prefix=f"{WORK_PREFIX}{os.getpid()}-") as work:
        t = time.perf_counter()
        patches = extract_patches(
            features,
            [images[i] for i in order],
            config.batch_size,
            projection.projection_dim,
            projection.seed,
            Path(work),
            config.progress,
            config.strict,
            held_out=len(held_idx),
            bank_images=len(bank_idx),
        )
        from_held = patches.positions[:, 0] >= len(bank_idx)
        if from_held.all():  # only held-out images could be read
            raise _none_usable(len(bank_idx), len(held_idx), patches.skipped)
        seconds["features"] = time.perf_counter() - t
        t = time.perf_counter()
        n_patches = len(patches.positions)
        ratio = config.coreset_ratio
        if grown is not None and ratio == Config().coreset_ratio:  # not set: the grown bank's own share
            ratio = grown.description.coreset.ratio
        limit = coreset_size(n_patches, ratio, config.coreset_size)
        if grown is None:
            picks, radius = greedy_coreset(patches.projected, limit, config.seed, config.progress)
            far = n_patches
        else:
            old = _projected(grown, features.dim)
            picks, far = _beyond_radius(patches.projected, old, grown.description.coreset.radius, limit)
            radius = grown.description.coreset.radius
        seconds["coreset"] = time.perf_counter() - t
        used = np.unique(patches.positions[:, 0])
        used_bank = used[used < len(bank_idx)]
        counts = {"images": len(used_bank), "patches": n_patches, "coreset_size": len(picks), "far_patches": far}
        if grown is not None and len(picks) == 0:
            return _summary(
                category,
                grown.version,
                features,
                grown.description,
                seconds,
                patches.skipped,
                nothing_added=True,
                holdout_images=len(held_idx),
                appended_to=grown.version,
                bank_size=len(grown.rows),
                **counts,
            )
        new = _rows(patches, picks, [names[i] for i in order])
        offset = 0 if grown is None else len(grown.rows)
        contents = BankContents(
            rows=new if grown is None else grown.rows.concatenate(new),
            probes=patches.full[probe_rows(n_patches, picks, config.seed)],
            calibration=np.concatenate([np.arange(offset), offset + np.flatnonzero(~from_held[picks])]),
        )
        # The held-out files that could not be read are reported by the thresholds' own pass.
        aside = tuple(f"{images[i]}: " for i in held_idx)
        skipped = [reason for reason in patches.skipped if not reason.startswith(aside)]
    del patches  # the projected features go; the memory-mapped file went with the folder

    part = TrainingImages(str(root), [names[order[i]] for i in used])
    index = IndexDescription(config.index_type, config.effective_index_params)
    if grown is None:
        description = BankDescription(
            category=category,
            package_version=__version__,
            created=_now(),
            origin="ingest",
            extractor=features.description,
            coreset=CoresetDescription(
                config.projection_dim,
                config.seed,
                config.coreset_ratio,
                len(contents.rows),
                n_patches,
                radius,
            ),
            index=index,
            training_images=[part],
        )
        earlier: list[HeldOutImage] = []
    else:
        old = grown.description
        description = replace(
            old,
            package_version=__version__,
            created=_now(),
            origin=f"append to {grown.version}",
            coreset=replace(old.coreset, size=len(contents.rows), patches=old.coreset.patches + n_patches),
            index=index,
            training_images=[*old.training_images, replace(part, far_patches=far, added=len(picks))],
            search=None,
            thresholds=None,
            extractor_model=None,
        )
        earlier = old.thresholds.holdout if old.thresholds else []
    held_out = [(images[i], names[i]) for i in held_idx]
    replaces = None if grown is None else grown.version
    store = store or BankStore.from_config(config)
    collection, description = _publish(
        store, features, config, contents, description, held_out, earlier, seconds, replaces
    )
    assert description.thresholds is not None  # _publish calibrated them
    return _summary(
        category,
        collection,
        features,
        description,
        seconds,
        skipped,
        holdout_images=len(description.thresholds.holdout) - len(earlier),  # this run's held-out images
        appended_to=None if grown is None else grown.version,
        bank_size=len(contents.rows),
        capped=grown is not None and len(picks) == limit < far,
        previous_thresholds=None if grown is None else _threshold_pair(grown.description),
        **counts,
    )


def _threshold_pair(description: BankDescription) -> tuple[float | None, float | None] | None:
    thresholds = description.thresholds
    return None if thresholds is None else (thresholds.image, thresholds.pixel)


# HNSW graphs can leave a few nodes that no search reaches, whatever its ef; more links per node
# make that rarer (bottle at a 1 % coreset: 2 of 2,001 vectors unreachable at M 16).
_MAX_M = 64


def _denser_graph(config: Config, params: dict[str, Any]) -> dict[str, Any] | None:
    """HNSW index parameters with twice the links, for a build that missed vectors even at its
    widest search; None where M is the user's choice, at its cap, or the index is no graph."""
    if not config.index_type.startswith("HNSW") or "M" in config.index_params or params["M"] >= _MAX_M:
        return None
    return {**params, "M": min(2 * int(params["M"]), _MAX_M)}


def _projected(grown: _Grown, dim: int) -> torch.Tensor:
    """A grown bank's vectors in its coreset projection."""
    coreset = grown.description.coreset
    matrix = projection_matrix(dim, coreset.projection_dim, coreset.projection_seed)
    old_vectors = torch.from_numpy(grown.rows.vectors)
    return old_vectors if matrix is None else old_vectors @ matrix


def _beyond_radius(projected: torch.Tensor, bank: torch.Tensor, radius: float, limit: int) -> tuple[np.ndarray, int]:
    """What patches (`projected`) add to a bank (`bank`, the same projection): greedy picks among
    those beyond its covering radius (at most `limit`), and how many lay beyond it."""
    nearest = torch.from_numpy(ExactSearch(bank.numpy())(projected.numpy(), 1)[0][:, 0]) ** 2
    # Beyond the radius by more than float32 rounding: the patch that defines the radius, extracted
    # again in another batch and measured by another routine, lands a hair either side of it.
    far = (nearest > radius**2 * (1 + RADIUS_TOLERANCE)).nonzero().squeeze(1)
    if len(far) == 0:
        return np.empty(0, dtype=np.int64), 0
    extended = extend_coreset(projected[far], nearest[far], radius, limit)
    return far[torch.as_tensor(extended)].numpy(), len(far)


def _subset_search(vectors: np.ndarray, keep: np.ndarray) -> SearchFunction:
    """Exact search over `vectors[keep]` that answers with the ids of the whole version."""
    exact = ExactSearch(vectors[keep])

    def search(_: str, queries: np.ndarray, k: int, __: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        distances, ids = exact(queries, k)
        return distances, np.where(ids >= 0, keep[np.maximum(ids, 0)], -1)

    return search


def _rows(patches: PatchSet, picks: np.ndarray, names: list[str]) -> BankRows:
    """Bank rows of the picked patches; `names`: the image names in the order they were extracted."""
    return BankRows(
        ids=np.arange(len(picks)),
        vectors=patches.full[picks],  # read back from disk
        images=[names[patches.positions[i, 0]] for i in picks],
        positions=patches.positions[picks, 1:],
    )


def _summary(
    category: str,
    collection: str,
    features: FeaturePipeline,
    description: BankDescription,
    seconds: dict[str, float],
    skipped: list[str],
    nothing_added: bool = False,
    **counts: Any,
) -> IngestSummary:
    """What an ingest or an append reports; `counts` holds what differs between them."""
    thresholds = description.thresholds
    return IngestSummary(
        category=category,
        collection=collection,
        dim=features.dim,
        index=f"{description.index.type} ({_params(description.index.params)})",
        image_threshold=None if thresholds is None else thresholds.image,
        pixel_threshold=None if thresholds is None else thresholds.pixel,
        seconds=seconds,
        search=None if nothing_added else description.search,
        skipped=skipped + ([] if nothing_added or thresholds is None else thresholds.skipped),
        joined=None if nothing_added or thresholds is None else thresholds.joined,
        **counts,
    )


def _publish(
    store: BankStore,
    features: FeaturePipeline,
    config: Config,
    contents: BankContents,
    description: BankDescription,
    held_out: list[tuple[Path, str]],
    earlier_holdout: list[HeldOutImage],
    seconds: dict[str, float],
    replaces: str | None,
) -> tuple[str, BankDescription]:
    """Store the rows as a new version, check its search against exact search, calibrate its
    thresholds, verify it, then point the category at it; returns the version and its final
    description. On any failure the new version is dropped and the old one serves on. `replaces`:
    the version an append grew, which must still be the category's (`BankStore.publish`)."""
    category = description.category
    t = time.perf_counter()
    rows = contents.rows
    collection = store.create_version(category, features.dim)
    try:
        _say(config, f"milvus: inserting {len(rows)} vectors into {collection}")
        store.insert(collection, rows)
        if features.model is not None:  # the bank carries its extractor
            store.write_model(collection, features.model)
            model = ExtractorModel("onnx", hashlib.sha256(features.model).hexdigest(), len(features.model))
            description = replace(description, extractor_model=model)
        index_params = config.effective_index_params
        seconds["milvus"] = seconds["search check"] = 0.0
        while True:
            _say(config, f"milvus: building the {config.index_type} index ({_params(index_params)})")
            store.build_index(collection, config.index_type, index_params)
            seconds["milvus"] += time.perf_counter() - t
            t = time.perf_counter()
            _say(config, f"milvus: checking the search on {len(contents.probes)} patches against exact search")
            try:
                widths = choose_search_widths(
                    lambda queries, k, params: store.search(collection, queries, k, params),
                    rows.vectors,
                    contents.probes,
                    config.index_type,
                    index_params,
                    config.effective_search_params,
                    fixed=bool(config.search_params),
                    say=lambda message: _say(config, message),
                )
                break
            except IndexTooPoorError as exc:
                denser = _denser_graph(config, index_params)
                if denser is None:
                    raise
                _say(config, f"milvus: {exc.args[0].split(';')[0]}; rebuilding it with {_params(denser)}")
                store.drop_index(collection)
                index_params = denser
            finally:
                seconds["search check"] += time.perf_counter() - t
                t = time.perf_counter()
        description = replace(description, search=widths, index=IndexDescription(config.index_type, index_params))
        t = time.perf_counter()
        exact = ExactSearch(rows.vectors)
        exact_search: SearchFunction = lambda _, q, k, __: exact(q, k)  # noqa: E731
        exact_bank = Bank.pinned(store, collection, description, features, config, exact_search, exact_search)
        calibration_bank = exact_bank
        keep = contents.calibration
        if len(keep) < len(rows):  # thresholds from the bank without the held-out images' own picks
            subset = _subset_search(rows.vectors, keep)
            calibration_bank = Bank.pinned(
                store,
                collection,
                replace(description, coreset=replace(description.coreset, size=len(keep))),
                features,
                config,
                subset,
                subset,
            )
        thresholds = _calibrate_thresholds(
            calibration_bank,
            exact_bank,
            Bank.pinned(store, collection, description, features, config, precise=exact_search),
            held_out,
            earlier_holdout,
            config,
        )
        if config.holdout_joins and held_out:
            thresholds = replace(thresholds, joined=len(rows) - len(keep))
        description = replace(description, thresholds=thresholds)
        seconds["thresholds"] = time.perf_counter() - t
        _say(config, f"milvus: verifying {collection}, then publishing it as {category}")
        store.verify(collection, len(rows), probe_id=len(rows) // 2, search_params=widths.params)
        # The description comes last: a version that has one passed verification, so a kill
        # before this line leaves a leftover for `gc`, never a version that merely looks complete.
        store.write_description(collection, description)
        stored = store.read_description_or_none(collection)
        if stored is None or stored.to_json() != description.to_json():
            raise StoreError(f"new bank version {collection}: its description did not read back as written")
        store.publish(category, collection, keep=config.keep_versions, replaces=replaces)
    except BaseException:
        store.drop_version(collection)
        raise
    return collection, description


# Relative slack on the squared covering radius when deciding which new patches lie outside it.
RADIUS_TOLERANCE = 1e-3

# Largest relative difference allowed between a held-out image's score through Milvus and
# through exact search (float32 rounding is about 1e-4 at these distances).
SCORE_TOLERANCE = 1e-3


def _calibrate_thresholds(
    calibration_bank: Bank,
    exact_bank: Bank,
    milvus_bank: Bank,
    held_out: list[tuple[Path, str]],
    earlier: list[HeldOutImage],
    config: Config,
) -> Thresholds:
    """Score the held-out good images and derive both thresholds.

    The thresholds come from exact search over the bank without the held-out images' own patches
    (`calibration_bank`; the version itself where they do not join it). The same images scored
    through Milvus must agree with exact search over the version's vectors (`SCORE_TOLERANCE`), or
    the version is not published. `earlier`: held-out images of the bank this one grows
    (`append`), scored again where their files are still at their recorded path and they are not
    in the bank themselves (scored against their own patches they would come out near 0); else
    their recorded scores stand (the bank only grew since, so those can only be too high: the
    thresholds err on the side of fewer false alarms). Unusable files are skipped and listed
    (`strict`: raised)."""
    again = [e for e in earlier if not e.in_bank and Path(e.path).is_file()]
    kept = [e for e in earlier if e not in again]
    joins = config.holdout_joins
    to_score = [(path, name, joins) for path, name in held_out] + [(Path(e.path), e.image, False) for e in again]
    entries, skipped = [], []
    for start in range(0, len(to_score), config.batch_size):
        batch = {str(path): (name, in_bank) for path, name, in_bank in to_score[start : start + config.batch_size]}
        extracted = calibration_bank.load_and_extract([Path(path) for path in batch])
        for _, error in extracted.errors:
            if config.strict:
                raise error
            skipped.append(str(error))
        if not extracted.names:
            continue
        calibrated = calibration_bank.score_extracted(extracted)
        exact_scores = calibrated if calibration_bank is exact_bank else exact_bank.score_extracted(extracted)
        for exact, milvus in zip(exact_scores, milvus_bank.score_extracted(extracted)):
            if abs(milvus.image_score - exact.image_score) > SCORE_TOLERANCE * max(1.0, exact.image_score):
                raise StoreError(
                    f"new bank version {milvus_bank.version} scores held-out image {exact.path} at "
                    f"{milvus.image_score:.4f} through Milvus, {exact.image_score:.4f} by exact search; not published"
                )
        for result in calibrated:
            score, map_max = round(result.image_score, 6), round(float(result.anomaly_map.max()), 6)
            name, in_bank = batch[result.path]
            entries.append(HeldOutImage(name, result.path, score, map_max, in_bank))
    entries += kept
    sigma = config.threshold_sigma
    image = calibrate(np.array([e.score for e in entries]), sigma) if entries else None
    pixel = calibrate(np.array([e.map_max for e in entries]), sigma) if entries else None
    return Thresholds(image, pixel, RULE, sigma, entries, skipped)


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
