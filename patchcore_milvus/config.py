"""One flat, explicit set of options; a YAML file and CLI flags fill it, flags win."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from patchcore_milvus.errors import ConfigError

BACKBONES = ("efficientnet_lite0", "wide_resnet50_2")
# The input statistics each backbone's weights were trained with (`normalization: backbone`).
BACKBONE_NORMALIZATION = {"efficientnet_lite0": "half", "wide_resnet50_2": "imagenet"}
RUNTIMES = ("onnx", "torch")
SEARCHES = ("milvus", "local")
NORMALIZATIONS = ("imagenet", "backbone")
BORDERS = ("zeros", "inside")
ASPECTS = ("auto", "keep", "square")
# Bounds that keep a setting from exhausting memory with a MemoryError deep in the work: a 2,048 px
# input is 65,536 patches per image; pooling patches to more dims than this only pads them.
MAX_IMAGE_SIZE = 2048
MAX_TARGET_DIM = 8192
MAX_THREADS = 256  # more extractor threads than this only starve the machine (100,000 hung it)


def stage_threads() -> int:
    """Threads for each of the two CPU stages that overlap (extraction beside decoding at ingest,
    beside the search at a station): half the cores each. On 2 cores a station searching locally
    scored bottle in 65.2 ms per image this way, 75.9 with both stages on all cores; 161.5 against
    182.8 on Milvus Lite (`python benchmarks/threads.py --uri bottle.db`, the run README quotes)."""
    return max(1, (os.cpu_count() or 2) // 2)


INDEX_TYPES = ("HNSW", "HNSW_SQ", "IVF_FLAT", "IVF_SQ8")
# Indexes that compare quantised vectors: their distances can be too small as well as too large.
QUANTISED_INDEX_TYPES = ("HNSW_SQ", "IVF_SQ8")

DEFAULT_INDEX_PARAMS: dict[str, dict[str, Any]] = {
    "HNSW": {"M": 16, "efConstruction": 200},
    "HNSW_SQ": {"M": 16, "efConstruction": 200, "sq_type": "SQ8"},
    "IVF_FLAT": {"nlist": 1024},
    "IVF_SQ8": {"nlist": 1024},
}
DEFAULT_SEARCH_PARAMS: dict[str, dict[str, Any]] = {
    "HNSW": {"ef": 64},
    "HNSW_SQ": {"ef": 64},
    "IVF_FLAT": {"nprobe": 32},
    "IVF_SQ8": {"nprobe": 32},
}
# The parameters each index type takes, with their allowed integer ranges (Milvus' own limits)
# or allowed values; anything else is refused before any work starts.
_HNSW_BUILD = {"M": (2, 2048), "efConstruction": (8, 2**31 - 1)}
_IVF_BUILD = {"nlist": (1, 65536)}
INDEX_PARAM_RULES: dict[str, dict[str, tuple[int, int] | tuple[str, ...]]] = {
    "HNSW": _HNSW_BUILD,
    "HNSW_SQ": {**_HNSW_BUILD, "sq_type": ("SQ4U", "SQ6", "SQ8", "BF16", "FP16")},
    "IVF_FLAT": _IVF_BUILD,
    "IVF_SQ8": _IVF_BUILD,
}
SEARCH_PARAM_RULES: dict[str, dict[str, tuple[int, int] | tuple[str, ...]]] = {
    "HNSW": {"ef": (1, 32768)},
    "HNSW_SQ": {"ef": (1, 32768)},
    "IVF_FLAT": {"nprobe": (1, 65536)},
    "IVF_SQ8": {"nprobe": (1, 65536)},
}

TOKEN_ENV = "MILVUS_TOKEN"
USER_ENV = "MILVUS_USER"
PASSWORD_ENV = "MILVUS_PASSWORD"


def _metadata(
    help: str, *, choices: tuple[str, ...] | None = None, flag: str | None = None, pairs: bool = False
) -> dict[str, Any]:
    """What an option's command-line flag needs: `help`, allowed `choices`, a `flag` name other
    than --the-option-name, `pairs` for repeatable KEY=VALUE flags."""
    return {"help": help, "choices": choices, "flag": flag, "pairs": pairs}


def _option(default: Any, help: str, **flag: Any) -> Any:
    """A Config field and its flag's description (see `_metadata`)."""
    return field(default=default, metadata=_metadata(help, **flag))


@dataclass(frozen=True)
class Config:
    """Every option of ingest and query. Defaults are the documented configuration."""

    # Each option's help (`_option`) is also its command-line flag's help: one definition.
    uri: str = _option("./patchcore_milvus.db", "Milvus Lite file (*.db) or http(s)://host:port of a Milvus server.")
    # Transient faults (server restarting, unreachable) are retried with backoff for
    # `retry_seconds` before the error is reported.
    milvus_timeout: float = _option(60.0, "Seconds any Milvus call may take.")
    index_timeout: float = _option(3600.0, "Seconds flushing, index building and loading may take.")
    retry_seconds: float = _option(30.0, "Seconds transient Milvus faults are retried, with backoff.")
    tls_ca_cert: str | None = _option(None, "PEM certificate (CA or server) to trust for https:// URIs.")
    tls_client_cert: str | None = _option(None, "Mutual TLS: this station's PEM certificate.")
    tls_client_key: str | None = _option(None, "Mutual TLS: this station's PEM key.")
    tls_server_name: str | None = _option(None, "Name on the server's TLS certificate.")
    keep_versions: int = _option(3, "Bank versions kept per category (the current one included).")

    # Feature extractor.
    backbone: str = _option("efficientnet_lite0", "Pretrained CNN.", choices=BACKBONES)
    weights: str | None = _option(None, "Backbone weights file (state dict), or 'random' for tests.")
    # 384 px and a 1 % coreset: chosen on bottle and the magnetic tiles side by side (README,
    # "Choosing the defaults"); 256 px and 10 % before.
    image_size: int = _option(384, "Images are resized so that their short side has this size (square: both).")
    aspect: str = _option(
        "auto",
        "The shape images are resized to: 'square' (image_size squared), 'keep' (the training "
        "images' median aspect ratio, long side up to 4x), 'auto' (keep where the training images "
        "share one aspect ratio, square where they differ).",
        choices=ASPECTS,
    )
    center_crop: int | None = _option(None, "Centre crop after resizing (default: none).")
    tile: int | None = _option(
        None,
        "Run the network on overlapping tiles of this many pixels a side (a multiple of 16), "
        "for an image_size larger than that: a finer scale for small defects (default: whole images).",
    )
    normalization: str = _option("imagenet", "Input statistics.", choices=NORMALIZATIONS)
    target_dim: int | None = _option(None, "Pool patch features to this many dims.")
    border: str = _option(
        "zeros",
        "3x3 neighbourhood average at the image border: 'inside' averages only the pixels inside "
        "the image; 'zeros' counts the padding as zeros (anomalib's AvgPool2d).",
        choices=BORDERS,
    )

    # Coreset: `coreset_size` (an absolute count) wins over `coreset_ratio`.
    coreset_ratio: float = _option(0.01, "Fraction of patches kept in the bank.")
    coreset_size: int | None = _option(None, "Absolute coreset size (wins over ratio).")
    projection_dim: int = _option(128, "Coreset random projection dims.")
    seed: int = _option(0, "Seed of projection, coreset start and hold-out split.")

    # Milvus index; empty index params take the defaults for the index type. Empty search params
    # take the bank's own, chosen and checked against exact search at ingest.
    index_type: str = _option("HNSW", "Milvus index type.", choices=INDEX_TYPES, flag="--index")
    index_params: dict[str, Any] = field(
        default_factory=dict,
        metadata=_metadata("Index build parameter, e.g. M=32 (repeatable).", flag="--index-param", pairs=True),
    )
    search_params: dict[str, Any] = field(
        default_factory=dict,
        metadata=_metadata(
            "Search parameter, e.g. ef=128 (repeatable; default: the bank's own).", flag="--search-param", pairs=True
        ),
    )

    # Scoring.
    reweight: bool = _option(True, "Image-score re-weighting (eq. 7).")
    reweight_neighbors: int = _option(9, "b in the re-weighting.")
    blur_sigma: float = _option(4.0, "Map blur sigma at 256 px (scaled with size).")

    # Thresholds: calibrated on held-out good images at ingest unless given here.
    holdout_ratio: float = _option(0.1, "Good images held out for thresholds.")
    holdout_joins: bool = _option(
        True,
        "Held-out images take part in the coreset too, as in anomalib's bank of every good image; "
        "the thresholds come from scoring them against the bank without their own picks.",
    )
    threshold_sigma: float = _option(4.0, "Threshold margin in std devs.")
    image_threshold: float | None = _option(None, "Override the stored image threshold.")
    pixel_threshold: float | None = _option(None, "Override the stored pixel threshold.")

    strict: bool = _option(
        False, "Stop at the first unusable image (default: skip it, say why).", flag="--strict/--skip-bad"
    )

    # Runtime. `onnx`: ingest exports the extractor to ONNX and the bank carries it; queries run
    # the bank's model on ONNX Runtime. `torch`: the torch reference, built from the options.
    runtime: str = _option("onnx", "Where the extractor runs.", choices=RUNTIMES)
    # `milvus`: stations ask the shared index. `local`: each station searches its own replica of
    # the bank version (see replica.py); Milvus still holds, versions and publishes the banks.
    search: str = _option(
        "milvus", "Where patches are searched: the shared Milvus index, or a local replica.", choices=SEARCHES
    )
    batch_size: int = _option(8, "Images per batch.")
    num_threads: int | None = _option(
        None, "CPU threads for the extractor (default: half the cores on onnx, beside decoding or search; all, torch)."
    )
    progress: bool = _option(True, "Progress bars.")
    review_folder: str = _option(
        "./patchcore_review",
        "Folder of the review queue: parts a station called DEFECT that a person found good, "
        "kept to grow the bank (ingest --from-review).",
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check_values(self)

    @property
    def effective_index_params(self) -> dict[str, Any]:
        return {**DEFAULT_INDEX_PARAMS[self.index_type], **self.index_params}

    @property
    def effective_search_params(self) -> dict[str, Any]:
        """What ingest starts its search-width check from."""
        return {**DEFAULT_SEARCH_PARAMS[self.index_type], **self.search_params}

    @property
    def credentials(self) -> dict[str, str]:
        """Milvus credentials, read from the environment so that they never sit in a file or a flag:
        a token (`user:password` or an API key), or a user and password."""
        token = os.environ.get(TOKEN_ENV, "")
        if token:
            return {"token": token}
        user, password = os.environ.get(USER_ENV, ""), os.environ.get(PASSWORD_ENV, "")
        return {"user": user, "password": password} if user else {}

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def is_server_uri(uri: str) -> bool:
    """An http(s):// address of a Milvus server, as opposed to a Milvus Lite file."""
    return uri.startswith(("http://", "https://"))


def shown_uri(uri: str) -> str:
    """`uri` as it may be printed or logged: credentials written into it (`http://user:secret@host`)
    replaced by ***."""
    scheme, separator, rest = uri.partition("://")
    authority, slash, path = rest.partition("/")
    if not separator or "@" not in authority:
        return uri
    return f"{scheme}://***@{authority.rsplit('@', 1)[1]}{slash}{path}"


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Config from defaults, then the YAML file at `path`, then `overrides` (None = not given)."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_yaml(Path(path)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(option_names()))
    if unknown:
        where = f" in {path}" if path is not None else ""
        named = ", ".join(f"{name!r}{_did_you_mean(name, option_names())}" for name in unknown)
        raise ConfigError(f"unknown option(s){where}: {named}; valid options are: {', '.join(option_names())}")
    return Config(**values)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value")
    hints = typing.get_type_hints(Config)
    return {key: _exponent_number(value, hints.get(key)) for key, value in data.items()}


# YAML 1.1 (PyYAML) reads 1.0e9 or 1e-3 as text: it wants a sign in the exponent and a dot.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _exponent_number(value: Any, annotation: Any) -> Any:
    """A float option (its type `annotation`, None for an unknown key) written in exponent
    notation that YAML left as text, as the number meant."""
    numeric = isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()) is not None
    if numeric and annotation is not None and _accepts(1.5, annotation):
        return float(value)
    return value


def _accepts(value: Any, annotation: Any) -> bool:
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _check_types(config: Config) -> None:
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _accepts(value, hints[f.name]):
            expected = getattr(hints[f.name], "__name__", str(hints[f.name]))
            raise ConfigError(f"option {f.name} must be {expected}, got {value!r}")
        # NaN compares false with everything and infinity passes every lower bound: either would
        # let a threshold or a margin silently call every image OK.
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"option {f.name} must be a finite number, got {value!r}")


def check_params(kind: str, params: dict[str, Any], index_type: str) -> None:
    """Refuse parameter names the index type does not take and values outside their range.

    `kind`: "index" or "search"."""
    rules = (INDEX_PARAM_RULES if kind == "index" else SEARCH_PARAM_RULES)[index_type]
    option = f"{kind}_params"
    for name, value in params.items():
        if name not in rules:
            raise ConfigError(
                f"{option}: {index_type} takes no parameter {name!r}; valid names: {', '.join(rules)}"
                + _did_you_mean(name, list(rules))
            )
        rule = rules[name]
        if isinstance(rule[0], str):
            if value not in rule:
                raise ConfigError(f"{option}: {name} must be one of {', '.join(map(str, rule))}, got {value!r}")
        elif not isinstance(value, int) or isinstance(value, bool) or not rule[0] <= value <= rule[1]:
            raise ConfigError(f"{option}: {name} must be a whole number from {rule[0]} to {rule[1]}, got {value!r}")


def _did_you_mean(name: str, valid: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_values(c: Config) -> None:
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    require(c.search in SEARCHES, f"search must be one of {', '.join(SEARCHES)}, got {c.search!r}")
    require(c.runtime in RUNTIMES, f"runtime must be one of {', '.join(RUNTIMES)}, got {c.runtime!r}")
    require(c.backbone in BACKBONES, f"backbone must be one of {', '.join(BACKBONES)}, got {c.backbone!r}")
    require(
        c.normalization in NORMALIZATIONS,
        f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {c.normalization!r}",
    )
    require(c.border in BORDERS, f"border must be one of {', '.join(BORDERS)}, got {c.border!r}")
    require(c.aspect in ASPECTS, f"aspect must be one of {', '.join(ASPECTS)}, got {c.aspect!r}")
    require(0 <= c.seed < 2**32, f"seed must be a whole number from 0 to {2**32 - 1}, got {c.seed}")
    require(c.index_type in INDEX_TYPES, f"index_type must be one of {', '.join(INDEX_TYPES)}, got {c.index_type!r}")
    require(
        32 <= c.image_size <= MAX_IMAGE_SIZE,
        f"image_size must be from 32 to {MAX_IMAGE_SIZE} pixels, got {c.image_size} (larger inputs would "
        "need gigabytes per image before the first one is scored)",
    )
    require(
        c.center_crop is None or 32 <= c.center_crop <= c.image_size,
        f"center_crop must lie between 32 and image_size ({c.image_size}), got {c.center_crop}",
    )
    require(
        c.tile is None or (64 <= c.tile <= MAX_IMAGE_SIZE and c.tile % 16 == 0),
        f"tile must be a multiple of 16 from 64 to {MAX_IMAGE_SIZE} pixels, got {c.tile}",
    )
    require(
        c.tile is None or (c.image_size % 16 == 0 and (c.center_crop or 16) % 16 == 0),
        f"with tile, image_size and center_crop must be multiples of 16 (tiles lie on the backbone's "
        f"coarsest grid), got image_size {c.image_size}, center_crop {c.center_crop}",
    )
    require(
        c.target_dim is None or 0 < c.target_dim <= MAX_TARGET_DIM,
        f"target_dim must be from 1 to {MAX_TARGET_DIM}, got {c.target_dim}",
    )
    require(0 < c.coreset_ratio <= 1, f"coreset_ratio must be in (0, 1], got {c.coreset_ratio}")
    require(c.coreset_size is None or c.coreset_size > 0, f"coreset_size must be positive, got {c.coreset_size}")
    require(c.projection_dim > 0, f"projection_dim must be positive, got {c.projection_dim}")
    require(c.reweight_neighbors >= 1, f"reweight_neighbors must be at least 1, got {c.reweight_neighbors}")
    require(c.blur_sigma >= 0, f"blur_sigma must not be negative, got {c.blur_sigma}")
    require(0 <= c.holdout_ratio < 1, f"holdout_ratio must be in [0, 1), got {c.holdout_ratio}")
    require(c.threshold_sigma >= 0, f"threshold_sigma must not be negative, got {c.threshold_sigma}")
    require(c.batch_size >= 1, f"batch_size must be at least 1, got {c.batch_size}")
    require(
        c.num_threads is None or 1 <= c.num_threads <= MAX_THREADS,
        f"num_threads must be between 1 and {MAX_THREADS} (this machine has {os.cpu_count()} cores), "
        f"got {c.num_threads}",
    )
    require(c.milvus_timeout >= 0.1, f"milvus_timeout must be at least 0.1 seconds, got {c.milvus_timeout}")
    require(c.index_timeout > 0, f"index_timeout must be positive, got {c.index_timeout}")
    require(c.retry_seconds >= 0, f"retry_seconds must not be negative, got {c.retry_seconds}")
    require(c.keep_versions >= 1, f"keep_versions must be at least 1 (the current bank), got {c.keep_versions}")
    require(
        (c.tls_client_cert is None) == (c.tls_client_key is None),
        "tls_client_cert and tls_client_key go together (mutual TLS needs both)",
    )
    require(
        c.tls_client_cert is None or c.tls_ca_cert is not None,
        "mutual TLS (tls_client_cert) also needs tls_ca_cert, the CA that signed the server's certificate",
    )
    check_params("index", c.index_params, c.index_type)
    # Search parameters are checked against the bank's index type when a bank is opened; here,
    # against every type, so that a typo is refused before any work starts.
    for name, value in c.search_params.items():
        takes = [t for t, rules in SEARCH_PARAM_RULES.items() if name in rules]
        check_params("search", {name: value}, takes[0] if takes else c.index_type)
    require(
        is_server_uri(c.uri) or c.uri.endswith(".db"),
        f"uri must be http(s)://host:port for a Milvus server or a file path ending in .db "
        f"for embedded Milvus Lite, got {shown_uri(c.uri)!r}",
    )
