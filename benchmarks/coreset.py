"""Coreset selection: the pruned greedy k-centre against the plain loop and an anomalib-style one.

All run on the patch features of the same training images (default configuration:
EfficientNet-Lite0, 256 px, 152 dims) with the same seed. `pruned` (what ingest uses),
`plain32` (the textbook loop in float32: one matrix-vector product per pick, the usual fast
version) and `plain64` (the same loop in float64, the exact reference) share the 128-dim
Gaussian projection, so their picks can be compared one by one; `anomalib` projects
with scikit-learn's SparseRandomProjection (eps 0.9; where that would need more dims than
the features have, it uses the features as they are) and recomputes each row's distance to the
new pick from scratch, as anomalib's KCenterGreedy does. The covering radius (largest distance
from any patch to its nearest pick, in the full 152-dim feature space) says how well each
coreset covers the features: lower is better.

    python benchmarks/coreset.py --images 209 --methods pruned,plain32,plain64
    python benchmarks/coreset.py --images 50
    python benchmarks/coreset.py --data ../shared/data/magnetic_tile_defect --category magnetic_tile \
        --images 300 --image-size 384 --ratio 0.01 --methods pruned,plain32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.random_projection import SparseRandomProjection

from patchcore_milvus.config import Config
from patchcore_milvus.coreset import coreset_size, covering_radius, greedy_coreset, greedy_coreset_plain
from patchcore_milvus.features import FeaturePipeline
from patchcore_milvus.images import list_images
from patchcore_milvus.ingest import extract_patches


def anomalib_style(features: torch.Tensor, size: int, seed: int) -> np.ndarray:
    try:
        projected = SparseRandomProjection(eps=0.9, random_state=seed).fit_transform(features.numpy())
    except ValueError:  # the JL dimension for eps 0.9 exceeds the 152 feature dims: nothing to reduce
        projected = features.numpy()
    z = torch.from_numpy(np.asarray(projected, dtype=np.float32))
    nearest = torch.full((len(z),), float("inf"))
    current = int(np.random.default_rng(seed).integers(len(z)))
    picks = np.empty(size, dtype=np.int64)
    for i in range(size):
        picks[i] = current
        nearest = torch.minimum(nearest, torch.linalg.norm(z - z[current], dim=1))
        nearest[current] = 0.0
        current = int(torch.argmax(nearest))
    return picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--images", type=int, default=209, help="the first N training images")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--methods", default="pruned,plain32,plain64,anomalib")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=256, help="the input size (the README's first table: 256)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    paths = list_images(args.data / args.category / "train" / "good")[: args.images]
    with tempfile.TemporaryDirectory() as folder:
        pipeline = FeaturePipeline.from_config(Config(image_size=args.image_size, aspect="square"))
        patches = extract_patches(pipeline, paths, 8, 128, args.seed, Path(folder), progress=True)
        features = torch.from_numpy(np.array(patches.full))
    projected = patches.projected
    size = coreset_size(len(features), args.ratio, None)
    print(f"{args.category}: {len(paths)} images, {len(features)} patches x {features.shape[1]} dims, {size} picks")

    runners = {
        "pruned": lambda: greedy_coreset(projected, size, args.seed, progress=True).picks,
        "plain32": lambda: greedy_coreset_plain(projected, size, args.seed, torch.float32),
        "plain64": lambda: greedy_coreset_plain(projected, size, args.seed, torch.float64),
        "anomalib": lambda: anomalib_style(features, size, args.seed),
    }
    started = time.perf_counter()
    greedy_coreset(projected[:1000], 10)  # numba compiles on first use (or loads its cache): not part of the timing
    print(f"  compiling the pruned loop: {time.perf_counter() - started:.1f} s")
    results = {}
    for name in args.methods.split(","):
        started = time.perf_counter()
        picks = runners[name]()
        seconds = time.perf_counter() - started
        results[name] = (picks, seconds, covering_radius(features, picks))
        print(f"  {name}: {seconds:.1f} s", flush=True)

    baseline = "plain32" if "plain32" in results else None
    print(f"{'method':<10}{'seconds':>10}{'ms/pick':>10}{'radius':>10}{'vs pruned':>11}{'picks = plain64':>17}")
    for name, (picks, seconds, radius) in results.items():
        ratio = f"{seconds / results['pruned'][1]:.1f}x" if "pruned" in results else "-"
        same = f"{np.mean(picks == results['plain64'][0]):.2%}" if "plain64" in results else "-"
        print(f"{name:<10}{seconds:>10.1f}{1000 * seconds / size:>10.2f}{radius:>10.4f}{ratio:>11}{same:>17}")
    if baseline and "pruned" in results:
        print(f"pruned is {results[baseline][1] / results['pruned'][1]:.1f}x faster than the float32 plain loop")


if __name__ == "__main__":
    main()
