"""Milvus Lite's search time per image against the HNSW search width (ef) and images per call.

Ingests bottle (default configuration) into a fresh Milvus Lite file and searches the patches
of 16 test images (every fourth) with ef 16, 32 and 64, 1, 8 or 16 images per call, k = 1;
prints the median ms per image and recall@1 against exact search. Shows whether Lite's time
goes into the graph search (it would shrink with ef) or into a fixed cost per query vector.

    python benchmarks/lite_search_width.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from patchcore_milvus.config import Config
from patchcore_milvus.exact import ExactSearch
from patchcore_milvus.features import FeaturePipeline
from patchcore_milvus.images import list_images, load_rgb
from patchcore_milvus.ingest import fit_bank
from patchcore_milvus.milvus import BankStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="lite-width-") as work:
        config = Config(uri=str(Path(work) / "lite.db"), progress=False)
        fit_bank("bottle", list_images(args.data / "bottle" / "train" / "good"), config)
        store = BankStore.from_config(config)
        version = store.resolve("bottle")
        paths = sorted((args.data / "bottle" / "test").rglob("*.png"))[::4][:16]
        features = FeaturePipeline.from_config(config)
        patches = features(np.stack([features.preprocess(load_rgb(p)) for p in paths]))
        per_image = patches.shape[1] * patches.shape[2]
        queries = patches.reshape(-1, features.dim)
        exact = ExactSearch(store.read_vectors(version))(queries, 1)[0][:, 0]
        print(f"{len(paths)} images, {per_image} patches each; | ef | images per call | ms per image | recall@1 |")
        for ef in (16, 32, 64):
            for images in (1, 8, 16):
                n = images * per_image
                store.search(version, queries[:n], 1, {"ef": ef})  # warm-up
                times, correct = [], 0
                for start in range(0, len(queries), n):
                    t = time.perf_counter()
                    distances, _ = store.search(version, queries[start : start + n], 1, {"ef": ef})
                    times.append((time.perf_counter() - t) * 1000 / images)
                    correct += int(np.sum(distances[:, 0] <= exact[start : start + n] * (1 + 1e-4) + 1e-6))
                print(f"| {ef} | {images} | {np.median(times):.1f} | {correct / len(queries):.4f} |", flush=True)


if __name__ == "__main__":
    main()
