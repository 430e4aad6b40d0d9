"""Square squash or the images' own aspect ratio: detection, time and memory side by side.

For each set, one ingest and one `evaluate` (Milvus search) per `aspect` setting, on a fresh
Milvus Lite file each, and one row per run: image AUROC, pixel AUROC, AUPRO, the shape images
are resized to, patches per image, ingest seconds, ms per test image, the bank's size.

- `magnetic_tile` (../shared/data/magnetic_tile_defect): grey tiles of many shapes (aspect
  ratios 0.4 to 2.5), so `auto` squares them; `keep` resizes every tile to their median shape.
- `bottle_band`: MVTec AD bottle cut to its middle 900 x 360 band (2.5:1, the shape of a long
  part), masks cut alike, defect images whose defect lies outside the band left out. Written to
  a temporary folder on each run, never into the repository.

    python benchmarks/aspect.py --ratio 0.01
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchcore_milvus.bank import Bank
from patchcore_milvus.config import Config
from patchcore_milvus.evaluate import evaluate_category
from patchcore_milvus.images import list_images
from patchcore_milvus.ingest import fit_bank
from patchcore_milvus.mvtec import GOOD, labelled_test_images, train_folder

MVTEC = Path("../shared/data/mvtec_ad")
MAGNETIC = Path("../shared/data/magnetic_tile_defect")
BAND = (900, 360)  # width, height of the band cut from bottle's 900 x 900 images


def bottle_band(target: Path) -> Path:
    """The band set under `target`; returns its DATA_ROOT."""
    source = MVTEC / "bottle"
    root = target / "derived"
    top = (900 - BAND[1]) // 2
    box = (0, top, BAND[0], top + BAND[1])

    def cut(path: Path, out: Path) -> Image.Image:
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            band = image.crop(box)
        band.save(out)
        return band

    for path in list_images(source / "train" / GOOD):
        cut(path, root / "bottle_band" / "train" / GOOD / path.name)
    for image in labelled_test_images(source):
        name = f"{image.defect}/{image.path.name}"
        if image.mask_path is not None:
            with Image.open(image.mask_path) as mask:
                if not np.asarray(mask.crop(box)).any():
                    continue  # the defect lies outside the band: not a defect image of this set
            cut(image.mask_path, root / "bottle_band" / "ground_truth" / image.defect / image.mask_path.name)
        cut(image.path, root / "bottle_band" / "test" / name)
    return root


def run(data_root: Path, category: str, config: Config, threads: int) -> dict:
    """One ingest and evaluate, in a process of its own (so that its peak memory is its own)."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    summary = fit_bank(category, list_images(train_folder(data_root, category)), config)
    ingest_seconds = time.perf_counter() - started
    bank = Bank.open(category, config)
    evaluation = evaluate_category(bank, category, data_root / category, "milvus", 256, progress=False)
    metrics = evaluation.report["search"]["milvus"]
    height, width = bank.features.preprocess.input_shape
    return {
        "image_auroc": metrics["image_auroc"],
        "pixel_auroc": metrics["pixel_auroc"],
        "aupro": metrics["aupro"],
        "shape": f"{width} x {height}",
        "patches": -(-height // 8) * -(-width // 8),
        "ingest_s": ingest_seconds,
        "ms": 1000 / metrics["images_per_second"],
        "bank": summary.bank_size,
        "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.01, help="coreset ratio")
    parser.add_argument("--aspect", action="append", help="settings to compare (default: square, keep)")
    parser.add_argument("--set", action="append", choices=["bottle_band", "magnetic_tile"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    aspects = args.aspect or ["square", "keep"]
    with tempfile.TemporaryDirectory(prefix="aspect-") as work:
        sets = {"bottle_band": lambda: bottle_band(Path(work)), "magnetic_tile": lambda: MAGNETIC}
        chosen = args.set or list(sets)
        columns = ["set", "aspect", "image AUROC", "pixel AUROC", "AUPRO", "input (w x h)", "patches", "ingest s"]
        columns += ["ms/img", "bank", "peak GiB"]
        rows = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        for name in chosen:
            data_root = sets[name]()
            for aspect in aspects:
                config = Config(
                    uri=str(Path(work) / f"{name}-{aspect}.db"),
                    coreset_ratio=args.ratio,
                    aspect=aspect,
                    progress=False,
                    num_threads=args.threads,
                )
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
                    r = child.submit(run, data_root, name, config, args.threads).result()
                rows.append(
                    f"| {name} | {aspect} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['aupro']:.4f} | "
                    f"{r['shape']} | {r['patches']} | {r['ingest_s']:.1f} | {r['ms']:.1f} | {r['bank']} | "
                    f"{r['peak_gib']:.2f} |"
                )
                print(rows[-1], flush=True)
    print(f"\ncoreset ratio {args.ratio}; peak GiB: the resident peak of the run's own process")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
