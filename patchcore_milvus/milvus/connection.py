"""Reaching Milvus: one client per store, a timeout on every call, transient faults retried with
backoff, and every failure turned into this project's own errors. The only module, with the
other two of this package, that touches pymilvus."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from pymilvus import MilvusClient, MilvusException

from patchcore_milvus.config import is_server_uri, shown_uri
from patchcore_milvus.errors import StoreError, StoreUnavailableError, VersionGoneError

if TYPE_CHECKING:
    from patchcore_milvus.config import Config

log = logging.getLogger("patchcore_milvus.milvus")
# pymilvus logs a whole traceback for every failed call, retried or not (thousands of lines at a
# station during an outage); this package turns each failure into one line of its own instead.
logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
# Milvus Lite logs its own tracebacks (a file locked by another process, a write after an
# interrupt) before the call fails; the failure reaches the user as this package's one line.
logging.getLogger("milvus_lite").setLevel(logging.CRITICAL)

T = TypeVar("T")


def _check_writable(path: Path) -> None:
    """Milvus Lite writes in its file (a folder: a LOCK file, staging, the collections) even to
    read a bank; on a read-only file or disk it would fail with its own traceback."""
    if path.exists():
        needed, what = [p for p in (path, path / "LOCK") if p.exists()], "it"
    else:
        needed, what = [path.parent] if path.parent.is_dir() else [], "its folder"
    if not all(os.access(p, os.W_OK) for p in needed):
        raise StoreError(
            f"cannot open Milvus Lite at {path}: {what} is read-only here, and Milvus Lite writes to its file "
            "even to read a bank (it locks it). Make it writable, copy it somewhere writable, or serve the "
            "banks from a Milvus server (--uri http://host:19530)"
        )


# Faults that pass by themselves: the server is (re)starting, stopping, frozen or unreachable for
# a moment, or reloading collections after a restart.
_TRANSIENT_CODES = {2, 101}
_TRANSIENT_WORDS = (
    "fail connecting",
    "unavailable",
    "not ready",
    "connection refused",
    "not loaded",
    "channel not available",  # a stopping server (code 503)
    "no available rootcoord",  # a stopping or starting server (code 65535)
    "deadline exceeded",  # a frozen or overloaded server
)
_TRANSIENT_GRPC = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
_MISSING_WORDS = ("not found", "not exist", "can't find")


def refusal(exc: BaseException) -> str | None:
    """The server's reason when it refused the credentials (pymilvus reports that as a failure to
    connect and keeps the reason in the exception's causes), else None."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, grpc.RpcError) and cause.code() in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
        ):
            return cause.details()
        cause = cause.__cause__ or cause.__context__
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying a failed call later may succeed."""
    if refusal(exc):
        return False
    if isinstance(exc, grpc.FutureTimeoutError):
        return True
    if isinstance(exc, grpc.RpcError):
        return exc.code() in _TRANSIENT_GRPC
    if not isinstance(exc, MilvusException):
        return False
    message = str(exc.message).lower()
    return (
        bool(getattr(exc, "retriable", False))
        or exc.code in _TRANSIENT_CODES
        or any(word in message for word in _TRANSIENT_WORDS)
    )


def _reason(exc: BaseException) -> str:
    """One line for a Milvus or gRPC failure."""
    if isinstance(exc, MilvusException):
        return f"{exc.message} (code {exc.code})"
    if isinstance(exc, grpc.RpcError):
        return f"{exc.details()} ({exc.code().name})"
    return str(exc) or type(exc).__name__


def tls_options(config: Config) -> dict[str, Any]:
    """pymilvus' TLS arguments: one-way TLS trusts `tls_ca_cert`; mutual TLS adds the client's pair.
    None for a Milvus Lite file, which is reached in-process."""
    options: dict[str, Any] = {}
    if not is_server_uri(config.uri):
        return options
    if config.tls_client_cert:
        options.update(
            ca_pem_path=config.tls_ca_cert or "",
            client_pem_path=config.tls_client_cert,
            client_key_path=config.tls_client_key or "",
        )
    elif config.tls_ca_cert:
        options["server_pem_path"] = config.tls_ca_cert
    if config.tls_server_name:
        options["server_name"] = config.tls_server_name
    if options:
        options["secure"] = True
    return options


class Connection:
    """A MilvusClient with the store's timeouts and retries.

    `call(what, function)` runs `function(client, timeout)`: a Milvus call with a timeout
    (`timeout`, or `index_timeout` for flushing, indexing and loading), retried with exponential
    backoff while its failure is transient, for `retry_seconds`.
    """

    def __init__(
        self,
        uri: str,
        *,
        credentials: dict[str, str] | None = None,
        timeout: float = 60.0,
        index_timeout: float = 3600.0,
        retry_seconds: float = 30.0,
        tls: dict[str, Any] | None = None,
    ):
        self.uri = uri
        self.shown_uri = shown_uri(uri)  # for messages and logs: without credentials
        self.timeout = timeout
        self.index_timeout = index_timeout
        self.retry_seconds = retry_seconds
        self.is_lite = not is_server_uri(uri)
        # Milvus Lite's embedded server answers pymilvus' idle keep-alive pings (every 10 s) with
        # GOAWAY "too_many_pings" and a logged error; it is in-process, so idle pings buy nothing.
        options = {"grpc.keepalive_permit_without_calls": 0, "grpc.keepalive_time_ms": 60000} if self.is_lite else {}
        if self.is_lite:
            _check_writable(Path(uri))
        try:
            self.client = self.retry(
                "connect",
                lambda: MilvusClient(
                    uri=uri, timeout=timeout, grpc_options=options, **(credentials or {}), **(tls or {})
                ),
            )
        except StoreUnavailableError:
            raise
        except Exception as error:  # pymilvus and milvus-lite raise several types here
            exc = error.__cause__ if isinstance(error, StoreError) and error.__cause__ else error
            reason = refusal(exc)
            if reason:
                raise StoreError(
                    f"Milvus at {self.shown_uri} refused the credentials ({reason}): set MILVUS_TOKEN "
                    f"(user:password or an API key), or MILVUS_USER and MILVUS_PASSWORD"
                ) from exc
            hint = (
                "A Milvus Lite file serves one process at a time: is another ingest or query using it? "
                "For several processes, run a Milvus server and pass its http://host:port as --uri."
                if self.is_lite
                else "Is the server running and reachable from here, and are MILVUS_TOKEN (or MILVUS_USER "
                "and MILVUS_PASSWORD) and the TLS options right?"
            )
            raise StoreError(f"cannot open Milvus at {self.shown_uri}: {getattr(exc, 'message', exc)}. {hint}") from exc

    def call(self, what: str, function: Callable[[MilvusClient, float], T], long: bool = False) -> T:
        """`function(client, timeout)`, retried while its failure is transient; `long`: the
        index timeout (flush, index, load)."""
        timeout = self.index_timeout if long else self.timeout
        return self.retry(what, lambda: function(self.client, timeout))

    def retry(self, what: str, call: Callable[[], T]) -> T:
        """`call()`, retried with backoff while its failure is transient; every failure ends as
        one of this project's errors: StoreUnavailableError (retry later), VersionGoneError, or
        StoreError (refused). The first failure of each call is logged as one warning line."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.25
        attempt = 0
        while True:
            attempt += 1
            try:
                return call()
            except (MilvusException, grpc.RpcError, grpc.FutureTimeoutError) as exc:
                if not is_transient(exc):
                    reason = _reason(exc)
                    code = exc.code if isinstance(exc, MilvusException) else None
                    message = f"Milvus at {self.shown_uri} refused {what}: {reason}"
                    lowered = reason.lower()
                    if code == 100 or ("collection" in lowered and any(w in lowered for w in _MISSING_WORDS)):
                        raise VersionGoneError(message, code=code) from exc
                    raise StoreError(message, code=code) from exc
                if attempt == 1:
                    log.warning(
                        "Milvus at %s: %s failed (%s); retrying for up to %.0f s",
                        self.shown_uri,
                        what,
                        _reason(exc),
                        self.retry_seconds,
                    )
                if time.monotonic() + delay > deadline:
                    hint = "Is the server up? Later calls retry by themselves."
                    if what == "connect" and not self.is_lite:
                        hint = (
                            "Is the server up and reachable, and do the URI's scheme (https:// for TLS) and the TLS "
                            "options (tls_ca_cert, tls_server_name) match the server's?"
                        )
                    raise StoreUnavailableError(
                        f"Milvus at {self.shown_uri} kept failing ({what}) for {self.retry_seconds:.0f} s: "
                        f"{_reason(exc)}. {hint}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 4.0)

    def close(self) -> None:
        self.client.close()
