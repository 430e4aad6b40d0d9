"""Evaluation results as a terminal table, report.json (stable keys), report.md and pictures."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from patchcore_milvus import __version__
from patchcore_milvus.evaluate import HEADLINE_METRICS, VERSUS_EXACT, CategoryEvaluation, Scorer
from patchcore_milvus.files import save_atomically, save_together
from patchcore_milvus.mvtec import GOOD, ground_truth
from patchcore_milvus.visualize import overlay_figure

THRESHOLD_KEYS = ("image_f1", "accuracy", "pixel_f1", "pixel_iou")


def summary(evaluations: list[CategoryEvaluation]) -> dict[str, Any]:
    """The whole report: per category, and the mean over categories per search method."""
    categories = {e.category: e.report for e in evaluations}
    methods = sorted({m for e in evaluations for m in e.report["search"]})
    mean: dict[str, Any] = {}
    for method in methods:
        rows = [e.report["search"][method] for e in evaluations if method in e.report["search"]]
        mean[method] = {k: _mean([r[k] for r in rows]) for k in HEADLINE_METRICS}
        at = [r["at_threshold"] for r in rows if "at_threshold" in r]
        for key in THRESHOLD_KEYS:
            if any(key in a for a in at):
                mean[method][key] = _mean([a.get(key) for a in at])
    return {
        "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "categories": categories,
        "mean": mean,
    }


def _mean(values: list[float | None]) -> float | None:
    """Over the categories that have the metric (pixel metrics need masks); None if none has."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def table_lines(report: dict[str, Any]) -> list[str]:
    header = [
        "category",
        "search",
        "img AUROC",
        "pix AUROC",
        "AUPRO",
        "img F1",
        "acc",
        "FP",
        "FN",
        "pix F1",
        "IoU",
        "ms/img",
        "recall@1",
    ]
    rows = []
    for category, entry in report["categories"].items():
        for method, m in entry["search"].items():
            at = m.get("at_threshold", {})
            ms = sum(m["time_ms"][s]["median"] for s in m["time_ms"])
            recall = entry.get(VERSUS_EXACT.get(method, ""), {}).get("patch_recall_at_1")
            counts = (str(at.get("false_positives", "-")), str(at.get("false_negatives", "-")))
            rows.append(_row(category, method, m, at, counts, f"{ms:.0f}", _fmt(recall)))
    if len(report["categories"]) > 1:
        for method, m in report["mean"].items():
            rows.append(_row("mean", method, m, m, ("", ""), "", ""))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return [
        "  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in [header, *rows]
    ]


# The seed's own figures (image AUROC / pixel AUROC), for the comparison's last rows.
SEED = {
    "bottle": {"autoencoder": (0.7294, 0.6938), "gan": (0.7103, 0.7793), "patchcore": (1.0, 0.9815)},
    "mean of the 15 categories": {
        "autoencoder": (0.6508, 0.7417),
        "gan": (0.6643, 0.7464),
        "patchcore": (0.9867, 0.9759),
    },
}
COMPARED = ("autoencoder", "gan", "patchcore")


def comparison_lines(compare: dict[str, Any]) -> list[str]:
    """The seed's layout: a row per category (and their mean), image then pixel AUROC of AE, GAN and
    PatchCore; below, the seed's own rows for the same categories."""
    header = ["category", *(f"{m} img" for m in COMPARED), *(f"{m} pix" for m in COMPARED)]
    rows = []
    for category, row in compare["categories"].items():
        rows.append(
            [category, *(_fmt(row[m]["image_auroc"]) for m in COMPARED)]
            + [_fmt(row[m]["pixel_auroc"], NOT_AVAILABLE) for m in COMPARED]
        )
    if len(compare["categories"]) > 1:
        rows.append(
            ["mean"]
            + [_fmt(_mean([r[m]["image_auroc"] for r in compare["categories"].values()])) for m in COMPARED]
            + [
                _fmt(_mean([r[m]["pixel_auroc"] for r in compare["categories"].values()]), NOT_AVAILABLE)
                for m in COMPARED
            ]
        )
    for name, figures in SEED.items():
        if name in compare["categories"] or name.startswith("mean"):
            rows.append(
                [
                    f"seed: {name}",
                    *(f"{figures[m][0]:.4f}" for m in COMPARED),
                    *(f"{figures[m][1]:.4f}" for m in COMPARED),
                ]
            )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in [header, *rows]
    ]


def detail_lines(report: dict[str, Any]) -> list[str]:
    """Below the table: image AUROC per defect type and the median time of each stage, per
    category and search."""
    lines = []
    for category, entry in report["categories"].items():
        if entry["masks"]["note"]:
            lines.append(f"{category}: {entry['masks']['note']}")
        for method, m in entry["search"].items():
            defects = ", ".join(f"{d} {_fmt(v)}" for d, v in m["image_auroc_per_defect"].items())
            stages = ", ".join(f"{s} {t['median']:.0f}" for s, t in m["time_ms"].items())
            lines.append(f"{category} {method}: image AUROC per defect type: {defects}; median ms: {stages}")
    return lines


def _row(
    label: str, method: str, m: dict[str, Any], at: dict[str, Any], counts: tuple[str, str], ms: str, recall: str
) -> list[str]:
    """One table row; `at` holds the thresholded metrics (the mean keeps them beside the others)."""
    return [
        label,
        method,
        f"{m['image_auroc']:.4f}",
        _fmt(m["pixel_auroc"], NOT_AVAILABLE),
        _fmt(m["aupro"], NOT_AVAILABLE),
        _fmt(at.get("image_f1")),
        _fmt(at.get("accuracy")),
        *counts,
        _fmt(at.get("pixel_f1"), "-" if m["pixel_auroc"] is not None else NOT_AVAILABLE),
        _fmt(at.get("pixel_iou"), "-" if m["pixel_auroc"] is not None else NOT_AVAILABLE),
        ms,
        recall,
    ]


NOT_AVAILABLE = "n/a"  # a pixel metric of a category without ground-truth masks


def _fmt(value: float | None, missing: str = "-") -> str:
    return missing if value is None else f"{value:.4f}"


def _signed(value: float | None) -> str:
    """+0.0012 / -0.0012, and +0.0000 for anything that rounds to zero (never -0.0000)."""
    return NOT_AVAILABLE if value is None else f"{round(value, 4) + 0.0:+.4f}"


def _tidy(value: Any) -> Any:
    """Floats rounded to 6 decimals and -0.0 written as 0.0: no 0.9999999999999999 or -0.0000
    in report.json (a difference of exactly zero between two searches is 0)."""
    if isinstance(value, float):
        return round(value, 6) + 0.0
    if isinstance(value, dict):
        return {key: _tidy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_tidy(item) for item in value]
    return value


def write_report(
    report: dict[str, Any], evaluations: list[CategoryEvaluation], banks: dict[str, Scorer], out: Path
) -> list[Path]:
    """report.json, report.md, and per category: ROC and PRO curves and a contact sheet."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json", out / "report.md"]
    save_together(
        [
            (written[0], lambda p: Path(p).write_text(json.dumps(_tidy(report), indent=2))),
            (written[1], lambda p: Path(p).write_text(markdown(report))),
        ]
    )
    for evaluation in evaluations:
        written.append(plot_curves(evaluation, out / f"{evaluation.category}_curves.png"))
        written.append(contact_sheet(evaluation, banks[evaluation.category], out / f"{evaluation.category}_worst.png"))
    return written


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Evaluation ({report['created']}, patchcore-milvus {report['package_version']})",
        "",
        "```",
        *([*comparison_lines(report["compare"]), ""] if "compare" in report else []),
        *table_lines(report),
        "```",
        "",
    ]
    for category, entry in report["categories"].items():
        if "bank" in entry:
            bank = entry["bank"]
            subject = (
                f"Bank {bank['collection']}: {bank['vectors']} vectors x {bank['dim']} dims "
                f"({bank['bytes'] / 2**20:.1f} MiB), {bank['index']['type']} {bank['index']['params']}, "
                f"backbone {bank['backbone']}, images resized to {bank['image_shape'][1]} x {bank['image_shape'][0]}"
            )
        else:
            model = entry["model"]
            subject = (
                f"{model['method']} at {model['image_size']} px, {model['epochs']} epochs (the best held-out loss "
                f"at {model['best_epoch']}) in {model['training_seconds']} s"
            )
        lines += [
            f"## {category}",
            "",
            f"{subject}; {entry['test_images']} test images; pixel metrics on "
            f"{entry['pixel_shape'][0]} x {entry['pixel_shape'][1]} maps.",
            "",
        ]
        if entry["masks"]["note"]:
            lines += [f"Note: {entry['masks']['note']}.", ""]
        for method, m in entry["search"].items():
            per_defect = ", ".join(f"{d} {v:.4f}" for d, v in m["image_auroc_per_defect"].items())
            stages = ", ".join(f"{s} {t['median']:.0f} (p95 {t['p95']:.0f})" for s, t in m["time_ms"].items())
            lines += [
                f"- {method}: image AUROC per defect type: {per_defect}",
                f"- {method}: ms per image, median (p95): {stages}; {m['images_per_second']:.2f} images/s",
            ]
        for method, key in VERSUS_EXACT.items():
            if key in entry:
                name = {"milvus": "Milvus", "local": "Local replica"}[method]
                a = entry[key]
                lines.append(
                    f"- {name} vs exact: patch recall@1 {a['patch_recall_at_1']:.4f}; differences "
                    f"image AUROC {_signed(a['image_auroc_difference'])}, pixel AUROC "
                    f"{_signed(a['pixel_auroc_difference'])}, AUPRO {_signed(a['aupro_difference'])}"
                )
        lines += ["", f"![curves]({category}_curves.png)", "", f"![worst cases]({category}_worst.png)", ""]
    return "\n".join(lines)


def plot_curves(evaluation: CategoryEvaluation, target: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    titles = {"image_roc": "image ROC", "pixel_roc": "pixel ROC", "pro": "PRO (AUPRO up to FPR 0.3)"}
    for axis, (key, title) in zip(axes, titles.items()):
        if all(key not in curves for curves in evaluation.curves.values()):
            axis.text(0.5, 0.5, "not available:\nno ground-truth masks", ha="center", va="center", fontsize=14)
        for method, curves in evaluation.curves.items():
            if key not in curves:
                continue
            x, y = curves[key]
            metric = evaluation.report["search"][method]
            value = {
                "image_roc": metric["image_auroc"],
                "pixel_roc": metric["pixel_auroc"],
                "pro": metric["aupro"],
            }[key]
            axis.plot(x, y, label=f"{method} ({value:.4f})", linestyle="-" if method == "milvus" else "--")
        if axis.lines:
            axis.legend(loc="lower right")
        if key == "pro":
            axis.axvline(0.3, color="grey", linewidth=0.8)
            axis.set_ylabel("per-region overlap")
        else:
            axis.set_ylabel("true-positive rate")
        axis.set_xlabel("false-positive rate")
        axis.set_title(f"{evaluation.category}: {title}")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.02)
    figure.tight_layout()
    save_atomically(target, lambda p: figure.savefig(p, format="png", dpi=90))
    plt.close(figure)
    return target


def worst_cases(evaluation: CategoryEvaluation, threshold: float | None, count: int = 12) -> list[int]:
    """Indices: false positives (highest score first), false negatives (lowest first), then near misses."""
    scores = next(iter(evaluation.scores.values()))
    good = [i for i, image in enumerate(evaluation.images) if image.defect == GOOD]
    bad = [i for i, image in enumerate(evaluation.images) if image.defect != GOOD]
    good.sort(key=lambda i: -scores[i])
    bad.sort(key=lambda i: scores[i])
    if threshold is None:
        return (good[: count // 2] + bad[: count // 2])[:count]
    false_pos = [i for i in good if scores[i] > threshold]
    false_neg = [i for i in bad if scores[i] <= threshold]
    near = [i for pair in zip(good, bad) for i in pair if i not in false_pos and i not in false_neg]
    return (false_pos + false_neg + near)[:count]


def contact_sheet(evaluation: CategoryEvaluation, bank: Scorer, target: Path, tile: int = 600) -> Path:
    """Overlays of the worst cases in a grid of 3 columns, each under a readable label, the
    ground truth outlined on the original beside the predicted outline.

    The chosen images are scored again, so that no full-size map had to be kept in memory.
    """
    chosen = worst_cases(evaluation, bank.image_threshold)
    labelled = {evaluation.images[i].path: evaluation.images[i] for i in chosen}
    threshold = bank.image_threshold
    font = ImageFont.load_default(size=18)
    label_height = 26
    tiles = []
    for path, result in bank.score_paths([evaluation.images[i].path for i in chosen]):
        is_good = path.parent.name == GOOD
        if threshold is None:
            kind = "good" if is_good else "defect"
        elif is_good:
            kind = "FALSE POSITIVE" if result.image_score > threshold else "good, near miss"
        else:
            kind = "FALSE NEGATIVE" if result.image_score <= threshold else "defect, near miss"
        truth = ground_truth(labelled[path], result.image.size)
        figure = overlay_figure(result, title=f"{path.parent.name}/{path.name}", truth=truth)
        figure = figure.resize((tile, round(tile * figure.height / figure.width)))
        framed = Image.new("RGB", (tile, figure.height + label_height), "white")
        framed.paste(figure, (0, label_height))
        text = f"{kind}: {path.parent.name}/{path.name}  score {result.image_score:.2f}"
        ImageDraw.Draw(framed).text((6, 3), text, fill=(0, 0, 0), font=font)
        tiles.append(framed)
    columns = 3
    height = max(f.height for f in tiles)
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * tile, rows * (height + 4)), "white")
    for k, figure in enumerate(tiles):
        sheet.paste(figure, ((k % columns) * tile, (k // columns) * (height + 4)))
    save_atomically(target, lambda p: sheet.save(p, format="PNG"))
    return target
