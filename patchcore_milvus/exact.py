"""Exact nearest neighbours in-process: the reference that Milvus' approximate index is measured against."""

from __future__ import annotations

import numpy as np
import torch


class ExactSearch:
    """Brute-force L2 search (torch) over a bank's vectors, as read back from Milvus."""

    def __init__(self, vectors: np.ndarray, chunk: int = 1024):
        self.bank = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        self.bank_norms = (self.bank * self.bank).sum(dim=1)
        self.chunk = chunk

    def __call__(self, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Euclidean distances, ids), each (n, top_k), nearest first: the same contract as Milvus search."""
        distances, ids = [], []
        for start in range(0, len(queries), self.chunk):
            block = torch.from_numpy(np.ascontiguousarray(queries[start : start + self.chunk], dtype=np.float32))
            squared = (block * block).sum(dim=1, keepdim=True) - 2.0 * block @ self.bank.T + self.bank_norms
            nearest = torch.topk(squared, k=min(top_k, len(self.bank)), dim=1, largest=False)
            distances.append(nearest.values.clamp_min(0).sqrt())
            ids.append(nearest.indices)
        return torch.cat(distances).numpy(), torch.cat(ids).numpy().astype(np.int64)
