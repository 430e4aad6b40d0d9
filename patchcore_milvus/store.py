"""One small facade over Milvus: a collection per bank version, an alias per category.

A category's alias (e.g. `bottle`) points at its current collection (`bottle__v<UTC time>`).
Ingest builds a new collection completely, verifies it, then moves the alias, so a half-built
bank is never what a category name resolves to, and an interrupted ingest leaves the old one
serving. Older versions stay (up to `keep_versions`) for `rollback`.

A version's JSON description lives in the collection itself, as rows of a `description`
partition: it is created and dropped with the vectors it describes, and unlike collection
properties (which Milvus 2.3 forgets on restart) it is stored like any other data.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from patchcore_milvus.errors import BankNotFoundError, StoreError, StoreUnavailableError, VersionGoneError

if TYPE_CHECKING:
    from patchcore_milvus.config import Config

log = logging.getLogger(__name__)
# pymilvus logs a whole traceback for every failed call, retried or not (thousands of lines at a
# station during an outage); this module turns each failure into one line of its own instead.
logging.getLogger("pymilvus").setLevel(logging.CRITICAL)

VECTOR_FIELD = "embedding"
DESCRIPTION_FIELD = "description"
DESCRIPTION_PARTITION = "description"
BANK_PARTITION = "_default"
DESCRIPTION_CHUNK = 60000  # characters of ASCII JSON per row, under Milvus' 65,535-byte VARCHAR limit
INSERT_BYTES = 32 * 1024 * 1024  # well under Milvus' 64 MiB message limit
MAX_NQ = 16384  # Milvus' limit on queries per search call
_NAME_RULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # matched whole (fullmatch): "$" would let a final newline in
_VERSION_SUFFIX = re.compile(r"^(?P<category>.+)__v(?P<stamp>\d{8}T\d{12})$")
_MAX_NAME = 255
_SUFFIX_LENGTH = len("__v20260101T000000000000")
# Faults that pass by themselves: the server is (re)starting or unreachable for a moment, or
# reloading collections after a restart.
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

T = TypeVar("T")


def validate_category(name: str) -> str:
    """Category names become Milvus collection names and aliases, and must obey their rule."""
    if not _NAME_RULE.fullmatch(name) or "__v" in name or len(name) > _MAX_NAME - _SUFFIX_LENGTH:
        raise StoreError(
            f"invalid category name {name!r}: it must start with a letter or underscore, contain only "
            f"letters, digits and underscores (Milvus' rule for collection names), not contain '__v', "
            f"and be at most {_MAX_NAME - _SUFFIX_LENGTH} characters long"
        )
    return name


def category_of(collection: str) -> str | None:
    match = _VERSION_SUFFIX.match(collection)
    return match.group("category") if match else None


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


class BankStore:
    """Collections, aliases, vectors and bank descriptions, over one reused connection.

    Every call has a timeout (`timeout`; `index_timeout` for flushing, indexing and loading),
    and transient faults are retried with exponential backoff for `retry_seconds`.
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
        self.timeout = timeout
        self.index_timeout = index_timeout
        self.retry_seconds = retry_seconds
        # Milvus Lite's embedded server answers pymilvus' idle keep-alive pings (every 10 s) with
        # GOAWAY "too_many_pings" and a logged error; it is in-process, so idle pings buy nothing.
        self.is_lite = not uri.startswith(("http://", "https://"))
        options = {"grpc.keepalive_permit_without_calls": 0, "grpc.keepalive_time_ms": 60000} if self.is_lite else {}
        try:
            self.client = self._retry(
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
                    f"Milvus at {uri} refused the credentials ({reason}): set MILVUS_TOKEN (user:password or "
                    f"an API key), or MILVUS_USER and MILVUS_PASSWORD"
                ) from exc
            hint = (
                "A Milvus Lite file serves one process at a time: is another ingest or query using it? "
                "For several processes, run a Milvus server and pass its http://host:port as --uri."
                if self.is_lite
                else "Is the server running and reachable from here, and are MILVUS_TOKEN (or MILVUS_USER "
                "and MILVUS_PASSWORD) and the TLS options right?"
            )
            raise StoreError(f"cannot open Milvus at {uri}: {getattr(exc, 'message', exc)}. {hint}") from exc

    @classmethod
    def from_config(cls, config: Config) -> BankStore:
        return cls(
            config.uri,
            credentials=config.credentials,
            timeout=config.milvus_timeout,
            index_timeout=config.index_timeout,
            retry_seconds=config.retry_seconds,
            tls=_tls_options(config),
        )

    def close(self) -> None:
        self.client.close()

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        """`call()`, retried with backoff while its failure is transient; every failure ends as
        one of this project's errors: StoreUnavailableError (retry later), VersionGoneError, or
        StoreError (refused)."""
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
                    message = f"Milvus at {self.uri} refused {what}: {reason}"
                    lowered = reason.lower()
                    if code == 100 or ("collection" in lowered and any(w in lowered for w in _MISSING_WORDS)):
                        raise VersionGoneError(message, code=code) from exc
                    raise StoreError(message, code=code) from exc
                if attempt == 1:
                    log.warning(
                        "Milvus at %s: %s failed (%s); retrying for up to %.0f s",
                        self.uri,
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
                        f"Milvus at {self.uri} kept failing ({what}) for {self.retry_seconds:.0f} s: {_reason(exc)}. "
                        f"{hint}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 4.0)

    def _call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """`MilvusClient.<method>` with a timeout, retried while the fault is transient."""
        function = getattr(self.client, method)
        return self._retry(method, lambda: function(*args, timeout=timeout or self.timeout, **kwargs))

    # Building a version -------------------------------------------------------------------

    def create_version(self, category: str, dim: int) -> str:
        validate_category(category)
        name = f"{category}__v{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%f')}"
        schema = MilvusClient.create_schema(auto_id=False, description=f"patchcore-milvus bank of {category}")
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("image", DataType.VARCHAR, max_length=2048)
        schema.add_field("patch_y", DataType.INT32)
        schema.add_field("patch_x", DataType.INT32)
        schema.add_field(DESCRIPTION_FIELD, DataType.VARCHAR, max_length=65535)
        self._call("create_collection", name, schema=schema)
        self._call("create_partition", name, DESCRIPTION_PARTITION)
        return name

    def insert(self, collection: str, vectors: np.ndarray, images: list[str], positions: np.ndarray) -> None:
        """Rows get ids 0..n-1 in order; inserted in batches under the message size limit."""
        rows_per_batch = max(1, INSERT_BYTES // (vectors.shape[1] * 4 + 2048 + 16))
        for start in range(0, len(vectors), rows_per_batch):
            stop = min(start + rows_per_batch, len(vectors))
            rows = [
                {
                    "id": i,
                    VECTOR_FIELD: vectors[i].tolist(),
                    "image": images[i],
                    "patch_y": int(positions[i, 0]),
                    "patch_x": int(positions[i, 1]),
                    DESCRIPTION_FIELD: "",
                }
                for i in range(start, stop)
            ]
            self._call("insert", collection, rows, partition_name=BANK_PARTITION)

    def build_index(self, collection: str, index_type: str, params: dict[str, Any]) -> None:
        """Flush (unflushed rows would be searched by brute force), index, load."""
        self._call("flush", collection, timeout=self.index_timeout)
        index = self.client.prepare_index_params()
        # As one JSON "params" entry: pymilvus 3 would send each parameter as its own key, which
        # Milvus Lite 3.2 ignores (it built IVF with its default nlist and HNSW with its default M
        # whatever was asked); Milvus servers read both forms.
        index.add_index(VECTOR_FIELD, index_type=index_type, metric_type="L2", params={"params": params})
        self._call("create_index", collection, index, timeout=self.index_timeout)
        self.ensure_loaded(collection)

    def write_description(self, collection: str, description: dict[str, Any]) -> None:
        """The bank's model description, as ASCII JSON in rows with negative ids (never pickle)."""
        text = json.dumps(description, ensure_ascii=True)
        chunks = [text[i : i + DESCRIPTION_CHUNK] for i in range(0, len(text), DESCRIPTION_CHUNK)]
        dim = self._dim(collection)
        # patch_y holds the number of chunks, so that a lost one is noticed.
        rows = [
            {
                "id": -1 - k,
                VECTOR_FIELD: [0.0] * dim,
                "image": "",
                "patch_y": len(chunks),
                "patch_x": k,
                DESCRIPTION_FIELD: chunk,
            }
            for k, chunk in enumerate(chunks)
        ]
        self._call("insert", collection, rows, partition_name=DESCRIPTION_PARTITION)
        self._call("flush", collection, timeout=self.index_timeout)

    def verify(self, collection: str, expected_rows: int, probe_id: int, search_params: dict[str, Any]) -> None:
        """Refuse to publish a version that is not complete: every row there, the index built,
        the collection loaded, and a stored vector found again at distance 0."""
        problems = []
        rows = self.vector_count(collection)
        if rows != expected_rows:
            problems.append(f"{rows} vectors stored, {expected_rows} expected")
        index = self._call("describe_index", collection, VECTOR_FIELD)
        if not index or index.get("state") not in (None, "Finished") or index.get("pending_index_rows", 0):
            problems.append(f"index not finished ({index})")
        state = str(self._call("get_load_state", collection).get("state"))
        if "Loaded" not in state:
            problems.append(f"not loaded ({state})")
        probe = self.get_rows(collection, [probe_id])[0]["vector"]
        distances, _ = self.search(collection, probe[None, :], 1, search_params)
        if distances[0, 0] > 1e-3 * max(1.0, float(np.linalg.norm(probe))):
            problems.append(f"stored vector {probe_id} found at distance {distances[0, 0]:.4g}, not 0")
        if not self.read_description_or_none(collection):
            problems.append("no description")
        if problems:
            raise StoreError(f"new bank version {collection} failed verification: {'; '.join(problems)}")

    def publish(self, category: str, collection: str, keep: int) -> list[str]:
        """Point the category at `collection`; then drop older versions beyond the newest `keep`
        complete ones, and older incomplete ones (leftovers of interrupted ingests)."""
        if self.current_version(category) is None:
            self._call("create_alias", collection, category)
        else:
            self._call("alter_alias", collection, category)
        kept, dropped = 0, []
        for name in reversed(self._version_names(category)):
            if name > collection:
                continue  # a newer ingest, still being built
            complete = name == collection or self.read_description_or_none(name) is not None
            if complete and kept < keep:
                kept += 1
                continue
            self.drop_version(name)
            dropped.append(name)
        return dropped

    def drop_version(self, collection: str) -> None:
        self._call("drop_collection", collection)

    # Reading a bank ------------------------------------------------------------------------

    def current_version(self, category: str) -> str | None:
        """The collection the category's alias points at, None if it has none."""
        # Looked up through the category's versions: asking Milvus for a missing alias logs an error.
        validate_category(category)
        for name in self._version_names(category):
            if category in self._call("list_aliases", name)["aliases"]:
                return name
        return None

    def follow_alias(self, category: str) -> str:
        """The alias' target in one call, for stations checking before each batch."""
        try:
            return self._call("describe_alias", category)["collection_name"]
        except StoreUnavailableError:
            raise
        except StoreError:
            return self.resolve(category)

    def resolve(self, category: str) -> str:
        """The collection a category's alias points at, or a clear error listing what exists."""
        target = self.current_version(category)
        if target is None:
            known = ", ".join(sorted(b["category"] for b in self.list_banks())) or "none yet"
            raise BankNotFoundError(
                f"no bank for category {category!r} at {self.uri} (known: {known}); create it with "
                f"`patchcore-milvus ingest DATA_ROOT --category {category}`"
            )
        return target

    def ensure_loaded(self, collection: str) -> None:
        """Load into memory for search (a no-op when loaded); Milvus Lite releases every
        collection when its file is reopened."""
        self._call("load_collection", collection, timeout=self.index_timeout)

    def read_description(self, collection: str) -> dict[str, Any]:
        description = self.read_description_or_none(collection)
        if description is None:
            raise StoreError(
                f"collection {collection} has no patchcore-milvus description (an interrupted ingest, or made by "
                f"something else or by an older patchcore-milvus); re-ingest the category"
            )
        return description

    def read_description_or_none(self, collection: str) -> dict[str, Any] | None:
        """None for a version that never got its description (its ingest was interrupted)."""
        try:
            self.ensure_loaded(collection)
        except StoreUnavailableError:
            raise
        except StoreError as exc:
            # No index yet: interrupted before indexing. Any other failure is not a verdict on the
            # version (publish would drop it as incomplete), so it is raised.
            if exc.code == 700 or "index" in str(exc).lower():
                return None
            raise
        if not self._call("has_partition", collection, DESCRIPTION_PARTITION):
            return None  # not made by this patchcore-milvus (another tool, or a version before 0.2)
        rows = self._call(
            "query",
            collection,
            filter="id < 0",
            output_fields=[DESCRIPTION_FIELD, "patch_y"],
            partition_names=[DESCRIPTION_PARTITION],
            consistency_level="Strong",
        )
        if not rows:
            return None
        text = "".join(row[DESCRIPTION_FIELD] for row in sorted(rows, key=lambda row: -row["id"]))
        try:
            if any(row["patch_y"] != len(rows) for row in rows):
                raise ValueError(f"{len(rows)} of {rows[0]['patch_y']} parts found")
            return json.loads(text)
        except ValueError as exc:  # JSONDecodeError is one
            raise StoreError(f"the description of {collection} is damaged ({exc}); re-ingest the category") from exc

    def vector_count(self, collection: str) -> int:
        return int(self._call("get_partition_stats", collection, BANK_PARTITION)["row_count"])

    def search(
        self, collection: str, vectors: np.ndarray, top_k: int, search_params: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest bank rows of each vector: (Euclidean distances, ids), each (n, top_k).

        Milvus reports squared L2; the square root turns it into PatchCore's distance. An HNSW
        search explores at least `top_k` candidates (Milvus refuses ef < top_k, and Milvus
        Lite would return fewer hits). Queries without a hit keep distance inf and id -1.
        """
        if "ef" in search_params:
            search_params = {**search_params, "ef": max(int(search_params["ef"]), top_k)}
        squared = np.full((len(vectors), top_k), np.inf, dtype=np.float32)
        ids = np.full((len(vectors), top_k), -1, dtype=np.int64)
        for start in range(0, len(vectors), MAX_NQ):
            hits = self._call(
                "search",
                collection,
                data=vectors[start : start + MAX_NQ],
                anns_field=VECTOR_FIELD,
                limit=top_k,
                output_fields=["id"],
                partition_names=[BANK_PARTITION],
                search_params={"metric_type": "L2", "params": search_params},
            )
            for row, neighbours in enumerate(hits, start=start):  # ids and distances, without a dict per hit
                found = len(neighbours.ids)
                squared[row, :found] = neighbours.distances
                ids[row, :found] = neighbours.ids
        return np.sqrt(np.maximum(squared, 0.0)), ids

    def get_rows(self, collection: str, ids: Iterable[int]) -> list[dict[str, Any]]:
        """Stored rows for `ids`, in the order given: id, vector, source image and patch position."""
        wanted = [int(i) for i in ids]
        rows = self._call(
            "get",
            collection,
            ids=sorted(set(wanted)),
            output_fields=[VECTOR_FIELD, "image", "patch_y", "patch_x"],
        )
        by_id = {row["id"]: _bank_row(row) for row in rows}
        missing = sorted(set(wanted) - set(by_id))
        if missing:
            raise StoreError(f"collection {collection} has no rows with ids {missing[:5]}")
        return [by_id[i] for i in wanted]

    def read_rows(self, collection: str, chunk: int = 10000) -> list[dict[str, Any]]:
        """Every bank row of a collection, in id order (ingest numbers them 0..n-1)."""
        n = self.vector_count(collection)
        rows: list[dict[str, Any]] = []
        for start in range(0, n, chunk):
            part = self._call(
                "query",
                collection,
                filter=f"id >= {start} and id < {start + chunk}",
                output_fields=[VECTOR_FIELD, "image", "patch_y", "patch_x"],
                partition_names=[BANK_PARTITION],
                limit=chunk,
            )
            rows.extend(_bank_row(row) for row in sorted(part, key=lambda row: row["id"]))
        if not rows:
            raise StoreError(f"collection {collection} holds no vectors")
        return rows

    def read_vectors(self, collection: str) -> np.ndarray:
        """All vectors of a collection, row i = id i."""
        return np.stack([row["vector"] for row in self.read_rows(collection)])

    def versions(self, category: str) -> list[dict[str, Any]]:
        """Every version of a category, oldest first: name, whether current, vectors and description."""
        current = self.current_version(category)
        history = []
        for name in self._version_names(category):
            description = self.read_description_or_none(name)
            history.append(
                {
                    "version": name,
                    "current": name == current,
                    "complete": description is not None,
                    "vectors": self.vector_count(name),
                    "description": description or {},
                }
            )
        return history

    def rollback(self, category: str, version: str | None = None) -> str:
        """Point the category back at `version` (default: the newest complete version before the current)."""
        current = self.resolve(category)
        names = self._version_names(category)
        if version is None:
            older = [n for n in names if n < current and self.read_description_or_none(n) is not None]
            if not older:
                raise StoreError(f"{category} has no complete version older than {current} to roll back to")
            target = older[-1]
        else:
            target = version if version in names else f"{category}__{version.removeprefix(category + '__')}"
            if target not in names:
                raise StoreError(f"{category} has no version {version!r}; versions: {', '.join(names)}")
            if self.read_description_or_none(target) is None:
                raise StoreError(f"version {target} is incomplete (its ingest was interrupted); pick another")
        self._call("alter_alias", target, category)
        return target

    def list_banks(self) -> list[dict[str, Any]]:
        """Every published bank: category, collection, vectors, dim, index and description."""
        banks = []
        for name in sorted(self._call("list_collections")):
            category = category_of(name)
            if category is None or self.current_version(category) != name:
                continue
            description = self.read_description(name)
            banks.append(
                {
                    "category": category,
                    "collection": name,
                    "vectors": self.vector_count(name),
                    "dim": description["extractor"]["dim"],
                    "index": description["index"]["type"],
                    "backbone": description["extractor"]["backbone"],
                    "created": description["created"],
                }
            )
        return banks

    def leftovers(self, category: str | None = None) -> list[str]:
        """Versions without a description (interrupted ingests, or one still being built), never
        a current one; of one category or all."""
        found = []
        current: dict[str, str | None] = {}
        for name in sorted(self._call("list_collections")):
            owner = category_of(name)
            if owner is None or (category is not None and owner != category):
                continue
            if owner not in current:
                current[owner] = self.current_version(owner)
            if current[owner] != name and self.read_description_or_none(name) is None:
                found.append(name)
        return found

    def drop(self, category: str) -> list[str]:
        """Remove a category: its alias and every version."""
        self.resolve(category)
        self._call("drop_alias", category)
        names = self._version_names(category)
        for name in names:
            self.drop_version(name)
        return names

    def _version_names(self, category: str) -> list[str]:
        """The category's collections, oldest first (the UTC stamps sort in time order)."""
        return sorted(name for name in self._call("list_collections") if category_of(name) == category)

    def _dim(self, collection: str) -> int:
        fields = self._call("describe_collection", collection)["fields"]
        return int(next(f["params"]["dim"] for f in fields if f["name"] == VECTOR_FIELD))


def _bank_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "vector": np.asarray(row[VECTOR_FIELD], dtype=np.float32),
        "image": row["image"],
        "patch_y": row["patch_y"],
        "patch_x": row["patch_x"],
    }


def _tls_options(config: Config) -> dict[str, Any]:
    """pymilvus' TLS arguments: one-way TLS trusts `tls_ca_cert`; mutual TLS adds the client's pair.
    None for a Milvus Lite file, which is reached in-process."""
    options: dict[str, Any] = {}
    if not config.uri.startswith(("http://", "https://")):
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
