"""Exact nearest-neighbour search: faiss' brute-force index (what exact.ExactSearch uses) against
the same sum written in numpy, on a bank version's own vectors and the patches of real images.

Queries: the patches of as many test images as ingest holds out for bottle's thresholds (21,
i.e. 21,504 patches); the two answers are checked to agree.

    python benchmarks/exact.py --uri bottle.db   # after `patchcore-milvus ingest ... --uri bottle.db`
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from patchcore_milvus.bank import Bank
from patchcore_milvus.config import Config
from patchcore_milvus.exact import ExactSearch
from patchcore_milvus.images import list_images, load_rgb


def numpy_nearest(bank: np.ndarray, queries: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """|q|^2 - 2 q.v + |v|^2 with numpy's BLAS, in chunks of queries: nearest distance and id."""
    norms = np.einsum("ij,ij->i", bank, bank)
    distances, ids = np.empty(len(queries), np.float32), np.empty(len(queries), np.int64)
    for start in range(0, len(queries), chunk):
        block = queries[start : start + chunk]
        partial = norms - 2.0 * (block @ bank.T)
        nearest = partial.argmin(axis=1)
        squared = partial[np.arange(len(block)), nearest] + np.einsum("ij,ij->i", block, block)
        rows = slice(start, start + len(block))
        distances[rows], ids[rows] = np.sqrt(np.maximum(squared, 0)), nearest
    return distances, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uri", required=True)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--images", type=Path, default=Path("../shared/data/mvtec_ad/bottle/test"))
    parser.add_argument("--count", type=int, default=21)
    args = parser.parse_args()
    bank = Bank.open(args.category, Config(uri=args.uri, progress=False))
    vectors = bank.store.read_vectors(bank.version)
    images = [load_rgb(p) for p in list_images(args.images, recursive=True)[: args.count]]
    patches = bank.features(np.stack([bank.features.preprocess(i) for i in images]))
    queries = np.ascontiguousarray(patches.reshape(-1, patches.shape[-1]))
    print(f"{len(queries)} queries against {len(vectors)} bank vectors of {vectors.shape[1]} dims")
    start = time.perf_counter()
    ours, ours_ids = ExactSearch(vectors)(queries, 1)
    faiss_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs, theirs_ids = numpy_nearest(vectors, queries)
    numpy_s = time.perf_counter() - start
    same = np.mean((ours_ids[:, 0] == theirs_ids) | np.isclose(ours[:, 0], theirs, rtol=1e-4))
    ratio = numpy_s / faiss_s
    print(f"faiss (ExactSearch) {faiss_s:.2f} s, numpy {numpy_s:.2f} s ({ratio:.2f}x); same answers {same:.4f}")


if __name__ == "__main__":
    main()
