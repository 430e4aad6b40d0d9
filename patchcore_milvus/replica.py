"""`search: local`: a station's own copy of the bank version it scores, searched in-process.

Milvus stays the one place where banks live, are versioned, appended to and rolled back; a
station mirrors the version the category's alias points at: its vectors read from Milvus once,
an in-process faiss index with the bank's own index parameters (HNSW: M, efConstruction; IVF:
nlist), cached on disk per version and checked against Milvus (row count, a probe vector) before
use. Every patch is searched at the bank's search width; the recheck of each image's largest
distances and the eq. 7 neighbours are exact (brute force over the replica's vectors). When the
alias moves, the new version's replica is built in a background thread while Milvus answers.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import numpy as np

from patchcore_milvus.config import stage_threads
from patchcore_milvus.exact import ExactSearch
from patchcore_milvus.files import cache_folder, save_atomically
from patchcore_milvus.milvus import BankStore


class Replica:
    """One version's vectors in a faiss index, and an exact search over the same vectors."""

    def __init__(self, index: Any, vectors: np.ndarray):
        self.index = index
        self.vectors = vectors
        self.exact = ExactSearch(vectors, stage_threads())

    @classmethod
    def build(cls, vectors: np.ndarray, index_type: str, index_params: dict[str, Any]) -> Replica:
        import faiss

        dim = vectors.shape[1]
        if index_type.startswith("HNSW"):
            index = faiss.IndexHNSWFlat(dim, int(index_params["M"]))
            index.hnsw.efConstruction = int(index_params["efConstruction"])
        else:  # IVF_FLAT, IVF_SQ8: the same lists, vectors kept unquantised
            nlist = min(int(index_params["nlist"]), len(vectors))
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
            index.train(vectors)
        index.add(vectors)
        return cls(index, vectors)

    def search(self, vectors: np.ndarray, top_k: int, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        if "ef" in params:
            options = faiss.SearchParametersHNSW(efSearch=max(int(params["ef"]), top_k))
        else:
            options = faiss.SearchParametersIVF(nprobe=int(params["nprobe"]))
        faiss.omp_set_num_threads(stage_threads())  # for the calling thread; the extractor has the rest
        squared, ids = self.index.search(queries, top_k, params=options)
        distances = np.sqrt(np.maximum(squared, 0.0))
        distances[ids < 0] = np.inf
        return distances, ids.astype(np.int64)

    def save(self, folder: Path, stem: str) -> None:
        """Index and vectors, each written through a temporary file and renamed (never half-written)."""
        import faiss

        folder.mkdir(parents=True, exist_ok=True)
        save_atomically(folder / f"{stem}.npy", lambda path: np.save(path, self.vectors))
        save_atomically(folder / f"{stem}.faiss", lambda path: faiss.write_index(self.index, path))

    @classmethod
    def load(cls, folder: Path, stem: str) -> Replica | None:
        import faiss

        index_path, vectors_path = folder / f"{stem}.faiss", folder / f"{stem}.npy"
        if not (index_path.is_file() and vectors_path.is_file()):
            return None
        try:
            return cls(faiss.read_index(str(index_path)), np.load(vectors_path))
        except (OSError, ValueError, RuntimeError):  # a damaged cache file: rebuilt
            return None


class LocalReplicas:
    """Replicas of a store's bank versions, for `Bank`'s search and precise search."""

    def __init__(self, store: BankStore, cache: Path | None = None):
        self.store = store
        # One cache folder per Milvus address, so that two servers' versions never mix.
        self.cache = (cache or cache_folder("replicas")) / hashlib.sha256(store.uri.encode()).hexdigest()[:16]
        self._ready: dict[str, Replica] = {}
        self._building: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def prepare(self, version: str) -> Replica:
        """The version's replica, built (or loaded from the cache and checked) now."""
        with self._lock:
            if version in self._ready:
                return self._ready[version]
        replica = Replica.load(self.cache, version)
        if replica is None or not self._matches(version, replica):
            description = self.store.read_description(version)
            replica = Replica.build(self.store.read_vectors(version), description.index.type, description.index.params)
            replica.save(self.cache, version)
        with self._lock:
            self._ready[version] = replica
        return replica

    def _matches(self, version: str, replica: Replica) -> bool:
        """Same row count as the version in Milvus, and its middle vector equal to Milvus' own."""
        rows = self.store.vector_count(version)
        if rows != len(replica.vectors) or rows != replica.index.ntotal:
            return False
        probe = self.store.get_vectors(version, [rows // 2])[0]
        return bool(np.array_equal(probe, replica.vectors[rows // 2]))

    def _replica(self, version: str) -> Replica | None:
        """The version's replica if it is ready; else one is started in the background and None
        says: ask Milvus meanwhile."""
        with self._lock:
            if version in self._ready:
                return self._ready[version]
            if version not in self._building:
                thread = threading.Thread(target=self.prepare, args=(version,), daemon=True, name="replica")
                self._building[version] = thread
                thread.start()
        return None

    def search(
        self, version: str, vectors: np.ndarray, top_k: int, params: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        """At the bank's width on the replica; through Milvus while the replica is being built."""
        replica = self._replica(version)
        if replica is None:
            return self.store.search(version, vectors, top_k, params)
        return replica.search(vectors, top_k, params)

    def precise(
        self, version: str, vectors: np.ndarray, top_k: int, params: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact on the replica; Milvus' recheck width while it is being built."""
        replica = self._replica(version)
        if replica is None:
            return self.store.search(version, vectors, top_k, params)
        return replica.exact(vectors, top_k)
