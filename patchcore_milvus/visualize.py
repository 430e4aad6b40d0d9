"""Pictures a person reads at a glance: the original beside a heat-map overlay with the defect outlined."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from patchcore_milvus.bank import Inspection
from patchcore_milvus.files import save_together

# Anchors of a blue -> cyan -> green -> yellow -> red map (like "jet"), interpolated linearly.
_COLORMAP = np.array([[0, 0, 143], [0, 112, 255], [0, 220, 160], [255, 230, 0], [230, 0, 0]], dtype=np.float64)
OK_COLOR, DEFECT_COLOR, OUTLINE_COLOR = (0, 150, 60), (210, 0, 0), (255, 0, 255)
TRUTH_COLOR = (0, 200, 255)  # the ground-truth outline on evaluate's sheet
# Each panel of the figure is drawn at most this many pixels on its longer side: outlining the
# defect of a 12,000 x 12,000 image at full size took over ten minutes. The map and the mask
# files keep the image's own size.
PANEL_SIDE = 1600


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8, shape (..., 3)."""
    position = np.clip(values, 0.0, 1.0) * (len(_COLORMAP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_COLORMAP) - 2)
    frac = (position - low)[..., None]
    return ((1 - frac) * _COLORMAP[low] + frac * _COLORMAP[low + 1]).round().astype(np.uint8)


def display_range(inspection: Inspection) -> tuple[float, float]:
    """Colours relative to the pixel threshold, so that every image shares one scale; red = well above it."""
    if inspection.pixel_threshold is not None:
        return 0.5 * inspection.pixel_threshold, 1.5 * inspection.pixel_threshold
    return float(inspection.anomaly_map.min()), float(inspection.anomaly_map.max())


def overlay_figure(inspection: Inspection, title: str | None = None, truth: np.ndarray | None = None) -> Image.Image:
    """Original | overlay side by side, under a caption (`title`, default the file name) with
    score, both thresholds and verdict, and a line with the colour bar (its fixed scale, the
    pixel threshold marked) and what the outline means; each panel at most PANEL_SIDE pixels on
    its longer side. `truth` (a boolean mask at the image's size): the ground truth, outlined on
    the original beside the predicted outline on the overlay, so that a miss shows at a glance."""
    image, overlay, outlined = _panels(inspection)
    if truth is not None and truth.shape != (image.height, image.width):
        resized = Image.fromarray(truth.astype(np.uint8) * 255).resize(image.size, Image.Resampling.NEAREST)
        truth = np.asarray(resized) > 0
    if truth is not None and truth.any():
        image = _outlined(image, truth, TRUTH_COLOR)
    font_size = max(14, image.width // 35)
    font = ImageFont.load_default(size=font_size)
    line = int(font_size * 1.8)
    figure = Image.new("RGB", (2 * image.width, image.height + 2 * line), "white")
    figure.paste(image, (0, 2 * line))
    figure.paste(overlay, (image.width, 2 * line))
    draw = ImageDraw.Draw(figure)
    verdict = inspection.verdict or "no threshold"
    name = title or Path(inspection.path).name
    text = (
        f"{name}   score {inspection.image_score:.2f} / image threshold {_number(inspection.image_threshold)}"
        f"   {verdict}   (pixel threshold {_number(inspection.pixel_threshold)})"
    )
    color = DEFECT_COLOR if verdict == "DEFECT" else OK_COLOR if verdict == "OK" else (0, 0, 0)
    draw.text((font_size // 2, font_size // 3), text, fill=color, font=font)
    _legend(draw, figure, inspection, display_range(inspection), outlined, truth is not None, line, font)
    return figure


def heat_overlay(inspection: Inspection, side: int = PANEL_SIDE) -> Image.Image:
    """The image with the anomaly map blended over it (colours on `display_range`) and the defect
    mask outlined, at most `side` pixels on its longer side: the picture of a web page."""
    return _panels(inspection, side)[1]


def _panels(inspection: Inspection, side: int = PANEL_SIDE) -> tuple[Image.Image, Image.Image, bool]:
    """(the image, its heat overlay, whether a defect is outlined), both at most `side` pixels on
    their longer side."""
    image, amap, mask = inspection.image, inspection.anomaly_map, inspection.mask
    scale = side / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
        amap = np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))
        if mask is not None:
            mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    low, high = display_range(inspection)
    normalised = (amap - low) / max(high - low, 1e-12)
    overlay = Image.blend(image, Image.fromarray(heat_colors(normalised)), 0.45)
    outlined = mask is not None and bool(mask.any())
    if outlined:
        overlay = _outlined(overlay, mask, OUTLINE_COLOR)
    return image, overlay, outlined


def _outlined(image: Image.Image, region: np.ndarray, color: tuple[int, int, int]) -> Image.Image:
    """`image` with the border of `region` (booleans, its size) drawn in `color`."""
    width = max(1, image.width // 300)
    mask = Image.fromarray(region.astype(np.uint8) * 255)
    edge = np.asarray(mask.filter(ImageFilter.MaxFilter(2 * width + 1))) != np.asarray(
        mask.filter(ImageFilter.MinFilter(2 * width + 1))
    )
    pixels = np.asarray(image).copy()
    pixels[edge] = color
    return Image.fromarray(pixels)


def _legend(
    draw: ImageDraw.ImageDraw,
    figure: Image.Image,
    inspection: Inspection,
    scale: tuple[float, float],
    outlined: bool,
    truth: bool,
    line: int,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
) -> None:
    """The second caption line: over the original, what the outlines mean; over the overlay, the
    colour bar from `scale`'s low to high end, with the pixel threshold marked."""
    half, size = figure.width // 2, int(font.size)
    top = line + size // 3
    box = max(2, size // 6)
    if truth:  # evaluate's sheet: both outlines named, briefly
        draw.rectangle((size // 2, top, size // 2 + size, top + size), outline=TRUTH_COLOR, width=box)
        draw.text((2 * size, top), "ground truth", fill=(0, 0, 0), font=font)
        left = 2 * size + int(draw.textlength("ground truth  ", font=font))
        draw.rectangle((left, top, left + size, top + size), outline=OUTLINE_COLOR, width=box)
        draw.text((left + 3 * size // 2, top), "predicted", fill=(0, 0, 0), font=font)
    elif outlined:
        draw.rectangle((size // 2, top, size // 2 + size, top + size), outline=OUTLINE_COLOR, width=box)
        draw.text((2 * size, top), "outline: map above the pixel threshold", fill=(0, 0, 0), font=font)
    elif inspection.verdict == "OK":
        draw.text((size // 2, top), "OK: no region outlined", fill=OK_COLOR, font=font)
    low, high = scale
    bar_left, bar_width = half + size // 2 + 3 * size, max(8, half // 2)
    bar = heat_colors(np.linspace(0.0, 1.0, bar_width))[None].repeat(size, axis=0)
    figure.paste(Image.fromarray(bar), (bar_left, top))
    draw.text((half + size // 2, top), f"{low:.1f}", fill=(0, 0, 0), font=font)
    marked = inspection.pixel_threshold is not None  # the scale is centred on it (display_range)
    right = f"{high:.1f}   | pixel threshold" if marked else f"{high:.1f}"
    draw.text((bar_left + bar_width + size // 2, top), right, fill=(0, 0, 0), font=font)
    if marked:
        middle = bar_left + bar_width // 2
        draw.line((middle, top - size // 4, middle, top + size + size // 4), fill=(0, 0, 0), width=max(2, size // 8))


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:.2f}"


def output_stems(paths: list[Path]) -> list[str]:
    """File-name stems, one per input and all different: the path below the inputs' common
    folder without its suffix, parts joined by '_' (`test/good/000.png` -> `good_000`).

    Where two inputs would share a stem (`img.png` beside `img.jpg`, `a_b/c.png` beside
    `a/b_c.png`), theirs keep the suffix and join parts with '__' (`img.png`, `a_b__c.png`);
    whatever still collides (the same file given twice) gets `-2`, `-3`, in input order. Built
    from path parts only, never containing a separator, so no input name can make an output land
    outside the output folder. Symbolic links are not followed: the name given is the name used.
    """
    absolute = [Path(os.path.abspath(p)) for p in paths]
    common = Path(os.path.commonpath([p.parent for p in absolute])) if absolute else Path("/")
    relative = [p.relative_to(common) for p in absolute]
    plain = ["_".join(r.with_suffix("").parts) for r in relative]
    counts = Counter(plain)
    stems = [stem if counts[stem] == 1 else "__".join(r.parts) for stem, r in zip(plain, relative)]
    seen: Counter[str] = Counter()
    unique = []
    for stem in stems:
        seen[stem] += 1
        unique.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return unique


def write_outputs(out_dir: Path, stem: str, inspection: Inspection) -> list[Path]:
    """The raw map (.npy, float32), the overlay figure (PNG) and the binary mask (PNG, 0/255),
    saved together: all or none of them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[tuple[Path, Callable[[str], object]]] = [
        (out_dir / f"{stem}_map.npy", lambda p: np.save(p, inspection.anomaly_map.astype(np.float32))),
        (out_dir / f"{stem}_overlay.png", lambda p: overlay_figure(inspection).save(p, format="PNG")),
    ]
    if inspection.mask is not None:
        pixels = Image.fromarray(inspection.mask.astype(np.uint8) * 255)
        files.append((out_dir / f"{stem}_mask.png", lambda p: pixels.save(p, format="PNG")))
    save_together(files)
    return [path for path, _ in files]
