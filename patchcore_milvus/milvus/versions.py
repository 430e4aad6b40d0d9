"""The store: one small facade over Milvus, a collection per bank version, an alias per category.

A category's alias (e.g. `bottle`) points at its current collection (`bottle__v<UTC time>`),
whose sidecar (`bottle__v<UTC time>__meta`, see sidecar.py) holds what the version records.
Ingest builds a new collection completely, verifies it, then moves the alias, so a half-built
bank is never what a category name resolves to, and an interrupted ingest leaves the old one
serving. Older versions stay (up to `keep_versions`) for `rollback`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from patchcore_milvus.config import is_server_uri
from patchcore_milvus.description import BankDescription
from patchcore_milvus.errors import BankNotFoundError, StoreError, StoreUnavailableError
from patchcore_milvus.milvus import rows as collection_rows
from patchcore_milvus.milvus import sidecar
from patchcore_milvus.milvus.connection import Connection, tls_options
from patchcore_milvus.milvus.rows import VECTOR_FIELD, BankRows
from patchcore_milvus.milvus.sidecar import Provenance

if TYPE_CHECKING:
    from patchcore_milvus.config import Config

_NAME_RULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # matched whole (fullmatch): "$" would let a final newline in
_VERSION_SUFFIX = re.compile(r"^(?P<category>.+)__v(?P<stamp>\d{8}T\d{12})$")
_MAX_NAME = 255
_SUFFIX_LENGTH = len("__v20260101T000000000000") + len(sidecar.SUFFIX)


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


@dataclass(frozen=True)
class VersionInfo:
    """One version of a category, as `history` lists it."""

    version: str
    current: bool
    vectors: int
    description: BankDescription | None  # None: incomplete (its ingest was interrupted)


@dataclass(frozen=True)
class BankInfo:
    """A published bank, as `collections` lists it."""

    category: str
    collection: str
    vectors: int
    description: BankDescription


class BankStore:
    """Collections, aliases, rows and bank descriptions, over one reused connection.

    Every call has a timeout (`timeout`; `index_timeout` for flushing, indexing and loading),
    and transient faults are retried with exponential backoff for `retry_seconds`.
    """

    def __init__(self, uri: str, existing: bool = False, **options: Any):
        """`options`: Connection's (credentials, timeout, index_timeout, retry_seconds, tls).
        `existing`: a Milvus Lite file must be there already (reading a bank must not create an
        empty one, as opening a missing file does)."""
        if existing and not is_server_uri(uri) and not Path(uri).exists():
            raise BankNotFoundError(
                f"no Milvus Lite file at {uri} (from {Path.cwd()}): `patchcore-milvus ingest` creates it; "
                "pass --uri to use another"
            )
        self.uri = uri
        self.connection = Connection(uri, **options)
        self.client = self.connection.client  # for tests and benchmarks that look underneath

    @classmethod
    def from_config(cls, config: Config, existing: bool = False) -> BankStore:
        return cls(
            config.uri,
            existing,
            credentials=config.credentials,
            timeout=config.milvus_timeout,
            index_timeout=config.index_timeout,
            retry_seconds=config.retry_seconds,
            tls=tls_options(config),
        )

    def close(self) -> None:
        self.connection.close()

    def ping(self) -> None:
        """One cheap call (the aliases): raises StoreError if Milvus does not answer."""
        self.connection.call("list_aliases", lambda c, t: c.list_aliases(timeout=t))

    # Rows of one version (see rows.py) ------------------------------------------------------

    def insert(self, collection: str, rows: BankRows) -> None:
        collection_rows.insert(self.connection, collection, rows)

    def search(
        self, collection: str, vectors: np.ndarray, top_k: int, search_params: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest bank rows of each vector: (Euclidean distances, ids), each (n, top_k)."""
        return collection_rows.search(self.connection, collection, vectors, top_k, search_params)

    def get_vectors(self, collection: str, ids: Iterable[int]) -> np.ndarray:
        """Stored vectors for `ids`, in the order given: (len(ids), dim)."""
        return collection_rows.get_vectors(self.connection, collection, ids)

    def read_rows(self, collection: str) -> BankRows:
        return collection_rows.read_rows(self.connection, collection)

    def read_vectors(self, collection: str) -> np.ndarray:
        """All vectors of a collection, row i = id i."""
        return collection_rows.read_vectors(self.connection, collection)

    def read_provenance(self, collection: str) -> Provenance:
        """Where each vector of a version came from (read once per version: it never changes)."""
        return sidecar.read_provenance(self.connection, collection, self.vector_count(collection))

    def vector_count(self, collection: str) -> int:
        return collection_rows.vector_count(self.connection, collection)

    def write_description(self, collection: str, description: BankDescription) -> None:
        sidecar.write_description(self.connection, collection, description)

    def write_model(self, collection: str, model: bytes) -> None:
        sidecar.write_model(self.connection, collection, model)

    def read_model(self, collection: str) -> bytes:
        """The extractor model the version carries (see features.FeaturePipeline.from_model)."""
        return sidecar.read_model(self.connection, collection)

    def read_description(self, collection: str) -> BankDescription:
        description = self.read_description_or_none(collection)
        if description is None:
            raise StoreError(
                f"collection {collection} has no patchcore-milvus description (an interrupted ingest, or made by "
                f"something else or by an older patchcore-milvus); re-ingest the category"
            )
        return description

    def read_description_or_none(self, collection: str) -> BankDescription | None:
        """None for a version that never got its description (its ingest was interrupted)."""
        return sidecar.read_description(self.connection, collection)

    # Building a version -------------------------------------------------------------------

    def create_version(self, category: str, dim: int) -> str:
        validate_category(category)
        name = f"{category}__v{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%f')}"
        collection_rows.create_collection(self.connection, name, category, dim)
        return name

    def build_index(self, collection: str, index_type: str, params: dict[str, Any]) -> None:
        collection_rows.build_index(self.connection, collection, index_type, params)

    def drop_index(self, collection: str) -> None:
        collection_rows.drop_index(self.connection, collection)

    def verify(self, collection: str, expected_rows: int, probe_id: int, search_params: dict[str, Any]) -> None:
        """Refuse to publish a version that is not complete: every row there, the index built,
        the collection loaded, and a stored vector found again at distance 0. Its description is
        written after this has passed (see ingest)."""
        call = self.connection.call
        problems = []
        rows = self.vector_count(collection)
        if rows != expected_rows:
            problems.append(f"{rows} vectors stored, {expected_rows} expected")
        index = call("describe_index", lambda c, t: c.describe_index(collection, VECTOR_FIELD, timeout=t))
        if not index or index.get("state") not in (None, "Finished") or index.get("pending_index_rows", 0):
            problems.append(f"index not finished ({index})")
        state = str(call("get_load_state", lambda c, t: c.get_load_state(collection, timeout=t)).get("state"))
        if "Loaded" not in state:
            problems.append(f"not loaded ({state})")
        records = self.read_provenance(collection) if rows == expected_rows else None
        if records is not None and len(records) != rows:
            problems.append(f"{len(records)} patch records for {rows} vectors")
        probe = self.get_vectors(collection, [probe_id])[0]
        distances, _ = self.search(collection, probe[None, :], 1, search_params)
        if distances[0, 0] > 1e-3 * max(1.0, float(np.linalg.norm(probe))):
            problems.append(f"stored vector {probe_id} found at distance {distances[0, 0]:.4g}, not 0")
        if problems:
            raise StoreError(f"new bank version {collection} failed verification: {'; '.join(problems)}")

    def publish(self, category: str, collection: str, keep: int, replaces: str | None = None) -> list[str]:
        """Point the category at `collection`; then drop older versions beyond the newest `keep`
        complete ones, and older incomplete ones (leftovers of interrupted ingests). `replaces`:
        the version an append grew, refused where the category has moved on from it since (another
        append or ingest published meanwhile, and this one would drop what that one added). Milvus
        has no compare-and-swap of an alias, so two publishes within one call of each other can
        still both pass; the review queue's lock keeps its appends apart."""
        current = self.current_version(category)
        if replaces is not None and current != replaces:
            raise StoreError(
                f"{category} moved from {replaces} to {current} while this append ran; nothing was published, "
                "run the append again (it grows the new version)"
            )
        if current is None:
            self.connection.call("create_alias", lambda c, t: c.create_alias(collection, category, timeout=t))
        else:
            self._point(category, collection)
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
        """The version's collection and its sidecar; either may be gone already."""
        collection_rows.drop_collection(self.connection, collection)

    # Reading a bank ------------------------------------------------------------------------

    def current_version(self, category: str) -> str | None:
        """The collection the category's alias points at, None if it has none."""
        # Every alias first (asking Milvus for a missing alias logs an error), and not through the
        # collections: Milvus Lite reads every collection of the file from disk to list them.
        validate_category(category)
        aliases = self.connection.call("list_aliases", lambda c, t: c.list_aliases(timeout=t))
        if category not in aliases["aliases"]:
            return None
        try:
            described = self.connection.call("describe_alias", lambda c, t: c.describe_alias(category, timeout=t))
        except StoreUnavailableError:
            raise
        except StoreError:  # dropped since it was listed
            return None
        name = described["collection_name"]
        return name if category_of(name) == category else None

    def follow_alias(self, category: str) -> str:
        """The alias' target in one call, for stations checking before each batch."""
        try:
            described = self.connection.call("describe_alias", lambda c, t: c.describe_alias(category, timeout=t))
            return described["collection_name"]
        except StoreUnavailableError:
            raise
        except StoreError:
            return self.resolve(category)

    def resolve(self, category: str) -> str:
        """The collection a category's alias points at, or a clear error listing what exists."""
        target = self.current_version(category)
        if target is None:
            known = ", ".join(sorted(bank.category for bank in self.list_banks())) or "none yet"
            raise BankNotFoundError(
                f"no bank for category {category!r} at {self.connection.shown_uri} (known: {known}); create it with "
                f"`patchcore-milvus ingest DATA_ROOT --category {category}`"
            )
        return target

    def versions(self, category: str) -> list[VersionInfo]:
        """Every version of a category, oldest first."""
        current = self.current_version(category)
        return [
            VersionInfo(name, name == current, self.vector_count(name), self.read_description_or_none(name))
            for name in self._version_names(category)
        ]

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
        self._point(category, target)
        return target

    def list_banks(self) -> list[BankInfo]:
        """Every published bank, sorted by category."""
        banks = []
        for name in self._collections():
            category = category_of(name)
            if category is None or self.current_version(category) != name:
                continue
            banks.append(BankInfo(category, name, self.vector_count(name), self.read_description(name)))
        return sorted(banks, key=lambda bank: bank.category)

    def leftovers(self, category: str | None = None) -> list[str]:
        """Versions without a description (interrupted ingests, or one still being built), never
        a current one; of one category or all."""
        if category is not None:
            validate_category(category)
        found = []
        current: dict[str, str | None] = {}
        collections = self._collections()
        for name in collections:
            owner = category_of(name)
            if owner is None or (category is not None and owner != category):
                continue
            if owner not in current:
                current[owner] = self.current_version(owner)
            if current[owner] != name and self.read_description_or_none(name) is None:
                found.append(name)
        return sorted(found + self._orphan_sidecars(collections, category))

    @staticmethod
    def _orphan_sidecars(collections: list[str], category: str | None) -> list[str]:
        """Versions whose sidecar outlived their collection (a kill between dropping the two, or
        between creating them)."""
        present = set(collections)
        versions = (name.removesuffix(sidecar.SUFFIX) for name in collections if name.endswith(sidecar.SUFFIX))
        return [
            version
            for version in versions
            if version not in present and category_of(version) is not None and category in (None, category_of(version))
        ]

    def drop(self, category: str) -> list[str]:
        """Remove a category: its alias and every version."""
        self.resolve(category)
        self.connection.call("drop_alias", lambda c, t: c.drop_alias(category, timeout=t))
        names = self._version_names(category)
        for name in names + self._orphan_sidecars(self._collections(), category):
            self.drop_version(name)
        return names

    def _point(self, category: str, collection: str) -> None:
        self.connection.call("alter_alias", lambda c, t: c.alter_alias(collection, category, timeout=t))

    def _collections(self) -> list[str]:
        return sorted(self.connection.call("list_collections", lambda c, t: c.list_collections(timeout=t)))

    def _version_names(self, category: str) -> list[str]:
        """The category's collections, oldest first (the UTC stamps sort in time order)."""
        return [name for name in self._collections() if category_of(name) == category]
