"""Errors a user can act on: each message says what was wrong and what to do."""


class PatchcoreMilvusError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class ConfigError(PatchcoreMilvusError):
    """An option has an unknown name, the wrong type or an impossible value."""


class ImageError(PatchcoreMilvusError):
    """A file could not be read as an image."""


class WeightsUnavailableError(PatchcoreMilvusError):
    """Pretrained weights could neither be found locally nor downloaded."""


class BankNotFoundError(PatchcoreMilvusError):
    """No memory bank exists for the requested category."""


class BankMismatchError(PatchcoreMilvusError):
    """The query's feature extractor differs from the one the bank was built with."""


class StoreError(PatchcoreMilvusError):
    """Milvus could not be reached or refused an operation; `code` is Milvus' error code, if any."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class IndexTooPoorError(StoreError):
    """An index that misses some vectors even at its widest search (HNSW: nodes the graph never
    reaches); another build of it may not."""


class StoreUnavailableError(StoreError):
    """Milvus did not answer within the retry time; a later call may succeed (the server restarts)."""


class VersionGoneError(StoreError):
    """The bank version (collection) asked for no longer exists: dropped by a publish or a drop."""


class CalibrationError(PatchcoreMilvusError):
    """Thresholds could not be derived from the held-out images."""


class ReviewError(PatchcoreMilvusError):
    """A review decision that cannot be taken: not a DEFECT, reviewed already, nothing queued."""


class ModelFileError(PatchcoreMilvusError):
    """A baseline model that cannot be trained as asked, or whose files are missing, damaged or do not match."""
