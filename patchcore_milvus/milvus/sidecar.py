"""What a bank version records beside its vectors, kept in a second collection, `<version>__meta`:
its description (JSON), its extractor (ONNX) and where each bank vector came from (training image
and patch position), each as one text in chunked rows.

Why not in the bank collection itself: Milvus Lite turns every search hit into a dict of all its
row's fields, so fields beside the vector slow down every query. A bank collection of id and
vector alone costs 81 µs per query vector on Lite, against 122 µs with these fields
(`benchmarks/lite_engine.py`). Milvus wants a vector field in every collection: the sidecar's is a
2-d marker of zeros, never searched. The sidecar is created before the bank collection and dropped
after it, so a version whose bank collection exists has its sidecar.

Versions made before the sidecar kept all of this in their own collection (fields `image`,
`patch_y`, `patch_x`, `description`; partitions `description` and `extractor`): they are still
read, as the "single" layout, so that an upgrade never turns a complete bank into a leftover.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient

from patchcore_milvus.description import BankDescription, NewerSchemaError
from patchcore_milvus.errors import StoreError, StoreUnavailableError
from patchcore_milvus.milvus.connection import Connection

SUFFIX = "__meta"
DESCRIPTION_PARTITION = "description"
EXTRACTOR_PARTITION = "extractor"
PROVENANCE_PARTITION = "provenance"
_FIRST_ID = {DESCRIPTION_PARTITION: -1, EXTRACTOR_PARTITION: -1_000_000, PROVENANCE_PARTITION: -2_000_000}
_MARKER = "marker"
CHUNK = 60000  # characters of ASCII text per row, under Milvus' 65,535-byte VARCHAR limit
_INSERT_BYTES = 32 * 1024 * 1024  # well under Milvus' 64 MiB message limit
_CHUNKS_PER_READ = 256  # chunks read per query: about 15 MB of text, under gRPC's and Milvus' limits


@dataclass(frozen=True)
class Provenance:
    """Where each bank vector came from; entry i belongs to id i."""

    names: list[str]  # the distinct training images, relative to their root
    image: np.ndarray  # (n,) int: index into `names`
    positions: np.ndarray  # (n, 2) int: patch y, x in that image's grid

    def __len__(self) -> int:
        return len(self.image)

    def images(self) -> list[str]:
        return [self.names[k] for k in self.image]

    def source(self, i: int) -> dict[str, Any]:
        """Where vector i came from: image and patch position (for JSON)."""
        return {
            "image": self.names[int(self.image[i])],
            "patch_y": int(self.positions[i, 0]),
            "patch_x": int(self.positions[i, 1]),
        }

    @classmethod
    def of(cls, images: list[str], positions: np.ndarray) -> Provenance:
        names, index = np.unique(np.array(images, dtype=str), return_inverse=True)
        return cls(names.tolist(), index.astype(np.int32), np.asarray(positions, dtype=np.int32).reshape(-1, 2))

    def encode(self) -> str:
        """A compressed numpy archive (never pickle), base64."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, names=np.array(self.names, dtype=str), image=self.image, positions=self.positions)
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    @classmethod
    def decode(cls, text: str) -> Provenance:
        with np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False) as archive:
            names, image, positions = archive["names"].tolist(), archive["image"], archive["positions"]
        if len(image) != len(positions) or (len(image) and not 0 <= image.min() <= image.max() < len(names)):
            raise ValueError("provenance arrays disagree")
        return cls(names, image, positions)


def name_of(version: str) -> str:
    return version + SUFFIX


@dataclass(frozen=True)
class _Layout:
    """Which collection holds a version's texts, and in which fields."""

    holder: str
    text: str  # the chunk
    parts: str  # how many chunks the text has
    part: str  # this chunk's number
    single: bool  # the version's own collection (made before the sidecar)


_SINGLE_FIELDS = ("description", "patch_y", "patch_x")


def create(connection: Connection, version: str, category: str) -> None:
    """The empty sidecar of `version`, indexed and loaded, so that it can be read at once."""
    name = name_of(version)
    schema = MilvusClient.create_schema(auto_id=False, description=f"patchcore-milvus bank of {category}: records")
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field(_MARKER, DataType.FLOAT_VECTOR, dim=2)
    schema.add_field("text", DataType.VARCHAR, max_length=65535)
    schema.add_field("parts", DataType.INT32)
    schema.add_field("part", DataType.INT32)
    connection.call("create_collection", lambda c, t: c.create_collection(name, schema=schema, timeout=t))
    for partition in _FIRST_ID:
        connection.call(
            "create_partition", lambda c, t, partition=partition: c.create_partition(name, partition, timeout=t)
        )
    index = connection.client.prepare_index_params()
    index.add_index(_MARKER, index_type="AUTOINDEX", metric_type="L2")
    connection.call("create_index", lambda c, t: c.create_index(name, index, timeout=t), long=True)
    _load(connection, name)


def drop(connection: Connection, version: str) -> None:
    name = name_of(version)
    if connection.call("has_collection", lambda c, t: c.has_collection(name, timeout=t)):
        connection.call("drop_collection", lambda c, t: c.drop_collection(name, timeout=t))


def _load(connection: Connection, collection: str) -> None:
    connection.call("load_collection", lambda c, t: c.load_collection(collection, timeout=t), long=True)


def _layout(connection: Connection, version: str) -> _Layout | None:
    """None for a collection with neither a sidecar nor the single layout's partitions."""
    name = name_of(version)
    if connection.call("has_collection", lambda c, t: c.has_collection(name, timeout=t)):
        _load(connection, name)  # a Lite file opened again starts with its collections released
        return _Layout(name, "text", "parts", "part", single=False)
    has = connection.call("has_partition", lambda c, t: c.has_partition(version, DESCRIPTION_PARTITION, timeout=t))
    return _Layout(version, *_SINGLE_FIELDS, single=True) if has else None


def _write_text(connection: Connection, version: str, partition: str, text: str) -> None:
    """ASCII `text` in sidecar rows with ids first, first - 1, ...; each row knows the number of
    chunks, so that a lost one is noticed."""
    name, first = name_of(version), _FIRST_ID[partition]
    chunks = [text[i : i + CHUNK] for i in range(0, len(text), CHUNK)] or [""]
    rows = [
        {"id": first - k, _MARKER: [0.0, 0.0], "text": chunk, "parts": len(chunks), "part": k}
        for k, chunk in enumerate(chunks)
    ]
    per_batch = max(1, _INSERT_BYTES // (CHUNK + 64))
    for start in range(0, len(rows), per_batch):
        batch = rows[start : start + per_batch]
        connection.call("insert", lambda c, t, batch=batch: c.insert(name, batch, partition_name=partition, timeout=t))
    connection.call("flush", lambda c, t: c.flush(name, timeout=t), long=True)


def _read_text(connection: Connection, layout: _Layout, partition: str) -> str | None:
    """The text `_write_text` stored, None if there is none; ValueError if a chunk is missing.

    Read first at Bounded consistency: a Milvus server answers at once, where a Strong read waits
    for its next time tick. A text is written once and never changed, so a bounded read can only
    miss it, or some of its chunks (the chunk count shows it), if it was written moments ago; then
    it is read again at Strong consistency."""
    try:
        text = _read_text_at(connection, layout, partition, "Bounded")
    except ValueError:
        text = None
    return text if text is not None else _read_text_at(connection, layout, partition, "Strong")


def _read_text_at(connection: Connection, layout: _Layout, partition: str, level: str) -> str | None:
    """`_read_text` at one consistency level, in ranges of ids, so that a large text never makes
    one huge answer."""
    rows: list[dict[str, Any]] = []
    expected, read = None, 0  # chunks the text has; ids read through so far
    while expected is None or read < expected:
        high = _FIRST_ID[partition] - read
        read += _CHUNKS_PER_READ
        part = connection.call(
            "query",
            lambda c, t, high=high: c.query(
                layout.holder,
                filter=f"id <= {high} and id > {high - _CHUNKS_PER_READ}",
                output_fields=[layout.text, layout.parts],
                partition_names=[partition],
                consistency_level=level,
                timeout=t,
            ),
        )
        if expected is None:
            if not part:
                break
            expected = part[0][layout.parts]
        rows.extend(part)
    if not rows:
        return None
    if any(row[layout.parts] != len(rows) for row in rows):
        raise ValueError(f"{len(rows)} of {rows[0][layout.parts]} parts found")
    return "".join(row[layout.text] for row in sorted(rows, key=lambda row: -row["id"]))


def write_description(connection: Connection, version: str, description: BankDescription) -> None:
    """As ASCII JSON (never pickle)."""
    _write_text(connection, version, DESCRIPTION_PARTITION, description.to_json())


def read_description(connection: Connection, version: str) -> BankDescription | None:
    """None for a version that never got its description (its ingest was interrupted, or
    another tool made it); a damaged one is an error."""
    try:
        _load(connection, version)  # so that a station can search it next (Lite releases on reopen)
    except StoreUnavailableError:
        raise
    except StoreError as exc:
        # No index yet: interrupted before indexing. Any other failure is not a verdict on the
        # version (publish would drop it as incomplete), so it is raised.
        if exc.code == 700 or "index" in str(exc).lower():
            return None
        raise
    layout = _layout(connection, version)
    if layout is None:
        return None  # not made by this patchcore-milvus (another tool, or a version before 0.2)
    try:
        text = _read_text(connection, layout, DESCRIPTION_PARTITION)
        return None if text is None else BankDescription.from_json(text)
    except NewerSchemaError as exc:
        raise StoreError(f"bank version {version} was {exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise StoreError(f"the description of {version} is damaged ({exc!r}); re-ingest the category") from exc


def write_model(connection: Connection, version: str, model: bytes) -> None:
    """The extractor's ONNX model, base64."""
    _write_text(connection, version, EXTRACTOR_PARTITION, base64.b64encode(model).decode("ascii"))


def read_model(connection: Connection, version: str) -> bytes:
    try:
        layout = _layout(connection, version)
        text = None if layout is None else _read_text(connection, layout, EXTRACTOR_PARTITION)
        if text is None:
            raise ValueError("no extractor rows")
        return base64.b64decode(text, validate=True)
    except ValueError as exc:  # binascii.Error is one
        raise StoreError(f"the extractor model of {version} is damaged ({exc}); re-ingest the category") from exc


def write_provenance(connection: Connection, version: str, provenance: Provenance) -> None:
    _write_text(connection, version, PROVENANCE_PARTITION, provenance.encode())


def read_provenance(connection: Connection, version: str, count: int) -> Provenance:
    """Where each of the version's `count` vectors came from."""
    layout = _layout(connection, version)
    try:
        if layout is None:
            raise ValueError("no records")
        if layout.single:
            _load(connection, version)
            return _single_provenance(connection, version, count)
        text = _read_text(connection, layout, PROVENANCE_PARTITION)
        if text is None:
            raise ValueError("no provenance rows")
        provenance = Provenance.decode(text)
    except (ValueError, KeyError, OSError) as exc:  # a damaged archive is one of these
        raise StoreError(f"the patch records of {version} are damaged ({exc}); re-ingest the category") from exc
    if len(provenance) != count:
        raise StoreError(f"{version} records {len(provenance)} patches for {count} vectors; re-ingest the category")
    return provenance


def _single_provenance(connection: Connection, version: str, count: int, chunk: int = 10000) -> Provenance:
    """The single layout kept each vector's source in its own row."""
    images: list[str] = []
    positions: list[list[int]] = []
    for start in range(0, count, chunk):
        part = connection.call(
            "query",
            lambda c, t, start=start: c.query(
                version,
                filter=f"id >= {start} and id < {start + chunk}",
                output_fields=["image", "patch_y", "patch_x"],
                partition_names=["_default"],
                limit=chunk,
                timeout=t,
            ),
        )
        for row in sorted(part, key=lambda row: row["id"]):
            images.append(row["image"])
            positions.append([row["patch_y"], row["patch_x"]])
    if len(images) != count:
        raise ValueError(f"{len(images)} of {count} rows found")
    return Provenance.of(images, np.array(positions, dtype=np.int32).reshape(-1, 2))
