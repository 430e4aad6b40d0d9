"""Files this package writes beside its results and in its cache: never half-written."""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def printable(text: str) -> str:
    """A name on one line, without control characters (a newline or a terminal escape in a file
    name stays text)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


@contextmanager
def exclusive(lock: Path, busy: Exception | None = None) -> Iterator[None]:
    """Hold `lock` (made where missing) against every other process and thread that takes it:
    flock, one per open file, so threads exclude each other too. Opened read-only, so that
    another user sharing the folder can take it. Waits for it, or with `busy` raises that while
    another holds it."""
    handle = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if busy is None else fcntl.LOCK_NB))
        except BlockingIOError:
            assert busy is not None
            raise busy from None
        yield
    finally:
        os.close(handle)  # releases the lock


def cache_folder(kind: str) -> Path:
    """Where derived data that can always be rebuilt is kept (`$XDG_CACHE_HOME`, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "patchcore-milvus" / kind


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


TEMPORARY_PREFIX = ".tmp-"  # then the writer's host and PID


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _host_prefix() -> str:
    """The temporary files of this host: a folder shared between hosts (NFS) never has another
    host's live writer taken for a dead one."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())
    return f"{TEMPORARY_PREFIX}{host}-"


def _writer_prefix(pid: int) -> str:
    return f"{_host_prefix()}{pid}-"


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files `save_atomically` on this host left in `folder` when its process
    was killed (those whose writer is no longer running). Returns what was removed."""
    removed = []
    mine = _host_prefix()
    for path in folder.glob(f"{mine}*"):
        pid = path.name[len(mine) :].split("-", 1)[0]
        if pid.isdigit() and not process_running(int(pid)) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def save_atomically(target: Path, write: Callable[[str], object]) -> None:
    """Write through a temporary file and rename, so a reader never sees a half-written file; the
    file gets the mode any new file would (0644 under umask 022). A temporary file left by a killed
    process is named with its PID, for `remove_stale_temporaries`."""
    save_together([(target, write)])


def save_together(files: list[tuple[Path, Callable[[str], object]]], durable: bool = False) -> None:
    """`save_atomically` for a set of files that belong together (one image's map, overlay and
    mask): every one is written to its temporary file before the first is renamed, so a process
    killed while writing (drawing an overlay takes long) leaves none of them, not a part; a kill
    between two renames can still leave the first files without the rest. `durable`: each file
    and its folder reach the disk before this returns, so a power cut keeps what was said saved."""
    prefix = _writer_prefix(os.getpid())
    temporaries: list[str] = []
    try:
        for target, write in files:
            handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=target.suffix)
            os.close(handle)
            temporaries.append(temporary)
            write(temporary)
            os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 would hide it from everyone else
            if durable:
                sync(temporary)
        for (target, _), temporary in zip(files, temporaries):
            os.replace(temporary, target)
        if durable:
            for folder in {target.parent for target, _ in files}:
                sync(folder)
    except BaseException:
        for temporary in temporaries:
            Path(temporary).unlink(missing_ok=True)
        raise


def sync(path: str | Path) -> None:
    """A file's (or a folder's: its names) contents on the disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
