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

import errno
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
from patchcore_milvus.errors import ImageError, ReviewError
from patchcore_milvus.files import exclusive, save_together, sync
from patchcore_milvus.images import load_rgb
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
        """The category's folder (made where missing), held under its lock `name` (`exclusive`)."""
        folder = self._category(category)
        _make_folder(folder)
        busy = ReviewError(f"an append of {category}'s reviewed images is running already; retry when it is done")
        with exclusive(folder / name, None if wait else busy):
            yield folder

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
            self._migrate(folder)
            for state in (IMAGES, QUEUED):
                _make_folder(folder / state)
            # The image first: a record is only ever written beside its image.
            save_together([(folder / IMAGES / f"{key}.png", lambda p: image.save(p, format="PNG"))], durable=True)
            _write(folder / QUEUED / f"{key}.json", decision)
            self._log(folder, {"event": "good", **decision.to_dict()})
        return decision

    def queued(self, category: str) -> list[Decision]:
        """The decisions waiting for an append, oldest first."""
        return self._state(category, QUEUED)

    def added(self, category: str) -> list[Decision]:
        return self._state(category, ADDED)

    def set_aside(self, category: str) -> list[str]:
        """The ids of the decisions moved to `damaged/`."""
        folder = self._category(category) / DAMAGED
        return sorted(path.stem for path in folder.glob("*.json")) if folder.is_dir() else []

    def _state(self, category: str, state: str) -> list[Decision]:
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "the review folder is a file", str(self.folder))
        if not self._category(category).is_dir():  # nothing reviewed yet: a read makes no folder
            return []
        with self._locked(category) as folder:
            self._migrate(folder)
            self._finish_moves(folder)
            return self._read(folder, state)

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
            if ids:
                entry = {"event": "appended", "ids": ids, "version": version, "published": published, "at": at}
                self._log(folder, entry)

    def _finish_moves(self, folder: Path) -> None:
        """Move every queued decision that records its version to `added/` (one rename each; a
        crash before it is finished here next time). The lock is held."""
        for decision in self._read(folder, QUEUED):
            if decision.added_to is not None:
                _make_folder(folder / ADDED)
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

    def _migrate(self, folder: Path) -> None:
        """Decisions in the first layout (`queued/<id>/decision.json` and `image.png` beside it)
        moved into this one. The lock is held."""
        for state in (QUEUED, ADDED):
            for record in (folder / state).glob("*/decision.json"):
                key, image = record.parent.name, record.parent / "image.png"
                if image.is_file():
                    _make_folder(folder / IMAGES)
                    os.replace(image, folder / IMAGES / f"{key}.png")
                os.replace(record, folder / state / f"{key}.json")
                record.parent.rmdir()

    def _set_aside(self, folder: Path, record: Path, reason: str) -> None:
        _make_folder(folder / DAMAGED)
        os.replace(record, folder / DAMAGED / record.name)
        self._log(folder, {"event": "set aside", "id": record.stem, "reason": reason, "at": _now()})

    def _log(self, folder: Path, entry: dict[str, Any]) -> None:
        with (folder / LOG).open("a") as out:
            out.write(json.dumps(entry) + "\n")
            out.flush()
            os.fsync(out.fileno())


def _make_folder(folder: Path) -> None:
    """A folder whose name is on the disk before a durable file is written into it."""
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        sync(folder.parent)


def _write(record: Path, decision: Decision) -> None:
    save_together([(record, lambda p: Path(p).write_text(json.dumps(decision.to_dict())))], durable=True)


def review_settings(config: Config, description: BankDescription) -> Config:
    """The settings an append of reviewed parts runs with: the bank's own (its index and its
    parameters but the graph's links, which ingest chooses again and makes denser where the graph
    misses vectors; its seed, threshold margin and coreset share; the search widths chosen
    afresh), whatever process runs it; no part held out, and unusable images skipped. A reviewed
    part was called DEFECT: held out, its score would set the thresholds for good, and the bank,
    without its patches, would keep scoring the variant high."""
    thresholds = description.thresholds
    return config.replace(
        index_type=description.index.type,
        index_params={key: value for key, value in description.index.params.items() if key != "M"},
        strict=False,
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
    the category runs. Images that cannot be read are set aside first. A decision whose image the
    bank lists already (an append stopped between its publish and its records) is recorded as
    added to the bank's version, not appended again."""
    from patchcore_milvus.ingest import append_to_bank

    queue = queue or ReviewQueue(config.review_folder)
    store = store or BankStore.from_config(config)
    with queue._locked(category, ".append.lock", wait=False) as folder:
        waiting = queue.queued(category)
        if not waiting:
            raise ReviewError(f"no reviewed images are queued for {category!r} in {folder / QUEUED}")
        version = store.resolve(category)
        description = store.read_description(version)
        # An append stopped between its publish and its records: the bank lists those images.
        taken = {
            name for part in description.training_images if part.root == str(folder / IMAGES) for name in part.bank
        }
        done = [decision for decision in waiting if f"{decision.id}.png" in taken]
        if done:
            queue.mark_added(category, done, version, True, {})
        unusable = {}
        for decision in waiting:
            if decision not in done:
                try:
                    load_rgb(queue.image(decision))
                except ImageError as exc:
                    unusable[decision.id] = str(exc)
        todo = [decision for decision in waiting if decision not in done]
        if unusable:
            queue.mark_added(category, [d for d in todo if d.id in unusable], version, False, unusable)
        todo = [decision for decision in todo if decision.id not in unusable]
        if not todo:
            raise ReviewError(
                f"none of the images queued for {category!r} is left to append ({len(done)} were in "
                f"{version} already, {len(unusable)} unusable were set aside in {folder / DAMAGED})"
            )
        images = [queue.image(decision) for decision in todo]
        summary = append_to_bank(category, images, review_settings(config, description), store, folder / IMAGES)
        by_path = {f"{path}: ": decision.id for path, decision in zip(images, todo)}
        unusable = {
            key: reason for reason in summary.skipped for prefix, key in by_path.items() if reason.startswith(prefix)
        }
        queue.mark_added(category, todo, summary.collection, summary.search is not None, unusable)
    return [d for d in todo if d.id not in unusable], summary
