"""`patchcore-milvus watch`: a hot folder. Each image a camera or a line writes into it is scored once.

An image is taken when it is complete: its size and modification time unchanged for `settle`
seconds (a file renamed into the folder is complete at once, and waits that long). Each gets one
JSON line in the results file, written to the disk before the file is moved (`sort`: to `ok/`,
`defect/` or `rejected/`, the reason beside a rejected one). The results file is the state: a file
whose name, size and modification time it records is never scored again, and one scored but not
yet moved when the process stopped is moved on restart. So a restart scores nothing twice, and
misses nothing: whatever is in the folder and not in the results is scored.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from patchcore_milvus.bank import Bank, Inspection
from patchcore_milvus.errors import ImageError, StoreUnavailableError
from patchcore_milvus.images import IMAGE_SUFFIXES
from patchcore_milvus.regions import defect_regions

RESULTS = "results.jsonl"
OK, DEFECT, REJECTED = "ok", "defect", "rejected"
# Names writers use while a file is not finished (browsers, rsync, cameras' FTP uploads).
UNFINISHED_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".filepart")


@dataclass(frozen=True)
class Seen:
    """A file as the folder shows it; another file of the same name later is another image."""

    name: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> Seen:
        stat = path.stat()
        return cls(path.name, stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class WatchSettings:
    folder: Path
    results: Path
    sort: bool = False  # move each scored file to ok/, defect/ or rejected/
    settle: float = 1.0  # seconds a file's size and time must hold still
    interval: float = 0.5  # seconds between looks at the folder
    once: bool = False  # score what the folder holds, then stop


class HotFolder:
    """The folder's files, what the results file says was done with them, and the moves."""

    def __init__(self, settings: WatchSettings):
        self.settings = settings
        self.done: dict[Seen, str | None] = {}  # each file recorded, and where it was to move
        self.damaged_lines = 0
        if settings.results.is_file():
            for line in settings.results.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.done[Seen(entry["name"], entry["size"], entry["mtime_ns"])] = entry.get("moved_to")
                except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                    self.damaged_lines += 1

    def files(self) -> list[Path]:
        """The folder's own files waiting, oldest first: not hidden, not unfinished, not the results."""
        found = []
        for path in self.settings.folder.iterdir():
            name = path.name
            if name.startswith(".") or name.lower().endswith(UNFINISHED_SUFFIXES) or path == self.settings.results:
                continue
            if path.is_file():
                found.append(path)
        return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def record(self, seen: Seen, entry: dict[str, Any]) -> None:
        """One JSON line, on the disk before the file moves."""
        line = json.dumps({"name": seen.name, "size": seen.size, "mtime_ns": seen.mtime_ns, **entry}, allow_nan=False)
        with self.settings.results.open("a") as out:
            out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())
        self.done[seen] = entry.get("moved_to")

    def destination(self, name: str, verdict: str) -> str | None:
        """Where a scored file goes (relative to the folder), a free name in its subfolder."""
        if not self.settings.sort:
            return None
        folder = {"OK": OK, "DEFECT": DEFECT}.get(verdict, REJECTED)
        stem, suffix = os.path.splitext(name)
        candidate, n = name, 1
        while (self.settings.folder / folder / candidate).exists():
            candidate, n = f"{stem}-{n}{suffix}", n + 1
        return f"{folder}/{candidate}"

    def move(self, path: Path, moved_to: str | None, reason: str | None = None) -> None:
        if moved_to is None or not path.exists():
            return
        target = self.settings.folder / moved_to
        target.parent.mkdir(exist_ok=True)
        if reason is not None:
            target.with_name(target.name + ".txt").write_text(reason + "\n")
        os.rename(path, target)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _entry(result: Inspection) -> dict[str, Any]:
    summary = result.summary()
    return {
        "verdict": result.verdict or "-",
        "score": summary["score"],
        "threshold": summary["threshold"],
        "pixel_threshold": summary["pixel_threshold"],
        "defect_pixels": summary["defect_pixels"],
        "regions": [region.to_dict() for region in defect_regions(result.mask, result.anomaly_map)],
        "bank_version": result.bank_version,
        "ms": summary["ms"],
    }


def watch(bank: Bank, settings: WatchSettings, say: Callable[[str], None] = print) -> int:
    """Score the folder's images as they arrive, until interrupted (or, `once`, until the folder
    holds nothing new); returns how many were scored. Milvus away: the images wait, nothing is
    recorded for them, and they are scored when it answers again."""
    folder = HotFolder(settings)
    if folder.damaged_lines:
        n = folder.damaged_lines
        say(f"{settings.results}: {n} line{'s' if n > 1 else ''} could not be read (cut short by a crash?); skipped")
    waiting: dict[str, tuple[Seen, float]] = {}  # name -> as last seen, and since when unchanged
    scored = 0
    while True:
        now = time.monotonic()
        ready: list[tuple[Path, Seen]] = []
        for path in folder.files():
            try:
                seen = Seen.of(path)
            except FileNotFoundError:  # moved away meanwhile
                continue
            if seen in folder.done:  # scored before a stop that came before its move
                folder.move(path, folder.done[seen])
                continue
            before = waiting.get(seen.name)
            if before is None or before[0] != seen:
                waiting[seen.name] = (seen, now)
            elif now - before[1] >= settings.settle:
                ready.append((path, seen))
        if ready:
            scored += _score(bank, folder, ready, say)
            for _, seen in ready:
                waiting.pop(seen.name, None)
        present = {path.name for path in folder.files()}
        waiting = {name: value for name, value in waiting.items() if name in present}
        if settings.once and not waiting:
            return scored
        time.sleep(settings.interval)


def _score(bank: Bank, folder: HotFolder, ready: list[tuple[Path, Seen]], say: Callable[[str], None]) -> int:
    seen_of = {path: seen for path, seen in ready}
    images = [path for path, _ in ready if path.suffix.lower() in IMAGE_SUFFIXES]
    scored = 0
    for path, seen in ready:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            _reject(folder, path, seen, f"{path.name}: not an image file (takes {', '.join(IMAGE_SUFFIXES)})", say)
    try:
        for path, result in bank.score_paths(images):
            seen = seen_of[path]
            if isinstance(result, ImageError):
                _reject(folder, path, seen, str(result), say)
                continue
            entry = _entry(result)
            moved_to = folder.destination(seen.name, entry["verdict"])
            folder.record(seen, {**entry, "time": _now(), "moved_to": moved_to})
            folder.move(path, moved_to)
            scored += 1
            threshold = "none" if result.image_threshold is None else f"{result.image_threshold:.3f}"
            say(f"{seen.name}  score {result.image_score:.3f}  threshold {threshold}  {entry['verdict']}")
    except StoreUnavailableError as exc:
        print(f"milvus: {exc}; the images wait and are scored when it answers", file=sys.stderr, flush=True)
    return scored


def _reject(folder: HotFolder, path: Path, seen: Seen, reason: str, say: Callable[[str], None]) -> None:
    moved_to = folder.destination(seen.name, "REJECTED")
    folder.record(seen, {"verdict": "REJECTED", "reason": reason, "time": _now(), "moved_to": moved_to})
    folder.move(path, moved_to, reason)
    say(f"{seen.name}  REJECTED  {reason}")
