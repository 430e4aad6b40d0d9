"""`watch`: a hot folder on a real Milvus Lite bank. Each image is scored once, and only when
complete; a restart scores nothing twice and misses nothing."""

import io
import json
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import textured_image

from patchcore_milvus import Bank, Config, fit_bank
from patchcore_milvus.cli import main
from patchcore_milvus.images import list_images
from patchcore_milvus.watch import RESULTS, Seen, WatchSettings, watch


@pytest.fixture
def bank(good_folder: Path, small_config: Config) -> Bank:
    fit_bank("texture", list_images(good_folder), small_config)
    return Bank.open("texture", small_config)


def lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / RESULTS).read_text().splitlines()]


def settings(folder: Path, **changes) -> WatchSettings:
    return WatchSettings(folder, folder / RESULTS, **{"settle": 0.3, "interval": 0.05, "once": True, **changes})


def test_a_file_still_being_written_is_scored_once_when_complete(bank: Bank, tmp_path: Path):
    folder = tmp_path / "hot"
    folder.mkdir()
    buffer = io.BytesIO()
    textured_image(100).save(buffer, format="PNG")
    data = buffer.getvalue()
    target = folder / "slow.png"
    target.write_bytes(data[:100])  # a camera writing in pieces, each within the settle time

    def write_the_rest() -> None:
        for start in range(100, len(data), len(data) // 4 + 1):
            time.sleep(0.1)
            with target.open("ab") as out:
                out.write(data[start : start + len(data) // 4 + 1])

    writer = threading.Thread(target=write_the_rest)
    writer.start()
    assert watch(bank, settings(folder, settle=1.0), say=lambda _: None).scored == 1  # 10 times the pauses
    writer.join()
    [entry] = lines(folder)
    assert entry["name"] == "slow.png" and entry["size"] == len(data) and entry["verdict"] == "OK"


def test_sorted_into_folders_with_reasons_and_a_restart_scores_only_what_is_new(bank: Bank, tmp_path: Path):
    folder = tmp_path / "hot"
    folder.mkdir()
    textured_image(100).save(folder / "good.png")
    textured_image(101, defect=True).save(folder / "bad.png")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("the operator's notes")
    (folder / "coming.png.part").write_bytes(b"a browser's download, not finished")
    said: list[str] = []
    assert watch(bank, settings(folder, sort=True), say=said.append).scored == 2
    by_name = {entry["name"]: entry for entry in lines(folder)}
    assert set(by_name) == {"good.png", "bad.png", "broken.png", "notes.txt"}
    assert (by_name["good.png"]["verdict"], by_name["bad.png"]["verdict"]) == ("OK", "DEFECT")
    assert by_name["bad.png"]["regions"] and by_name["good.png"]["regions"] == []
    assert (folder / "ok" / "good.png").is_file() and (folder / "defect" / "bad.png").is_file()
    assert (folder / "rejected" / "broken.png.txt").read_text() == by_name["broken.png"]["reason"] + "\n"
    assert "broken.png" in by_name["broken.png"]["reason"]
    assert "not an image file" in (folder / "rejected" / "notes.txt.txt").read_text()
    assert (folder / "coming.png.part").is_file() and len(said) == 4

    # A restart: a new image, and one the last run recorded but stopped before moving.
    textured_image(102).save(folder / "new.png")
    textured_image(103).save(folder / "good.png")  # the same name again: another image
    stopped = folder / "stopped.png"
    textured_image(104).save(stopped)
    seen = Seen.of(stopped)
    with (folder / RESULTS).open("a") as out:
        entry = {"name": seen.name, "size": seen.size, "mtime_ns": seen.mtime_ns, "inode": seen.inode, "verdict": "OK"}
        out.write(json.dumps({**entry, "moved_to": "ok/stopped.png"}) + "\n")
    assert watch(bank, settings(folder, sort=True), say=lambda _: None).scored == 2
    new_lines = lines(folder)[5:]
    assert sorted(entry["name"] for entry in new_lines) == ["good.png", "new.png"]
    assert (folder / "ok" / "stopped.png").is_file() and not stopped.exists()
    assert (folder / "ok" / "good-1.png").is_file()  # not over the first good.png


def test_without_sorting_a_second_run_scores_nothing(bank: Bank, tmp_path: Path):
    folder = tmp_path / "hot"
    folder.mkdir()
    textured_image(100).save(folder / "a.png")
    assert watch(bank, settings(folder), say=lambda _: None).scored == 1
    with (folder / RESULTS).open("a") as out:
        out.write('{"name": "cut sh')  # a line cut short by a crash
    said: list[str] = []
    assert watch(bank, settings(folder), say=said.append).scored == 0
    assert said == [f"{folder / RESULTS}: 1 line could not be read (cut short by a crash?); skipped"]
    # The cut line was ended: the next record is a line of its own, read on the next start.
    textured_image(101).save(folder / "b.png")
    assert watch(bank, settings(folder), say=lambda _: None).scored == 1
    assert watch(bank, settings(folder), say=lambda _: None).scored == 0


def test_while_milvus_refuses_the_images_wait_and_nothing_is_recorded(bank: Bank, tmp_path: Path, monkeypatch):
    from patchcore_milvus.errors import StoreUnavailableError

    folder = tmp_path / "hot"
    folder.mkdir()
    textured_image(100).save(folder / "a.png")

    def refused(paths):
        raise StoreUnavailableError("Milvus did not answer within 30 s")
        yield

    monkeypatch.setattr(bank, "score_paths", refused)
    outcome = watch(bank, settings(folder, sort=True), say=lambda _: None)
    assert (outcome.scored, outcome.waiting) == (0, 1) and not (folder / RESULTS).exists()
    monkeypatch.undo()
    assert watch(bank, settings(folder, sort=True), say=lambda _: None).scored == 1
    assert (folder / "ok" / "a.png").is_file()


def test_one_watcher_per_results_file_and_sorting_needs_a_threshold(bank: Bank, tmp_path: Path):
    from patchcore_milvus.errors import ConfigError
    from patchcore_milvus.watch import only_watcher

    folder = tmp_path / "hot"
    folder.mkdir()
    with only_watcher(folder / RESULTS), pytest.raises(ConfigError, match="another watch writes"):
        watch(bank, settings(folder), say=lambda _: None)
    bank.image_threshold = None
    with pytest.raises(ConfigError, match="no image threshold, so --sort could not tell"):
        watch(bank, settings(folder, sort=True), say=lambda _: None)


def test_a_rejected_file_never_takes_the_place_of_another(bank: Bank, tmp_path: Path):
    folder = tmp_path / "hot"
    (folder / "rejected").mkdir(parents=True)
    (folder / "rejected" / "a.txt.txt").write_text("an earlier rejected file")
    (folder / "a.txt").write_text("notes")
    assert watch(bank, settings(folder, sort=True), say=lambda _: None).scored == 0
    assert (folder / "rejected" / "a.txt.txt").read_text() == "an earlier rejected file"
    assert (folder / "rejected" / "a-1.txt").read_text() == "notes"
    assert "not an image file" in (folder / "rejected" / "a-1.txt.txt").read_text()


def test_watch_on_the_command_line(bank: Bank, small_config: Config, tmp_path: Path):
    folder = tmp_path / "hot"
    folder.mkdir()
    textured_image(101, defect=True).save(folder / "bad.png")
    options = ["--uri", small_config.uri, "--image-size", "64", "--settle", "0", "--once"]
    result = CliRunner().invoke(main, ["watch", str(folder), "--category", "texture", *options])
    assert result.exit_code == 0, result.output
    assert "bad.png  score" in result.output and "DEFECT" in result.output and "1 image scored" in result.output
    assert [entry["verdict"] for entry in lines(folder)] == ["DEFECT"]
