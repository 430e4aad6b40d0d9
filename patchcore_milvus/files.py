"""Files this package writes beside its results and in its cache: never half-written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_folder(kind: str) -> Path:
    """Where derived data that can always be rebuilt is kept (`$XDG_CACHE_HOME`, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "patchcore-milvus" / kind


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_atomically(target: Path, write: Callable[[str], object]) -> None:
    """Write through a temporary file and rename, so a reader never sees a half-written file; the
    file gets the mode any new file would (0644 under umask 022)."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=target.suffix)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 would hide it from everyone else
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
