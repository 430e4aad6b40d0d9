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
from patchcore_milvus.errors import ReviewError, StoreError
from patchcore_milvus.images import list_images
from patchcore_milvus.review import ADDED, DAMAGED, IMAGES, LOG, QUEUED, ReviewQueue, append_reviewed


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
    for i in range(2, 5):
        queue.add_good(inspect(bank, variant(199 + i), f"a{i}"), variant(199 + i))
    before = bank.version

    again = ReviewQueue(banked.review_folder)  # a restart: the queue is on disk
    ids = ["a1", "a2", "a3", "a4"]
    assert [d.id for d in again.queued("texture")] == ids
    added, summary = append_reviewed("texture", banked, queue=again)
    assert [d.id for d in added] == ids and summary.search is not None
    new_version = BankStore(banked.uri).resolve("texture")
    assert summary.collection == new_version != before
    assert again.queued("texture") == []
    assert [(d.id, d.added_to, d.published) for d in again.added("texture")] == [(i, new_version, True) for i in ids]
    # Another part of the variant, not reviewed: the station follows the alias and calls it good.
    later = inspect(bank, variant(220), "a5")
    assert later["bank_version"] == new_version and later["verdict"] == "OK"
    events = [json.loads(line)["event"] for line in (Path(banked.review_folder) / "texture" / LOG).open()]
    assert events == ["good"] * 4 + ["appended"]


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
    folder = Path(banked.review_folder) / "texture"
    record = folder / QUEUED / "c1.json"
    # The version recorded, then a crash before the record moved to added/.
    record.write_text(json.dumps({**json.loads(record.read_text()), "added_to": "texture__v1", "published": True}))
    assert queue.queued("texture") == []
    assert [d.added_to for d in queue.added("texture")] == ["texture__v1"]
    assert (folder / ADDED / "c1.json").is_file() and (folder / IMAGES / "c1.png").is_file()


def test_a_damaged_review_record_is_set_aside_and_the_queue_goes_on(banked: Config):
    queue = ReviewQueue(banked.review_folder)
    queue.add_good(inspect(Bank.open("texture", banked), variant(200), "d2"), variant(200))
    folder = Path(banked.review_folder) / "texture"
    (folder / QUEUED / "d1.json").write_text("{not json")
    assert [d.id for d in queue.queued("texture")] == ["d2"]
    assert (folder / DAMAGED / "d1.json").read_text() == "{not json"
    [entry] = [json.loads(line) for line in (folder / LOG).open() if '"set aside"' in line]
    assert entry["id"] == "d1" and "unreadable record" in entry["reason"]


def test_an_image_the_append_cannot_use_is_set_aside_not_marked_added(banked: Config):
    bank = Bank.open("texture", banked)
    queue = ReviewQueue(banked.review_folder)
    queue.add_good(inspect(bank, variant(200), "u1"), variant(200))
    queue.add_good(inspect(bank, variant(201), "u2"), variant(201))
    folder = Path(banked.review_folder) / "texture"
    (folder / IMAGES / "u1.png").write_bytes(b"not a png")
    added, summary = append_reviewed("texture", banked, queue=queue)
    assert [d.id for d in added] == ["u2"] and summary.search is not None
    assert [d.id for d in queue.added("texture")] == ["u2"] and queue.queued("texture") == []
    assert (folder / DAMAGED / "u1.json").is_file()
    # The bank records where the images are, and they stay there.
    description = BankStore(banked.uri).read_description(summary.collection)
    assert description.training_images[-1].root == str(folder / IMAGES)
    assert description.training_images[-1].bank == ["u2.png"]


def test_a_review_append_grows_the_bank_with_the_banks_own_settings(banked: Config):
    """The page's append runs with serve's options: a station's fixed search width, another
    margin or index must not decide how the shared bank grows."""
    bank = Bank.open("texture", banked)
    built = BankStore(banked.uri).read_description(bank.version)
    queue = ReviewQueue(banked.review_folder)
    queue.add_good(inspect(bank, variant(200), "s1"), variant(200))
    station = banked.replace(index_type="IVF_FLAT", search_params={"nprobe": 1}, threshold_sigma=0.5, strict=True)
    _, summary = append_reviewed("texture", station, queue=queue)
    grown = BankStore(banked.uri).read_description(summary.collection)
    assert grown.index.type == built.index.type == "HNSW"
    assert grown.thresholds.sigma == built.thresholds.sigma == banked.threshold_sigma


def test_two_appends_of_one_queue_do_not_both_run(banked: Config):
    queue = ReviewQueue(banked.review_folder)
    queue.add_good(inspect(Bank.open("texture", banked), variant(200), "r1"), variant(200))
    running = queue._locked("texture", ".append.lock", wait=False)  # another process's append
    with running, pytest.raises(ReviewError, match="running already"):
        append_reviewed("texture", banked, queue=ReviewQueue(banked.review_folder))
    assert [d.id for d in queue.queued("texture")] == ["r1"]


def test_an_append_whose_bank_moved_on_meanwhile_publishes_nothing(
    banked: Config, good_folder: Path, monkeypatch: pytest.MonkeyPatch
):
    from patchcore_milvus import ingest

    grown = ingest._Grown.read
    ingested: list[str] = []

    def read_then_another_ingest(store, category):
        found = grown(store, category)
        ingested.append(fit_bank("texture", list_images(good_folder), banked, store=store).collection)
        return found

    queue = ReviewQueue(banked.review_folder)
    queue.add_good(inspect(Bank.open("texture", banked), variant(200), "m1"), variant(200))
    store = BankStore(banked.uri)
    monkeypatch.setattr(ingest._Grown, "read", read_then_another_ingest)
    with pytest.raises(StoreError, match="while this append ran; nothing was published"):
        append_reviewed("texture", banked, store=store, queue=queue)
    assert store.resolve("texture") == ingested[0]
    assert [d.id for d in queue.queued("texture")] == ["m1"]  # still queued, for the next append


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


def test_reviewed_parts_go_into_the_bank_and_do_not_raise_the_thresholds(banked: Config):
    """A reviewed part held out for the thresholds would set them at its DEFECT score for good
    (and the bank, without its patches, keeps scoring the variant high): every reviewed part goes
    into the bank, so the thresholds can only fall as the bank grows."""
    bank = Bank.open("texture", banked)
    before = BankStore(banked.uri).read_description(bank.version).thresholds
    queue = ReviewQueue(banked.review_folder)
    for i in range(4):  # at holdout_ratio 0.25, one of the four would be held out
        queue.add_good(inspect(bank, variant(210 + i), f"t{i}"), variant(210 + i))
    _, summary = append_reviewed("texture", banked, queue=queue)
    after = BankStore(banked.uri).read_description(summary.collection).thresholds
    assert summary.holdout_images == 0  # 9.70 -> 26.98 when one of them was held out
    assert after.image <= before.image * (1 + 1e-6) and after.pixel <= before.pixel * (1 + 1e-6)
    assert [e.image for e in after.holdout] == [e.image for e in before.holdout]


def test_an_append_stopped_between_its_publish_and_its_records_is_not_appended_again(
    banked: Config, monkeypatch: pytest.MonkeyPatch
):
    bank = Bank.open("texture", banked)
    queue = ReviewQueue(banked.review_folder)
    for i in range(4):  # capped by the coreset share: a second append would find more to add
        queue.add_good(inspect(bank, variant(230 + i), f"p{i}"), variant(230 + i))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ReviewQueue, "mark_added", killed)
    with pytest.raises(KeyboardInterrupt):
        append_reviewed("texture", banked, queue=queue)
    monkeypatch.undo()
    published = BankStore(banked.uri).resolve("texture")
    assert published != bank.version and len(queue.queued("texture")) == 4
    with pytest.raises(ReviewError, match=rf"4 were in {published} already"):
        append_reviewed("texture", banked, queue=queue)
    assert BankStore(banked.uri).resolve("texture") == published  # no second version
    assert [(d.added_to, d.published) for d in queue.added("texture")] == [(published, True)] * 4


def test_when_every_queued_image_is_unusable_they_are_set_aside_and_the_queue_is_free(banked: Config):
    bank = Bank.open("texture", banked)
    queue = ReviewQueue(banked.review_folder)
    folder = Path(banked.review_folder) / "texture"
    for i in range(2):
        queue.add_good(inspect(bank, variant(240 + i), f"w{i}"), variant(240 + i))
        (folder / IMAGES / f"w{i}.png").write_bytes(b"truncated")
    with pytest.raises(ReviewError, match="2 unusable were set aside"):
        append_reviewed("texture", banked.replace(strict=True), queue=queue)
    assert queue.queued("texture") == [] and queue.set_aside("texture") == ["w0", "w1"]
    assert BankStore(banked.uri).resolve("texture") == bank.version


def test_decisions_in_the_first_layout_are_moved_into_this_one(banked: Config):
    bank = Bank.open("texture", banked)
    folder = Path(banked.review_folder) / "texture"
    ReviewQueue(banked.review_folder).add_good(inspect(bank, variant(250), "o1"), variant(250))
    old = folder / QUEUED / "o1"  # as ba7d471 wrote it: a folder with the record and the image
    old.mkdir()
    (folder / QUEUED / "o1.json").rename(old / "decision.json")
    (folder / IMAGES / "o1.png").rename(old / "image.png")
    queue = ReviewQueue(banked.review_folder)
    assert [d.id for d in queue.queued("texture")] == ["o1"]
    assert (folder / IMAGES / "o1.png").is_file() and not old.exists()


def test_reading_a_queue_that_does_not_exist_makes_no_folder(small_config: Config):
    assert ReviewQueue(small_config.review_folder).queued("never_reviewed") == []
    assert not Path(small_config.review_folder).exists()
