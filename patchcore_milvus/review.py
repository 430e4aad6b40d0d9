"""The review loop: parts a station called DEFECT that a person found good, queued to grow the bank.

A decision keeps the image and its inspection on disk, under `review_folder/<category>/`:

    queued/<id>/image.png, decision.json    waiting for the next append
    added/<id>/image.png, decision.json     appended (decision.json says to which version, and when)
    decisions.jsonl                         every decision and every append, one JSON line each

`append_reviewed` grows the bank with what is queued (`ingest.append_to_bank`: a new version
through the alias, which every station follows) and moves those decisions to `added/`. It is all
files, so the queue survives a restart and an ingest host sharing the folder can read it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from patchcore_milvus.config import Config
from patchcore_milvus.errors import ReviewError
from patchcore_milvus.files import save_together
from patchcore_milvus.milvus import BankStore, validate_category

if TYPE_CHECKING:
    from patchcore_milvus.ingest import IngestSummary

QUEUED, ADDED, LOG = "queued", "added", "decisions.jsonl"
IMAGE, RECORD = "image.png", "decision.json"


@dataclass(frozen=True)
class Decision:
    """One reviewed inspection: the part a station called DEFECT was found `decision`."""

    id: str  # the inspection's id
    category: str
    decision: str  # "good": add the part to the bank
    decided_at: str  # UTC, ISO 8601
    inspection: dict[str, Any]  # the station's answer (score, threshold, verdict, bank version, ...)
    added_to: str | None = None  # the bank version the append published, or that already covered it
    added_at: str | None = None
    published: bool | None = None  # False: the bank already covered the part, so no new version

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ReviewQueue:
    """The decisions of every category under one folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _category(self, category: str) -> Path:
        validate_category(category)  # a folder name: nothing lands outside `folder`
        return self.folder / category

    def add_good(self, record: dict[str, Any], image: Image.Image) -> Decision:
        """Queue a DEFECT inspection whose part was found good (`record`: the station's answer,
        with its `id` and `category`), with its image as PNG (lossless)."""
        key, category = str(record["id"]), record["category"]
        if record.get("verdict") != "DEFECT":
            raise ReviewError(
                f"inspection {key} was {record.get('verdict') or 'not judged'}, not DEFECT: nothing to review"
            )
        if not key.isalnum():
            raise ReviewError(f"{key!r} is not an inspection id")
        folder = self._category(category)
        if any((folder / state / key / RECORD).exists() for state in (QUEUED, ADDED)):
            raise ReviewError(f"inspection {key} was reviewed already")
        decision = Decision(key, category, "good", _now(), record)
        place = folder / QUEUED / key
        place.mkdir(parents=True, exist_ok=True)
        save_together(  # the record last: a folder without one is not a decision
            [
                (place / IMAGE, lambda p: image.save(p, format="PNG")),
                (place / RECORD, lambda p: Path(p).write_text(json.dumps(decision.to_dict()))),
            ]
        )
        self._log(category, {"event": "good", **decision.to_dict()})
        return decision

    def queued(self, category: str) -> list[Decision]:
        """The decisions waiting for an append, oldest first."""
        self._finish_moves(category)
        return self._read(category, QUEUED)

    def added(self, category: str) -> list[Decision]:
        self._finish_moves(category)
        return self._read(category, ADDED)

    def image(self, decision: Decision) -> Path:
        return (
            self._category(decision.category) / (QUEUED if decision.added_to is None else ADDED) / decision.id / IMAGE
        )

    def mark_added(self, category: str, decisions: list[Decision], version: str, published: bool) -> None:
        """Record in each decision the version it went into, then move it to `added/`."""
        folder = self._category(category)
        at = _now()
        for decision in decisions:
            done = Decision(**{**decision.to_dict(), "added_to": version, "added_at": at, "published": published})
            record = folder / QUEUED / decision.id / RECORD
            save_together([(record, lambda p, d=done: Path(p).write_text(json.dumps(d.to_dict())))])
        self._finish_moves(category)
        ids = [d.id for d in decisions]
        self._log(category, {"event": "appended", "ids": ids, "version": version, "published": published, "at": at})

    def _finish_moves(self, category: str) -> None:
        """Move every queued decision that records its version to `added/` (one rename each; a
        crash before it is finished here next time)."""
        folder = self._category(category)
        for decision in self._read(category, QUEUED):
            if decision.added_to is not None:
                (folder / ADDED).mkdir(parents=True, exist_ok=True)
                os.replace(folder / QUEUED / decision.id, folder / ADDED / decision.id)

    def _read(self, category: str, state: str) -> list[Decision]:
        found = []
        for record in (self._category(category) / state).glob(f"*/{RECORD}"):
            try:
                found.append(Decision(**json.loads(record.read_text())))
            except (OSError, ValueError, TypeError) as exc:
                raise ReviewError(f"cannot read the review record {record} ({exc}); move its folder away") from exc
        return sorted(found, key=lambda d: (d.decided_at, d.id))

    def _log(self, category: str, entry: dict[str, Any]) -> None:
        with (self._category(category) / LOG).open("a") as out:
            out.write(json.dumps(entry) + "\n")
            out.flush()
            os.fsync(out.fileno())


def append_reviewed(
    category: str, config: Config, store: BankStore | None = None, queue: ReviewQueue | None = None
) -> tuple[list[Decision], IngestSummary]:
    """Grow `category`'s bank with the images queued for review: (the decisions added, the
    append's summary). Refused where nothing is queued."""
    from patchcore_milvus.ingest import append_to_bank

    queue = queue or ReviewQueue(config.review_folder)
    waiting = queue.queued(category)
    if not waiting:
        raise ReviewError(f"no reviewed images are queued for {category!r} in {queue.folder / category / QUEUED}")
    images = [queue.image(decision) for decision in waiting]
    summary = append_to_bank(category, images, config, store=store, root=queue.folder / category / QUEUED)
    queue.mark_added(category, waiting, summary.collection, published=summary.search is not None)
    return waiting, summary
