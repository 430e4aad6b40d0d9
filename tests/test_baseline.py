"""The reconstruction baselines: they learn (on real images), save and load exactly, refuse damaged
or mismatched files, and go through `baseline fit` and `evaluate --method` like a bank."""

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import textured_image
from safetensors.torch import load_file, save
from test_evaluate import write_mvtec_like

from patchcore_milvus.baseline import (
    DESCRIPTION,
    WEIGHTS,
    Baseline,
    TrainingSettings,
    _networks,
    _preprocess,
    _settings_digest,
    _Trainer,
    fit_baseline,
)
from patchcore_milvus.cli import main
from patchcore_milvus.errors import ModelFileError
from patchcore_milvus.images import list_images, load_rgb


@pytest.mark.parametrize("method", ["autoencoder", "gan"])
def test_a_few_training_steps_lower_the_loss_on_real_images(bottle_root: Path, method: str):
    torch.manual_seed(0)
    settings = TrainingSettings(method, image_size=64)
    trainer = _Trainer(settings, _networks(settings))
    preprocess = _preprocess(settings)
    paths = list_images(bottle_root / "train" / "good")[:8]
    x = torch.from_numpy(np.stack([preprocess(load_rgb(p)) for p in paths]))
    before = trainer.held_out_loss(x)
    losses = [trainer.step(x)["train"] for _ in range(15)]
    assert losses[-1] < losses[0] and trainer.held_out_loss(x) < before


@pytest.fixture
def good_images(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(6):
        textured_image(i, size=64).save(folder / f"{i:03d}.png")
    return list_images(folder)


@pytest.mark.parametrize("method", ["autoencoder", "gan"])
def test_a_saved_model_loads_to_identical_maps_and_its_record(good_images: list[Path], tmp_path: Path, method: str):
    settings = TrainingSettings(method, image_size=32, epochs=2, batch_size=4, holdout_ratio=0.34)
    fitted = fit_baseline("texture", good_images, settings, tmp_path / "model", progress=False)
    loaded = Baseline.load(tmp_path / "model")
    probe = tmp_path / "probe.png"
    textured_image(50, size=64, defect=True).save(probe)
    [(_, want)], [(_, got)] = fitted.score_paths([probe]), loaded.score_paths([probe])
    np.testing.assert_array_equal(got.anomaly_map, want.anomaly_map)
    assert got.image_score == want.image_score == float(want.anomaly_map.max())
    assert (loaded.image_threshold, loaded.pixel_threshold) == (fitted.image_threshold, fitted.pixel_threshold)
    record = json.loads((tmp_path / "model" / DESCRIPTION).read_text())
    assert record["method"] == method and record["training"]["epochs"] == 2 and len(record["training"]["losses"]) == 2
    assert record["training"]["held_out"] == 2 and len(record["thresholds"]["held_out"]) == 2


def test_a_damaged_or_mismatched_model_is_a_clear_error(good_images: list[Path], tmp_path: Path):
    settings = TrainingSettings("autoencoder", image_size=32, epochs=1, batch_size=4, holdout_ratio=0.34)
    fit_baseline("texture", good_images, settings, tmp_path / "model", progress=False)
    folder = tmp_path / "model"
    with pytest.raises(ModelFileError, match=r"no baseline in .* \(model\.json missing\)"):
        Baseline.load(tmp_path / "nowhere")
    weights = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(weights[:-8] + b"\0" * 8)
    with pytest.raises(ModelFileError, match=r"does not match model\.json"):
        Baseline.load(folder)
    (folder / WEIGHTS).write_bytes(weights)
    record = json.loads((folder / DESCRIPTION).read_text())
    lowered = {**record, "thresholds": {**record["thresholds"], "image": 0.0}}  # every part a DEFECT
    (folder / DESCRIPTION).write_text(json.dumps(lowered))
    with pytest.raises(ModelFileError, match=r"model\.json was edited since training"):
        Baseline.load(folder)
    # A GAN's description beside an AutoEncoder's weights, both checksums made to agree.
    as_gan = {**record, "method": "gan", "settings": {**record["settings"], "method": "gan"}}
    data = save(
        load_file(folder / WEIGHTS),
        metadata={"description": _settings_digest(as_gan["settings"], as_gan["thresholds"])},
    )
    (folder / WEIGHTS).write_bytes(data)
    as_gan["weights"] = {**record["weights"], "sha256": hashlib.sha256(data).hexdigest()}
    (folder / DESCRIPTION).write_text(json.dumps(as_gan))
    with pytest.raises(ModelFileError, match="does not fit a gan at 32 px"):
        Baseline.load(folder)
    (folder / DESCRIPTION).write_text(json.dumps({**record, "settings": [1, 2]}))
    with pytest.raises(ModelFileError, match="is not a baseline description"):
        Baseline.load(folder)
    (folder / DESCRIPTION).write_text("{not json")
    with pytest.raises(ModelFileError, match="is not a baseline description"):
        Baseline.load(folder)


def test_the_thresholds_pass_every_held_out_good_image(good_images: list[Path], tmp_path: Path):
    settings = TrainingSettings("autoencoder", image_size=32, epochs=2, batch_size=4, holdout_ratio=0.5)
    fitted = fit_baseline("texture", good_images, settings, tmp_path / "model", progress=False)
    held_out = fitted.description.thresholds["held_out"]
    assert len(held_out) == 3 and fitted.image_threshold >= max(entry["score"] for entry in held_out)
    assert all(result.verdict == "OK" for _, result in fitted.score_paths(Path(e["path"]) for e in held_out))


def test_fit_and_evaluate_on_the_command_line(tmp_path: Path):
    data = write_mvtec_like(tmp_path / "data")
    model = tmp_path / "models" / "autoencoder"
    fit = ["baseline", "fit", str(data), "--category", "texture", "--method", "autoencoder", "--out", str(model)]
    fitted = CliRunner().invoke(
        main, [*fit, "--image-size", "32", "--epochs", "2", "--holdout-ratio", "0.25", "--no-progress"]
    )
    assert fitted.exit_code == 0, fitted.output
    assert "autoencoder for texture" in fitted.output and "thresholds: image" in fitted.output
    report = tmp_path / "report"
    evaluate = ["evaluate", str(data), "--category", "texture", "--method", "autoencoder", "--model-dir", str(model)]
    result = CliRunner().invoke(main, [*evaluate, "--report", str(report), "--no-progress"])
    assert result.exit_code == 0, result.output
    entry = json.loads((report / "report.json").read_text())["categories"]["texture"]
    assert entry["model"]["method"] == "autoencoder" and entry["search"]["autoencoder"]["pixel_auroc"] is not None
    assert (report / "texture_worst.png").is_file() and "autoencoder at 32 px" in (report / "report.md").read_text()
    wrong = CliRunner().invoke(main, [*evaluate[:-4], "--method", "gan", "--model-dir", str(model), "--no-progress"])
    assert wrong.exit_code == 2 and "holds the autoencoder baseline, not the gan" in wrong.output
    missing = CliRunner().invoke(main, [*evaluate[:-4], "--method", "gan", "--no-progress"])
    assert missing.exit_code == 2 and "a baseline needs --model-dir" in missing.output


def test_the_same_seed_trains_the_same_model(good_images: list[Path], tmp_path: Path):
    settings = TrainingSettings("gan", image_size=32, epochs=2, batch_size=4, holdout_ratio=0.34)
    first = fit_baseline("texture", good_images, settings, tmp_path / "a", progress=False)
    second = fit_baseline("texture", good_images, settings, tmp_path / "b", progress=False)
    assert (tmp_path / "a" / WEIGHTS).read_bytes() == (tmp_path / "b" / WEIGHTS).read_bytes()
    assert first.description.training["losses"] == second.description.training["losses"]
    other = fit_baseline("texture", good_images, replace(settings, seed=1), tmp_path / "c", progress=False)
    assert (tmp_path / "c" / WEIGHTS).read_bytes() != (tmp_path / "a" / WEIGHTS).read_bytes()
    assert other.description.settings["seed"] == 1


def test_compare_prints_the_seeds_layout_and_checks_every_model_first(tmp_path: Path):
    data = write_mvtec_like(tmp_path / "data")
    db, models = str(tmp_path / "cmp.db"), tmp_path / "models"
    fast = ["--image-size", "64", "--no-progress"]
    ingest = ["ingest", str(data), "--category", "texture", "--uri", db, "--coreset-ratio", "0.25"]
    assert CliRunner().invoke(main, [*ingest, "--holdout-ratio", "0.25", *fast]).exit_code == 0
    compare = ["evaluate", str(data), "--category", "texture", "--uri", db, "--compare", "--model-dir", str(models)]
    tiny = ["--image-size", "32", "--epochs", "1", "--holdout-ratio", "0.25", "--no-progress"]
    fit = ["baseline", "fit", str(data), "--category", "texture", *tiny]
    assert (
        CliRunner().invoke(main, [*fit, "--method", "autoencoder", "--out", str(models / "autoencoder")]).exit_code == 0
    )
    missing = CliRunner().invoke(main, [*compare, *fast])
    assert missing.exit_code == 2 and f"no baseline in {models / 'gan' / 'texture'}" in missing.output
    assert "category" not in missing.output  # refused before anything was scored
    assert CliRunner().invoke(main, [*fit, "--method", "gan", "--out", str(models / "gan" / "texture")]).exit_code == 0
    result = CliRunner().invoke(main, [*compare, "--report", str(tmp_path / "report"), *fast])
    assert result.exit_code == 0, result.output
    header, row, seed = result.output.splitlines()[:3]
    assert (
        header.split()
        == ["category", *[f"{m} {k}" for k in ("img", "pix") for m in ("autoencoder", "gan", "patchcore")]][:1]
        + header.split()[1:]
    )
    assert row.startswith("texture") and len(row.split()) == 7 and seed.startswith("seed: mean of the 15 categories")
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "autoencoder img" in markdown and "seed: mean of the 15 categories" in markdown
    both = CliRunner().invoke(main, [*compare, "--method", "gan", *fast])
    assert both.exit_code == 2 and "leave out --method" in both.output
