"""PatchCore anomaly detection with its memory banks in Milvus."""

__version__ = "0.2.0"

from patchcore_milvus.bank import Bank, Inspection
from patchcore_milvus.config import Config, load_config
from patchcore_milvus.ingest import IngestSummary, fit_bank
from patchcore_milvus.store import BankStore

__all__ = ["Bank", "BankStore", "Config", "IngestSummary", "Inspection", "__version__", "fit_bank", "load_config"]
