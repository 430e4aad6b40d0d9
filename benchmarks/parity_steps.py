"""The remaining steps where this project's PatchCore and anomalib's may differ, one at a time.

`anomalib_parity.py` measured the 3x3 average's border, the held-out images, the projection and
the eq. 7 weight. This script measures the rest, on bottle and the magnetic tiles at anomalib's
settings (every image squashed to 256 x 256, 1 % coreset, exact search, so that no search miss
moves a figure), pixel metrics at 256 px:

- **Resizing the input**: ours (PIL bilinear on the 8-bit image, which widens its filter when it
  shrinks, then rounds to 8 bits) against anomalib's (torchvision's bilinear with `antialias=True`
  on the image as floats) and bilinear without antialiasing (each input pixel from the 4 nearest
  source pixels). Each is one ingest and one scoring pass.
- **From patch distances to map and score**, all from the same pass's patch distances: ours (the
  grid upsampled bilinearly to the input, blurred with sigma 4, resized to the original image and
  from there to 256 px for the metrics) against the same at the input (no trip through the
  original size), anomalib 2.7.0's chain (`F.interpolate`'s default, nearest-neighbour, then the
  blur, at the input), other blur sigmas, and the image score taken as the blurred map's maximum
  instead of the worst patch (PatchCore eq. 6/7, as both tools do).

    python benchmarks/parity_steps.py            # both sets, about 15 minutes on 2 cores
    python benchmarks/parity_steps.py --set ../shared/data/mvtec_ad:bottle --seed 1
    python benchmarks/parity_steps.py --inputs 5    # how far the resized inputs lie apart, only
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as tvf
from PIL import Image

from patchcore_milvus.bank import Bank
from patchcore_milvus.config import Config
from patchcore_milvus.evaluate import HEADLINE_METRICS, ScoredSet, score_set, set_metrics
from patchcore_milvus.images import NORMALIZATION_STATS, Preprocess, list_images, load_rgb
from patchcore_milvus.ingest import fit_bank
from patchcore_milvus.mvtec import ground_truth, labelled_test_images, train_folder
from patchcore_milvus.scoring import _bilinear, _gaussian

SETS = ["../shared/data/mvtec_ad:bottle", "../shared/data/magnetic_tile_defect:magnetic_tile"]
SIZE = 256  # input and metrics, as anomalib_parity.py
SIGMA = 4.0

Resize = Callable[[Preprocess, Image.Image], np.ndarray]


def _normalised(preprocess: Preprocess, array: np.ndarray) -> np.ndarray:
    """(height, width, 3) floats in [0, 1] -> the network's (3, height, width) input."""
    mean = np.asarray(preprocess.mean, dtype=np.float32)
    std = np.asarray(preprocess.std, dtype=np.float32)
    return np.ascontiguousarray(((array - mean) / std).transpose(2, 0, 1))


def _torchvision(antialias: bool) -> Resize:
    def resize(preprocess: Preprocess, image: Image.Image) -> np.ndarray:
        floats = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        resized = tvf.resize(floats, list(preprocess.size), tvf.InterpolationMode.BILINEAR, antialias=antialias)
        return _normalised(preprocess, resized.permute(1, 2, 0).numpy())

    return resize


RESIZES: dict[str, Resize | None] = {
    "ours (PIL bilinear, 8 bits)": None,
    "anomalib's (torchvision, antialias, floats)": _torchvision(True),
    "no antialiasing (torchvision)": _torchvision(False),
}


def _chain(grid: int, sigma: float, nearest: bool) -> np.ndarray:
    """(SIZE, grid): one axis from the patch grid to the 256 px input, upsampled then blurred."""
    up = np.kron(np.eye(grid), np.ones((SIZE // grid, 1))) if nearest else _bilinear(grid, SIZE)
    return _gaussian(SIZE, sigma) @ up


def map_variants(scored: ScoredSet) -> dict[str, ScoredSet]:
    """The same patch distances turned into maps and scores the other ways."""

    def at_input(sigma: float, nearest: bool = False) -> list[np.ndarray]:
        out = []
        for distances in scored.patch_distances:
            rows, cols = _chain(distances.shape[0], sigma, nearest), _chain(distances.shape[1], sigma, nearest)
            out.append((rows @ distances @ cols.T).astype(np.float32))
        return out

    def variant(maps: list[np.ndarray], scores: np.ndarray | None = None) -> ScoredSet:
        chosen = scored.scores if scores is None else scores
        return ScoredSet(chosen, maps, [], [], [], scored.timings_ms, scored.seconds)

    at_input_maps = at_input(SIGMA)
    return {
        "ours: bilinear, blur 4, via the original size; worst patch (eq. 7)": scored,
        "bilinear and blur 4 at the input (no trip via the original size)": variant(at_input_maps),
        "anomalib's: nearest-neighbour upsampling, blur 4 at the input": variant(at_input(SIGMA, nearest=True)),
        "no blur (bilinear at the input)": variant(at_input(0.0)),
        "blur sigma 2": variant(at_input(2.0)),
        "blur sigma 8": variant(at_input(8.0)),
        "score: the blurred map's maximum": variant(at_input_maps, np.array([m.max() for m in at_input_maps])),
    }


def run_set(data_root: Path, category: str, resize: Resize | None, seed: int, work: Path) -> ScoredSet:
    """Ingest (with `resize` in place of ours) and one exact-search scoring pass of the test set."""
    original = Preprocess.__call__
    if resize is not None:
        Preprocess.__call__ = resize  # type: ignore[method-assign]
    try:
        config = Config(
            uri=str(work / "bank.db"), aspect="square", image_size=SIZE, coreset_ratio=0.01, seed=seed, progress=False
        )
        fit_bank(category, list_images(train_folder(data_root, category)), config)
        bank = Bank.open(category, config).with_exact_search()
        return score_set(bank, labelled_test_images(data_root / category), SIZE, "exact", progress=False)
    finally:
        Preprocess.__call__ = original  # type: ignore[method-assign]


def input_differences(data_root: Path, category: str, count: int) -> list[str]:
    """How far each other resize's network input lies from ours, in grey levels (of 255), on the
    first `count` training images: the largest and the mean absolute difference of each."""
    ours = Preprocess(SIZE, None, *NORMALIZATION_STATS[Config().normalization])
    levels = np.asarray(ours.std, dtype=np.float32)[:, None, None] * 255.0
    lines = []
    for path in list_images(train_folder(data_root, category))[:count]:
        image = load_rgb(path)
        mine = ours(image)
        for name, resize in RESIZES.items():
            if resize is not None:
                apart = np.abs(resize(ours, image) - mine) * levels
                lines.append(f"| {category} | {path.name} | {name} | {apart.max():.2f} | {apart.mean():.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", help="DATA_ROOT:CATEGORY (repeatable; default: both sets)")
    parser.add_argument("--seed", type=int, default=0, help="the hold-out split's and the coreset's seed")
    parser.add_argument("--inputs", type=int, metavar="N", help="only compare the inputs of N training images")
    args = parser.parse_args()
    if args.inputs:
        print(
            "| set | image | resize | largest difference from ours (of 255) | mean |\n| --- | --- | --- | --- | --- |"
        )
        for spec in args.set or SETS:
            root, category = spec.rsplit(":", 1)
            print("\n".join(input_differences(Path(root), category, args.inputs)))
        return
    rows = []
    for spec in args.set or SETS:
        root, category = spec.rsplit(":", 1)
        data_root = Path(root)
        test = labelled_test_images(data_root / category)
        truth = [ground_truth(i, SIZE) for i in test]
        baseline: dict | None = None
        for name, resize in RESIZES.items():
            started = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="parity-steps-") as work:
                scored = run_set(data_root, category, resize, args.seed, Path(work))
            variants = map_variants(scored) if resize is None else {"ours": scored}
            for step, variant in variants.items():
                metrics, _ = set_metrics(test, truth, variant, None, None)
                values = [metrics[k] for k in HEADLINE_METRICS]
                baseline = baseline or dict(zip(HEADLINE_METRICS, values))
                label = step if resize is None else f"resize: {name}"
                rows.append((category, label, values, [v - baseline[k] for k, v in zip(HEADLINE_METRICS, values)]))
            print(f"{category}: {name} done ({time.perf_counter() - started:.0f} s)", flush=True)

    print(f"\n256 x 256 input, 1 % coreset, seed {args.seed}, exact search, metrics at {SIZE} px")
    print("| set | step | image AUROC | pixel AUROC | AUPRO | difference from ours |")
    print("| --- | --- | --- | --- | --- | --- |")
    for category, label, values, moved in rows:
        shown = " | ".join(f"{v:.4f}" for v in values)
        print(f"| {category} | {label} | {shown} | {' / '.join(f'{d:+.4f}' for d in moved)} |")


if __name__ == "__main__":
    main()
