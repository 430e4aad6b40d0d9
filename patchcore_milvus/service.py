"""`patchcore-milvus serve`: one long-running station process over HTTP.

The extractor and the banks stay warm in one process; every inspection goes through one queue,
whose worker takes whatever is waiting when it is free (up to `batch_size` images) and scores
each category's share in one search: concurrent requests are micro-batched. The queue is bounded:
a request that finds it full is answered 503 at once, never left hanging. Each batch follows the
category's alias (`Bank`), so a re-ingest or a rollback reaches this station by itself.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import logging
import queue
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel
from starlette.datastructures import UploadFile  # what the form parser makes (FastAPI's is a subclass)

from patchcore_milvus.bank import Bank, Decoded, Extracted, Inspection
from patchcore_milvus.config import Config, shown_uri
from patchcore_milvus.errors import (
    BankNotFoundError,
    ConfigError,
    ImageError,
    PatchcoreMilvusError,
    StoreError,
    StoreUnavailableError,
)
from patchcore_milvus.images import decode_rgb
from patchcore_milvus.milvus import BankStore
from patchcore_milvus.milvus.versions import validate_category
from patchcore_milvus.regions import defect_regions
from patchcore_milvus.review import ReviewQueue
from patchcore_milvus.visualize import display_range

MAX_UPLOAD_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 40_000_000  # an upload larger than this (e.g. 8000 x 5000) is refused before decoding
QUEUE_SIZE = 64  # images waiting for the worker; one more is answered 503
KEEP_INSPECTIONS = 32  # recent inspections whose map, overlay and mask can be fetched
KEEP_BYTES = 1 << 30  # and at most this much of their images and maps
UPLOADS_AT_ONCE = 4  # uploads read and decoded at the same time
REQUEST_TIMEOUT_S = 120.0
logger = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)


class Busy(Exception):
    """The queue is full: the client should retry later."""


@dataclass
class _Job:
    category: str
    image: Image.Image
    name: str
    queued_at: float = field(default_factory=time.perf_counter)
    future: Future[Inspection] = field(default_factory=Future)


class Metrics:
    """Prometheus counters of one service (its own registry, so that two apps never mix)."""

    def __init__(self, queue_depth: Callable[[], int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.inspections = Counter(
            "patchcore_inspections", "Images inspected", ["category", "verdict"], registry=self.registry
        )
        self.refused = Counter("patchcore_refused_requests", "Requests refused", ["reason"], registry=self.registry)
        self.latency = Histogram(
            "patchcore_inspection_seconds",
            "From the request's image decoded to its inspection ready",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch = Histogram(
            "patchcore_batch_images",
            "Images per search (micro-batch)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        Gauge("patchcore_queue_depth", "Images waiting", registry=self.registry).set_function(queue_depth)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Inspector:
    """Two worker threads, overlapping as `Bank.score_paths` does: one takes whatever is queued
    (up to `batch_size` images) and extracts each category's share, the other searches and
    scores it. The first takes its next batch only once the second has picked up the last, so
    that requests arriving meanwhile wait together and share a search. Banks are opened on first
    use (or before the start)."""

    def __init__(self, config: Config, store: BankStore, queue_size: int = QUEUE_SIZE):
        self.config = config
        self.store = store
        self.jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self.metrics = Metrics(self.jobs.qsize)
        self._banks: dict[str, Bank] = {}
        self._extracted: queue.Queue[tuple[Bank, list[_Job], Extracted] | None] = queue.Queue(maxsize=1)
        self._picked_up = threading.Semaphore(1)  # the search took the last extracted batch
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        # For /healthz: one call without retries, so that a probe hears at once that Milvus is gone.
        self._probe = BankStore.from_config(config.replace(retry_seconds=0.0, milvus_timeout=5.0), existing=True)

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("the inspector is running already")
        for target, name in ((self._extract, "patchcore-extract"), (self._search, "patchcore-search")):
            thread = threading.Thread(target=target, daemon=True, name=name)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """After what is queued is answered; nothing is taken meanwhile."""
        self._stopping.set()
        if self._threads:
            self.jobs.put(None)
            for thread in self._threads:
                thread.join()
            self._threads = []

    def probe(self) -> None:
        self._probe.ping()

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def open(self, category: str) -> Bank:
        """The category's bank, opened once (before the workers start, or by the extracting one)."""
        if category not in self._banks:
            self._banks[category] = Bank.open(category, self.config, store=self.store)
        return self._banks[category]

    def loaded(self) -> dict[str, str]:
        """Category -> the version its bank scored last."""
        return {category: bank.version for category, bank in list(self._banks.items())}

    def knows(self, category: str) -> bool:
        """Whether the category has a bank (open here, or an alias in Milvus)."""
        return category in self._banks or self.store.current_version(category) is not None

    def submit(self, category: str, image: Image.Image, name: str) -> Future[Inspection]:
        if self._stopping.is_set():
            raise Busy
        job = _Job(category, image, name)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy from None
        return job.future

    def _take(self) -> tuple[list[_Job], bool]:
        """The next batch (the first job waited for, then whatever else is queued) and whether it is the last."""
        batch: list[_Job] = []
        while len(batch) < self.config.batch_size:
            try:
                job = self.jobs.get() if not batch else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _extract(self) -> None:
        last = False
        while not last:
            self._picked_up.acquire()
            batch, last = self._take()
            by_category: dict[str, list[_Job]] = {}
            for job in batch:
                if job.future.set_running_or_notify_cancel():  # not given up on
                    by_category.setdefault(job.category, []).append(job)
            handed = 0
            for category, jobs in by_category.items():
                try:
                    bank = self.open(category)
                    decoded = Decoded([job.name for job in jobs], [job.image for job in jobs], [0.0] * len(jobs))
                    extracted = bank.extract(decoded)
                except Exception as exc:  # every request of the batch gets the error; the worker goes on
                    _fail(jobs, exc)
                    continue
                if handed:  # one hand-off at a time: wait for the search to take the one before
                    self._picked_up.acquire()
                self._extracted.put((bank, jobs, extracted))
                handed += 1
            if not handed:
                self._picked_up.release()
        self._extracted.put(None)

    def _search(self) -> None:
        while (item := self._extracted.get()) is not None:
            self._picked_up.release()
            bank, jobs, extracted = item
            try:
                results = bank.score_extracted(extracted)
                self.metrics.batch.observe(len(jobs))
                for job, result in zip(jobs, results):
                    result.timings_ms.pop("load")  # decoded by the request, which reports it as "decode"
                    elapsed = time.perf_counter() - job.queued_at
                    result.timings_ms["total"] = elapsed * 1000  # queued to scored
                    self.metrics.latency.observe(elapsed)
                    self.metrics.inspections.labels(job.category, result.verdict or "none").inc()
                    job.future.set_result(result)
            except Exception as exc:
                _fail([job for job in jobs if not job.future.done()], exc)


def _fail(jobs: list[_Job], exc: Exception) -> None:
    for job in jobs:
        job.future.set_exception(exc)


class Recent:
    """The last inspections, by id: their records (the JSON answers, newest last) and what their
    map, pictures and mask are drawn from."""

    def __init__(self, keep: int = KEEP_INSPECTIONS, keep_bytes: int = KEEP_BYTES):
        self.keep, self.keep_bytes = keep, keep_bytes
        self._items: OrderedDict[str, tuple[Inspection, dict[str, Any], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, inspection: Inspection, describe: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        """Keep `inspection` under a new id; its record is `describe(id)`, returned."""
        key = secrets.token_hex(8)
        record = describe(key)
        size = inspection.anomaly_map.nbytes + inspection.image.width * inspection.image.height * 3
        with self._lock:
            self._items[key] = (inspection, record, size)
            self._bytes += size
            while len(self._items) > 1 and (len(self._items) > self.keep or self._bytes > self.keep_bytes):
                self._bytes -= self._items.popitem(last=False)[1][2]
        return record

    def get(self, key: str) -> tuple[Inspection, dict[str, Any]] | None:
        """The inspection and its record, if it is still kept."""
        with self._lock:
            found = self._items.get(key)
        return None if found is None else found[:2]

    def records(self, category: str | None = None, verdict: str | None = None) -> list[dict[str, Any]]:
        """The records kept, newest first, of `category` and `verdict` where given."""
        with self._lock:
            kept = [record for _, record, _ in self._items.values()]
        return [
            record
            for record in reversed(kept)
            if category in (None, record["category"]) and verdict in (None, record["verdict"])
        ]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token_rule(host: str, token: str | None) -> None:
    """A host other than loopback is reachable from the network: it needs a token."""
    if not is_loopback(host) and not token:
        raise ConfigError(
            f"serve --host {host} is reachable from other machines: give an API token (--token, or the "
            "environment variable PATCHCORE_MILVUS_TOKEN) that every client sends as 'Authorization: Bearer "
            "<token>', or serve on 127.0.0.1"
        )


def create_app(
    inspector: Inspector,
    token: str | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    keep: int = KEEP_INSPECTIONS,
    timeout_s: float = REQUEST_TIMEOUT_S,
    allowed_hosts: tuple[str, ...] = (),
) -> FastAPI:
    """The FastAPI application over `inspector` (started and stopped by the caller). With a
    token, every endpoint but /healthz's status needs it, the API description included.
    `allowed_hosts`: names a request's Host may give besides IP addresses, localhost and this
    machine's own names (`same_station`)."""
    token = token or None
    names, extra = station_names(allowed_hosts), frozenset(name.lower() for name in allowed_hosts)
    recent = Recent(keep)
    metrics = inspector.metrics
    uploads = asyncio.Semaphore(UPLOADS_AT_ONCE)
    described = token is None  # the OpenAPI page and /docs only where no token guards the API
    reviews = ReviewQueue(inspector.config.review_folder)
    app = FastAPI(
        title="patchcore-milvus",
        version="1",
        docs_url="/docs" if described else None,
        redoc_url=None,
        openapi_url="/openapi.json" if described else None,
    )

    @app.middleware("http")
    async def same_station(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """A web page elsewhere must not drive the station through its user's browser: a Host that
        is none of this station's names is a DNS-rebinding page reaching 127.0.0.1 (400), and a
        POST whose Origin is another site is a cross-site request (403). Tools send no Origin; a
        request without a Host, or with the token (a page elsewhere has none), is no browser's."""
        host = request.headers.get("host")
        if host and not host_allowed(host, names) and not (token is not None and allowed(request)):
            metrics.refused.labels("host").inc()
            message = f"Host {host!r} is not a name of this station; start serve with --allowed-host NAME to accept it"
            return JSONResponse({"detail": message}, 400)
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD") and origin is not None and not same_origin(origin, host, extra):
            metrics.refused.labels("cross_origin").inc()
            message = f"a request from the page of {origin} is refused: open this station's own page"
            return JSONResponse({"detail": message}, 403)
        return await call_next(request)

    def allowed(request: Request) -> bool:
        if token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(given.encode(), token.encode())

    def refuse(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> HTTPException:
        metrics.refused.labels(reason).inc()
        return HTTPException(status, message, headers=headers)

    def busy() -> HTTPException:
        return refuse(503, "busy", "the inspection queue is full; retry shortly", {"Retry-After": "1"})

    def unavailable(exc: StoreError) -> HTTPException:
        return refuse(503, "milvus_unavailable", str(exc), {"Retry-After": "5"})

    async def authorized(request: Request) -> None:
        if not allowed(request):
            message = "missing or wrong API token: send 'Authorization: Bearer <token>'"
            raise refuse(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})

    async def body(request: Request) -> bytes:
        """The whole request body, refused (413) past `max_upload_bytes` however it is sent."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_upload_bytes:
            raise refuse(413, "too_large", f"the upload is {int(declared)} bytes; at most {max_upload_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_upload_bytes:
                raise refuse(413, "too_large", f"the upload is over {max_upload_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def upload(request: Request) -> tuple[bytes, str]:
        """The image's bytes (the raw body, or the first file of a multipart form) and its name."""
        data = await body(request)
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return data, request.query_params.get("name", "upload")

        async def replay() -> dict[str, Any]:  # the body read above, for the form parser
            return {"type": "http.request", "body": data, "more_body": False}

        try:
            async with Request(request.scope, replay).form(max_files=1, max_fields=8) as form:
                files = [value for value in form.values() if isinstance(value, UploadFile)]
                if files:
                    return await files[0].read(), files[0].filename or "upload"
        except HTTPException:  # Starlette's own 400: a malformed form
            metrics.refused.labels("bad_input").inc()
            raise
        raise refuse(400, "bad_input", "the multipart form holds no file: send the image as a file field")

    @app.post("/v1/inspect", dependencies=[Depends(authorized)])
    async def inspect(request: Request, category: str) -> JSONResponse:
        try:
            validate_category(category)
        except StoreError as exc:
            raise refuse(400, "bad_input", str(exc)) from None
        if inspector.jobs.full():
            raise busy()
        try:
            known = await run_in_threadpool(inspector.knows, category)
        except StoreError as exc:
            raise unavailable(exc) from None
        if not known:
            raise refuse(404, "unknown_category", f"no bank for category {category!r}: GET /v1/categories lists them")
        async with uploads:  # bounded: each upload and its decoded image are held in memory
            data, name = await upload(request)
            if not data:
                message = "no image in the request: send its bytes as the body, or a multipart file"
                raise refuse(400, "bad_input", message)
            start = time.perf_counter()
            try:
                image = await run_in_threadpool(decode_rgb, data, name, max_pixels)
            except ImageError as exc:
                raise refuse(400, "bad_input", str(exc)) from None
            decode_ms = (time.perf_counter() - start) * 1000
            try:
                future = inspector.submit(category, image, name)
            except Busy:
                raise busy() from None
        waited = asyncio.wrap_future(future)
        done, _ = await asyncio.wait({waited}, timeout=timeout_s)
        if not done:
            waited.cancel()  # a job still queued is dropped; one being scored finishes unread
            raise refuse(504, "timeout", f"no result within {timeout_s:.0f} s")
        try:
            result = waited.result()
        except BankNotFoundError as exc:
            raise refuse(404, "unknown_category", str(exc)) from None
        except StoreUnavailableError as exc:
            raise unavailable(exc) from None
        except Exception as exc:  # ours or not: the reason, as JSON, counted
            logger.exception("inspection failed")
            raise refuse(500, "failed", f"{type(exc).__name__}: {exc}") from None
        result.timings_ms["decode"] = decode_ms
        record = await run_in_threadpool(recent.add, result, lambda key: _inspection_json(key, category, result))
        return JSONResponse(record)

    def _kept(key: str) -> tuple[Inspection, dict[str, Any]]:
        found = recent.get(key)
        if found is None:
            raise HTTPException(404, f"no inspection {key!r} here (only the last {keep} are kept)")
        return found

    def _recent(key: str) -> Inspection:
        return _kept(key)[0]

    @app.get("/v1/inspections", dependencies=[Depends(authorized)])
    def inspections(category: str | None = None, verdict: str | None = None) -> JSONResponse:
        """The inspections kept here (the last `keep`), newest first, filtered by category and verdict."""
        return JSONResponse({"keep": keep, "inspections": recent.records(category or None, verdict or None)})

    @app.get("/v1/inspections/{key}/map.npy", dependencies=[Depends(authorized)])
    def anomaly_map(key: str) -> Response:
        buffer = io.BytesIO()
        np.save(buffer, _recent(key).anomaly_map.astype(np.float32))
        return Response(buffer.getvalue(), media_type="application/octet-stream")

    @app.get("/v1/inspections/{key}/overlay.png", dependencies=[Depends(authorized)])
    def overlay(key: str) -> Response:
        from patchcore_milvus.visualize import overlay_figure

        return Response(_png(overlay_figure(_recent(key))), media_type="image/png")

    @app.get("/v1/inspections/{key}/heat.png", dependencies=[Depends(authorized)])
    def heat(key: str, side: int = 1024) -> Response:
        """The image with the map over it and the defect outlined, at most `side` pixels a side."""
        from patchcore_milvus.visualize import heat_overlay

        if not 16 <= side <= 4096:
            raise HTTPException(400, f"side must be from 16 to 4096 pixels, got {side}")
        return Response(_png(heat_overlay(_recent(key), side)), media_type="image/png")

    @app.get("/v1/inspections/{key}/mask.png", dependencies=[Depends(authorized)])
    def mask(key: str) -> Response:
        found = _recent(key).mask
        if found is None:
            raise HTTPException(404, "this bank has no pixel threshold, so there is no mask")
        return Response(_png(Image.fromarray(found.astype(np.uint8) * 255)), media_type="image/png")

    def review_refused(exc: Exception) -> HTTPException:
        """A review call's failure: Milvus away (503), the review folder unusable (500, saying
        so), any other refusal of ours (not a DEFECT, reviewed already, an append running, the
        bank moved on, an unusable setting) a conflict the person can act on (409); anything
        else a 500 with its reason, as the inspections answer."""
        if isinstance(exc, StoreUnavailableError):
            return unavailable(exc)
        if isinstance(exc, OSError) and Path(exc.filename or "/").is_relative_to(reviews.folder):
            return refuse(500, "review_folder", f"cannot use the review folder {reviews.folder}: {exc}")
        if isinstance(exc, PatchcoreMilvusError):
            return refuse(409, "review", str(exc))
        logger.exception("review call failed")
        return refuse(500, "failed", f"{type(exc).__name__}: {exc}")

    def review_category(category: str) -> str:
        try:
            return validate_category(category)
        except StoreError as exc:
            raise refuse(400, "bad_input", str(exc)) from None

    @app.post("/v1/inspections/{key}/review", dependencies=[Depends(authorized)])
    def review(key: str, decision: Review) -> JSONResponse:
        """A person found the part of a DEFECT inspection good: queue its image for the bank."""
        inspection, record = _kept(key)
        try:
            queued = reviews.add_good(record, inspection.image)
            waiting = len(reviews.queued(record["category"]))
        except Exception as exc:
            raise review_refused(exc) from None
        return JSONResponse({**queued.to_dict(), "queued": waiting})

    @app.get("/v1/review/{category}", dependencies=[Depends(authorized)])
    def review_queue(category: str, added: int = 200) -> JSONResponse:
        """The decisions waiting for an append, the newest `added` appended ones, and the ids of
        those set aside (an unreadable record or image)."""
        category = review_category(category)
        try:
            queued, done, aside = reviews.queued(category), reviews.added(category), reviews.set_aside(category)
        except Exception as exc:
            raise review_refused(exc) from None
        newest = list(reversed(done))[: max(0, added)]
        return JSONResponse(
            {
                "queued": [d.to_dict() for d in queued],
                "added": [d.to_dict() for d in newest],
                "added_total": len(done),
                "set_aside": aside,
            }
        )

    @app.post("/v1/review/{category}/append", dependencies=[Depends(authorized)])
    def review_append(category: str) -> JSONResponse:
        """Grow the bank with the queued images (`ingest --from-review`, in this process: a Milvus
        Lite file serves this process only), with the bank's own settings; the stations follow the
        new version."""
        from patchcore_milvus.review import append_reviewed

        category = review_category(category)
        aside = set(reviews.set_aside(category))
        try:
            added, summary = append_reviewed(category, inspector.config, inspector.store, reviews)
        except Exception as exc:
            raise review_refused(exc) from None
        published = summary.search is not None
        return JSONResponse(
            {
                "added": len(added),
                "set_aside": sorted(set(reviews.set_aside(category)) - aside),
                "version": summary.collection,
                "published": published,
                "summary": summary.lines(),
            }
        )

    @app.get("/v1/categories", dependencies=[Depends(authorized)])
    def categories() -> JSONResponse:
        try:
            banks = inspector.store.list_banks()
        except StoreError as exc:
            raise unavailable(exc) from None
        return JSONResponse(
            {
                "uri": shown_uri(inspector.config.uri),
                "categories": [
                    {
                        "category": bank.category,
                        "version": bank.collection,
                        "vectors": bank.vectors,
                        "created": bank.description.created,
                        "thresholds": None
                        if bank.description.thresholds is None
                        else {"image": bank.description.thresholds.image, "pixel": bank.description.thresholds.pixel},
                    }
                    for bank in banks
                ],
            }
        )

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        """The station's web page (static; it calls the API, with the token where one is set)."""
        return _page_file("index.html", "text/html; charset=utf-8")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/page.js", include_in_schema=False)
    def page_script() -> Response:
        return _page_file("page.js", "text/javascript; charset=utf-8")

    @app.get("/page.css", include_in_schema=False)
    def page_style() -> Response:
        return _page_file("page.css", "text/css; charset=utf-8")

    @app.get("/healthz")
    def healthz(request: Request) -> JSONResponse:
        """Workers alive and Milvus answering (one call, no retries); the details with the token."""
        if not inspector.alive:
            return JSONResponse({"status": "workers stopped"}, status_code=503)
        try:
            inspector.probe()
        except StoreError as exc:
            detail = {"reason": str(exc)} if allowed(request) else {}
            return JSONResponse({"status": "milvus unreachable", **detail}, status_code=503)
        detail = {"banks": inspector.loaded(), "queued": inspector.jobs.qsize()} if allowed(request) else {}
        return JSONResponse({"status": "ok", **detail})

    @app.get("/metrics", dependencies=[Depends(authorized)])
    def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


# The page's own files only, nothing from elsewhere: a station may have no internet.
PAGE_POLICY = "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"


class Review(BaseModel):
    """A person's decision on an inspection: "good" queues its part to grow the bank."""

    decision: Literal["good"]


def _page_file(name: str, media_type: str) -> Response:
    from importlib.resources import files

    content = files("patchcore_milvus").joinpath("web", name).read_bytes()
    return Response(content, media_type=media_type, headers={"Content-Security-Policy": PAGE_POLICY})


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _inspection_json(key: str, category: str, result: Inspection) -> dict[str, Any]:
    """The answer to an inspection (its mask and regions computed here, off the event loop)."""
    summary, mask = result.summary(), result.mask
    base = f"/v1/inspections/{key}"
    links = {"map": f"{base}/map.npy", "overlay": f"{base}/overlay.png", "heat": f"{base}/heat.png"}
    if mask is not None:
        links["mask"] = f"{base}/mask.png"
    return {
        "id": key,
        "category": category,
        "name": result.path,
        "score": summary["score"],
        "threshold": summary["threshold"],
        "verdict": summary["verdict"],
        "pixel_threshold": summary["pixel_threshold"],
        "bank_version": result.bank_version,
        "regions": [region.to_dict() for region in defect_regions(mask, result.anomaly_map)],
        "defect_pixels": summary["defect_pixels"],
        "width": result.image.width,
        "height": result.image.height,
        "colors": dict(zip(("low", "high"), display_range(result))),  # the heat picture's colour scale
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ms": summary["ms"],
        "links": links,
    }


def station_names(extra: tuple[str, ...] = ()) -> frozenset[str]:
    """The names a request may reach this station by: localhost, the machine's own, and `extra`."""
    return frozenset(name.lower() for name in ("localhost", socket.gethostname(), socket.getfqdn(), *extra))


def _host_name(host: str) -> str | None:
    """The name in a Host header (`name[:port]`, `[v6]:port`), lower case and without a final
    dot; None where the header is malformed."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
    else:
        name, _, port = host.partition(":")
        rest = f":{port}" if port else ""
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return None
    return name.lower().removesuffix(".")


def host_allowed(host: str, names: frozenset[str]) -> bool:
    """Whether a Host header is an IP address or one of `names`."""
    name = _host_name(host)
    if name is None:
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name in names


def same_origin(origin: str, host: str | None, allowed: frozenset[str]) -> bool:
    """Whether a request's Origin is this station's page: the Host it was sent to, or a name
    given with --allowed-host (a reverse proxy may rewrite the Host). "null" is no page's."""
    parts = urlsplit(origin)
    return bool(parts.netloc) and (parts.netloc == host or (parts.hostname or "") in allowed)


def serve(
    config: Config,
    host: str,
    port: int,
    token: str | None,
    categories: tuple[str, ...] = (),
    queue_size: int = QUEUE_SIZE,
    announce: Callable[[str], None] = print,
    allowed_hosts: tuple[str, ...] = (),
) -> None:
    """Open the banks named (others on first use), then answer until interrupted (Ctrl-C or
    SIGTERM: the requests in flight are answered first)."""
    import uvicorn

    check_token_rule(host, token)
    inspector = Inspector(config, BankStore.from_config(config, existing=True), queue_size)
    for category in categories:
        inspector.open(category)
    inspector.start()
    shown = f"[{host}]" if ":" in host else host
    announce(f"serving {shown_uri(config.uri)} on http://{shown}:{port} (Ctrl-C stops)")
    try:
        uvicorn.run(
            create_app(inspector, token, allowed_hosts=allowed_hosts), host=host, port=port, log_level="warning"
        )
    finally:
        inspector.stop()
