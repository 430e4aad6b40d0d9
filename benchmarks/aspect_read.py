"""Reading the training images' aspect ratios (what `aspect: auto` and `keep` decide on) before
any pixel is decoded: `images.aspect_ratio` against PIL's own `getexif()`, which decodes a whole
PNG to look for EXIF stored after its pixels.

    python benchmarks/aspect_read.py   # bottle's 209 training images
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from PIL import Image

from patchcore_milvus.images import aspect_ratio, list_images


def pil_orientation(path: Path) -> int | None:
    with Image.open(path) as opened:
        return opened.getexif().get(0x0112)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=Path("../shared/data/mvtec_ad/bottle/train/good"))
    args = parser.parse_args()
    paths = list_images(args.images)
    start = time.perf_counter()
    for path in paths:
        aspect_ratio(path)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    for path in paths:
        pil_orientation(path)
    theirs = time.perf_counter() - start
    print(f"{len(paths)} images: aspect_ratio {ours:.2f} s, PIL getexif() {theirs:.2f} s ({theirs / ours:.0f}x)")


if __name__ == "__main__":
    main()
