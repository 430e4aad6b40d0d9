"""The review loop: parts a station called DEFECT that a person found good, queued to grow the bank.

A decision keeps the image and its inspection on disk, under `review_folder/<category>/`:

    images/<id>.png             the part, lossless; it never moves, so the bank's record of it holds
    queued/<id>.json            a decision waiting for the next append
    added/<id>.json             appended (it says to which version, and when)
    damaged/<id>.json           a record that could not be read, or an image the append could not use
    decisions.jsonl             every decision, append and set-aside, one JSON line each

A decision changes state by one rename, done under the category's lock (`.queue.lock`), which
every process sharing the folder takes; an append holds `.append.lock` from the bank it reads to
the moves, so two never grow the bank from the same queue. All files, so the queue survives a
restart and an ingest host sharing the folder can run the append.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
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
    from patchcore_milvus.description import BankDescription
    from patchcore_milvus.ingest import IngestSummary

IMAGES, QUEUED, ADDED, DAMAGED, LOG = "images", "queued", "added", "damaged", "decisions.jsonl"


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

    @contextmanager
    def _locked(self, category: str, name: str = ".queue.lock", wait: bool = True) -> Iterator[Path]:
        """The category's folder, held exclusively against every other process and thread that
        takes the same lock (flock: one per open file, so threads exclude each other too)."""
        folder = self._category(category)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / name).open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise ReviewError(
                    f"an append of {category}'s reviewed images is running already; retry when it is done"
                ) from None
            try:
                yield folder
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

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
        decision = Decision(key, category, "good", _now(), record)
        with self._locked(category) as folder:
            if any((folder / state / f"{key}.json").exists() for state in (QUEUED, ADDED, DAMAGED)):
                raise ReviewError(f"inspection {key} was reviewed already")
            for state in (IMAGES, QUEUED):
                (folder / state).mkdir(exist_ok=True)
            # The image first: a record is only ever written beside its image.
            save_together([(folder / IMAGES / f"{key}.png", lambda p: image.save(p, format="PNG"))], durable=True)
            _write(folder / QUEUED / f"{key}.json", decision)
            self._log(folder, {"event": "good", **decision.to_dict()})
        return decision

    def queued(self, category: str) -> list[Decision]:
        """The decisions waiting for an append, oldest first."""
        with self._locked(category) as folder:
            self._finish_moves(folder)
            return self._read(folder, QUEUED)

    def added(self, category: str) -> list[Decision]:
        with self._locked(category) as folder:
            self._finish_moves(folder)
            return self._read(folder, ADDED)

    def image(self, decision: Decision) -> Path:
        return self._category(decision.category) / IMAGES / f"{decision.id}.png"

    def mark_added(
        self, category: str, decisions: list[Decision], version: str, published: bool, unusable: dict[str, str]
    ) -> None:
        """Record in each decision the version it went into, then move it to `added/`; those whose
        image the append could not use (`unusable`: id -> reason) go to `damaged/`."""
        at = _now()
        with self._locked(category) as folder:
            for decision in decisions:
                if decision.id in unusable:
                    self._set_aside(folder, folder / QUEUED / f"{decision.id}.json", unusable[decision.id])
                    continue
                done = Decision(**{**decision.to_dict(), "added_to": version, "added_at": at, "published": published})
                _write(folder / QUEUED / f"{decision.id}.json", done)
            self._finish_moves(folder)
            ids = [d.id for d in decisions if d.id not in unusable]
            self._log(folder, {"event": "appended", "ids": ids, "version": version, "published": published, "at": at})

    def _finish_moves(self, folder: Path) -> None:
        """Move every queued decision that records its version to `added/` (one rename each; a
        crash before it is finished here next time). The lock is held."""
        for decision in self._read(folder, QUEUED):
            if decision.added_to is not None:
                (folder / ADDED).mkdir(exist_ok=True)
                os.replace(folder / QUEUED / f"{decision.id}.json", folder / ADDED / f"{decision.id}.json")

    def _read(self, folder: Path, state: str) -> list[Decision]:
        """The decisions in `state`; a record that cannot be read is set aside in `damaged/`
        (and logged), so that one bad file does not stop the category's queue."""
        found = []
        for record in (folder / state).glob("*.json"):
            try:
                found.append(Decision(**json.loads(record.read_text())))
            except (OSError, ValueError, TypeError) as exc:
                self._set_aside(folder, record, f"unreadable record ({exc})")
        return sorted(found, key=lambda d: (d.decided_at, d.id))

    def _set_aside(self, folder: Path, record: Path, reason: str) -> None:
        (folder / DAMAGED).mkdir(exist_ok=True)
        os.replace(record, folder / DAMAGED / record.name)
        self._log(folder, {"event": "set aside", "id": record.stem, "reason": reason, "at": _now()})

    def _log(self, folder: Path, entry: dict[str, Any]) -> None:
        with (folder / LOG).open("a") as out:
            out.write(json.dumps(entry) + "\n")
            out.flush()
            os.fsync(out.fileno())


def _write(record: Path, decision: Decision) -> None:
    save_together([(record, lambda p: Path(p).write_text(json.dumps(decision.to_dict())))], durable=True)


def review_settings(config: Config, description: BankDescription) -> Config:
    """The settings an append of reviewed parts runs with: the bank's own (its index, its seed,
    its threshold margin and coreset share; the search widths chosen afresh), whatever process runs
    it, and no part held out. A reviewed part was called DEFECT: held out, its score would set the
    thresholds for good, and the bank, without its patches, would keep scoring the variant high."""
    thresholds = description.thresholds
    return config.replace(
        index_type=description.index.type,
        index_params=dict(description.index.params),
        search_params={},
        seed=description.coreset.projection_seed,
        coreset_ratio=description.coreset.ratio,
        coreset_size=None,
        threshold_sigma=config.threshold_sigma if thresholds is None else thresholds.sigma,
        holdout_ratio=0.0,
    )


def append_reviewed(
    category: str, config: Config, store: BankStore | None = None, queue: ReviewQueue | None = None
) -> tuple[list[Decision], IngestSummary]:
    """Grow `category`'s bank with the images queued for review (`review_settings`): (the
    decisions added, the append's summary). Refused where nothing is queued, or another append of
    the category runs. A crash between the publish and the moves leaves the decisions queued; the
    next append finds their patches in the bank already and publishes nothing."""
    from patchcore_milvus.ingest import append_to_bank

    queue = queue or ReviewQueue(config.review_folder)
    store = store or BankStore.from_config(config)
    with queue._locked(category, ".append.lock", wait=False) as folder:
        waiting = queue.queued(category)
        if not waiting:
            raise ReviewError(f"no reviewed images are queued for {category!r} in {folder / QUEUED}")
        settings = review_settings(config, store.read_description(store.resolve(category)))
        images = [queue.image(decision) for decision in waiting]
        summary = append_to_bank(category, images, settings, store=store, root=folder / IMAGES)
        by_path = {f"{path}: ": decision.id for path, decision in zip(images, waiting)}
        unusable = {
            key: reason for reason in summary.skipped for prefix, key in by_path.items() if reason.startswith(prefix)
        }
        queue.mark_added(category, waiting, summary.collection, summary.search is not None, unusable)
    return [d for d in waiting if d.id not in unusable], summary
