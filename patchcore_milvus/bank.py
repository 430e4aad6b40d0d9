"""A category's memory bank in Milvus, opened for scoring: images in, inspections out."""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from patchcore_milvus.config import (
    BACKBONE_NORMALIZATION,
    DEFAULT_SEARCH_PARAMS,
    QUANTISED_INDEX_TYPES,
    Config,
    check_params,
)
from patchcore_milvus.description import BankDescription, ExtractorDescription, aggregation
from patchcore_milvus.errors import BankMismatchError, ImageError, StoreError, VersionGoneError
from patchcore_milvus.exact import ExactSearch
from patchcore_milvus.features import FeaturePipeline
from patchcore_milvus.images import NORMALIZATION_STATS, load_rgb
from patchcore_milvus.milvus import BankStore
from patchcore_milvus.mirror import VersionVectors
from patchcore_milvus.scoring import anomaly_map, image_scores, reweighting_factor, settle_largest


@dataclass
class ScoredImage:
    """What any method answers for one image: its score, the thresholds it is judged by, and the
    anomaly map, which has the original image's size (H, W)."""

    path: str
    image_score: float
    image_threshold: float | None
    pixel_threshold: float | None
    anomaly_map: np.ndarray = field(repr=False)
    timings_ms: dict[str, float]
    # The RGB image as scored, for drawing overlays.
    image: Image.Image = field(repr=False)

    @property
    def verdict(self) -> str | None:
        if self.image_threshold is None:
            return None
        return "DEFECT" if self.image_score > self.image_threshold else "OK"

    @property
    def mask(self) -> np.ndarray | None:
        """Where the map exceeds the pixel threshold, on an image whose verdict is not OK: the
        verdict decides, so that no picture outlines a defect on a part called OK (its map is
        still in `anomaly_map`). None without a pixel threshold."""
        if self.pixel_threshold is None:
            return None
        if self.verdict == "OK":
            return np.zeros(self.anomaly_map.shape, dtype=bool)
        return self.anomaly_map > self.pixel_threshold


@dataclass
class Inspection(ScoredImage):
    """PatchCore's result for one image: where the bank looked, besides the score and the map."""

    # The training patch nearest to the most anomalous test patch: where the bank "looked".
    nearest_patch: dict[str, Any]
    # Per patch (h, w): distance to and id of the nearest bank vector, and the patch feature's norm
    # (what float32 rounding of a distance scales with, see ann_check.same_distance).
    patch_distances: np.ndarray = field(repr=False)
    patch_ids: np.ndarray = field(repr=False)
    patch_norms: np.ndarray = field(repr=False)
    # The bank version (collection) that scored it.
    bank_version: str = ""
    # Patches whose distance was settled by the exact recheck (see scoring.settle_largest).
    rechecked_patches: int = 0

    def summary(self) -> dict[str, Any]:
        """Everything but the map, ready for JSON."""
        mask = self.mask  # a full-size comparison: once
        return {
            "path": self.path,
            "score": round(self.image_score, 6),
            "threshold": self.image_threshold,
            "verdict": self.verdict,
            "pixel_threshold": self.pixel_threshold,
            "defect_pixels": int(mask.sum()) if mask is not None else None,
            "nearest_patch": self.nearest_patch,
            "bank_version": self.bank_version,
            "rechecked_patches": self.rechecked_patches,
            "ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
        }


# Batches in flight while one is scored: one in the extractor, one being decoded.
PIPELINE_DEPTH = 2

# (version, vectors, top_k, search params) -> (Euclidean distances, ids), each (n, top_k).
SearchFunction = Callable[[str, np.ndarray, int, dict[str, Any]], tuple[np.ndarray, np.ndarray]]


class Bank:
    """Scores images against a category's bank. Open it with `Bank.open` (checks the extractor).

    Before each batch the bank follows the category's alias, so a station picks up a new or
    rolled-back version by itself, and every call for one batch goes to one version: an
    answer never mixes two banks. `search` defaults to Milvus; `Bank.pinned` scores one version
    whatever the alias says, `with_exact_search` searches it exactly in-process.

    Every patch is searched at the bank's search width (chosen and measured against exact search
    at ingest, see ann_check.py); each image's largest distances, which make its score, and the
    eq. 7 neighbours are then searched exactly (`precise`: by default over the station's copy of
    the version's vectors, mirror.py), so a verdict never rests on an approximate distance.
    """

    def __init__(
        self,
        store: BankStore,
        category: str | None,
        version: str,
        description: BankDescription,
        features: FeaturePipeline,
        config: Config,
        search: SearchFunction | None = None,
        precise: SearchFunction | None = None,
        mirror: VersionVectors | None = None,
    ):
        """`search`: every patch (default: Milvus); `precise`: an exact search (default: over
        `mirror`, the station's copy of each version's vectors, made here unless given)."""
        self.store = store
        self.category = category  # None: pinned to `version`
        self.features = features
        self.config = config
        self.search: SearchFunction = search or store.search  # every patch, at the bank's width
        # Milvus' index, whose distances may be quantised (a bound method compares equal to itself).
        self._searches_index = search is None or search == store.search
        if mirror is None and precise is None:
            mirror = VersionVectors(store)
        self.mirror = mirror  # also where the eq. 7 candidates' vectors are read, if there is one
        self.precise: SearchFunction = precise or mirror.precise  # the recheck and the eq. 7 neighbours
        self._use(version, description)

    @classmethod
    def pinned(
        cls,
        store: BankStore,
        version: str,
        description: BankDescription,
        features: FeaturePipeline,
        config: Config,
        search: SearchFunction | None = None,
        precise: SearchFunction | None = None,
    ) -> Bank:
        """Exactly `version`, whatever the category's alias points at."""
        return cls(store, None, version, description, features, config, search, precise)

    @classmethod
    def open(
        cls, category: str, config: Config, store: BankStore | None = None, features: FeaturePipeline | None = None
    ) -> Bank:
        """The category's current bank; refuses an extractor that differs from the bank's."""
        store = store or BankStore.from_config(config, existing=True)
        version = store.resolve(category)
        description = store.read_description(version)
        features = features or bank_extractor(store, version, description, config)
        check_extractor(category, description, features)
        bank = cls(store, category, version, description, features, config)
        return bank.with_local_search(follow_alias=True) if config.search == "local" else bank

    def with_exact_search(self) -> Bank:
        """This version, searched exactly in-process over its vectors read back from Milvus."""
        vectors = self.mirror.vectors(self.version) if self.mirror else self.store.read_vectors(self.version)
        exact = ExactSearch(vectors)  # on all cores, as evaluate's reference
        search: SearchFunction = lambda _, v, k, __: exact(v, k)  # noqa: E731
        return Bank.pinned(self.store, self.version, self.description, self.features, self.config, search, search)

    def with_local_search(self, follow_alias: bool = False) -> Bank:
        """Searched on station-side replicas of the bank's versions (`search: local`, see
        replica.py), this version's ready before this returns; pinned to it unless `follow_alias`."""
        from patchcore_milvus.replica import LocalReplicas

        replicas = LocalReplicas(self.store, self.mirror)
        replicas.prepare(self.version)
        category = self.category if follow_alias else None
        return Bank(
            self.store,
            category,
            self.version,
            self.description,
            self.features,
            self.config,
            replicas.search,
            mirror=replicas.mirror,
        )

    def refresh(self) -> None:
        """Follow the category's alias to its current version (a no-op when pinned or unchanged)."""
        if self.category is None:
            return
        version = self.store.follow_alias(self.category)
        if version != self.version:
            description = self.store.read_description(version)
            features = self.features
            if description.extractor != features.description:  # re-ingested with another extractor
                features = bank_extractor(self.store, version, description, self.config)
            check_extractor(self.category, description, features)  # refused: this version stays
            self.features = features
            self._use(version, description)

    def _use(self, version: str, description: BankDescription) -> None:
        config, stored = self.config, description.thresholds
        image_threshold, pixel_threshold = config.image_threshold, config.pixel_threshold  # overrides win
        if stored is not None:
            image_threshold = stored.image if image_threshold is None else image_threshold
            pixel_threshold = stored.pixel if pixel_threshold is None else pixel_threshold
        for name, value in (("image", image_threshold), ("pixel", pixel_threshold)):
            if value is not None and not math.isfinite(value):
                raise StoreError(f"bank version {version} has a non-finite {name} threshold ({value}); re-ingest it")
        index = description.index
        if config.search_params:
            check_params("search", config.search_params, index.type)
            params = {**DEFAULT_SEARCH_PARAMS[index.type], **config.search_params}
        elif description.search is not None:
            params = description.search.params
        else:  # a bank from before the search widths were measured at ingest
            params = DEFAULT_SEARCH_PARAMS[index.type]
        self.version, self.description = version, description
        self.provenance = self.store.read_provenance(version)  # for each inspection's nearest patch
        self.image_threshold, self.pixel_threshold = image_threshold, pixel_threshold
        self.search_params = params

    def score_paths(self, paths: Iterable[Path]) -> Iterator[tuple[Path, Inspection | ImageError]]:
        """Score files in batches; a file that is not a usable image yields its error and the rest go on.

        Three stages overlap, each in its own thread: while one batch is searched and scored,
        the next goes through the extractor and the one after is decoded (PIL and ONNX Runtime
        release the GIL), so that the search waits neither for the decoder nor for the network.
        """
        batches = _batched(paths, self.config.batch_size)
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchcore-decode") as decoder,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchcore-extract") as extractor,
        ):

            def submit(batch: list[Path]) -> Future[Extracted]:
                decoded = decoder.submit(self.load, batch)
                return extractor.submit(lambda: self.extract(decoded.result()))

            pending = deque(submit(batch) for batch in itertools.islice(batches, PIPELINE_DEPTH))
            while pending:
                extracted = pending.popleft().result()
                batch = next(batches, None)
                if batch is not None:
                    pending.append(submit(batch))
                yield from extracted.errors
                if extracted.names:
                    yield from ((Path(result.path), result) for result in self.score_extracted(extracted))

    def score_images(self, images: list[Image.Image], names: list[str]) -> list[Inspection]:
        """Score RGB images: all their patches go to Milvus in one search with top_k = 1."""
        return self.score_extracted(self.extract(Decoded(names, images, [0.0] * len(images))))

    def load_and_extract(self, paths: list[Path]) -> Extracted:
        """Decode `paths` and extract their patch features: one batch, ready for `score_extracted`."""
        return self.extract(self.load(paths))

    def load(self, paths: list[Path]) -> Decoded:
        """Decode `paths`; a file that is not a usable image is kept with its error."""
        decoded = Decoded([], [], [])
        for path in paths:
            start = time.perf_counter()
            try:
                decoded.images.append(load_rgb(path))
            except ImageError as exc:
                decoded.errors.append((path, exc))
                continue
            decoded.names.append(str(path))
            decoded.load_ms.append((time.perf_counter() - start) * 1000)
        return decoded

    def extract(self, decoded: Decoded) -> Extracted:
        """The decoded batch's patch features (resized and normalised first)."""
        features = self.features  # once: a refresh may swap it meanwhile (see score_extracted)
        start = time.perf_counter()
        patches = None
        if decoded.images:
            patches = features(np.stack([features.preprocess(image) for image in decoded.images]))
        extract_ms = (time.perf_counter() - start) * 1000
        return Extracted(decoded.names, decoded.images, patches, decoded.load_ms, extract_ms, features, decoded.errors)

    def score_extracted(self, extracted: Extracted) -> list[Inspection]:
        """Inspections of one extracted batch, all from one bank version."""
        t1 = time.perf_counter()
        for attempt in (1, 2):
            self.refresh()
            if extracted.features is not self.features:  # the new version has another extractor
                extracted = self.extract(Decoded(extracted.names, extracted.images, extracted.load_ms))
            images, patches = extracted.images, extracted.patches
            n, h, w, dim = patches.shape
            version, provenance = self.version, self.provenance
            try:
                found = self._search_batch(version, patches.reshape(n, h * w, dim))
                break
            except VersionGoneError:
                # The version was dropped between the alias lookup and the search (a publish
                # keeping fewer versions, or a drop): look the alias up again, once.
                if attempt == 2 or self.category is None:
                    raise
        distances, ids, rechecked, worst, nearest, weights = found
        scores = image_scores(distances, worst, weights)
        norms = np.linalg.norm(patches, axis=-1)
        t2 = time.perf_counter()
        results = []
        for i, image in enumerate(images):
            results.append(
                Inspection(
                    path=extracted.names[i],
                    image_score=float(scores[i]),
                    image_threshold=self.image_threshold,
                    pixel_threshold=self.pixel_threshold,
                    anomaly_map=anomaly_map(
                        distances[i].reshape(h, w), self.features.preprocess, self.config.blur_sigma, *image.size
                    ),
                    nearest_patch=provenance.source(int(nearest[i])),
                    timings_ms={},
                    image=image,
                    patch_distances=distances[i].reshape(h, w),
                    patch_ids=ids[i].reshape(h, w),
                    patch_norms=norms[i],
                    bank_version=version,
                    rechecked_patches=int(rechecked[i]),
                )
            )
        t3 = time.perf_counter()
        for result, load_ms in zip(results, extracted.load_ms):
            result.timings_ms = {
                "load": load_ms,
                "extract": extracted.extract_ms / n,
                "search": (t2 - t1) * 1000 / n,
                "post": (t3 - t2) * 1000 / n,
            }
        return results

    def _search_batch(
        self, version: str, patches: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For n images x p patches x dim, all from `version`: each patch's distance to and id of
        its nearest bank vector (n, p), with each image's largest distances settled by the exact
        search; how many patches of each image were rechecked; each image's worst patch (its
        index), the id of the bank vector nearest to it, and the image's eq. 7 weight."""
        n, p, dim = patches.shape
        distances, ids = self.search(version, patches.reshape(-1, dim), 1, self.search_params)
        distances, ids = distances[:, 0].reshape(n, p), ids[:, 0].reshape(n, p)
        quantised = self._searches_index and self.description.index.type in QUANTISED_INDEX_TYPES
        if quantised and (ids >= 0).all():
            # A quantised distance can be too small, which `settle_largest` may not see: take
            # each patch's distance to the real bank vector found instead, never below the exact one.
            found = self._vectors(version, ids.ravel()).reshape(n, p, dim)
            distances = np.linalg.norm(patches - found, axis=-1).astype(distances.dtype)
        rechecked = settle_largest(distances, ids, patches, lambda vectors: self.precise(version, vectors, 1, {}))
        missing = int((ids < 0).sum())
        if missing:
            raise StoreError(f"bank version {version} returned no neighbour for {missing} patches; is it complete?")
        worst = distances.argmax(axis=1)
        nearest = ids[np.arange(n), worst]
        weights = np.ones(n)
        if self.config.reweight:
            weights = self._reweighting(version, patches[np.arange(n), worst], nearest)
        return distances, ids, rechecked, worst, nearest, weights

    def _reweighting(self, version: str, worst_patches: np.ndarray, nearest: np.ndarray) -> np.ndarray:
        """Eq. 7 weights for each image: needs m*'s own b nearest neighbours in the bank, found
        by exact search; fewer than the bank holds is refused, not scored."""
        b = min(self.config.reweight_neighbors, self.description.coreset.size - 1)
        if b < 1:
            return np.ones(len(worst_patches))  # a bank of one vector: m* has no neighbours to weigh against
        _, neighbour_ids = self.precise(version, self._vectors(version, nearest), b + 1, {})
        candidate_ids = []
        for centre, ids in zip(nearest, neighbour_ids):
            others = [int(i) for i in ids if i >= 0 and i != centre][:b]
            if len(others) < b:
                raise StoreError(
                    f"bank version {version} returned {len(others)} of the {b} neighbours of bank vector "
                    f"{centre} that the re-weighting (eq. 7) needs; the score was not computed"
                )
            candidate_ids.append([int(centre), *others])
        candidates = self._vectors(version, [i for ids in candidate_ids for i in ids])
        return np.array(
            [
                reweighting_factor(patch, candidates[k * (b + 1) : (k + 1) * (b + 1)])
                for k, patch in enumerate(worst_patches)
            ]
        )

    def _vectors(self, version: str, ids: Iterable[int]) -> np.ndarray:
        """Bank vectors by id: from the station's copy where there is one, else from Milvus."""
        if self.mirror is None:
            return self.store.get_vectors(version, ids)
        return self.mirror.vectors(version)[np.fromiter(ids, dtype=np.int64)]


@dataclass
class Decoded:
    """One batch of image files, decoded."""

    names: list[str]
    images: list[Image.Image]
    load_ms: list[float]
    errors: list[tuple[Path, ImageError]] = field(default_factory=list)


@dataclass
class Extracted:
    """One batch, decoded and through the feature extractor."""

    names: list[str]
    images: list[Image.Image]
    patches: np.ndarray | None  # (n, h, w, dim); None for a batch with no usable image
    load_ms: list[float]
    extract_ms: float  # the whole batch
    features: FeaturePipeline  # the extractor that made `patches`
    errors: list[tuple[Path, ImageError]] = field(default_factory=list)


def _batched(paths: Iterable[Path], size: int) -> Iterator[list[Path]]:
    batch: list[Path] = []
    for path in paths:
        batch.append(Path(path))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def bank_extractor(store: BankStore, version: str, description: BankDescription, config: Config) -> FeaturePipeline:
    """The extractor a bank version was built with: its own ONNX model, run on ONNX Runtime,
    without torch or the weights. Extractor options set away from their defaults must agree
    with the bank (a station asking for something else is refused, naming the difference).
    On `runtime: torch`, with a weights file named, or for a bank that carries no model, the
    extractor is built from the options and must match the bank's checksum exactly."""
    if config.runtime == "torch" or config.weights is not None or description.extractor_model is None:
        return FeaturePipeline.from_config(config, description.extractor.shape)
    asked = requested_differences(config, description.extractor)
    if asked:
        raise BankMismatchError(
            f"the feature extractor does not match bank {description.category!r}:\n  "
            + "\n  ".join(asked)
            + "\nLeave the extractor options out (the bank carries its own), or re-ingest with them."
        )
    model = store.read_model(version)
    return FeaturePipeline.from_model(description.extractor, description.extractor_model, model, config)


def requested_differences(config: Config, bank: ExtractorDescription) -> list[str]:
    """The extractor options `config` sets away from their defaults that differ from the bank's."""
    default = Config()
    asked = {
        "backbone": (config.backbone, bank.backbone),
        "image_size": (config.image_size, bank.image_size),
        "center_crop": (config.center_crop, bank.center_crop),
        "target_dim": (config.target_dim, bank.target_dim),
        "tile": (config.tile, bank.tile),
    }
    lines = [
        f"{name}: bank has {theirs!r}, this query uses {ours!r}"
        for name, (ours, theirs) in asked.items()
        if ours != getattr(default, name) and ours != theirs
    ]
    if config.aspect == "square" and bank.image_shape is not None:
        lines.append(f"aspect: bank has images resized to {bank.image_shape} (height, width), this query uses 'square'")
    if config.border != default.border and bank.aggregation != aggregation(config.border):
        lines.append(f"border: bank has {bank.aggregation!r}, this query uses {config.border!r}")
    if config.normalization != default.normalization:
        wanted = NORMALIZATION_STATS[BACKBONE_NORMALIZATION[bank.backbone]]
        if (tuple(bank.normalization["mean"]), tuple(bank.normalization["std"])) != wanted:
            lines.append(f"normalization: bank has {bank.normalization!r}, this query uses {config.normalization!r}")
    return lines


def check_extractor(category: str, description: BankDescription, features: FeaturePipeline) -> None:
    differences = description.extractor.differences(features.description)
    if differences:
        raise BankMismatchError(
            f"the feature extractor does not match bank {category!r}:\n  "
            + "\n  ".join(differences)
            + "\nUse the options (or the config file) the bank was ingested with, or re-ingest it."
        )
