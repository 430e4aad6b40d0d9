"""Ingest and scoring end to end on synthetic images, against a real Milvus Lite file."""

from pathlib import Path

import numpy as np
import pytest
from conftest import score_good_and_bad, textured_image

from patchcore_milvus import Bank, BankStore, Config, fit_bank
from patchcore_milvus.ann_check import SearchWidths
from patchcore_milvus.config import BORDERS
from patchcore_milvus.errors import BankMismatchError, BankNotFoundError, StoreError
from patchcore_milvus.images import list_images, load_rgb
from patchcore_milvus.milvus import sidecar


@pytest.fixture
def fitted(good_folder: Path, small_config: Config) -> Config:
    summary = fit_bank("texture", list_images(good_folder), small_config)
    assert summary.images == 6 and summary.holdout_images == 2
    # The held-out images' patches are in the coreset selection too (holdout_joins).
    assert summary.patches == 8 * 8 * 8 and summary.coreset_size == 128 and summary.dim == 152
    assert 0 < summary.joined < 128
    assert summary.image_threshold is not None and summary.pixel_threshold is not None
    return small_config


def test_defect_scores_above_good_and_is_localised(fitted: Config, tmp_path: Path):
    good, bad = score_good_and_bad(Bank.open("texture", fitted), tmp_path)
    assert bad.image_score > 3 * good.image_score
    assert bad.verdict == "DEFECT"
    assert bad.anomaly_map.shape == (96, 96)
    peak_y, peak_x = np.unravel_index(bad.anomaly_map.argmax(), bad.anomaly_map.shape)
    assert 28 <= peak_y <= 55 and 44 <= peak_x <= 70  # the painted square spans y 32-51, x 48-67
    assert bad.anomaly_map[40, 56] > 2 * bad.anomaly_map[88, 8]  # far from the defect
    assert bad.mask is not None and bad.mask[40, 56]
    assert bad.nearest_patch["image"].endswith(".png")


def test_a_wide_part_keeps_its_shape_from_ingest_to_map(small_config: Config, tmp_path: Path):
    """Images 96 x 240: the bank resizes every one to 64 x 160 (short side image_size), the patch
    grid is 8 x 20, and a defect's map is the image's own shape, peaking where the defect is."""
    folder = tmp_path / "wide"
    folder.mkdir()
    for seed in range(8):
        textured_image(seed, width=240).save(folder / f"{seed:03d}.png")
    summary = fit_bank("wide", list_images(folder), small_config)
    assert summary.patches == 8 * 8 * 20
    bank = Bank.open("wide", small_config)
    assert bank.description.extractor.image_shape == [64, 160]
    good, bad = score_good_and_bad(bank, tmp_path, width=240)
    assert bad.patch_distances.shape == (8, 20) and bad.anomaly_map.shape == (96, 240)
    assert bad.verdict == "DEFECT" and good.verdict == "OK"
    peak_y, peak_x = np.unravel_index(bad.anomaly_map.argmax(), bad.anomaly_map.shape)
    assert 28 <= peak_y <= 55 and 116 <= peak_x <= 143  # the painted square spans y 32-51, x 120-139
    # The same images through the torch reference, built from the options and the bank's shape.
    reference = Bank.open("wide", small_config.replace(runtime="torch"))
    [(_, again)] = reference.score_paths([tmp_path / "bad.png"])
    assert again.image_score == pytest.approx(bad.image_score, rel=1e-4)
    with pytest.raises(BankMismatchError, match="aspect: bank has images resized to \\[64, 160\\]"):
        Bank.open("wide", small_config.replace(aspect="square"))
    square = fit_bank("squashed", list_images(folder), small_config.replace(aspect="square"))
    assert square.patches == 8 * 8 * 8


def test_description_records_the_model(fitted: Config):
    store = BankStore(fitted.uri)
    description = store.read_description(store.resolve("texture"))
    assert description.extractor.backbone == "efficientnet_lite0"
    assert len(description.extractor.weights_sha256) == 64
    # 25 % of all 8 images' 512 patches, some of them from the 2 held-out images.
    assert 0 < description.thresholds.joined < 128
    assert description.coreset.size == 128 and description.coreset.patches == 512
    assert description.coreset.projection_seed == 0
    [training] = description.training_images
    assert len(training.bank) == 8 and description.origin == "ingest"
    assert description.coreset.radius > 0
    held_out = description.thresholds.holdout
    assert len(held_out) == 2
    assert description.thresholds.image >= max(h.score for h in held_out)
    assert description.thresholds.pixel >= max(h.map_max for h in held_out)
    assert (description.index.type, description.index.params) == ("HNSW", {"M": 16, "efConstruction": 200})
    [listed] = store.list_banks()
    assert listed.category == "texture" and listed.vectors == description.coreset.size
    assert listed.description.extractor.dim == 152


def test_reweighting_can_be_switched_off(fitted: Config, tmp_path: Path):
    textured_image(101, defect=True).save(tmp_path / "bad.png")
    [(_, weighted)] = Bank.open("texture", fitted).score_paths([tmp_path / "bad.png"])
    [(_, plain)] = Bank.open("texture", fitted.replace(reweight=False)).score_paths([tmp_path / "bad.png"])
    assert plain.image_score == pytest.approx(float(plain.anomaly_map.max()), rel=0.5)
    assert 0.9 * plain.image_score <= weighted.image_score < plain.image_score


def test_mismatched_extractor_is_refused_with_the_difference(fitted: Config):
    with pytest.raises(BankMismatchError, match="image_size: bank has 64, this query uses 96"):
        Bank.open("texture", fitted.replace(image_size=96))
    with pytest.raises(BankMismatchError, match="weights_sha256"):
        Bank.open("texture", fitted.replace(weights="random"))
    other = next(border for border in BORDERS if border != fitted.border)
    with pytest.raises(BankMismatchError, match=f"border: bank has .* this query uses '{other}'"):
        Bank.open("texture", fitted.replace(border=other))


def test_thresholds_can_be_overridden(fitted: Config, tmp_path: Path):
    textured_image(100).save(tmp_path / "good.png")
    bank = Bank.open("texture", fitted.replace(image_threshold=0.0, pixel_threshold=1e9))
    [(_, result)] = bank.score_paths([tmp_path / "good.png"])
    assert result.verdict == "DEFECT" and not result.mask.any()


def test_a_bad_file_is_reported_and_the_rest_scored(fitted: Config, tmp_path: Path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    textured_image(100).save(tmp_path / "good.png")
    results = list(Bank.open("texture", fitted).score_paths([tmp_path / "broken.png", tmp_path / "good.png"]))
    assert "not a readable image" in str(results[0][1])
    assert results[1][1].image_score > 0


def test_batches_scored_while_the_next_is_extracted_give_the_same_results(fitted: Config, tmp_path: Path):
    """score_paths extracts batch k + 1 in a worker thread while batch k is searched: every file
    still gets its own result, in order, equal to scoring it alone; bad files in any batch are reported."""
    paths = []
    for i in range(7):  # batches of 3: 3 + 3 + 1, a bad file in the middle one
        paths.append(tmp_path / f"{i}.png")
        if i == 4:
            paths[-1].write_bytes(b"not an image")
        else:
            textured_image(200 + i, defect=i % 2 == 0).save(paths[-1])
    bank = Bank.open("texture", fitted.replace(batch_size=3))
    results = list(bank.score_paths(paths))
    # A batch's bad files come before its results.
    assert [path for path, _ in results] == [*paths[:3], paths[4], paths[3], *paths[5:]]
    assert "not a readable image" in str(results[3][1])
    for path, result in results[:3] + results[4:]:
        [alone] = bank.score_images([load_rgb(path)], [str(path)])
        assert result.path == str(path)
        assert result.image_score == pytest.approx(alone.image_score, rel=1e-5)
        assert set(result.timings_ms) == {"load", "extract", "search", "post"}


def test_batches_extracted_before_a_version_with_another_extractor_are_extracted_again(
    fitted: Config, good_folder: Path, tmp_path: Path
):
    """A station open on the 64 px bank, re-ingested at 48 px: the batches its pipeline extracted
    with the old extractor are not searched against the new version as they are."""
    paths = [tmp_path / f"{i}.png" for i in range(7)]
    for i, path in enumerate(paths):
        textured_image(300 + i, defect=i % 3 == 0).save(path)
    station_config = fitted.replace(batch_size=3, image_size=Config().image_size)  # the bank's own extractor
    station = Bank.open("texture", station_config)
    fit_bank("texture", list_images(good_folder), fitted.replace(image_size=48))
    results = dict(station.score_paths(paths))
    fresh = Bank.open("texture", station_config)
    assert station.version == fresh.version and station.features.description.image_size == 48
    for path in paths:
        [alone] = fresh.score_images([load_rgb(path)], [str(path)])
        assert results[path].bank_version == fresh.version
        assert results[path].image_score == pytest.approx(alone.image_score, rel=1e-5)


def test_reingest_replaces_the_bank_and_failed_ingest_keeps_the_old(fitted: Config, good_folder: Path):
    store = BankStore(fitted.uri)
    first = store.resolve("texture")
    store.close()
    with pytest.raises(Exception, match="weights"):
        fit_bank("texture", list_images(good_folder), fitted.replace(weights=str(good_folder / "none.pth")))
    store = BankStore(fitted.uri)
    assert store.resolve("texture") == first
    store.close()
    fit_bank("texture", list_images(good_folder), fitted.replace(coreset_size=10))
    store = BankStore(fitted.uri)
    assert store.resolve("texture") != first and store.list_banks()[0].vectors == 10


def test_unknown_category(small_config: Config):
    with pytest.raises(BankNotFoundError, match="patchcore-milvus ingest"):
        Bank.open("cable", small_config)


def test_patches_stream_to_disk_and_only_the_projection_stays_in_memory(good_folder: Path, tmp_path: Path):
    from patchcore_milvus.coreset import random_projection
    from patchcore_milvus.features import FeaturePipeline
    from patchcore_milvus.ingest import extract_patches

    paths = list_images(good_folder)[:5]
    features = FeaturePipeline.from_config(Config(image_size=64))
    patches = extract_patches(features, paths, 2, 16, 7, tmp_path, progress=False)
    assert isinstance(patches.full, np.memmap) and (tmp_path / "patches.f32").exists()
    assert patches.full.shape == (5 * 64, 152) and patches.projected.shape == (5 * 64, 16)
    # Batch by batch gives what one pass over everything gives.
    import torch

    batch = np.stack([features.preprocess(load_rgb(p)) for p in paths])
    everything = torch.from_numpy(features(batch)).reshape(-1, 152)
    np.testing.assert_allclose(patches.full, everything.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(patches.projected, random_projection(everything, 16, 7), rtol=1e-3, atol=1e-4)
    assert patches.positions[64 * 3 + 9].tolist() == [3, 1, 1]  # image 3, row 1, column 1 of its 8x8 grid


def test_append_grows_the_bank_with_a_new_variant_and_keeps_the_old(fitted: Config, good_folder: Path, tmp_path: Path):
    from PIL import Image as PILImage

    from patchcore_milvus.ingest import append_to_bank

    variant = tmp_path / "variant"  # the same product, turned by 90 degrees: new patches
    variant.mkdir()
    for i in range(20, 28):
        textured_image(i).transpose(PILImage.Transpose.ROTATE_90).save(variant / f"{i}.png")
    textured_image(100).transpose(PILImage.Transpose.ROTATE_90).save(tmp_path / "turned.png")
    textured_image(100).save(tmp_path / "plain.png")
    queries = [tmp_path / "turned.png", tmp_path / "plain.png"]
    store = BankStore(fitted.uri)
    old = store.resolve("texture")
    old_size = store.vector_count(old)
    before = [r.image_score for _, r in Bank.open("texture", fitted, store=store).score_paths(queries)]

    summary = append_to_bank("texture", list_images(variant), fitted, store=store)
    assert summary.appended_to == old and summary.images == 6 and summary.holdout_images == 2
    assert 0 < summary.coreset_size <= summary.far_patches <= summary.patches == 8 * 64
    assert 0 < summary.joined <= summary.coreset_size and summary.bank_size == old_size + summary.coreset_size
    new = store.resolve("texture")
    np.testing.assert_array_equal(store.read_vectors(new)[:old_size], store.read_vectors(old))  # nothing old is lost
    after = [r.image_score for _, r in Bank.open("texture", fitted, store=store).score_paths(queries)]
    assert after[0] < 0.5 * before[0]  # the new variant is now known
    assert after[1] == pytest.approx(before[1], rel=0.05)  # the old one scores as before
    description = store.read_description(new)
    assert description.origin == f"append to {old}" and len(description.training_images) == 2
    assert len(description.thresholds.holdout) == 4  # old and new held-out images
    # The old ones are in the bank themselves (holdout_joins): their recorded scores stand, never a
    # new score against their own patches; the new ones took part in this append's picks.
    earlier = store.read_description(old).thresholds.holdout
    assert all(e.in_bank for e in earlier) and set(earlier) <= set(description.thresholds.holdout)
    assert all(e.in_bank for e in description.thresholds.holdout)

    again = append_to_bank("texture", list_images(good_folder), fitted, store=store)  # nothing new in these
    assert again.coreset_size < 0.1 * summary.coreset_size + 2


def test_append_without_a_coreset_share_takes_the_grown_bank_s(fitted: Config, tmp_path: Path):
    """The bank was fitted at 25 %; an append that leaves `coreset_ratio` at its default (1 %) may
    still add up to 25 % of its new patches, so a new variant is not cut short by another share."""
    from PIL import Image as PILImage

    from patchcore_milvus.ingest import append_to_bank

    variant = tmp_path / "variant"
    variant.mkdir()
    for i in range(20, 28):
        textured_image(i).transpose(PILImage.Transpose.ROTATE_90).save(variant / f"{i}.png")
    summary = append_to_bank("texture", list_images(variant), fitted.replace(coreset_ratio=Config().coreset_ratio))
    assert summary.coreset_size > round(0.01 * summary.patches)  # more than the default share would allow
    assert summary.coreset_size <= round(0.25 * summary.patches)


def test_append_of_images_the_bank_already_covers_adds_nothing_and_keeps_the_version(
    fitted: Config, good_folder: Path, tmp_path: Path
):
    from patchcore_milvus.ingest import append_to_bank

    store = BankStore(fitted.uri)
    current = store.resolve("texture")
    known = tmp_path / "known"  # three of the bank's own images: no patch lies outside its radius
    known.mkdir()
    for name in store.read_description(current).training_images[0].bank[:3]:
        (known / name).write_bytes((good_folder / name).read_bytes())
    summary = append_to_bank("texture", list_images(known), fitted.replace(holdout_ratio=0.0), store=store)
    assert summary.coreset_size == 0 and summary.collection == current
    assert summary.lines()[0].startswith(f"nothing to add: all {summary.patches} new patches")
    assert store.resolve("texture") == current and len(store.versions("texture")) == 1


def test_append_refuses_another_extractor(fitted: Config, good_folder: Path):
    from patchcore_milvus.ingest import append_to_bank

    with pytest.raises(BankMismatchError, match="image_size"):
        append_to_bank("texture", list_images(good_folder), fitted.replace(image_size=96))


def test_a_station_scores_with_the_bank_s_own_extractor_without_torch(
    good_folder: Path, small_config: Config, tmp_path: Path
):
    import subprocess
    import sys

    textured_image(101, defect=True).save(tmp_path / "bad.png")
    # A Lite file stays locked by the process that opened it: ingest and station run in processes
    # of their own, and this one opens the file after them.
    ingest = (
        "from pathlib import Path; from patchcore_milvus import Config, fit_bank; "
        "from patchcore_milvus.images import list_images; "
        f"fit_bank('texture', list_images(Path({str(good_folder)!r})), Config(**{small_config.to_dict()!r}))"
    )
    subprocess.run([sys.executable, "-c", ingest], check=True, capture_output=True, timeout=300)
    # Only the URI and the category: the extractor's options and weights come from the bank.
    station = (
        "import sys; from patchcore_milvus import Bank, Config; "
        f"bank = Bank.open('texture', Config(uri={small_config.uri!r}, progress=False)); "
        f"[(_, r)] = bank.score_paths([{str(tmp_path / 'bad.png')!r}]); "
        "print(r.image_score, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", station], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    score, torch_loaded = result.stdout.split()
    assert torch_loaded == "False"
    store = BankStore(small_config.uri)
    description = store.read_description(store.resolve("texture"))
    assert description.extractor_model.format == "onnx" and description.extractor_model.bytes > 100_000
    reference = Bank.open("texture", small_config.replace(runtime="torch"), store=store)  # built from the options
    [(_, here)] = reference.score_paths([tmp_path / "bad.png"])
    assert float(score) == pytest.approx(here.image_score, rel=1e-4)


def test_a_damaged_extractor_model_is_refused(fitted: Config):
    store = BankStore(fitted.uri)
    version = store.resolve("texture")
    store.client.delete(sidecar.name_of(version), ids=[-1_000_000 - 3], partition_name="extractor")
    store.client.flush(sidecar.name_of(version))
    with pytest.raises(StoreError, match=r"extractor model of .* is damaged"):
        Bank.open("texture", fitted, store=store)


def test_an_append_summary_says_how_the_thresholds_moved_and_when_the_cap_stopped_it():
    from patchcore_milvus.ingest import IngestSummary

    summary = IngestSummary(
        category="bottle",
        collection="bottle__v2",
        images=6,
        holdout_images=1,
        patches=5120,
        coreset_size=512,
        dim=152,
        index="HNSW",
        image_threshold=30.08,
        pixel_threshold=25.20,
        seconds={},
        search=SearchWidths({"ef": 64}, 1.0, 4096),
        appended_to="bottle__v1",
        far_patches=3150,
        bank_size=19763,
        capped=True,
        previous_thresholds=(27.58, 25.12),
    )
    text = "\n".join(summary.lines())
    assert "image 27.5800 -> 30.0800 (+9.1 %), pixel 25.1200 -> 25.2000 (+0.3 %)" in text
    assert "warning: the image threshold rose 9.1 %" in text and "rollback bottle" in text
    assert "warning: the pixel" not in text
    assert "stopped at the cap" in text and "--coreset-ratio or --coreset-size raises it" in text


def test_an_hnsw_build_that_misses_vectors_at_its_widest_search_is_rebuilt_denser(tmp_path: Path, good_folder: Path):
    # A real HNSW graph can leave a node no search reaches (bottle at 1 %: 2 of 2,001). Here the
    # first check reports it; ingest must rebuild the index with twice the links and record that.
    from patchcore_milvus import ingest
    from patchcore_milvus.errors import IndexTooPoorError

    calls = []
    real = ingest.choose_search_widths

    def first_build_too_poor(*args, **kwargs):
        calls.append(args[4])  # the index parameters it was checked with
        if len(calls) == 1:
            raise IndexTooPoorError("the HNSW index finds ... even at its widest search ({'ef': 32768}); ...")
        return real(*args, **kwargs)

    config = Config(uri=str(tmp_path / "dense.db"), image_size=64, coreset_ratio=0.25, progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ingest, "choose_search_widths", first_build_too_poor)
        summary = fit_bank("texture", list_images(good_folder), config)
    assert [params["M"] for params in calls] == [16, 32]
    assert "index HNSW (M 32, efConstruction 200)" in "\n".join(summary.lines())
    store = BankStore(config.uri)
    version = store.resolve("texture")
    assert store.read_description(version).index.params == {"M": 32, "efConstruction": 200}
    assert store.client.describe_index(version, "embedding")["params"]["M"] == 32  # what Milvus built


def test_an_hnsw_m_the_user_chose_is_never_changed_behind_their_back(tmp_path: Path, good_folder: Path):
    from patchcore_milvus import ingest
    from patchcore_milvus.errors import IndexTooPoorError

    def too_poor(*args, **kwargs):
        raise IndexTooPoorError("the HNSW index finds ... even at its widest search")

    config = Config(
        uri=str(tmp_path / "fixed.db"), image_size=64, coreset_ratio=0.25, index_params={"M": 8}, progress=False
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ingest, "choose_search_widths", too_poor)
        with pytest.raises(IndexTooPoorError, match="widest search"):
            fit_bank("texture", list_images(good_folder), config)


def test_held_out_images_set_the_thresholds_without_their_own_picks(fitted: Config):
    # They are in the coreset (holdout_joins): scored against the whole bank they would meet their
    # own patches. The recorded scores come from the bank without those, so they are higher.
    bank = Bank.open("texture", fitted).with_exact_search()
    entries = bank.store.read_description(bank.version).thresholds.holdout
    against_all = {str(path): result.image_score for path, result in bank.score_paths([Path(e.path) for e in entries])}
    assert all(against_all[e.path] <= e.score + 1e-4 for e in entries)
    assert any(against_all[e.path] < e.score - 1e-3 for e in entries)
