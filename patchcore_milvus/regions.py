"""Defect mask -> regions: what a line controller or an operator acts on, one entry per defect."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Region:
    """One connected component of the defect mask (8-connected), in the original image's pixels."""

    box: tuple[int, int, int, int]  # left, top, right, bottom; right and bottom exclusive
    area: int  # pixels
    peak: float  # the anomaly map's largest value inside it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def defect_regions(mask: np.ndarray | None, anomaly_map: np.ndarray) -> list[Region]:
    """The mask's connected components (H, W booleans; None: no pixel threshold, no regions),
    largest first."""
    if mask is None or not mask.any():
        return []
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    peaks = ndimage.maximum(anomaly_map, labels, index=np.arange(1, count + 1))
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    regions = [
        Region(
            box=(int(cols.start), int(rows.start), int(cols.stop), int(rows.stop)),
            area=int(area),
            peak=round(float(peak), 4),
        )
        for (rows, cols), area, peak in zip(ndimage.find_objects(labels), areas, np.atleast_1d(peaks))
    ]
    return sorted(regions, key=lambda region: -region.area)
