"""Candidate settings side by side on more than one set: detection, time and memory.

For each set and each candidate (a few config options; the first is compared against), one
ingest and one `evaluate` (Milvus search) on a fresh Milvus Lite file, in a process of its own
(so that its peak memory is its own), and one row per run: image AUROC, pixel AUROC, AUPRO and
their differences from the first candidate, false positives and negatives at the stored
thresholds, the shape images are resized to, patches per image, ingest seconds, ms per test image
and its ratio to the first candidate's, the bank's size, the process' peak memory. Pixel metrics
at 256 px (short side) whatever the input size.

- `bottle` (../shared/data/mvtec_ad): square, large defects.
- `magnetic_tile` (../shared/data/magnetic_tile_defect): grey tiles of many shapes (aspect
  ratios 0.4 to 2.5, 130 to 620 pixels a side), so `aspect: auto` squares them.
- `bottle_band`: MVTec AD bottle cut to its middle 900 x 360 band (2.5:1, the shape of a long
  part), masks cut alike, defect images whose defect lies outside the band left out. Written to
  a temporary folder on each run, never into the repository.
- `bottle_grey`: bottle converted to grey, the same way (a grey set with bottle's defects).

    python benchmarks/candidates.py                     # the candidates below on bottle and magnetic_tile
    python benchmarks/candidates.py --set bottle_band --set magnetic_tile \
        --candidate image_size=256,aspect=square --candidate image_size=256,aspect=keep
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
import yaml
from PIL import Image

from patchcore_milvus.bank import Bank
from patchcore_milvus.config import Config
from patchcore_milvus.evaluate import HEADLINE_METRICS, evaluate_category
from patchcore_milvus.images import list_images
from patchcore_milvus.ingest import fit_bank
from patchcore_milvus.mvtec import GOOD, labelled_test_images, train_folder

MVTEC = Path("../shared/data/mvtec_ad")
MAGNETIC = Path("../shared/data/magnetic_tile_defect")
BAND = (900, 360)  # width, height of the band cut from bottle's 900 x 900 images
PIXEL_SIZE = 256

# 256 px (anomalib's squash and the default before) first, then one change each: what issue 16
# lists to measure (aspect: see bottle_band; bottle and the magnetic tiles are squared by `auto`).
CANDIDATES = [
    "image_size=256",
    "image_size=256,coreset_ratio=0.1",
    "image_size=320",
    "image_size=384",
    "image_size=448",
    "image_size=512",
    "image_size=512,tile=256",
    "image_size=256,center_crop=224",
    "image_size=256,normalization=backbone",
]


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


def bottle_grey(target: Path) -> Path:
    """bottle in grey (8-bit, one channel; masks as they are) under `target`; returns its DATA_ROOT:
    a second grey set beside the magnetic tiles, with bottle's own defects."""
    source = MVTEC / "bottle"
    root = target / "derived"
    for path in source.rglob("*.png"):
        out = root / "bottle_grey" / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            (image if "ground_truth" in path.parts else image.convert("L")).save(out)
    return root


def options_of(candidate: str) -> dict:
    """Config options from `k=v,k=v` (or `defaults`: none), values read as YAML."""
    if candidate == "defaults":
        return {}
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in candidate.split(","))}


def run(data_root: Path, category: str, config: Config, threads: int) -> dict:
    """One ingest and evaluate, in the calling process."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    summary = fit_bank(category, list_images(train_folder(data_root, category)), config)
    ingest_seconds = time.perf_counter() - started
    bank = Bank.open(category, config)
    evaluation = evaluate_category(bank, category, data_root / category, "milvus", PIXEL_SIZE, progress=False)
    metrics = evaluation.report["search"]["milvus"]
    height, width = bank.features.preprocess.input_shape
    at = metrics["at_threshold"]
    return {
        **{k: metrics[k] for k in HEADLINE_METRICS},
        "fp_fn": f"{at['false_positives']} / {at['false_negatives']}",
        "shape": f"{width} x {height}",
        "patches": -(-height // 8) * -(-width // 8),
        "ingest_s": ingest_seconds,
        "ms": 1000 / metrics["images_per_second"],
        "bank": summary.bank_size,
        "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def row(name: str, candidate: str, r: dict, first: dict) -> str:
    deltas = " / ".join(f"{r[k] - first[k]:+.4f}" for k in HEADLINE_METRICS)
    values = " | ".join(f"{r[k]:.4f}" for k in HEADLINE_METRICS)
    return (
        f"| {name} | {candidate} | {values} | {deltas} | {r['fp_fn']} | {r['shape']} | {r['patches']} | "
        f"{r['ingest_s']:.1f} | {r['ms']:.1f} | {r['ms'] / first['ms']:.2f}x | {r['bank']} | {r['peak_gib']:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.01, help="coreset ratio (a candidate may set its own)")
    parser.add_argument(
        "--candidate", action="append", help='"k=v[,k=v]" or "defaults" (repeatable; the first is the reference)'
    )
    parser.add_argument("--set", action="append", choices=["bottle", "magnetic_tile", "bottle_band", "bottle_grey"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    candidates = args.candidate or CANDIDATES
    with tempfile.TemporaryDirectory(prefix="candidates-") as work:
        sets = {
            "bottle": lambda: MVTEC,
            "magnetic_tile": lambda: MAGNETIC,
            "bottle_band": lambda: bottle_band(Path(work)),
            "bottle_grey": lambda: bottle_grey(Path(work)),
        }
        columns = ["set", "candidate", "image AUROC", "pixel AUROC", "AUPRO", "difference from the first", "FP / FN"]
        columns += ["input (w x h)", "patches", "ingest s", "ms/img", "time ratio", "bank", "peak GiB"]
        rows = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        for name in args.set or ["bottle", "magnetic_tile"]:
            data_root = sets[name]()
            first = None
            for number, candidate in enumerate(candidates):
                options = {"coreset_ratio": args.ratio, **options_of(candidate)}
                config = Config(
                    uri=str(Path(work) / f"{name}-{number}.db"), progress=False, num_threads=args.threads, **options
                )
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
                    result = child.submit(run, data_root, name, config, args.threads).result()
                first = first or result
                rows.append(row(name, candidate, result, first))
                print(rows[-1], flush=True)
    print(f"\ncoreset ratio {args.ratio} unless a candidate sets its own; pixel metrics at {PIXEL_SIZE} px;")
    print("difference: image / pixel AUROC / AUPRO minus the first candidate's; peak GiB: the run's own process")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
