"""`serve`'s web page in a real browser: headless Chromium from the system packages, driven by
Selenium, against `patchcore-milvus serve` started on 127.0.0.1 with a real bottle bank."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import CLI, serving

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="headless Chromium is not installed (apt-get install chromium chromium-driver; tests/run.sh does)",
)
WAIT_S = 60


@pytest.fixture(scope="module")
def bottle_uri(bottle_root: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Bottle's bank from every fifth training image at 128 px (13 s), ingested by a child process."""
    folder = tmp_path_factory.mktemp("page")
    train = folder / "train"
    train.mkdir()
    for image in sorted((bottle_root / "train" / "good").glob("*.png"))[::5]:
        (train / image.name).symlink_to(image)
    uri = str(folder / "bottle.db")
    settings = ["--category", "bottle", "--images", str(train), "--uri", uri, "--image-size", "128"]
    subprocess.run([*CLI, "ingest", *settings, "--coreset-ratio", "0.1", "--no-progress"], check=True)
    return uri


@pytest.fixture
def browser() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(condition, message)


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def _rows(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [row.text for row in driver.find_elements(By.CSS_SELECTOR, "#recent tr")]


def _upload(driver, path: Path, verdict: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "file").send_keys(str(path))
    _wait(driver, lambda d: _text(d, "name").startswith(path.name) and _text(d, "verdict") == verdict, path.name)
    _wait(driver, lambda d: d.execute_script("return document.getElementById('heat').naturalWidth > 0"), "picture")


def test_the_page_shows_a_defective_and_a_good_bottle_and_the_recent_inspections(
    bottle_uri: str, bottle_root: Path, browser, tmp_path: Path
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    defective, good = bottle_root / "test" / "broken_large" / "000.png", bottle_root / "test" / "good" / "000.png"
    options = ("--image-size", "128", "--category", "bottle", "--review-folder", str(tmp_path / "review"))
    with serving(bottle_uri, tmp_path / "serve.log", *options) as address:
        browser.get(f"{address}/")
        _wait(browser, lambda d: "bottle__v" in _text(d, "bank"), "the bank's version in the header")
        assert [o.text for o in Select(browser.find_element(By.ID, "category")).options] == ["bottle"]

        _upload(browser, defective, "DEFECT")
        [shown] = httpx.get(f"{address}/v1/inspections").json()["inspections"]  # what the API answered
        assert _text(browser, "score") == f"score {shown['score']:.2f} against the threshold {shown['threshold']:.2f}"
        assert shown["score"] > shown["threshold"]
        assert browser.execute_script("return document.getElementById('heat').naturalWidth") == shown["width"]
        assert _text(browser, "color-low") == f"{shown['colors']['low']:.1f}"
        assert _text(browser, "color-high") == f"{shown['colors']['high']:.1f}"
        # Each region's box lies where the API put it, over the picture as shown.
        boxes = browser.find_elements(By.CSS_SELECTOR, "#picture .region")
        assert len(boxes) == len(shown["regions"]) >= 1
        picture = browser.find_element(By.ID, "heat").rect
        left, top, right, _ = shown["regions"][0]["box"]
        assert boxes[0].rect["x"] - picture["x"] == pytest.approx(picture["width"] * left / shown["width"], abs=2)
        assert boxes[0].rect["width"] == pytest.approx(picture["width"] * (right - left) / shown["width"], abs=2)
        assert boxes[0].rect["y"] - picture["y"] == pytest.approx(picture["height"] * top / shown["height"], abs=2)
        listed = browser.find_elements(By.CSS_SELECTOR, "#regions li")[0].text
        assert re.match(r"region 1: \d+ \u00d7 \d+ px at \(\d+, \d+\)", listed)

        # The review loop: this DEFECT found good is queued for the bank.
        browser.find_element(By.ID, "review-good").click()
        _wait(browser, lambda d: _text(d, "review-state") == "queued for the bank", "the part queued")
        waiting = "1 part found good on review wait for the bottle bank"
        _wait(browser, lambda d: _text(d, "queue-state") == waiting, "the queue's state")

        _upload(browser, good, "OK")
        assert not browser.find_element(By.ID, "review-good").is_displayed()  # an OK has nothing to review
        assert browser.find_elements(By.CSS_SELECTOR, "#picture .region") == []
        assert browser.find_elements(By.CSS_SELECTOR, "#regions li") == []
        _wait(browser, lambda d: len(_rows(d)) == 2, "two recent inspections")
        assert [row.split()[0] for row in _rows(browser)] == ["OK", "DEFECT"]  # newest first
        thumbnails = "return [...document.querySelectorAll('#recent img')].every((i) => i.naturalWidth > 0)"
        _wait(browser, lambda d: d.execute_script(thumbnails), "thumbnails")

        Select(browser.find_element(By.ID, "filter-verdict")).select_by_visible_text("DEFECT")
        _wait(browser, lambda d: [row.split()[0] for row in _rows(d)] == ["DEFECT"], "the DEFECT filter")
        Select(browser.find_element(By.ID, "filter-verdict")).select_by_visible_text("all")
        # The list is live: an inspection by another client (a line controller) shows up by itself.
        other = httpx.post(
            f"{address}/v1/inspect?category=bottle&name=line.png", content=good.read_bytes(), timeout=WAIT_S
        )
        assert other.status_code == 200
        _wait(browser, lambda d: len(_rows(d)) == 3 and "line.png" in _rows(d)[0], "another client's inspection")

        # A file that is no image: the API's reason on the page, nothing else changed.
        text_file = tmp_path / "notes.png"
        text_file.write_text("not an image")
        browser.find_element(By.ID, "file").send_keys(str(text_file))
        _wait(browser, lambda d: _text(d, "error").startswith("notes.png: "), "the reason for a bad upload")
        assert _text(browser, "verdict") == "OK" and len(_rows(browser)) == 3

        # The queued part grows the bank: a new version, which the header shows.
        before = _text(browser, "bank")
        browser.find_element(By.ID, "review-append").click()
        _wait(browser, lambda d: _text(d, "queue-state").startswith("1 added: the bank is now bottle__v"), "append")
        version = _text(browser, "queue-state").rsplit(" ", 1)[1]
        _wait(browser, lambda d: version in _text(d, "bank"), "the new version in the header")
        assert version not in before
        assert not browser.find_element(By.ID, "review-append").is_displayed()


def test_the_page_asks_for_the_token_where_one_is_set(bottle_uri: str, browser, tmp_path: Path):
    from selenium.webdriver.common.by import By

    options = ("--image-size", "128", "--token", "s3cret")
    with serving(bottle_uri, tmp_path / "serve.log", *options) as address:
        browser.get(f"{address}/")
        _wait(browser, lambda d: d.find_element(By.ID, "token-box").is_displayed(), "the token box")
        assert "token" in _text(browser, "error")
        browser.find_element(By.ID, "token").send_keys("s3cret")
        browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
        _wait(browser, lambda d: "bottle__v" in _text(d, "bank"), "the banks once the token is given")
        assert not browser.find_element(By.ID, "token-box").is_displayed() and _text(browser, "error") == ""
