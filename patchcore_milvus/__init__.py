"""PatchCore anomaly detection with its memory banks in Milvus.

The names below are imported on first use, so that `import patchcore_milvus` (and the command's
`--help`) does not load torch, pymilvus and the rest.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("patchcore-milvus")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_WHERE = {
    "Bank": "bank",
    "Inspection": "bank",
    "Config": "config",
    "load_config": "config",
    "IngestSummary": "ingest",
    "fit_bank": "ingest",
    "BankStore": "milvus",
}

__all__ = ["Bank", "BankStore", "Config", "IngestSummary", "Inspection", "__version__", "fit_bank", "load_config"]

if TYPE_CHECKING:
    from patchcore_milvus.bank import Bank, Inspection
    from patchcore_milvus.config import Config, load_config
    from patchcore_milvus.ingest import IngestSummary, fit_bank
    from patchcore_milvus.milvus import BankStore


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'patchcore_milvus' has no attribute {name!r}")
    return getattr(importlib.import_module(f"patchcore_milvus.{_WHERE[name]}"), name)
