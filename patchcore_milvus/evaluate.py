"""Score a category's MVTec AD test set against its bank and compute the literature's metrics."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from patchcore_milvus.ann_check import recall_at_1
from patchcore_milvus.bank import Bank, Inspection, ScoredImage
from patchcore_milvus.errors import ImageError
from patchcore_milvus.metrics import aupro, auroc, f1_iou, pro_curve, roc_curve
from patchcore_milvus.mvtec import GOOD, LabelledImage, ground_truth, labelled_test_images

if TYPE_CHECKING:
    from patchcore_milvus.baseline import Baseline

STAGES = ("load", "extract", "search", "post")
HEADLINE_METRICS = ("image_auroc", "pixel_auroc", "aupro")
# Each approximate search, and the report key of its comparison with exact search.
VERSUS_EXACT = {"milvus": "ann_vs_exact", "local": "local_vs_exact"}


def resize_map(amap: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """`amap` resized to `size` squared, or to `size` = (width, height)."""
    width, height = (size, size) if isinstance(size, int) else size
    return np.asarray(
        Image.fromarray(amap.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
    )


class Scorer(Protocol):
    """What evaluate scores a test set with: a `Bank`, or a reconstruction `Baseline`."""

    image_threshold: float | None
    pixel_threshold: float | None

    def score_paths(self, paths: Iterable[Path]) -> Iterator[tuple[Path, ScoredImage | ImageError]]: ...


def pixel_shape(size: tuple[int, int], pixel_size: int) -> tuple[int, int]:
    """(width, height) the pixel metrics compare maps and masks at: the scorer's input `size`
    (height, width) with its short side `pixel_size` (`pixel_size` squared for a square input)."""
    height, width = size
    short = min(height, width)
    return round(width * pixel_size / short), round(height * pixel_size / short)


@dataclass
class ScoredSet:
    """One pass over a test set with one search method."""

    scores: np.ndarray
    maps: list[np.ndarray] = field(repr=False)  # at the evaluation size
    patch_distances: list[np.ndarray] = field(repr=False)
    patch_ids: list[np.ndarray] = field(repr=False)
    patch_norms: list[np.ndarray] = field(repr=False)
    timings_ms: dict[str, np.ndarray]
    seconds: float


def score_set(
    scorer: Scorer, images: list[LabelledImage], pixel_size: int | tuple[int, int], label: str, progress: bool
) -> ScoredSet:
    """Every test image scored; PatchCore's also keep their patches' distances (for recall@1)."""
    scores, maps, distances, ids, norms, timings = [], [], [], [], [], []
    started = time.perf_counter()
    results = scorer.score_paths([i.path for i in images])
    for _, result in tqdm(results, total=len(images), desc=f"scoring ({label})", unit="img", disable=not progress):
        if isinstance(result, ImageError):
            raise result
        scores.append(result.image_score)
        maps.append(resize_map(result.anomaly_map, pixel_size))
        if isinstance(result, Inspection):
            distances.append(result.patch_distances)
            ids.append(result.patch_ids)
            norms.append(result.patch_norms)
        timings.append(result.timings_ms)
    return ScoredSet(
        scores=np.array(scores),
        maps=maps,
        patch_distances=distances,
        patch_ids=ids,
        patch_norms=norms,
        timings_ms={stage: np.array([t[stage] for t in timings]) for stage in STAGES},
        seconds=time.perf_counter() - started,
    )


def _thin(x: np.ndarray, y: np.ndarray, points: int = 2000) -> tuple[list[float], list[float]]:
    """At most `points` points of a curve, for pictures."""
    keep = np.unique(np.linspace(0, len(x) - 1, min(points, len(x))).round().astype(int))
    return x[keep].tolist(), y[keep].tolist()


def set_metrics(
    images: list[LabelledImage],
    truth: list[np.ndarray | None],
    scored: ScoredSet,
    image_threshold: float | None,
    pixel_threshold: float | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics for report.json, curves for the pictures).

    `truth`: each image's mask, None for a defect image labelled without one. The pixel metrics
    use the images with a mask (and the good ones); with no defect mask at all they are None."""
    labels = np.array([i.defect != GOOD for i in images])
    image_fpr, image_tpr, _ = roc_curve(labels, scored.scores)
    masked = [k for k, t in enumerate(truth) if t is not None]
    pixel_truth = [t for t in truth if t is not None]
    pixel_maps = [scored.maps[k] for k in masked]
    has_pixel_metrics = any(labels[k] for k in masked)
    metrics: dict[str, Any] = {
        "image_auroc": auroc(labels, scored.scores),
        "pixel_auroc": None,
        "aupro": None,
        "image_auroc_per_defect": {
            defect: auroc(labels[mask], scored.scores[mask])
            for defect in sorted({i.defect for i in images} - {GOOD})
            for mask in [np.array([i.defect in (GOOD, defect) for i in images])]
        },
    }
    if image_threshold is not None:
        predicted = scored.scores > image_threshold
        metrics["at_threshold"] = {
            "image_threshold": image_threshold,
            "image_f1": f1_iou(predicted, labels)[0],
            "accuracy": float((predicted == labels).mean()),
            "false_positives": int((predicted & ~labels).sum()),
            "false_negatives": int((~predicted & labels).sum()),
        }
    curves = {"image_roc": _thin(image_fpr, image_tpr)}
    if has_pixel_metrics:
        pixel_labels = np.concatenate([t.ravel() for t in pixel_truth])
        pixel_scores = np.concatenate([m.ravel() for m in pixel_maps])
        pixel_fpr, pixel_tpr, _ = roc_curve(pixel_labels, pixel_scores)
        pro_fpr, pro = pro_curve(pixel_truth, pixel_maps)
        metrics["pixel_auroc"] = float(np.trapezoid(pixel_tpr, pixel_fpr))
        metrics["aupro"] = aupro(pixel_truth, pixel_maps, 0.3)
        curves.update({"pixel_roc": _thin(pixel_fpr, pixel_tpr), "pro": _thin(pro_fpr, pro)})
        if pixel_threshold is not None:
            pixel_f1, pixel_iou = f1_iou(pixel_scores > pixel_threshold, pixel_labels)
            metrics.setdefault("at_threshold", {}).update(
                {"pixel_threshold": pixel_threshold, "pixel_f1": pixel_f1, "pixel_iou": pixel_iou}
            )
    metrics["time_ms"] = {
        stage: {"median": float(np.median(v)), "p95": float(np.percentile(v, 95))}
        for stage, v in scored.timings_ms.items()
    }
    metrics["images_per_second"] = len(images) / scored.seconds
    return metrics, curves


def mask_coverage(images: list[LabelledImage], category_root: Path) -> dict[str, Any]:
    """How many defect images have a ground-truth mask, and what that means for the pixel metrics."""
    defects = [i for i in images if i.defect != GOOD]
    masked = sum(i.mask_path is not None for i in defects)
    if masked == 0:
        note = f"pixel metrics not available: no defect image has a mask under {category_root / 'ground_truth'}"
    elif masked < len(defects):
        note = f"pixel metrics on the {masked} of {len(defects)} defect images that have a mask (and the good ones)"
    else:
        note = None
    return {"defect_images": len(defects), "with_mask": masked, "note": note}


def patch_recall_at_1(approximate: ScoredSet, exact: ScoredSet) -> float:
    """Share of test patches whose Milvus neighbour is an exact nearest neighbour (same id, or a tie)."""
    joined = [
        np.concatenate([a.ravel() for a in arrays])
        for arrays in (
            approximate.patch_distances,
            approximate.patch_ids,
            exact.patch_distances,
            exact.patch_ids,
            exact.patch_norms,
        )
    ]
    return recall_at_1(*joined)


@dataclass
class CategoryEvaluation:
    category: str
    report: dict[str, Any]
    curves: dict[str, dict[str, Any]]  # per search method
    images: list[LabelledImage]
    scores: dict[str, np.ndarray]  # per search method


def evaluate_category(
    bank: Bank,
    category: str,
    category_root: Path,
    search: str,
    pixel_size: int,
    progress: bool,
    strict_masks: bool = False,
) -> CategoryEvaluation:
    """`search`: "milvus", "local", "exact", "both" (Milvus and exact) or "all". `strict_masks`:
    refuse defect images without a ground-truth mask instead of leaving them out of the pixel
    metrics."""
    images = labelled_test_images(category_root, strict_masks)
    shape = pixel_shape(bank.features.preprocess.size, pixel_size)
    truth = [ground_truth(i, shape) for i in images]
    methods: dict[str, Bank] = {}
    if search in ("milvus", "both", "all"):
        methods["milvus"] = bank
    if search in ("local", "all"):
        methods["local"] = bank.with_local_search()
    if search in ("exact", "both", "all"):
        methods["exact"] = bank.with_exact_search()
    scored = {name: score_set(b, images, shape, name, progress) for name, b in methods.items()}
    description = bank.description
    report: dict[str, Any] = {
        **_report_head(category, images, category_root, pixel_size, shape),
        "bank": {
            "collection": bank.version,
            "vectors": description.coreset.size,
            "dim": description.extractor.dim,
            "bytes": description.coreset.size * description.extractor.dim * 4,
            "index": {"type": description.index.type, "params": description.index.params},
            "backbone": description.extractor.backbone,
            "image_shape": list(bank.features.preprocess.size),  # height, width the images are resized to
        },
        "search": {},
    }
    curves = {}
    for name, run in scored.items():
        report["search"][name], curves[name] = set_metrics(
            images, truth, run, bank.image_threshold, bank.pixel_threshold
        )
    for method, key in VERSUS_EXACT.items():
        if method in scored and "exact" in scored:
            ours, exact = report["search"][method], report["search"]["exact"]
            report[key] = {
                "patch_recall_at_1": patch_recall_at_1(scored[method], scored["exact"]),
                **{f"{k}_difference": _difference(ours[k], exact[k]) for k in HEADLINE_METRICS},
            }
    return CategoryEvaluation(category, report, curves, images, {k: v.scores for k, v in scored.items()})


def _report_head(
    category: str, images: list[LabelledImage], category_root: Path, pixel_size: int, shape: tuple[int, int]
) -> dict[str, Any]:
    """What every category's report starts with, whichever method scored it."""
    return {
        "category": category,
        "test_images": len(images),
        "defect_types": sorted({i.defect for i in images} - {GOOD}),
        "pixel_size": pixel_size,
        "pixel_shape": list(shape),  # width, height
        "masks": mask_coverage(images, category_root),
    }


def evaluate_baseline(
    baseline: Baseline, category: str, category_root: Path, pixel_size: int, progress: bool, strict_masks: bool = False
) -> CategoryEvaluation:
    """The same metrics for a reconstruction baseline (baseline.py), under its method's name."""
    images = labelled_test_images(category_root, strict_masks)
    shape = pixel_shape(baseline.size, pixel_size)
    truth = [ground_truth(i, shape) for i in images]
    method = baseline.settings.method
    scored = score_set(baseline, images, shape, method, progress)
    description = baseline.description
    training = {} if description is None else description.training
    report: dict[str, Any] = {
        **_report_head(category, images, category_root, pixel_size, shape),
        "model": {
            "method": method,
            "image_size": baseline.settings.image_size,
            "epochs": training.get("epochs"),
            "best_epoch": training.get("best_epoch"),
            "training_seconds": training.get("seconds"),
        },
        "search": {},
    }
    metrics, curves = set_metrics(images, truth, scored, baseline.image_threshold, baseline.pixel_threshold)
    report["search"][method] = metrics
    return CategoryEvaluation(category, report, {method: curves}, images, {method: scored.scores})


def _difference(ours: float | None, exact: float | None) -> float | None:
    return None if ours is None or exact is None else ours - exact
