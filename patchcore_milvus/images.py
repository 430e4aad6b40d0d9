"""Image files in, normalised network input out: any mode, size or orientation becomes RGB."""

from __future__ import annotations

import io
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from patchcore_milvus.errors import ImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

NORMALIZATION_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files inside `folder` (and its subfolders if `recursive`), sorted so that runs are
    reproducible."""
    return scan_folder(folder, recursive)[0]


def scan_folder(folder: Path, recursive: bool = False) -> tuple[list[Path], str | None]:
    """`list_images`' files, and in the same pass what it leaves out, counted by reason (None if
    nothing): so that a folder given as input never loses files in silence."""
    if not folder.is_dir():
        raise ImageError(f"{folder} is not a folder")
    images: list[Path] = []
    reasons: Counter[tuple[str, str]] = Counter()  # (one, many)
    for entry in folder.rglob("*") if recursive else folder.iterdir():
        if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            images.append(entry)
        elif entry.is_symlink() and not entry.exists():
            reasons["broken or looping symbolic link", "broken or looping symbolic links"] += 1
        elif entry.is_dir():
            if not recursive:
                reasons["subfolder (not searched)", "subfolders (not searched)"] += 1
        elif not entry.is_file():
            reasons["entry that is not a regular file", "entries that are not regular files"] += 1
        else:
            kind, takes = entry.suffix.lower() or "suffix-less", f"(not {', '.join(IMAGE_SUFFIXES)})"
            reasons[f"{kind} file {takes}", f"{kind} files {takes}"] += 1
    left_out = None
    if reasons:
        counted = "; ".join(f"{count} {one if count == 1 else many}" for (one, many), count in sorted(reasons.items()))
        left_out = f"left out of {folder}: {counted}"
    return sorted(images), left_out


# Fewer pixels than this on a side carry less detail than the patch grid of a 256 px input (32).
MIN_SIDE = 32


def load_rgb(path: Path) -> Image.Image:
    """Read any image PIL understands as 8-bit RGB, with EXIF orientation applied.

    Anything else is an ImageError with the reason: unreadable, truncated, not an image,
    too small, or so large that decoding it would exhaust memory (PIL's decompression-bomb
    limit, checked from the header before any pixel is decoded). Only regular files are opened:
    reading a FIFO or a device could block forever."""
    if not Path(path).is_file():
        what = "does not exist" if not Path(path).exists() else "is not a regular file"
        raise ImageError(f"{path}: {what}")
    return _read_rgb(path, str(path))


def decode_rgb(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """`load_rgb` for an image's bytes (an upload), `name` in the messages; more than
    `max_pixels` is refused before any pixel is decoded."""
    return _read_rgb(io.BytesIO(data), name, max_pixels)


def _read_rgb(source: Path | io.BytesIO, path: str, max_pixels: int | None = None) -> Image.Image:
    """`path`: what messages call the image."""
    try:
        with Image.open(source) as opened:
            width, height = opened.size
            if min(width, height) < MIN_SIDE:
                raise ImageError(f"{path}: {width}x{height} pixels is too small (at least {MIN_SIDE} on each side)")
            if max_pixels is not None and width * height > max_pixels:
                raise ImageError(f"{path}: {width}x{height} pixels is more than this service takes ({max_pixels:,})")
            frames = getattr(opened, "n_frames", 1)
            if frames > 1:
                raise ImageError(
                    f"{path}: holds {frames} frames (an animation or a multi-page file); only single images "
                    "are scored: save the frame you mean as its own file"
                )
            image = ImageOps.exif_transpose(opened)
            image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: refused, too large to decode safely ({exc})") from exc
    except MemoryError:
        raise
    except PermissionError as exc:
        raise ImageError(f"{path}: this user may not read it ({exc.strerror}); check its permissions") from exc
    except UnidentifiedImageError as exc:
        known = ", ".join(IMAGE_SUFFIXES)
        raise ImageError(f"{path}: not a readable image (no image format PIL knows; these are read: {known})") from exc
    except Exception as exc:  # PIL's plugins raise anything on a damaged file: TypeError, KeyError, ...
        raise ImageError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
    return _to_rgb(image, path)


def _to_rgb(image: Image.Image, path: str) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float grey: stretch the value range to 8 bits instead of clipping it.
        values = np.asarray(image, dtype=np.float64)
        bad = int((~np.isfinite(values)).sum())
        if bad:  # one NaN would make the whole stretched image black
            raise ImageError(f"{path}: {bad} pixels are not finite numbers (NaN or infinity)")
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
        image = Image.fromarray(scaled.round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


# How far the training images' aspect ratios may spread for `aspect: auto` to keep theirs: 90 % of
# them within 10 % of the median. Beyond that (e.g. magnetic tiles from 0.4 to 2.5) one shape
# would distort many images more than the square does.
SHARED_ASPECT_SPREAD = 1.1
SHARED_ASPECT_SHARE = 0.9
# Nearer to square than this, an image stays square; farther than 4:1, its long side is capped
# (four times the patches of a square input already).
SQUARE_WITHIN = 1.05
MAX_ASPECT = 4.0


def aspect_ratio(path: Path) -> float | None:
    """Width / height as `load_rgb` would orient the image (EXIF rotations swap the sides), from
    the file's header alone; None for a file that is not a readable image (ingest says why later)."""
    if not Path(path).is_file():  # a FIFO could block; load_rgb reports what it is
        return None
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if opened.format == "PNG":
                # PIL's PNG getexif() decodes the whole image to look for EXIF after the pixels
                # (`python benchmarks/aspect_read.py`); the base class reads what came before them
                # (an eXIf chunk, a raw EXIF profile, XMP), and the chunk headers say the rest.
                orientation = Image.Image.getexif(opened).get(0x0112) or _png_orientation(path)
            else:
                orientation = opened.getexif().get(0x0112)
            if orientation in (5, 6, 7, 8):  # turned by 90 degrees
                width, height = height, width
    except Exception:  # anything PIL raises for a damaged file; load_rgb reports it
        return None
    return width / height if width > 0 and height > 0 else None


def _png_orientation(path: Path) -> int | None:
    """The EXIF orientation in a PNG's eXIf chunk wherever it is, reading chunk headers only (the
    pixel data is skipped)."""
    with open(path, "rb") as file:
        file.seek(8)  # the signature
        while len(header := file.read(8)) == 8:
            length, kind = struct.unpack(">I4s", header)
            if kind == b"eXIf":
                exif = Image.Exif()
                exif.load(file.read(length))
                return exif.get(0x0112)
            if kind == b"IEND":
                break
            file.seek(length + 4, 1)  # the data and its CRC
    return None


def input_shape(ratios: list[float], image_size: int, aspect: str) -> tuple[int, int] | None:
    """(height, width) every image of a bank is resized to, None for `image_size` squared.

    `aspect`: "square"; "keep" the median width/height of `ratios` (the training images): short
    side `image_size`, long side in proportion (a multiple of 16, the backbone's coarsest stride,
    at most `MAX_ASPECT` times the short one); "auto" keeps it only where the ratios agree
    (`SHARED_ASPECT_SHARE` of them within `SHARED_ASPECT_SPREAD` of the median)."""
    if aspect == "square" or not ratios:
        return None
    logs = np.log(np.asarray(ratios, dtype=np.float64))
    median = float(np.median(logs))
    if aspect == "auto" and (np.abs(logs - median) <= np.log(SHARED_ASPECT_SPREAD)).mean() < SHARED_ASPECT_SHARE:
        return None
    if abs(median) <= np.log(SQUARE_WITHIN):
        return None
    long = max(image_size, round(image_size * min(float(np.exp(abs(median))), MAX_ASPECT) / 16) * 16)
    return (image_size, long) if median > 0 else (long, image_size)


@dataclass(frozen=True)
class Preprocess:
    """Resize (no crop by default, so that defects at the border stay in view), crop, normalise.

    Every image is resized to `shape` (height, width), `image_size` squared by default; the
    centre crop takes `image_size - center_crop` pixels off each axis."""

    image_size: int
    center_crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    shape: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) after resizing."""
        return self.shape or (self.image_size, self.image_size)

    @property
    def crop(self) -> tuple[int, int] | None:
        """(height, width) kept at the centre, None without a crop."""
        if self.center_crop is None:
            return None
        margin = self.image_size - self.center_crop
        return self.size[0] - margin, self.size[1] - margin

    @property
    def input_shape(self) -> tuple[int, int]:
        """(height, width) of the network input."""
        return self.crop or self.size

    def __call__(self, image: Image.Image) -> np.ndarray:
        """(3, height, width) of `input_shape`, float32."""
        height, width = self.size
        resized = image.resize((width, height), Image.Resampling.BILINEAR)
        if self.crop is not None:
            top, left = (height - self.crop[0]) // 2, (width - self.crop[1]) // 2
            resized = resized.crop((left, top, left + self.crop[1], top + self.crop[0]))
        array = np.asarray(resized, dtype=np.float32) / np.float32(255.0)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(((array - mean) / std).transpose(2, 0, 1))
