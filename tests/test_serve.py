"""`serve`: the HTTP service of a station, against a real Milvus Lite bank (in process through
FastAPI's test client, and once as the real command on a loopback socket)."""

import io
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import CLI, serving, textured_image
from fastapi.testclient import TestClient
from PIL import Image

from patchcore_milvus import Bank, BankStore, Config, fit_bank
from patchcore_milvus.errors import ConfigError
from patchcore_milvus.images import list_images
from patchcore_milvus.service import Inspector, check_token_rule, create_app


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


LOCAL = "http://127.0.0.1"  # TestClient's own "testserver" is no name of this station
GOOD, BAD = png(textured_image(100)), png(textured_image(101, defect=True))


@pytest.fixture
def banked(good_folder: Path, small_config: Config) -> Config:
    fit_bank("texture", list_images(good_folder), small_config)
    return small_config


def inspector_of(config: Config, queue_size: int = 64) -> Inspector:
    return Inspector(config, BankStore.from_config(config, existing=True), queue_size)


@pytest.fixture
def client(banked: Config):
    inspector = inspector_of(banked)
    inspector.start()
    with TestClient(base_url=LOCAL, app=create_app(inspector)) as client:
        yield client
    inspector.stop()


def test_an_inspection_over_http_is_the_bank_s_own_with_its_regions_and_pictures(client: TestClient, banked: Config):
    bank = Bank.open("texture", banked)
    want_good, want_bad = bank.score_images([textured_image(100), textured_image(101, defect=True)], ["g", "b"])
    good = client.post("/v1/inspect?category=texture", content=GOOD).json()
    bad = client.post("/v1/inspect?category=texture&name=bad.png", content=BAD).json()
    assert (good["verdict"], bad["verdict"]) == ("OK", "DEFECT")
    assert good["score"] == pytest.approx(want_good.image_score, rel=1e-5)
    assert bad["score"] == pytest.approx(want_bad.image_score, rel=1e-5)
    assert bad["name"] == "bad.png" and bad["bank_version"] == bank.version and good["regions"] == []
    # The blob is 19 x 19 pixels from (48, 32): the largest region holds its centre and peaks
    # above the pixel threshold; the regions partition the mask.
    region = bad["regions"][0]
    left, top, right, bottom = region["box"]
    assert left <= 57 < right and top <= 41 < bottom
    assert region["peak"] > bad["pixel_threshold"]
    assert sum(r["area"] for r in bad["regions"]) == bad["defect_pixels"]
    assert set(bad["ms"]) == {"decode", "extract", "search", "post", "total"}
    amap = np.load(io.BytesIO(client.get(bad["links"]["map"]).content))
    np.testing.assert_allclose(amap, want_bad.anomaly_map, rtol=1e-4, atol=1e-4)
    mask = np.asarray(Image.open(io.BytesIO(client.get(bad["links"]["mask"]).content))) > 0
    assert mask.sum() == bad["defect_pixels"] > 0
    overlay = Image.open(io.BytesIO(client.get(bad["links"]["overlay"]).content))
    assert overlay.format == "PNG" and overlay.width >= 2 * 96
    assert client.get("/v1/inspections/0000/map.npy").status_code == 404


def test_a_multipart_upload_and_bad_requests_get_the_reason(client: TestClient, banked: Config):
    sent = client.post("/v1/inspect?category=texture", files={"image": ("part.png", BAD, "image/png")})
    assert sent.status_code == 200 and sent.json()["verdict"] == "DEFECT" and sent.json()["name"] == "part.png"
    cases = [
        ("/v1/inspect?category=texture", b"not an image", 400, "not a readable image"),
        ("/v1/inspect?category=texture", b"", 400, "no image in the request"),
        ("/v1/inspect?category=nothing_here", GOOD, 404, "no bank for category 'nothing_here'"),
        ("/v1/inspect?category=../x", GOOD, 400, "invalid category name"),
    ]
    for url, body, status, reason in cases:
        answer = client.post(url, content=body)
        assert answer.status_code == status and reason in answer.json()["detail"], (url, answer.text)
    assert client.post("/v1/inspect", content=GOOD).status_code == 422  # no category at all
    fields = b'--b0\r\nContent-Disposition: form-data; name="note"\r\n\r\nno file\r\n--b0--\r\n'
    headers = {"Content-Type": "multipart/form-data; boundary=b0"}
    form = client.post("/v1/inspect?category=texture", content=fields, headers=headers)
    assert form.status_code == 400 and "holds no file" in form.json()["detail"]
    assert client.post("/v1/inspect?category=texture", content=GOOD).json()["verdict"] == "OK"  # after the errors
    small = inspector_of(banked)
    with TestClient(base_url=LOCAL, app=create_app(small, max_upload_bytes=1000)) as limited:
        answer = limited.post("/v1/inspect?category=texture", content=GOOD)
        assert answer.status_code == 413 and "at most 1000" in answer.json()["detail"]

        def chunked(parts: list[bytes]):
            yield from parts  # no Content-Length: counted as it arrives

        raw = limited.post("/v1/inspect?category=texture", content=chunked([GOOD[:900], GOOD[900:]]))
        assert raw.status_code == 413
        boundary = "b0undary"
        multipart = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + GOOD
            + f"\r\n--{boundary}--\r\n".encode()
        )
        sent = limited.post(
            "/v1/inspect?category=texture",
            content=chunked([multipart[:500], multipart[500:]]),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert sent.status_code == 413
    with TestClient(base_url=LOCAL, app=create_app(small, max_pixels=96 * 95)) as limited:
        answer = limited.post("/v1/inspect?category=texture", content=GOOD)
        assert answer.status_code == 400 and "more than this service takes" in answer.json()["detail"]


def test_a_full_queue_is_answered_503_at_once(banked: Config):
    inspector = inspector_of(banked, queue_size=1)  # its worker not started yet: the queue stays full
    waiting = inspector.submit("texture", textured_image(100), "waiting")
    with TestClient(base_url=LOCAL, app=create_app(inspector)) as client:
        started = time.monotonic()
        answer = client.post("/v1/inspect?category=texture", content=GOOD)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert time.monotonic() - started < 10
        assert 'patchcore_refused_requests_total{reason="busy"} 1.0' in client.get("/metrics").text
    inspector.start()
    assert waiting.result(timeout=120).verdict == "OK"
    queued = [inspector.submit("texture", textured_image(100 + i), f"{i}") for i in range(1)]
    inspector.stop()  # answers what is queued first
    assert all(future.done() and future.result().verdict == "OK" for future in queued)


def test_requests_waiting_together_are_scored_in_one_search(banked: Config):
    inspector = inspector_of(banked)
    images = [textured_image(100), textured_image(101, defect=True), textured_image(102), textured_image(103)]
    futures = [inspector.submit("texture", image, f"{i}") for i, image in enumerate(images)]
    inspector.start()  # finds all four queued: one batch (batch_size 4)
    results = [future.result(timeout=120) for future in futures]
    inspector.stop()
    alone = Bank.open("texture", banked).score_images(images, [str(i) for i in range(4)])
    assert [r.image_score for r in results] == pytest.approx([a.image_score for a in alone], rel=1e-5)
    text = inspector.metrics.text().decode()
    assert "patchcore_batch_images_count 1.0" in text and "patchcore_batch_images_sum 4.0" in text


def test_categories_health_and_metrics(client: TestClient, banked: Config):
    client.post("/v1/inspect?category=texture", content=GOOD)
    [listed] = client.get("/v1/categories").json()["categories"]
    version = BankStore(banked.uri).resolve("texture")
    assert listed["category"] == "texture" and listed["version"] == version
    assert listed["thresholds"]["image"] > 0 and listed["thresholds"]["pixel"] > 0
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["banks"] == {"texture": version}
    metrics = client.get("/metrics").text
    assert 'patchcore_inspections_total{category="texture",verdict="OK"} 1.0' in metrics
    assert "patchcore_inspection_seconds_count 1.0" in metrics


def test_recent_inspections_are_listed_newest_first_filtered_and_pictured(client: TestClient):
    good = client.post("/v1/inspect?category=texture&name=g.png", content=GOOD).json()
    bad = client.post("/v1/inspect?category=texture&name=b.png", content=BAD).json()
    listed = client.get("/v1/inspections").json()
    assert [r["id"] for r in listed["inspections"]] == [bad["id"], good["id"]] and listed["keep"] == 32
    assert listed["inspections"][0] == bad  # the very answer, kept
    assert [r["name"] for r in client.get("/v1/inspections?verdict=DEFECT").json()["inspections"]] == ["b.png"]
    assert client.get("/v1/inspections?category=other").json()["inspections"] == []
    assert (bad["width"], bad["height"]) == (96, 96) and bad["colors"]["low"] < bad["pixel_threshold"]
    heat = Image.open(io.BytesIO(client.get(bad["links"]["heat"]).content))
    assert heat.size == (96, 96)  # the image's own size, below the 1024 px bound
    small = Image.open(io.BytesIO(client.get(bad["links"]["heat"] + "?side=48").content))
    assert small.size == (48, 48)
    assert client.get(bad["links"]["heat"] + "?side=0").status_code == 400


def test_a_defect_found_good_on_review_is_queued_and_appended_to_the_bank(client: TestClient, banked: Config):
    good = client.post("/v1/inspect?category=texture", content=GOOD).json()
    bad = client.post("/v1/inspect?category=texture", content=BAD).json()
    queued = client.post(f"/v1/inspections/{bad['id']}/review", json={"decision": "good"})
    assert queued.status_code == 200 and queued.json()["queued"] == 1
    assert queued.json()["inspection"]["score"] == bad["score"]  # the station's answer, recorded
    twice = client.post(f"/v1/inspections/{bad['id']}/review", json={"decision": "good"})
    assert twice.status_code == 409 and "reviewed already" in twice.json()["detail"]
    not_defect = client.post(f"/v1/inspections/{good['id']}/review", json={"decision": "good"})
    assert not_defect.status_code == 409 and "not DEFECT" in not_defect.json()["detail"]
    assert client.post(f"/v1/inspections/{bad['id']}/review", json={"decision": "bad"}).status_code == 422
    assert [d["id"] for d in client.get("/v1/review/texture").json()["queued"]] == [bad["id"]]

    appended = client.post("/v1/review/texture/append").json()
    version = BankStore(banked.uri).resolve("texture")
    assert appended["added"] == 1 and appended["version"] == version != bad["bank_version"]
    review = client.get("/v1/review/texture").json()
    assert review["queued"] == [] and [(d["id"], d["added_to"]) for d in review["added"]] == [(bad["id"], version)]
    assert client.post("/v1/inspect?category=texture", content=BAD).json()["bank_version"] == version
    nothing = client.post("/v1/review/texture/append")
    assert nothing.status_code == 409 and "no reviewed images are queued" in nothing.json()["detail"]


def test_a_review_folder_that_cannot_be_written_is_a_500_that_says_so(banked: Config, tmp_path: Path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the review folder should be")
    inspector = inspector_of(banked.replace(review_folder=str(blocked)))
    inspector.start()
    try:
        with TestClient(base_url=LOCAL, app=create_app(inspector)) as client:
            bad = client.post("/v1/inspect?category=texture", content=BAD).json()
            answer = client.post(f"/v1/inspections/{bad['id']}/review", json={"decision": "good"})
            assert answer.status_code == 500
            assert answer.json()["detail"].startswith(f"cannot use the review folder {blocked}")
            assert client.get("/v1/review/texture").status_code == 500
    finally:
        inspector.stop()


def test_a_page_elsewhere_cannot_drive_the_station_through_a_browser(client: TestClient):
    """DNS rebinding (a name of the attacker's that now resolves to 127.0.0.1) and cross-site
    POSTs (another site's page posting to 127.0.0.1) are refused; tools and the page itself pass."""
    rebound = client.get("/v1/inspections", headers={"host": "attacker.example:8000"})
    assert rebound.status_code == 400 and "--allowed-host NAME" in rebound.json()["detail"]
    assert client.get("/v1/inspections", headers={"host": "localhost:8000"}).status_code == 200
    assert client.get("/v1/inspections", headers={"host": "[::1]:8000"}).status_code == 200
    elsewhere = client.post("/v1/review/texture/append", headers={"origin": "http://attacker.example"})
    assert elsewhere.status_code == 403 and "open this station's own page" in elsewhere.json()["detail"]
    own = client.post("/v1/review/texture/append", headers={"origin": LOCAL})
    assert own.status_code == 409  # through the guard: nothing is queued


def test_a_request_without_a_host_or_with_the_token_passes(banked: Config, client: TestClient):
    assert client.get("/v1/inspections", headers={"host": ""}).status_code == 200
    null = client.post("/v1/review/texture/append", headers={"origin": "null"})  # a sandboxed page
    assert null.status_code == 403
    assert client.get("/v1/review/bad-name").status_code == 400
    inspector = inspector_of(banked)
    inspector.start()
    try:
        with TestClient(create_app(inspector, token="s3cret")) as guarded:
            alias = {"host": "station-alias:8000"}
            assert guarded.get("/v1/inspections", headers=alias).status_code == 400
            token = {**alias, "authorization": "Bearer s3cret"}
            assert guarded.get("/v1/inspections", headers=token).status_code == 200
    finally:
        inspector.stop()


def test_an_allowed_host_is_accepted_also_behind_a_proxy(banked: Config):
    inspector = inspector_of(banked)
    inspector.start()
    try:
        with TestClient(create_app(inspector, allowed_hosts=("Station-7.factory", "backend"))) as client:
            assert client.get("/v1/inspections", headers={"host": "station-7.factory.:8000"}).status_code == 200
            assert client.get("/v1/inspections").status_code == 400  # "testserver"
            assert client.get("/v1/inspections", headers={"host": "[::1]evil.example"}).status_code == 400
            # A proxy that rewrote the Host: the page's Origin is the public name.
            proxied = {"host": "backend:8000", "origin": "https://station-7.factory"}
            assert client.post("/v1/review/texture/append", headers=proxied).status_code == 409  # nothing queued
    finally:
        inspector.stop()


def test_the_page_and_its_files_are_served_with_a_policy_of_their_own(client: TestClient):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="page.js"' in page.text
    assert client.get("/page.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/page.css").headers["content-type"].startswith("text/css")


def test_a_new_bank_version_reaches_the_service_through_the_alias(client: TestClient, banked: Config, good_folder):
    first = client.post("/v1/inspect?category=texture", content=GOOD).json()["bank_version"]
    fit_bank("texture", list_images(good_folder), banked.replace(coreset_size=40))
    second = client.post("/v1/inspect?category=texture", content=GOOD).json()["bank_version"]
    assert second != first and second == BankStore(banked.uri).resolve("texture")


def test_a_token_is_required_beyond_loopback_and_checked(banked: Config):
    with pytest.raises(ConfigError, match="reachable from other machines"):
        check_token_rule("0.0.0.0", None)
    for host in ("127.0.0.1", "::1", "localhost"):
        check_token_rule(host, None)
    inspector = inspector_of(banked)
    inspector.start()
    with TestClient(base_url=LOCAL, app=create_app(inspector, token="s3cret")) as client:
        assert client.post("/v1/inspect?category=texture", content=GOOD).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert client.post("/v1/inspect?category=texture", content=GOOD, headers=wrong).status_code == 401
        assert client.get("/metrics").status_code == 401
        right = {"Authorization": "bearer s3cret"}  # the scheme's case does not matter
        inspected = client.post("/v1/inspect?category=texture", content=GOOD, headers=right)
        assert inspected.status_code == 200
        for guarded in ("/v1/categories", inspected.json()["links"]["map"], "/openapi.json", "/docs"):
            assert client.get(guarded).status_code in (401, 404), guarded  # 404: not published at all
        assert client.get("/v1/categories", headers=right).status_code == 200
        assert client.get("/healthz").json() == {"status": "ok"}  # for probes, no details without the token
        assert client.get("/healthz", headers=right).json()["banks"] == {"texture": inspected.json()["bank_version"]}
    inspector.stop()


def test_the_serve_command_answers_on_a_loopback_socket(good_folder: Path, tmp_path: Path):
    uri = str(tmp_path / "station.db")  # a Lite file serves one process: ingested by a child as well
    settings = ["--category", "texture", "--images", str(good_folder), "--uri", uri, "--image-size", "64"]
    subprocess.run([*CLI, "ingest", *settings, "--coreset-ratio", "0.25", "--no-progress"], check=True)
    refused = subprocess.run([*CLI, "serve", "--uri", uri, "--host", "0.0.0.0"], capture_output=True, text=True)
    assert refused.returncode == 2 and "give an API token" in refused.stderr and "Traceback" not in refused.stderr
    with serving(uri, tmp_path / "serve.log", "--category", "texture") as address:
        answer = httpx.post(f"{address}/v1/inspect?category=texture", content=BAD, timeout=60)
        assert answer.status_code == 200 and answer.json()["verdict"] == "DEFECT"
