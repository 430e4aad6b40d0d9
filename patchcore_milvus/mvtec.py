"""The MVTec AD folder layout, known here and nowhere else:

    DATA_ROOT/<category>/train/good/*.png                     defect-free training images
    DATA_ROOT/<category>/test/<good | defect type>/*.png      test images, labelled by folder
    DATA_ROOT/<category>/ground_truth/<defect type>/<name>_mask.png

The CLI, `evaluate` and the benchmarks read data sets through these functions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from patchcore_milvus.errors import ImageError
from patchcore_milvus.images import list_images, load_rgb

GOOD = "good"


def train_folder(data_root: Path, category: str) -> Path:
    """`DATA_ROOT/<category>/train/good`, or a clear error naming the layout."""
    folder = data_root / category / "train" / GOOD
    if not folder.is_dir():
        raise ImageError(
            f"{folder} does not exist: DATA_ROOT must hold <category>/train/good/ (the MVTec AD layout); "
            "for any other folder of good images use --images DIR"
        )
    return folder


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    defect: str  # "good" or the defect type (the folder name)
    mask_path: Path | None  # None for good images, and for defect images labelled without a mask

    @property
    def has_truth(self) -> bool:
        """Whether its pixels are labelled: a good image's are all good; a defect image needs a mask."""
        return self.defect == GOOD or self.mask_path is not None


def labelled_test_images(category_root: Path, strict_masks: bool = False) -> list[LabelledImage]:
    """`<category>/test/<defect>/*.png` with masks at `<category>/ground_truth/<defect>/<name>_mask.png`.

    A defect image without a mask is labelled by its folder alone (most factories never draw
    masks); `strict_masks` refuses it instead."""
    test_root = category_root / "test"
    if not test_root.is_dir():
        raise ImageError(f"{test_root} does not exist: expected the MVTec AD layout <category>/test/<defect>/")
    images = []
    for folder in sorted(p for p in test_root.iterdir() if p.is_dir()):
        for path in list_images(folder):
            mask: Path | None = category_root / "ground_truth" / folder.name / f"{path.stem}_mask.png"
            if folder.name == GOOD or not mask.exists():
                if strict_masks and folder.name != GOOD:
                    raise ImageError(
                        f"{path} has no ground-truth mask at {mask} (without --strict-masks, defect images "
                        "without masks count for the image metrics only)"
                    )
                mask = None
            images.append(LabelledImage(path, folder.name, mask))
    if not images or all(i.defect == GOOD for i in images) or all(i.defect != GOOD for i in images):
        raise ImageError(f"{test_root} needs both good/ and defect folders with images")
    return images


def ground_truth(image: LabelledImage, size: int | tuple[int, int]) -> np.ndarray | None:
    """The image's defect mask as booleans, resized to `size` x `size` or to `size` = (width,
    height) (all False for a good image; None for a defect image without a mask)."""
    if not image.has_truth:
        return None
    width, height = (size, size) if isinstance(size, int) else size
    if image.mask_path is None:
        return np.zeros((height, width), dtype=bool)
    mask = load_rgb(image.mask_path).convert("L")  # a damaged mask is an ImageError naming it
    return np.asarray(mask.resize((width, height), Image.Resampling.NEAREST)) > 0
