"""`patchcore-milvus watch`: a hot folder. Each image a camera or a line writes into it is scored once.

An image is taken when it is complete: its size and modification time unchanged for `settle`
seconds (a file renamed into the folder is complete at once, and waits that long), and again the
same after it was scored (else the result is dropped and it waits again). Each gets one JSON line
in the results file, on the disk before the file is moved (`sort`: to `ok/`, `defect/` or
`rejected/`, the reason beside a rejected one). The results file is the state: a file whose name,
size, time and inode it records is never scored again, and one scored but not yet moved when the
process stopped is moved on restart. So a restart scores nothing twice, and misses nothing:
whatever is in the folder and not in the results is scored. One watcher per results file (a lock).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from patchcore_milvus.bank import Bank, Inspection
from patchcore_milvus.errors import ConfigError, ImageError, PatchcoreMilvusError
from patchcore_milvus.files import exclusive, printable, sync
from patchcore_milvus.images import IMAGE_SUFFIXES
from patchcore_milvus.regions import defect_regions

RESULTS = "results.jsonl"
OK, DEFECT, REJECTED = "ok", "defect", "rejected"
# Names writers use while a file is not finished (browsers, rsync, cameras' FTP uploads).
UNFINISHED_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".filepart")
# Longest wait between two tries while Milvus refuses: the images wait, the folder is still watched.
MAX_BACKOFF_S = 60.0


@dataclass(frozen=True)
class Seen:
    """A file as the folder shows it; another file of the same name later is another image (a
    copy that keeps the time and size still has another inode)."""

    name: str
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> Seen:
        stat = path.stat()
        return cls(path.name, stat.st_size, stat.st_mtime_ns, stat.st_ino)


@dataclass(frozen=True)
class WatchSettings:
    folder: Path
    results: Path
    sort: bool = False  # move each scored file to ok/, defect/ or rejected/
    settle: float = 1.0  # seconds a file's size and time must hold still
    interval: float = 0.5  # seconds between looks at the folder
    once: bool = False  # score what the folder holds, then stop

    def __post_init__(self) -> None:
        if self.interval < 0.01 or self.settle < 0:
            raise ConfigError(
                f"interval must be at least 0.01 s and settle not negative: {self.interval}, {self.settle}"
            )


class HotFolder:
    """The folder's files, what the results file says was done with them, and the moves."""

    def __init__(self, settings: WatchSettings):
        self.settings = settings
        self.done: dict[Seen, tuple[str | None, str | None]] = {}  # recorded: where to move, the reason
        self.damaged_lines = 0
        results = settings.results
        if results.is_file():
            text = results.read_text()
            for line in text.splitlines():
                try:
                    entry = json.loads(line)
                    seen = Seen(entry["name"], entry["size"], entry["mtime_ns"], entry["inode"])
                    self.done[seen] = (entry.get("moved_to"), entry.get("reason"))
                except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                    self.damaged_lines += 1
            if text and not text.endswith("\n"):  # end the cut line, or the next one joins it
                self._append("")

    def files(self) -> Iterator[tuple[Path, Seen]]:
        """The folder's own regular files, each with what it looks like now: not hidden, not
        unfinished, not the results file; one that goes away while it is looked at is passed over."""
        results = self.settings.results
        try:
            own = os.stat(results)
            results_id = (own.st_dev, own.st_ino)
        except OSError:
            results_id = None
        with os.scandir(self.settings.folder) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or name.lower().endswith(UNFINISHED_SUFFIXES):
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    stat = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if (stat.st_dev, stat.st_ino) == results_id:
                    continue
                yield Path(entry.path), Seen(name, stat.st_size, stat.st_mtime_ns, stat.st_ino)

    def record(self, seen: Seen, entry: dict[str, Any]) -> None:
        """One JSON line, on the disk before the file moves."""
        fields = {"name": seen.name, "size": seen.size, "mtime_ns": seen.mtime_ns, "inode": seen.inode}
        self._append(json.dumps({**fields, **entry}, allow_nan=False))
        self.done[seen] = (entry.get("moved_to"), entry.get("reason"))

    def _append(self, line: str) -> None:
        new = not self.settings.results.exists()
        with self.settings.results.open("a") as out:
            out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())
        if new:
            sync(self.settings.results.parent)

    def destination(self, name: str, verdict: str) -> str | None:
        """Where a scored file goes (relative to the folder), None without `sort`."""
        if not self.settings.sort:
            return None
        return self._free(name, {"OK": OK, "DEFECT": DEFECT}.get(verdict, REJECTED))

    def _free(self, name: str, folder: str) -> str:
        """`folder/name`, or `name-1`, `name-2`, ... where that is taken (for a rejected file,
        its reason file's name too)."""
        stem, suffix = os.path.splitext(name)
        candidate, n = name, 1
        place = self.settings.folder / folder
        while (place / candidate).exists() or (folder == REJECTED and (place / f"{candidate}.txt").exists()):
            candidate, n = f"{stem}-{n}{suffix}", n + 1
        return f"{folder}/{candidate}"

    def move(self, path: Path, moved_to: str | None, reason: str | None = None) -> None:
        """`path` to `moved_to` (its reason beside it), never over another file."""
        if moved_to is None or not path.exists():
            return
        folder = moved_to.split("/", 1)[0]
        if (self.settings.folder / moved_to).exists():  # taken since (a restart finishing a move)
            moved_to = self._free(path.name, folder)
        target = self.settings.folder / moved_to
        target.parent.mkdir(exist_ok=True)
        if reason is not None:
            target.with_name(target.name + ".txt").write_text(reason + "\n")
        try:
            os.link(path, target)  # refuses to replace a file, where a rename would not
            os.unlink(path)
        except OSError:  # no hard links here (another file system, FAT, SMB): the checked rename
            os.rename(path, target)


@contextmanager
def only_watcher(results: Path) -> Iterator[None]:
    """One watcher per results file: a second is refused, not let in to score the same files."""
    results.parent.mkdir(parents=True, exist_ok=True)
    lock = results.with_name(f".{results.name}.lock")
    with exclusive(lock, ConfigError(f"another watch writes {results} already (its lock: {lock}); stop it first")):
        yield


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


@dataclass
class WatchOutcome:
    scored: int  # images scored (rejected files not counted)
    waiting: int  # files left unscored when it stopped (`once`: Milvus refused, or still being written)


def watch(bank: Bank, settings: WatchSettings, say: Callable[[str], None] = print) -> WatchOutcome:
    """Score the folder's images as they arrive, until interrupted (or, `once`, until the folder
    holds nothing new, or Milvus refused what was left). Milvus refusing: the images wait, nothing
    is recorded for them, and they are tried again after a growing pause (up to a minute)."""
    if settings.sort and bank.image_threshold is None:
        raise ConfigError(
            f"the bank {bank.version} has no image threshold, so --sort could not tell ok/ from defect/; "
            "ingest with held-out images, or give --image-threshold"
        )
    for name in (OK, DEFECT, REJECTED) if settings.sort else ():
        if (settings.folder / name).exists() and not (settings.folder / name).is_dir():
            raise ConfigError(f"{settings.folder / name} is a file: --sort moves images into a folder of that name")
    with only_watcher(settings.results):
        folder = HotFolder(settings)
        if folder.damaged_lines:
            n = folder.damaged_lines
            say(
                f"{settings.results}: {n} line{'s' if n > 1 else ''} could not be read (cut short by a crash?); skipped"
            )
        return _loop(bank, settings, folder, say)


def _loop(bank: Bank, settings: WatchSettings, folder: HotFolder, say: Callable[[str], None]) -> WatchOutcome:
    waiting: dict[str, tuple[Seen, float]] = {}  # name -> as last seen, and since when unchanged
    scored, backoff, retry_at = 0, 0.0, 0.0
    while True:
        now = time.monotonic()
        ready: list[tuple[Path, Seen]] = []
        present = set()
        for path, seen in folder.files():
            present.add(seen.name)
            if seen in folder.done:  # recorded (and, sorting, moved; or stopped before the move)
                waiting.pop(seen.name, None)
                folder.move(path, *folder.done[seen])
                continue
            before = waiting.get(seen.name)
            if before is None or before[0] != seen:
                waiting[seen.name] = (seen, now)
            elif now - before[1] >= settings.settle:
                ready.append((path, seen))
        waiting = {name: value for name, value in waiting.items() if name in present}
        if ready and now >= retry_at:
            done, refused = _score(bank, folder, ready, say)
            scored += done
            if refused is None:
                backoff = 0.0
            else:
                backoff = min(MAX_BACKOFF_S, max(1.0, 2 * backoff))
                retry_at = time.monotonic() + backoff
                print(f"milvus: {refused}; the images wait (next try in {backoff:.0f} s)", file=sys.stderr, flush=True)
                if settings.once:
                    return WatchOutcome(scored, len(waiting))
        if settings.once and not waiting:
            return WatchOutcome(scored, 0)
        time.sleep(settings.interval)


def _score(
    bank: Bank, folder: HotFolder, ready: list[tuple[Path, Seen]], say: Callable[[str], None]
) -> tuple[int, PatchcoreMilvusError | None]:
    """Score and record `ready`; (how many were scored, the error that stopped the rest, if any)."""
    seen_of = dict(ready)
    scored = 0
    for path, seen in ready:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            _reject(folder, path, seen, f"{path.name}: not an image file (takes {', '.join(IMAGE_SUFFIXES)})", say)
    images = [path for path, _ in ready if path.suffix.lower() in IMAGE_SUFFIXES]
    try:
        for path, result in bank.score_paths(images):
            seen = seen_of[path]
            try:
                unchanged = Seen.of(path) == seen
            except OSError:  # gone meanwhile: nothing to record
                continue
            if not unchanged:  # written to while it was scored: it waits again
                continue
            if isinstance(result, ImageError):
                _reject(folder, path, seen, str(result), say)
                continue
            entry = _entry(result)
            moved_to = folder.destination(seen.name, entry["verdict"])
            folder.record(seen, {**entry, "time": _now(), "moved_to": moved_to})
            folder.move(path, moved_to)
            scored += 1
            threshold = "none" if result.image_threshold is None else f"{result.image_threshold:.3f}"
            say(f"{printable(seen.name)}  score {result.image_score:.3f}  threshold {threshold}  {entry['verdict']}")
    except PatchcoreMilvusError as exc:  # Milvus away, a version dropped, a bank re-ingested otherwise
        return scored, exc
    return scored, None


def _reject(folder: HotFolder, path: Path, seen: Seen, reason: str, say: Callable[[str], None]) -> None:
    moved_to = folder.destination(seen.name, "REJECTED")
    folder.record(seen, {"verdict": "REJECTED", "reason": reason, "time": _now(), "moved_to": moved_to})
    folder.move(path, moved_to, reason)
    say(f"{printable(seen.name)}  REJECTED  {printable(reason)}")
