"""`search: local`: a station's own index over the bank version it scores, searched in-process.

Milvus stays the one place where banks live, are versioned, appended to and rolled back; a
station mirrors the version the category's alias points at (its vectors, `mirror.py`) and builds
an in-process faiss index over them with the bank's own index parameters (HNSW: M,
efConstruction; IVF: nlist), cached on disk per version beside the vectors it was built from.
Every patch is searched at the bank's search width; the recheck of each image's largest distances
and the eq. 7 neighbours are exact, as for `search: milvus`. When the alias moves, the new
version's index is built in a background thread while Milvus answers.

A bank of up to `EXACT_UP_TO` vectors is searched exhaustively instead: exact, and no slower
there. On one core of a 2-core machine, one 384 px image's 2,304 patches took 61.9 ms against
bottle's 4,815 vectors of 152 dims, 68.4 ms in HNSW at ef 64 (recall@1 0.9996); against 10,000
training patches 121.8 against 72.2 ms (`python benchmarks/local_search.py --uri bottle.db`).
The exhaustive cost grows with the bank (about 12.5 µs per vector and image), HNSW's hardly: they
meet near 5,500 vectors.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from patchcore_milvus.config import stage_threads
from patchcore_milvus.files import save_atomically
from patchcore_milvus.milvus import BankStore
from patchcore_milvus.mirror import VERSIONS_IN_MEMORY, VersionVectors

# Banks this small are searched exhaustively (see the module's docstring).
EXACT_UP_TO = 5000


def exhaustive_for(vectors: int) -> bool:
    return vectors <= EXACT_UP_TO


class Replica:
    """One version's vectors in a faiss index with the bank's index parameters (exhaustive for a
    bank of up to `EXACT_UP_TO` vectors)."""

    def __init__(self, index: Any):
        self.index = index

    @property
    def exhaustive(self) -> bool:
        import faiss

        return isinstance(self.index, faiss.IndexFlat)

    @classmethod
    def build(cls, vectors: np.ndarray, index_type: str, index_params: dict[str, Any]) -> Replica:
        import faiss

        dim = vectors.shape[1]
        if exhaustive_for(len(vectors)):
            index = faiss.IndexFlatL2(dim)
        elif index_type.startswith("HNSW"):
            index = faiss.IndexHNSWFlat(dim, int(index_params["M"]))
            index.hnsw.efConstruction = int(index_params["efConstruction"])
        else:  # IVF_FLAT, IVF_SQ8: the same lists, vectors kept unquantised
            nlist = min(int(index_params["nlist"]), len(vectors))
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
            index.train(vectors)
        index.add(vectors)
        return cls(index)

    def search(self, vectors: np.ndarray, top_k: int, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.exhaustive:
            options = None
        elif "ef" in params:
            options = faiss.SearchParametersHNSW(efSearch=max(int(params["ef"]), top_k))
        else:
            options = faiss.SearchParametersIVF(nprobe=int(params["nprobe"]))
        faiss.omp_set_num_threads(stage_threads())  # for the calling thread; the extractor has the rest
        squared, ids = self.index.search(queries, top_k, params=options)
        distances = np.sqrt(np.maximum(squared, 0.0))
        distances[ids < 0] = np.inf
        return distances, ids.astype(np.int64)

    def save(self, path: Path) -> None:
        """Written through a temporary file and renamed (never half-written)."""
        import faiss

        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomically(path, lambda temporary: faiss.write_index(self.index, temporary))

    @classmethod
    def load(cls, path: Path) -> Replica | None:
        import faiss

        if not path.is_file():
            return None
        try:
            return cls(faiss.read_index(str(path)))
        except (OSError, ValueError, RuntimeError):  # a damaged cache file: rebuilt
            return None


class LocalReplicas:
    """Replicas of a store's bank versions, for `Bank`'s search of every patch."""

    def __init__(self, store: BankStore, mirror: VersionVectors | None = None):
        self.store = store
        self.mirror = mirror or VersionVectors(store)
        self._ready: OrderedDict[str, Replica] = OrderedDict()
        self._building: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def index_path(self, version: str) -> Path:
        """The index file of `version` built from exactly its mirrored vectors (their digest in its name)."""
        return self.mirror.folder / f"{version}.{self.mirror.checksum(version)}.faiss"

    def prepare(self, version: str) -> Replica:
        """The version's replica, built (or loaded from the cache) now."""
        with self._lock:
            if version in self._ready:
                return self._ready[version]
        vectors = self.mirror.vectors(version)
        path = self.index_path(version)
        replica = Replica.load(path)
        if (
            replica is None
            or replica.index.ntotal != len(vectors)
            or replica.exhaustive != exhaustive_for(len(vectors))  # cached before EXACT_UP_TO changed
        ):
            description = self.store.read_description(version)
            replica = Replica.build(vectors, description.index.type, description.index.params)
            with contextlib.suppress(OSError):  # a cache that cannot be written: built again next time
                replica.save(path)
        with self._lock:
            self._ready[version] = replica
            self._ready.move_to_end(version)
            while len(self._ready) > VERSIONS_IN_MEMORY:
                self._ready.popitem(last=False)
        return replica

    def _replica(self, version: str) -> Replica | None:
        """The version's replica if it is ready; else one is started in the background and None
        says: ask Milvus meanwhile."""
        with self._lock:
            if version in self._ready:
                self._ready.move_to_end(version)
                return self._ready[version]
            if version not in self._building or not self._building[version].is_alive():
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
