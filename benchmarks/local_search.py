"""`search: local` on one core: exhaustive search against HNSW (the bank's M and efConstruction,
ef 64), per bank size, on real patches: where replica.EXACT_UP_TO comes from.

Banks: the category's own version, then as many of its training images' patches as each larger
size asks for (drawn at random, seed 0: real features, as a bigger coreset would hold). Queries:
the patches of `--images` test images. One thread each, as a station gives the search one core
beside the extractor. Prints ms per image (its patches in one call) and HNSW's recall@1.

    python benchmarks/local_search.py --uri bottle.db   # after `patchcore-milvus ingest ... --uri bottle.db`
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np

from patchcore_milvus.ann_check import recall_at_1
from patchcore_milvus.bank import Bank
from patchcore_milvus.config import Config
from patchcore_milvus.images import list_images, load_rgb


def patches_of(bank: Bank, paths: list[Path]) -> np.ndarray:
    out = []
    for start in range(0, len(paths), 8):
        images = [load_rgb(p) for p in paths[start : start + 8]]
        patches = bank.features(np.stack([bank.features.preprocess(i) for i in images]))
        out.append(patches.reshape(-1, patches.shape[-1]))
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def timed(
    index: faiss.Index, queries: np.ndarray, params: faiss.SearchParameters | None
) -> tuple[float, np.ndarray, np.ndarray]:
    """Median seconds of three calls, and the (distances, ids) found."""
    index.search(queries[:256], 1, params=params)  # warm
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        squared, ids = index.search(queries, 1, params=params)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds)), np.sqrt(np.maximum(squared[:, 0], 0)), ids[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uri", required=True)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad/bottle"))
    parser.add_argument("--images", type=int, default=8, help="test images whose patches are the queries")
    parser.add_argument("--sizes", default="10000,20000,40000", help="larger banks, drawn from training patches")
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    bank = Bank.open(args.category, Config(uri=args.uri, progress=False))
    own = bank.store.read_vectors(bank.version).astype(np.float32)
    if not bank.description.index.type.startswith("HNSW"):
        raise SystemExit(f"{args.category}'s bank has a {bank.description.index.type} index; this compares HNSW")
    params = bank.description.index.params
    tests = list_images(args.data / "test", recursive=True)
    queries = patches_of(bank, [tests[i] for i in np.linspace(0, len(tests) - 1, args.images).astype(int)])
    per_image = len(queries) // args.images
    sizes = [int(s) for s in args.sizes.split(",") if s]
    rng = np.random.default_rng(0)
    training = list_images(args.data / "train" / "good")
    pool = patches_of(bank, [training[i] for i in rng.permutation(len(training))[:40]])
    print(f"{len(queries)} queries ({per_image} patches per image, {args.images} images), one thread")
    print(f"HNSW M {params['M']}, efConstruction {params['efConstruction']}, ef 64")
    print("| bank vectors | exhaustive ms per image | HNSW ms per image | HNSW / exhaustive | HNSW recall@1 |")
    print("| --- | --- | --- | --- | --- |")
    drawn = [pool[rng.choice(len(pool), min(n, len(pool)), replace=False)] for n in sizes]
    for label, vectors in [(f"{len(own):,} (the bank)", own)] + [(f"{len(v):,} (training patches)", v) for v in drawn]:
        flat = faiss.IndexFlatL2(vectors.shape[1])
        flat.add(vectors)
        hnsw = faiss.IndexHNSWFlat(vectors.shape[1], int(params["M"]))
        hnsw.hnsw.efConstruction = int(params["efConstruction"])
        hnsw.add(vectors)
        flat_s, exact, exact_ids = timed(flat, queries, None)
        hnsw_s, found, found_ids = timed(hnsw, queries, faiss.SearchParametersHNSW(efSearch=64))
        recall = recall_at_1(found, found_ids, exact, exact_ids, np.linalg.norm(queries, axis=1))
        flat_ms, hnsw_ms = flat_s * 1000 / args.images, hnsw_s * 1000 / args.images
        print(f"| {label} | {flat_ms:.1f} | {hnsw_ms:.1f} | {hnsw_ms / flat_ms:.2f}x | {recall:.4f} |")


if __name__ == "__main__":
    main()
