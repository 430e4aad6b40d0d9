"""Large inputs through the extractor in overlapping tiles (`tile`): small defects on large images.

An image resized to a large `image_size` (a finer scale: each patch covers fewer of its pixels)
goes through the network tile by tile, each `tile` pixels a side (e.g. 256, anomalib's input).
Neighbouring tiles overlap by at least twice a margin, and each patch of the stitched
grid comes from the tile whose own border lies farthest from it, so no patch is taken from next
to a tile's edge, where the network's zero padding shows. The stitched grid has the patches the
whole input would have (H/8, W/8), so the bank, the search and the maps go on as for any input.
Memory stays that of one batch of tiles, and the exported model has the tile's shape.

Tile origins are multiples of 16, the coarsest stride, so that both stages' grids align.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import numpy as np

ALIGN = 16  # the backbone's coarsest stride
STRIDE = 8  # input pixels per patch


def margin(tile: int) -> int:
    """Input pixels next to each tile edge whose patches are not kept where another tile has them:
    an eighth of the tile rounded down to a multiple of 16, at least 16 (32 for 256-pixel tiles)."""
    return max(ALIGN, tile // 8 // ALIGN * ALIGN)


def axis_tiles(length: int, tile: int) -> list[tuple[int, int, int]]:
    """Tiles along one axis of `length` input pixels (a multiple of 16): (origin, first, end), the
    tile covering [origin, origin + tile) and supplying the patches of [first, end). One tile where
    `length` <= `tile`; else the fewest tiles, spread evenly from one end to the other, that overlap
    by at least twice the margin."""
    if length <= tile:
        return [(0, 0, length)]
    step = tile - 2 * margin(tile)  # the farthest apart two neighbouring tiles may lie
    count = -(-(length - tile) // step) + 1
    # Even spacing is at most `step`; rounding down to the 16 grid keeps it so, as `step` is a multiple of 16.
    origins = [i * (length - tile) // (count - 1) // ALIGN * ALIGN for i in range(count)]
    # Where two tiles overlap, the boundary lies in the middle of the overlap (on the patch grid).
    cuts = [(a + tile + b) // 2 // STRIDE * STRIDE for a, b in pairwise(origins)]
    return list(zip(origins, [0, *cuts], [*cuts, length]))


def tile_shape(input_shape: tuple[int, int], tile: int) -> tuple[int, int]:
    """(height, width) the network sees: the tile, or the input where it is smaller."""
    return min(input_shape[0], tile), min(input_shape[1], tile)


def run_tiled(run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, tile: int) -> np.ndarray:
    """(B, 3, H, W) -> (B, H/8, W/8, D): `run`, the extractor on (B, 3, th, tw) tiles, over each
    tile position of the batch in turn, stitched."""
    b, _, height, width = batch.shape
    if height % ALIGN or width % ALIGN:
        raise ValueError(f"tiled inputs need sides that are multiples of {ALIGN}, got {height} x {width}")
    th, tw = tile_shape((height, width), tile)
    out: np.ndarray | None = None
    for oy, y0, y1 in axis_tiles(height, tile):
        for ox, x0, x1 in axis_tiles(width, tile):
            features = run(np.ascontiguousarray(batch[:, :, oy : oy + th, ox : ox + tw]))
            if out is None:
                out = np.empty((b, height // STRIDE, width // STRIDE, features.shape[-1]), dtype=features.dtype)
            out[:, y0 // STRIDE : y1 // STRIDE, x0 // STRIDE : x1 // STRIDE] = features[
                :, (y0 - oy) // STRIDE : (y1 - oy) // STRIDE, (x0 - ox) // STRIDE : (x1 - ox) // STRIDE
            ]
    assert out is not None
    return out
