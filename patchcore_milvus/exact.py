"""Exact nearest neighbours in-process: the reference that Milvus' approximate index is measured
against, and the precise search of a station's local replica. numpy only (no torch)."""

from __future__ import annotations

import numpy as np


class ExactSearch:
    """Brute-force L2 search over a bank's vectors, in chunks of queries."""

    def __init__(self, vectors: np.ndarray, chunk: int = 1024):
        self.bank = np.ascontiguousarray(vectors, dtype=np.float32)
        self.bank_norms = np.einsum("ij,ij->i", self.bank, self.bank)
        self.chunk = chunk

    def __call__(self, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Euclidean distances, ids), each (n, top_k), nearest first: the same contract as Milvus search."""
        k = min(top_k, len(self.bank))
        distances = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), self.chunk):
            block = np.ascontiguousarray(queries[start : start + self.chunk], dtype=np.float32)
            # |q|^2 - 2 q.v + |v|^2; |q|^2 is the same along a row, so it is added to the k kept only.
            partial = self.bank_norms - 2.0 * (block @ self.bank.T)
            if k == 1:
                nearest = partial.argmin(axis=1)[:, None]
            else:
                nearest = np.argpartition(partial, k - 1, axis=1)[:, :k]
                order = np.argsort(np.take_along_axis(partial, nearest, axis=1), axis=1, kind="stable")
                nearest = np.take_along_axis(nearest, order, axis=1)
            squared = np.take_along_axis(partial, nearest, axis=1) + np.einsum("ij,ij->i", block, block)[:, None]
            distances[start : start + len(block)] = np.sqrt(np.maximum(squared, 0.0))
            ids[start : start + len(block)] = nearest
        return distances, ids
