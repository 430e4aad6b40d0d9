"""The review loop: a part called DEFECT that a person found good is queued, survives a restart,
grows the bank through `ingest --from-review` (a new version the stations follow), and every
decision records which version it went into."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import textured_image
from PIL import Image

from patchcore_milvus import Bank, BankStore, Config, fit_bank
from patchcore_milvus.cli import main
from patchcore_milvus.errors import ReviewError
from patchcore_milvus.images import list_images
from patchcore_milvus.review import ADDED, LOG, QUEUED, RECORD, ReviewQueue, append_reviewed


def variant(seed: int) -> Image.Image:
    """A good part of a variant the bank has not seen: the stripes turned a quarter."""
    return textured_image(seed).transpose(Image.Transpose.ROTATE_90)


@pytest.fixture
def banked(good_folder: Path, small_config: Config) -> Config:
    fit_bank("texture", list_images(good_folder), small_config)
    return small_config


def inspect(bank: Bank, image: Image.Image, key: str) -> dict:
    [result] = bank.score_images([image], [key])
    return {"id": key, "category": "texture", **result.summary()}


def test_a_part_found_good_on_review_grows_the_bank_and_is_no_longer_called_defective(banked: Config):
    bank = Bank.open("texture", banked)
    record = inspect(bank, variant(200), "a1")
    assert record["verdict"] == "DEFECT"  # the new variant, before review
    queue = ReviewQueue(banked.review_folder)
    queue.add_good(record, variant(200))
    queue.add_good(inspect(bank, variant(201), "a2"), variant(201))
    before = bank.version

    again = ReviewQueue(banked.review_folder)  # a restart: the queue is on disk
    assert [d.id for d in again.queued("texture")] == ["a1", "a2"]
    added, summary = append_reviewed("texture", banked, queue=again)
    assert [d.id for d in added] == ["a1", "a2"] and summary.search is not None
    new_version = BankStore(banked.uri).resolve("texture")
    assert summary.collection == new_version != before
    assert again.queued("texture") == []
    assert [(d.id, d.added_to, d.published) for d in again.added("texture")] == [
        ("a1", new_version, True),
        ("a2", new_version, True),
    ]
    # Another part of the variant, not reviewed: the station follows the alias and calls it good.
    later = inspect(bank, variant(202), "a3")
    assert later["bank_version"] == new_version and later["verdict"] == "OK"
    events = [json.loads(line)["event"] for line in (Path(banked.review_folder) / "texture" / LOG).open()]
    assert events == ["good", "good", "appended"]


def test_only_a_defect_can_be_reviewed_and_only_once(banked: Config):
    bank = Bank.open("texture", banked)
    queue = ReviewQueue(banked.review_folder)
    good = inspect(bank, textured_image(100), "g1")
    with pytest.raises(ReviewError, match="was OK, not DEFECT"):
        queue.add_good(good, textured_image(100))
    bad = inspect(bank, variant(200), "b1")
    queue.add_good(bad, variant(200))
    with pytest.raises(ReviewError, match="reviewed already"):
        queue.add_good(bad, variant(200))
    with pytest.raises(ReviewError, match="is not an inspection id"):
        queue.add_good({**bad, "id": "../x"}, variant(200))
    with pytest.raises(ReviewError, match="no reviewed images are queued for 'other'"):
        append_reviewed("other", banked)


def test_an_append_stopped_before_its_moves_is_finished_by_the_next_read(banked: Config):
    queue = ReviewQueue(banked.review_folder)
    queue.add_good(inspect(Bank.open("texture", banked), variant(200), "c1"), variant(200))
    record = Path(banked.review_folder) / "texture" / QUEUED / "c1" / RECORD
    # The version recorded, then a crash before the folder moved to added/.
    record.write_text(json.dumps({**json.loads(record.read_text()), "added_to": "texture__v1", "published": True}))
    assert queue.queued("texture") == []
    assert [d.added_to for d in queue.added("texture")] == ["texture__v1"]
    assert (Path(banked.review_folder) / "texture" / ADDED / "c1" / "image.png").is_file()


def test_a_damaged_review_record_is_a_message(banked: Config):
    place = Path(banked.review_folder) / "texture" / QUEUED / "d1"
    place.mkdir(parents=True)
    (place / RECORD).write_text("{not json")
    with pytest.raises(ReviewError, match=r"cannot read the review record .* move its folder away"):
        ReviewQueue(banked.review_folder).queued("texture")


def test_ingest_from_review_on_the_command_line(banked: Config, tmp_path: Path):
    queue = ReviewQueue(banked.review_folder)
    queue.add_good(inspect(Bank.open("texture", banked), variant(200), "e1"), variant(200))
    settings = ["--uri", banked.uri, "--image-size", "64", "--review-folder", banked.review_folder, "--no-progress"]
    result = CliRunner().invoke(main, ["ingest", "--append", "--from-review", "texture", *settings])
    assert result.exit_code == 0, result.output
    version = BankStore(banked.uri).resolve("texture")
    assert f"review: 1 parts found good on review added into {version}" in result.output
    again = CliRunner().invoke(main, ["ingest", "--from-review", "texture", *settings])
    assert again.exit_code == 2 and "no reviewed images are queued for 'texture'" in again.output
    both = CliRunner().invoke(main, ["ingest", "--from-review", "texture", "--images", str(tmp_path), *settings])
    assert both.exit_code == 2 and "leave out DATA_ROOT and --images" in both.output
