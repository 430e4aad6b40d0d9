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


class VersionVectors:
    """Each bank version's vectors, read from Milvus once per version, and exact search over them."""

    def __init__(self, store: BankStore, cache: Path | None = None):
        self.store = store
        # One folder per Milvus address, so that two servers' versions never mix.
        self.folder = (cache or cache_folder("banks")) / hashlib.sha256(store.uri.encode()).hexdigest()[:16]
        self._exact: OrderedDict[str, ExactSearch] = OrderedDict()
        self._vectors: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def vectors(self, version: str) -> np.ndarray:
        """All of `version`'s vectors, row i = id i: from memory, the disk cache (checked against
        Milvus) or Milvus itself."""
        return self._prepare(version)[1]

    def exact(self, version: str) -> ExactSearch:
        return self._prepare(version)[0]

    def precise(
        self, version: str, queries: np.ndarray, top_k: int, _: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over `version` (a `bank.SearchFunction`; search parameters do not apply)."""
        return self.exact(version)(queries, top_k)

    def _prepare(self, version: str) -> tuple[ExactSearch, np.ndarray]:
        with self._lock:  # one reader per version, whichever thread asks first
            if version not in self._exact:
                vectors = self._load(version)
                if vectors is None:
                    vectors = self.store.read_vectors(version)
                    self._save(version, vectors)
                self._exact[version], self._vectors[version] = ExactSearch(vectors, stage_threads()), vectors
                while len(self._exact) > VERSIONS_IN_MEMORY:
                    dropped, _ = self._exact.popitem(last=False)
                    del self._vectors[dropped]
            self._exact.move_to_end(version)
            return self._exact[version], self._vectors[version]

    def _load(self, version: str) -> np.ndarray | None:
        """The cached copy if it is intact (its checksum, in its name) and matches Milvus: the
        same row count, and its middle vector equal to Milvus' own."""
        vectors = None
        for path in self.folder.glob(f"{version}.*.npy"):
            try:
                loaded = np.load(path)
            except Exception:  # empty, truncated or not an array (np.load raises several types)
                continue
            if isinstance(loaded, np.ndarray) and path.name == f"{version}.{digest(loaded)}.npy":
                vectors = loaded
        if vectors is None:
            return None
        rows = self.store.vector_count(version)
        if vectors.ndim != 2 or len(vectors) != rows or rows == 0:
            return None
        probe = self.store.get_vectors(version, [rows // 2])[0]
        return vectors if np.array_equal(probe, vectors[rows // 2]) else None

    def _save(self, version: str, vectors: np.ndarray) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.folder)
            for old in self.folder.glob(f"{version}.*.npy"):  # damaged or stale copies
                old.unlink(missing_ok=True)
            save_atomically(self.folder / f"{version}.{digest(vectors)}.npy", lambda path: np.save(path, vectors))
        except OSError:  # a cache that cannot be written: read from Milvus again next time
            pass
