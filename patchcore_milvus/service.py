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
import queue
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

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

MAX_UPLOAD_BYTES = 64 * 1024 * 1024
QUEUE_SIZE = 64  # images waiting for the worker; one more is answered 503
KEEP_INSPECTIONS = 32  # recent inspections whose map, overlay and mask can be fetched
REQUEST_TIMEOUT_S = 120.0
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
    scores the batch before it. Banks are opened on first use (or before the start)."""

    def __init__(self, config: Config, store: BankStore, queue_size: int = QUEUE_SIZE):
        self.config = config
        self.store = store
        self.jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self.metrics = Metrics(self.jobs.qsize)
        self._banks: dict[str, Bank] = {}
        self._extracted: queue.Queue[tuple[Bank, list[_Job], Extracted] | None] = queue.Queue(maxsize=1)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for target, name in ((self._extract, "patchcore-extract"), (self._search, "patchcore-search")):
            thread = threading.Thread(target=target, daemon=True, name=name)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """After what is queued is answered."""
        if self._threads:
            self.jobs.put(None)
            for thread in self._threads:
                thread.join()
            self._threads = []

    def open(self, category: str) -> Bank:
        """The category's bank, opened once (before the workers start, or by the extracting one)."""
        if category not in self._banks:
            self._banks[category] = Bank.open(category, self.config, store=self.store)
        return self._banks[category]

    def loaded(self) -> dict[str, str]:
        """Category -> the version its bank scored last."""
        return {category: bank.version for category, bank in list(self._banks.items())}

    def submit(self, category: str, image: Image.Image, name: str) -> Future[Inspection]:
        job = _Job(category, image, name)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy from None
        return job.future

    def _take(self) -> list[_Job] | None:
        """The next batch: the first job waited for, then whatever else is queued; None: stop."""
        first = self.jobs.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.config.batch_size:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)  # stop after this batch
                break
            batch.append(job)
        return batch

    def _extract(self) -> None:
        while (batch := self._take()) is not None:
            by_category: dict[str, list[_Job]] = {}
            for job in batch:
                if job.future.set_running_or_notify_cancel():  # not given up on
                    by_category.setdefault(job.category, []).append(job)
            for category, jobs in by_category.items():
                try:
                    bank = self.open(category)
                    decoded = Decoded([job.name for job in jobs], [job.image for job in jobs], [0.0] * len(jobs))
                    self._extracted.put((bank, jobs, bank.extract(decoded)))
                except Exception as exc:  # every request of the batch gets the error; the worker goes on
                    _fail(jobs, exc)
        self._extracted.put(None)

    def _search(self) -> None:
        while (item := self._extracted.get()) is not None:
            bank, jobs, extracted = item
            try:
                results = bank.score_extracted(extracted)
            except Exception as exc:
                _fail(jobs, exc)
                continue
            self.metrics.batch.observe(len(jobs))
            for job, result in zip(jobs, results):
                result.timings_ms.pop("load")  # decoded by the request, which reports it as "decode"
                elapsed = time.perf_counter() - job.queued_at
                result.timings_ms["queue"] = elapsed * 1000 - sum(result.timings_ms.values())
                self.metrics.latency.observe(elapsed)
                self.metrics.inspections.labels(job.category, result.verdict or "none").inc()
                job.future.set_result(result)


def _fail(jobs: list[_Job], exc: Exception) -> None:
    for job in jobs:
        job.future.set_exception(exc)


class Recent:
    """The last inspections, by id, for their map, overlay and mask."""

    def __init__(self, keep: int = KEEP_INSPECTIONS):
        self.keep = keep
        self._items: OrderedDict[str, Inspection] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, inspection: Inspection) -> str:
        key = secrets.token_hex(8)
        with self._lock:
            self._items[key] = inspection
            while len(self._items) > self.keep:
                self._items.popitem(last=False)
        return key

    def get(self, key: str) -> Inspection | None:
        with self._lock:
            return self._items.get(key)


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
    keep: int = KEEP_INSPECTIONS,
    timeout_s: float = REQUEST_TIMEOUT_S,
) -> FastAPI:
    """The FastAPI application over `inspector` (started and stopped by the caller)."""
    recent = Recent(keep)
    metrics = inspector.metrics
    app = FastAPI(title="patchcore-milvus", version="1", docs_url="/docs", redoc_url=None)

    def authorized(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            metrics.refused.labels("unauthorized").inc()
            raise HTTPException(401, "missing or wrong API token: send 'Authorization: Bearer <token>'")

    def refuse(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> HTTPException:
        metrics.refused.labels(reason).inc()
        return HTTPException(status, message, headers=headers)

    async def upload(request: Request) -> tuple[bytes, str]:
        """The image's bytes (the raw body, or the first file of a multipart form) and its name."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes:
            raise refuse(413, "too_large", f"the upload is {int(declared)} bytes; at most {max_upload_bytes}")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=8, max_part_size=max_upload_bytes)
            files = [value for value in form.values() if hasattr(value, "read")]
            if not files:
                raise refuse(400, "bad_input", "the multipart form holds no file: send the image as a file field")
            data = await files[0].read()
            return data, files[0].filename or "upload"
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_upload_bytes:
                raise refuse(413, "too_large", f"the upload is over {max_upload_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks), request.query_params.get("name", "upload")

    @app.post("/v1/inspect", dependencies=[Depends(authorized)])
    async def inspect(request: Request, category: str) -> JSONResponse:
        try:
            validate_category(category)
        except StoreError as exc:
            raise refuse(400, "bad_input", str(exc)) from None
        data, name = await upload(request)
        if not data:
            raise refuse(400, "bad_input", "no image in the request: send its bytes as the body, or a multipart file")
        start = time.perf_counter()
        try:
            image = await run_in_threadpool(decode_rgb, data, name)
        except ImageError as exc:
            raise refuse(400, "bad_input", str(exc)) from None
        decode_ms = (time.perf_counter() - start) * 1000
        try:
            future = inspector.submit(category, image, name)
        except Busy:
            raise refuse(503, "busy", "the inspection queue is full; retry shortly", {"Retry-After": "1"}) from None
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except asyncio.TimeoutError:
            raise refuse(504, "timeout", f"no result within {timeout_s:.0f} s") from None
        except BankNotFoundError as exc:
            raise refuse(404, "unknown_category", str(exc)) from None
        except StoreUnavailableError as exc:
            raise refuse(503, "milvus_unavailable", str(exc), {"Retry-After": "5"}) from None
        except PatchcoreMilvusError as exc:
            raise refuse(500, "failed", str(exc)) from None
        result.timings_ms["decode"] = decode_ms
        key = recent.add(result)
        return JSONResponse(_inspection_json(key, category, result))

    def _recent(key: str) -> Inspection:
        found = recent.get(key)
        if found is None:
            raise HTTPException(404, f"no inspection {key!r} here (only the last {keep} are kept)")
        return found

    @app.get("/v1/inspections/{key}/map.npy", dependencies=[Depends(authorized)])
    def anomaly_map(key: str) -> Response:
        buffer = io.BytesIO()
        np.save(buffer, _recent(key).anomaly_map.astype(np.float32))
        return Response(buffer.getvalue(), media_type="application/octet-stream")

    @app.get("/v1/inspections/{key}/overlay.png", dependencies=[Depends(authorized)])
    def overlay(key: str) -> Response:
        from patchcore_milvus.visualize import overlay_figure

        return Response(_png(overlay_figure(_recent(key))), media_type="image/png")

    @app.get("/v1/inspections/{key}/mask.png", dependencies=[Depends(authorized)])
    def mask(key: str) -> Response:
        found = _recent(key).mask
        if found is None:
            raise HTTPException(404, "this bank has no pixel threshold, so there is no mask")
        return Response(_png(Image.fromarray(found.astype(np.uint8) * 255)), media_type="image/png")

    @app.get("/v1/categories", dependencies=[Depends(authorized)])
    def categories() -> JSONResponse:
        try:
            banks = inspector.store.list_banks()
        except StoreError as exc:
            raise HTTPException(503, str(exc)) from None
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

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        versions: dict[str, str | None] = {}
        try:
            for category in inspector.loaded():
                versions[category] = inspector.store.current_version(category)
        except StoreError as exc:
            return JSONResponse({"status": "milvus unreachable", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok", "banks": versions, "queued": inspector.jobs.qsize()})

    @app.get("/metrics", dependencies=[Depends(authorized)])
    def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _inspection_json(key: str, category: str, result: Inspection) -> dict[str, Any]:
    summary = result.summary()
    base = f"/v1/inspections/{key}"
    links = {"map": f"{base}/map.npy", "overlay": f"{base}/overlay.png"}
    if result.mask is not None:
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
        "regions": [region.to_dict() for region in defect_regions(result.mask, result.anomaly_map)],
        "defect_pixels": summary["defect_pixels"],
        "ms": summary["ms"],
        "links": links,
    }


def serve(
    config: Config,
    host: str,
    port: int,
    token: str | None,
    categories: tuple[str, ...] = (),
    queue_size: int = QUEUE_SIZE,
) -> None:
    """Open the banks named (others on first use), then answer until interrupted."""
    import uvicorn

    check_token_rule(host, token)
    inspector = Inspector(config, BankStore.from_config(config, existing=True), queue_size)
    for category in categories:
        inspector.open(category)
    inspector.start()
    try:
        uvicorn.run(create_app(inspector, token), host=host, port=port, log_level="warning")
    finally:
        inspector.stop()
