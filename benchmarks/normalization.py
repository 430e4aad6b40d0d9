"""Which input normalisation suits the EfficientNet-Lite0 weights better: ImageNet's or their own?

Builds one bank per choice on the same images (the default configuration otherwise), scores
the category's whole test set and prints image AUROC and pixel AUROC side by side. Pixel AUROC
is computed on maps and masks resized to 256 x 256, over all test pixels.

    python benchmarks/normalization.py --data ../shared/data/mvtec_ad --category bottle --coreset-ratio 0.01
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from patchcore_milvus import Bank, Config, fit_bank
from patchcore_milvus.evaluate import resize_map
from patchcore_milvus.images import list_images
from patchcore_milvus.mvtec import GOOD, ground_truth, labelled_test_images, train_folder

PIXEL_GRID = 256


def evaluate(root: Path, config: Config, category: str) -> dict[str, float]:
    started = time.perf_counter()
    summary = fit_bank(category, list_images(train_folder(root.parent, root.name)), config, root=root)
    fit_seconds = time.perf_counter() - started
    test_images = labelled_test_images(root)
    labels, scores, pixel_labels, pixel_scores = [], [], [], []
    results = Bank.open(category, config).score_paths([image.path for image in test_images])
    for image, (_, result) in zip(test_images, results):
        labels.append(int(image.defect != GOOD))
        scores.append(result.image_score)
        pixel_scores.append(resize_map(result.anomaly_map, PIXEL_GRID).ravel())
        pixel_labels.append(ground_truth(image, PIXEL_GRID).ravel())
    return {
        "image_auroc": roc_auc_score(labels, scores),
        "pixel_auroc": roc_auc_score(np.concatenate(pixel_labels), np.concatenate(pixel_scores)),
        "coreset": summary.coreset_size,
        "fit_s": fit_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = args.data / args.category
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for normalization in ("imagenet", "backbone"):
            config = Config(
                uri=str(Path(folder) / "bench.db"),
                normalization=normalization,
                coreset_ratio=args.coreset_ratio,
                image_size=256,  # the size its README figures are at
                progress=False,
            )
            rows[normalization] = evaluate(root, config, f"{args.category}_{normalization}")
    print(f"{args.category}, coreset ratio {args.coreset_ratio}, efficientnet_lite0 at 256 px")
    print(f"{'normalization':<14}{'image AUROC':>13}{'pixel AUROC':>13}{'coreset':>9}{'fit s':>8}")
    for name, row in rows.items():
        print(
            f"{name:<14}{row['image_auroc']:>13.4f}{row['pixel_auroc']:>13.4f}{row['coreset']:>9}{row['fit_s']:>8.0f}"
        )
    delta = rows["imagenet"]["pixel_auroc"] - rows["backbone"]["pixel_auroc"]
    print(f"pixel AUROC, imagenet - backbone: {delta:+.4f}")


if __name__ == "__main__":
    main()
