"""End to end on real MVTec AD bottle images (a subset, to keep CI short) in a real Milvus Lite file."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from patchcore_milvus import Bank, Config, fit_bank
from patchcore_milvus.cli import main
from patchcore_milvus.images import list_images

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bottle_bank(tmp_path_factory: pytest.TempPathFactory, bottle_root: Path) -> tuple[Path, Config]:
    root = bottle_root
    config = Config(uri=str(tmp_path_factory.mktemp("bottle") / "bottle.db"), progress=False)
    # Every second training image: the default configuration on half the data.
    summary = fit_bank("bottle", list_images(root / "train" / "good")[::2], config, root=root)
    assert summary.images + summary.holdout_images == 105 and summary.dim == 152
    return root, config


def test_defects_rank_above_good_images(bottle_bank: tuple[Path, Config]):
    root, config = bottle_bank
    test_images = list_images(root / "test" / "good")
    for defect in ("broken_large", "broken_small", "contamination"):
        test_images += list_images(root / "test" / defect)[:6]
    results = dict(Bank.open("bottle", config).score_paths(test_images))
    labels = [int(path.parent.name != "good") for path in test_images]
    scores = [results[path].image_score for path in test_images]
    assert roc_auc_score(labels, scores) >= 0.98


def test_query_command_gives_verdicts_and_pictures(bottle_bank: tuple[Path, Config], tmp_path: Path):
    root, config = bottle_bank
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "query",
            "--category",
            "bottle",
            "--uri",
            config.uri,
            "--out",
            str(out),
            str(root / "test" / "broken_large" / "000.png"),
            str(root / "test" / "good" / "000.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    defect_line, good_line = result.output.splitlines()
    assert defect_line.split()[5] == "DEFECT" and good_line.split()[5] == "OK"
    assert {p.name for p in out.iterdir()} >= {"broken_large_000_overlay.png", "good_000_mask.png"}


def test_evaluate_reports_literature_metrics_and_ann_vs_exact(bottle_bank: tuple[Path, Config], tmp_path: Path):
    root, config = bottle_bank
    out = tmp_path / "report"
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            str(root.parent),
            "--category",
            "bottle",
            "--uri",
            config.uri,
            "--report",
            str(out),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    entry = json.loads((out / "report.json").read_text())["categories"]["bottle"]
    assert entry["test_images"] == 83
    milvus = entry["search"]["milvus"]
    assert milvus["image_auroc"] >= 0.98 and milvus["pixel_auroc"] >= 0.97 and milvus["aupro"] >= 0.85
    assert abs(entry["ann_vs_exact"]["image_auroc_difference"]) <= 0.002
    assert abs(entry["ann_vs_exact"]["pixel_auroc_difference"]) <= 0.002
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "bottle_curves.png", "bottle_worst.png"}


def test_evaluate_on_labels_alone_gives_the_image_auroc_of_the_full_run(
    bottle_bank: tuple[Path, Config], tmp_path: Path
):
    from patchcore_milvus.evaluate import evaluate_category

    root, config = bottle_bank
    labels_only = tmp_path / "bottle"
    labels_only.mkdir()
    (labels_only / "test").symlink_to(root / "test")  # the same test images, no ground_truth/
    bank = Bank.open("bottle", config)
    full = evaluate_category(bank, "bottle", root, "milvus", 256, progress=False).report
    ours = evaluate_category(bank, "bottle", labels_only, "milvus", 256, progress=False).report
    assert ours["search"]["milvus"]["image_auroc"] == full["search"]["milvus"]["image_auroc"]
    assert ours["search"]["milvus"]["at_threshold"]["accuracy"] == full["search"]["milvus"]["at_threshold"]["accuracy"]
    assert ours["search"]["milvus"]["pixel_auroc"] is None and full["search"]["milvus"]["pixel_auroc"] > 0.97
    assert ours["masks"] == {"defect_images": 63, "with_mask": 0, "note": ours["masks"]["note"]}
