"""The station's copy of each bank version's vectors: the exact search behind every verdict.

PatchCore's image score is one patch's distance, so one approximate-search miss is a wrong
score. Every patch is searched in Milvus at the bank's width; the patches that make each image's
score (`scoring.settle_largest`) and the eq. 7 neighbours are then searched exactly, over this
copy. A wide HNSW search is no such guarantee: the width is measured on training patches, and a
defect patch is unlike any of them (at ef 1024 Milvus Lite missed the nearest bank vector of a
bottle defect patch, which scored 77.85 instead of 75.35).

Milvus stays the one place where banks live: a version's vectors are read from it once, cached
on disk per version (derived data, rebuilt whenever it is missing or damaged: the file is named
with its contents' checksum) and checked against Milvus (row count, a probe vector) before use.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patchcore_milvus.config import stage_threads
from patchcore_milvus.exact import ExactSearch
from patchcore_milvus.files import cache_folder, remove_stale_temporaries, save_atomically
from patchcore_milvus.milvus import BankStore

# Versions kept in memory: the one a station scores, and the one it just left (a batch in
# flight when the alias moves). 21,402 vectors of 152 dims (bottle) take 13 MB.
VERSIONS_IN_MEMORY = 2


def digest(vectors: np.ndarray) -> str:
    """A short checksum of an array's bytes: names the cached copy and the index built from it."""
    return hashlib.sha256(np.ascontiguousarray(vectors).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class _Copy:
    """One version as a station holds it."""

    exact: ExactSearch
    vectors: np.ndarray
    digest: str


class VersionVectors:
    """Each bank version's vectors, read from Milvus once per version, and exact search over them."""

    def __init__(self, store: BankStore, cache: Path | None = None):
        self.store = store
        # One folder per Milvus address, so that two servers' versions never mix.
        self.folder = (cache or cache_folder("banks")) / hashlib.sha256(store.uri.encode()).hexdigest()[:16]
        self._held: OrderedDict[str, _Copy] = OrderedDict()
        self._lock = threading.Lock()

    def vectors(self, version: str) -> np.ndarray:
        """All of `version`'s vectors, row i = id i: from memory, the disk cache (checked against
        Milvus) or Milvus itself."""
        return self._prepare(version).vectors

    def exact(self, version: str) -> ExactSearch:
        return self._prepare(version).exact

    def checksum(self, version: str) -> str:
        """`digest` of `version`'s vectors: what names its cached copy and anything built from it."""
        return self._prepare(version).digest

    def precise(
        self, version: str, queries: np.ndarray, top_k: int, _: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over `version` (a `bank.SearchFunction`; search parameters do not apply)."""
        return self.exact(version)(queries, top_k)

    def _prepare(self, version: str) -> _Copy:
        with self._lock:  # one reader per version, whichever thread asks first
            if version not in self._held:
                loaded = self._load(version)
                if loaded is None:
                    vectors = self.store.read_vectors(version)
                    loaded = vectors, digest(vectors)
                    self._save(version, *loaded)
                vectors, checksum = loaded
                self._held[version] = _Copy(ExactSearch(vectors, stage_threads()), vectors, checksum)
                while len(self._held) > VERSIONS_IN_MEMORY:
                    self._held.popitem(last=False)
            self._held.move_to_end(version)
            return self._held[version]

    def _load(self, version: str) -> tuple[np.ndarray, str] | None:
        """The cached copy and its checksum, if it is intact (the checksum in its name) and
        matches Milvus: the same row count, and its middle vector equal to Milvus' own."""
        found = None
        for path in self.folder.glob(f"{version}.*.npy"):
            try:
                loaded = np.load(path)
            except Exception:  # empty, truncated or not an array (np.load raises several types)
                continue
            if isinstance(loaded, np.ndarray) and path.name == f"{version}.{digest(loaded)}.npy":
                found = loaded, path.name.split(".")[-2]
        if found is None:
            return None
        vectors, rows = found[0], self.store.vector_count(version)
        if vectors.ndim != 2 or len(vectors) != rows or rows == 0:
            return None
        probe = self.store.get_vectors(version, [rows // 2])[0]
        return found if np.array_equal(probe, vectors[rows // 2]) else None

    def _save(self, version: str, vectors: np.ndarray, checksum: str) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.folder)
            for old in self.folder.glob(f"{version}.*.npy"):  # damaged or stale copies
                old.unlink(missing_ok=True)
            save_atomically(self.folder / f"{version}.{checksum}.npy", lambda path: np.save(path, vectors))
        except OSError:  # a cache that cannot be written: read from Milvus again next time
            pass
