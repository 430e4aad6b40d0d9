"""The bank's format: what a version records about itself, defined here and only here.

A version's description is stored beside its vectors (see milvus/rows.py) as JSON; these typed
objects are what the rest of the package reads. `SCHEMA` counts format changes: 1 added the
measured search widths, 2 the extractor model, 3 the held-out images in the bank, 4 dropped the
recheck width (stations recheck exactly), 5 the input shape of banks whose images are not
square, 6 the tile size of tiled extraction; older descriptions are read with those left out.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from patchcore_milvus.ann_check import SearchWidths

SCHEMA = 6

# How patch features are aggregated (PatchCore eq. 2): recorded, so a query can be held to it.
AGGREGATION = "avg_pool 3x3 stride 1, coarse map bilinear to the stride-8 grid, concat"


def aggregation(border: str) -> str:
    """The description's aggregation line: the border treatment of the 3x3 average named where
    it is the zero padding (banks without that suffix averaged only inside the image)."""
    return AGGREGATION if border == "inside" else f"{AGGREGATION}, border padding counted as zeros"


class NewerSchemaError(ValueError):
    """A description from a later release of this package, which this one cannot read safely."""


@dataclass(frozen=True)
class ExtractorDescription:
    """What turns an image into patch features; a query must use exactly the same."""

    backbone: str
    weights_sha256: str
    layers: list[str]
    image_size: int
    center_crop: int | None
    normalization: dict[str, list[float]]  # {"mean": [r, g, b], "std": [r, g, b]}
    aggregation: str
    target_dim: int | None
    dim: int
    # [height, width] every image is resized to; None: image_size squared (and before schema 5).
    image_shape: list[int] | None = None
    # The side of the tiles the network runs on (tiling.py); None: whole images (and before schema 6).
    tile: int | None = None

    @property
    def shape(self) -> tuple[int, int] | None:
        """`image_shape` as (height, width), None for a square bank."""
        return None if self.image_shape is None else (self.image_shape[0], self.image_shape[1])

    def differences(self, query: ExtractorDescription) -> list[str]:
        """The settings that differ from a query's, as readable lines."""
        ours, theirs = asdict(self), asdict(query)
        different = [key for key in ours if ours[key] != theirs[key]]
        return [f"{key}: bank has {ours[key]!r}, this query uses {theirs[key]!r}" for key in different]


@dataclass(frozen=True)
class ExtractorModel:
    """The extractor as the bank carries it (rows of its `extractor` partition)."""

    format: str  # "onnx"
    sha256: str
    bytes: int


@dataclass(frozen=True)
class CoresetDescription:
    projection_dim: int
    projection_seed: int
    ratio: float
    size: int  # vectors in the bank
    patches: int  # training patches they were chosen from
    radius: float | None = None  # covering radius in the projection; None in banks from before `--append`


@dataclass(frozen=True)
class IndexDescription:
    type: str
    params: dict[str, Any]


@dataclass(frozen=True)
class TrainingImages:
    """One ingest's (or append's) images: their root and the names, relative to it, in the bank."""

    root: str
    bank: list[str]
    far_patches: int | None = None  # append: new patches beyond the bank's covering radius
    added: int | None = None  # append: vectors added


@dataclass(frozen=True)
class HeldOutImage:
    image: str  # name relative to its root
    path: str  # where it was read
    score: float  # image score
    map_max: float  # largest anomaly-map value
    in_bank: bool = False  # its patches took part in the bank's coreset (holdout_joins; schema 3)


@dataclass(frozen=True)
class Thresholds:
    image: float | None  # None: no held-out images
    pixel: float | None
    rule: str
    sigma: float
    holdout: list[HeldOutImage]
    skipped: list[str] = field(default_factory=list)  # held-out files that could not be read
    # Bank vectors picked from the held-out images, left out of the bank these thresholds were set
    # against; None: the held-out images stayed out of the bank (holdout_joins false, or schema < 3).
    joined: int | None = None


@dataclass(frozen=True)
class BankDescription:
    category: str
    package_version: str
    created: str  # UTC, ISO 8601
    origin: str  # "ingest" or "append to <version>"
    extractor: ExtractorDescription
    coreset: CoresetDescription
    index: IndexDescription
    training_images: list[TrainingImages]
    search: SearchWidths | None = None  # None before schema 1
    thresholds: Thresholds | None = None  # set at ingest before the version is stored
    extractor_model: ExtractorModel | None = None  # None before schema 2, or ingested on the torch runtime
    schema: int = SCHEMA

    def to_json(self) -> str:
        """ASCII JSON, which fits any VARCHAR encoding."""
        return json.dumps(asdict(self), ensure_ascii=True)

    @classmethod
    def from_json(cls, text: str) -> BankDescription:
        """Raises ValueError (or KeyError/TypeError) for JSON that is not a description."""
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
        if values.get("schema", 0) > SCHEMA:
            raise NewerSchemaError(
                f"written by a newer patchcore-milvus (description schema {values['schema']}, this one reads up to "
                f"{SCHEMA}); upgrade patchcore-milvus at this station"
            )
        thresholds = values.get("thresholds")
        return cls(
            category=values["category"],
            package_version=values["package_version"],
            created=values["created"],
            origin=values["origin"],
            extractor=ExtractorDescription(**values["extractor"]),
            coreset=CoresetDescription(**values["coreset"]),
            index=IndexDescription(**values["index"]),
            training_images=[TrainingImages(**part) for part in values["training_images"]],
            search=SearchWidths.from_dict(values["search"]) if values.get("search") else None,
            thresholds=None
            if thresholds is None
            else Thresholds(**{**thresholds, "holdout": [HeldOutImage(**entry) for entry in thresholds["holdout"]]}),
            extractor_model=ExtractorModel(**values["extractor_model"]) if values.get("extractor_model") else None,
            schema=values.get("schema", 0),
        )
