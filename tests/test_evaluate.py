"""`evaluate` on a small synthetic data set in the MVTec AD layout, against a real Milvus Lite file."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import textured_image
from PIL import Image

from patchcore_milvus.cli import main
from patchcore_milvus.errors import ImageError
from patchcore_milvus.evaluate import CategoryEvaluation
from patchcore_milvus.mvtec import LabelledImage, ground_truth, labelled_test_images
from patchcore_milvus.report import worst_cases

FAST = ["--image-size", "64", "--no-progress"]


def write_mvtec_like(data: Path, width: int = 96) -> Path:
    """DATA_ROOT/texture with train/good, test/good, test/blob and ground_truth/blob masks, of
    images 96 tall and `width` wide."""
    root = data / "texture"
    for folder in ("train/good", "test/good", "test/blob", "ground_truth/blob"):
        (root / folder).mkdir(parents=True)
    for i in range(8):
        textured_image(i, width=width).save(root / "train" / "good" / f"{i:03d}.png")
    for i in range(4):
        textured_image(100 + i, width=width).save(root / "test" / "good" / f"{i:03d}.png")
        textured_image(200 + i, defect=True, width=width).save(root / "test" / "blob" / f"{i:03d}.png")
        mask = np.zeros((96, width), np.uint8)
        mask[32:51, width // 2 : width // 2 + 19] = 255  # where textured_image paints the defect
        Image.fromarray(mask).save(root / "ground_truth" / "blob" / f"{i:03d}_mask.png")
    return data


@pytest.fixture
def mvtec_like(tmp_path: Path) -> Path:
    return write_mvtec_like(tmp_path / "data")


def test_a_wide_part_is_evaluated_at_its_own_shape(tmp_path: Path):
    data = write_mvtec_like(tmp_path / "data", width=240)
    db, out, runner = str(tmp_path / "wide.db"), tmp_path / "report", CliRunner()
    ingest = runner.invoke(main, ["ingest", str(data), "--category", "texture", "--uri", db, *FAST])
    assert ingest.exit_code == 0, ingest.output
    result = runner.invoke(main, ["evaluate", str(data), "--all", "--uri", db, "--report", str(out), *FAST])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())["categories"]["texture"]
    assert report["bank"]["image_shape"] == [64, 160] and report["pixel_shape"] == [640, 256]
    assert report["search"]["milvus"]["image_auroc"] == 1.0 and report["search"]["milvus"]["pixel_auroc"] > 0.9
    assert "images resized to 160 x 64" in (out / "report.md").read_text()


def test_evaluate_writes_a_readable_report(mvtec_like: Path, tmp_path: Path):
    db = str(tmp_path / "eval.db")
    runner = CliRunner()
    ingest = runner.invoke(
        main,
        [
            "ingest",
            str(mvtec_like),
            "--category",
            "texture",
            "--uri",
            db,
            "--coreset-ratio",
            "0.25",
            "--holdout-ratio",
            "0.25",
            *FAST,
        ],
    )
    assert ingest.exit_code == 0, ingest.output
    out = tmp_path / "report"
    result = runner.invoke(main, ["evaluate", str(mvtec_like), "--all", "--uri", db, "--report", str(out), *FAST])
    assert result.exit_code == 0, result.output
    header, milvus_row, exact_row = result.output.splitlines()[:3]
    assert header.split()[:3] == ["category", "search", "img"]
    assert milvus_row.split()[:3] == ["texture", "milvus", "1.0000"]
    assert exact_row.split()[:3] == ["texture", "exact", "1.0000"]
    assert "texture milvus: image AUROC per defect type: blob 1.0000; median ms: load " in result.output
    report = json.loads((out / "report.json").read_text())
    entry = report["categories"]["texture"]
    assert entry["test_images"] == 8 and entry["defect_types"] == ["blob"]
    milvus = entry["search"]["milvus"]
    assert set(milvus) >= {
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "image_auroc_per_defect",
        "at_threshold",
        "time_ms",
        "images_per_second",
    }
    assert milvus["pixel_auroc"] > 0.8 and 0 < milvus["aupro"] <= 1
    assert set(milvus["time_ms"]) == {"load", "extract", "search", "post"}
    assert entry["bank"]["vectors"] == 128 and entry["bank"]["bytes"] == 128 * 152 * 4
    assert entry["ann_vs_exact"]["patch_recall_at_1"] > 0.95
    assert abs(entry["ann_vs_exact"]["image_auroc_difference"]) <= 0.002
    assert report["mean"]["milvus"]["image_auroc"] == milvus["image_auroc"]
    assert "## texture" in (out / "report.md").read_text() and "-0.0000" not in (out / "report.md").read_text()
    text = (out / "report.json").read_text()
    assert "999999" not in text and "-0.0," not in text and "aupro_0.3" not in text
    for picture in ("texture_curves.png", "texture_worst.png"):
        assert Image.open(out / picture).width > 500


def test_worst_cases_put_false_positives_and_negatives_first():
    defects = ("good", "good", "good", "blob", "blob")
    evaluation = CategoryEvaluation(
        category="texture",
        report={},
        curves={},
        images=[LabelledImage(Path(f"{i}.png"), d, None) for i, d in enumerate(defects)],
        scores={"milvus": np.array([1.0, 5.0, 2.0, 4.0, 9.0])},
    )
    # Threshold 3: image 1 (good, 5.0) is a false positive, image 3 (blob, 4.0) is not a false negative.
    assert worst_cases(evaluation, 3.0, count=3)[0] == 1
    assert worst_cases(evaluation, 4.5, count=2) == [1, 3]


def test_wrong_layout_is_explained(tmp_path: Path):
    with pytest.raises(ImageError, match="expected the MVTec AD layout"):
        labelled_test_images(tmp_path)
    (tmp_path / "test" / "crack").mkdir(parents=True)
    textured_image(0).save(tmp_path / "test" / "crack" / "000.png")
    with pytest.raises(ImageError, match=r"has no ground-truth mask .* \(without --strict-masks"):
        labelled_test_images(tmp_path, strict_masks=True)
    with pytest.raises(ImageError, match="needs both good/ and defect folders"):
        labelled_test_images(tmp_path)


def test_a_damaged_mask_is_named_not_a_traceback(mvtec_like: Path):
    images = labelled_test_images(mvtec_like / "texture")
    damaged = next(image for image in images if image.mask_path is not None)
    damaged.mask_path.write_bytes(b"not a png")
    with pytest.raises(ImageError, match=rf"{damaged.mask_path.name}: not a readable image"):
        ground_truth(damaged, 64)


def _ingest_texture(mvtec_like: Path, db: str) -> None:
    args = ["ingest", str(mvtec_like), "--category", "texture", "--uri", db, "--coreset-ratio", "0.25", *FAST]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output


def _evaluate_report(mvtec_like: Path, db: str, out: Path, *flags: str):
    args = ["evaluate", str(mvtec_like), "--category", "texture", "--uri", db, "--report", str(out), *flags, *FAST]
    return CliRunner().invoke(main, args)


def test_evaluate_without_masks_reports_the_image_metrics_and_marks_the_pixel_ones(mvtec_like: Path, tmp_path: Path):
    db = str(tmp_path / "eval.db")
    _ingest_texture(mvtec_like, db)
    with_masks = _evaluate_report(mvtec_like, db, tmp_path / "full")
    assert with_masks.exit_code == 0, with_masks.output
    full = json.loads((tmp_path / "full" / "report.json").read_text())["categories"]["texture"]
    assert full["masks"] == {"defect_images": 4, "with_mask": 4, "note": None}

    shutil.rmtree(mvtec_like / "texture" / "ground_truth")
    result = _evaluate_report(mvtec_like, db, tmp_path / "labels")
    assert result.exit_code == 0, result.output
    assert result.output.count("pixel metrics not available: no defect image has a mask") == 1
    milvus_row = result.output.splitlines()[1].split()
    assert milvus_row[:5] == ["texture", "milvus", f"{full['search']['milvus']['image_auroc']:.4f}", "n/a", "n/a"]
    text = (tmp_path / "labels" / "report.json").read_text()
    assert "NaN" not in text
    entry = json.loads(text)["categories"]["texture"]
    for method in ("milvus", "exact"):
        ours, theirs = entry["search"][method], full["search"][method]
        assert ours["image_auroc"] == theirs["image_auroc"]
        assert ours["image_auroc_per_defect"] == theirs["image_auroc_per_defect"]
        assert ours["pixel_auroc"] is None and ours["aupro"] is None
        assert "pixel_f1" not in ours["at_threshold"] and ours["at_threshold"]["accuracy"] is not None
    assert entry["ann_vs_exact"]["pixel_auroc_difference"] is None
    assert entry["masks"]["with_mask"] == 0
    assert "Note: pixel metrics not available" in (tmp_path / "labels" / "report.md").read_text()
    for picture in ("texture_curves.png", "texture_worst.png"):
        assert Image.open(tmp_path / "labels" / picture).width > 500

    refused = _evaluate_report(mvtec_like, db, tmp_path / "strict", "--strict-masks")
    assert refused.exit_code == 2 and "has no ground-truth mask" in refused.output


def test_evaluate_with_some_masks_uses_those_for_the_pixel_metrics(mvtec_like: Path, tmp_path: Path):
    db = str(tmp_path / "eval.db")
    _ingest_texture(mvtec_like, db)
    for name in ("000_mask.png", "001_mask.png"):
        (mvtec_like / "texture" / "ground_truth" / "blob" / name).unlink()
    result = _evaluate_report(mvtec_like, db, tmp_path / "some")
    assert result.exit_code == 0, result.output
    assert "pixel metrics on the 2 of 4 defect images that have a mask" in result.output
    entry = json.loads((tmp_path / "some" / "report.json").read_text())["categories"]["texture"]
    assert entry["masks"]["with_mask"] == 2 and entry["test_images"] == 8
    assert entry["search"]["milvus"]["pixel_auroc"] > 0.8 and 0 < entry["search"]["milvus"]["aupro"] <= 1
