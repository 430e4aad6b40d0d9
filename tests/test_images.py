import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from patchcore_milvus.errors import ImageError
from patchcore_milvus.images import (
    NORMALIZATION_STATS,
    Preprocess,
    aspect_ratio,
    input_shape,
    list_images,
    load_rgb,
    scan_folder,
)


def save(tmp_path: Path, image: Image.Image, name: str) -> Path:
    path = tmp_path / name
    image.save(path)
    return path


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (50, 32), 128),
        Image.new("RGBA", (40, 40), (255, 0, 0, 128)),
        Image.new("P", (33, 41), 3),
        Image.new("CMYK", (40, 40), (0, 255, 0, 0)),
        Image.fromarray(np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)),
    ],
    ids=["grey", "rgba", "palette", "cmyk", "16bit"],
)
def test_every_mode_becomes_rgb(tmp_path: Path, image: Image.Image):
    suffix = ".jpg" if image.mode == "CMYK" else ".png"
    loaded = load_rgb(save(tmp_path, image, f"x{suffix}"))
    assert loaded.mode == "RGB"
    assert loaded.size == image.size


def test_sixteen_bit_keeps_its_value_range(tmp_path: Path):
    ramp = np.linspace(1000, 3000, 64 * 64).astype(np.uint16).reshape(64, 64)
    loaded = np.asarray(load_rgb(save(tmp_path, Image.fromarray(ramp), "ramp.png")))
    assert loaded.min() == 0 and loaded.max() == 255


def test_exif_rotation_is_applied(tmp_path: Path):
    image = Image.new("RGB", (90, 40), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_rgb(path).size == (40, 90)


def test_unreadable_file_raises_a_clear_error(tmp_path: Path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image")
    with pytest.raises(ImageError, match=r"notes\.png: not a readable image"):
        load_rgb(path)


def test_a_fifo_or_a_folder_is_refused_at_once_never_waited_on(tmp_path: Path):
    fifo = tmp_path / "camera.png"
    os.mkfifo(fifo)  # opening it for reading would block until someone writes
    with pytest.raises(ImageError, match=r"camera\.png: is not a regular file"):
        load_rgb(fifo)
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImageError, match=r"folder\.png: is not a regular file"):
        load_rgb(tmp_path / "folder.png")
    with pytest.raises(ImageError, match=r"gone\.png: does not exist"):
        load_rgb(tmp_path / "gone.png")


def test_any_size_and_aspect_ratio_gives_the_configured_input():
    mean, std = NORMALIZATION_STATS["imagenet"]
    preprocess = Preprocess(image_size=64, center_crop=None, mean=mean, std=std)
    tensor = preprocess(Image.new("RGB", (300, 17), (124, 116, 104)))
    assert tensor.shape == (3, 64, 64)
    # ImageNet's mean colour normalises to about zero.
    assert np.allclose(tensor, 0.0, atol=0.01) and tensor.dtype == np.float32
    cropped = Preprocess(image_size=64, center_crop=48, mean=mean, std=std)
    assert cropped(Image.new("RGB", (10, 99))).shape == (3, 48, 48)


def test_a_bank_shape_keeps_the_training_images_aspect_ratio_where_they_share_one():
    assert input_shape([1.0] * 5, 256, "auto") is None  # square stays square
    assert input_shape([2.5] * 5, 256, "auto") == (256, 640)  # 1250 x 500: the patch grid follows
    assert input_shape([0.4] * 5, 256, "keep") == (640, 256)  # portrait
    assert input_shape([1.33, 1.34, 1.33], 256, "auto") == (256, 336)  # 4:3, long side a multiple of 16
    assert input_shape([9.0] * 3, 256, "keep") == (256, 1024)  # at most 4:1
    assert input_shape([2.5] * 5, 256, "square") is None
    spread = [0.4, 0.6, 0.8, 0.84, 1.3, 1.6, 2.5]  # magnetic tiles: no shape fits them all
    assert input_shape(spread, 256, "auto") is None
    assert input_shape(spread, 256, "keep") == (304, 256)  # their median, 0.84


def test_the_aspect_ratio_is_read_from_the_header_as_load_rgb_turns_the_image(tmp_path: Path):
    save(tmp_path, Image.new("RGB", (300, 100)), "wide.png")
    turned = Image.new("RGB", (300, 100))
    exif = turned.getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    turned.save(tmp_path / "turned.jpg", exif=exif)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert aspect_ratio(tmp_path / "wide.png") == 3.0
    assert aspect_ratio(tmp_path / "turned.jpg") == pytest.approx(1 / 3)
    assert load_rgb(tmp_path / "turned.jpg").size == (100, 300)
    assert aspect_ratio(tmp_path / "broken.png") is None


def test_a_png_s_exif_orientation_counts_before_or_after_its_pixels(tmp_path: Path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    Image.new("RGB", (300, 100)).save(tmp_path / "before.png", exif=exif)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (300, 100)).save(plain)
    data = plain.read_bytes()
    payload = exif.tobytes()[6:] if exif.tobytes().startswith(b"Exif\x00\x00") else exif.tobytes()
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    end = data.rindex(b"IEND") - 4  # the IEND chunk's length field
    (tmp_path / "after.png").write_bytes(data[:end] + chunk + data[end:])
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    Image.new("RGB", (300, 100)).save(tmp_path / "xmp.png", pnginfo=_text_chunk("XML:com.adobe.xmp", xmp))
    for name in ("before.png", "after.png", "xmp.png"):
        assert load_rgb(tmp_path / name).size == (100, 300)
        assert aspect_ratio(tmp_path / name) == pytest.approx(1 / 3)
    assert aspect_ratio(plain) == 3.0


def _text_chunk(key: str, value: bytes):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(key, value.decode())
    return info


def test_the_aspect_ratio_of_a_png_is_read_without_decoding_its_pixels(tmp_path: Path, monkeypatch):
    from PIL import PngImagePlugin

    Image.new("RGB", (300, 100)).save(tmp_path / "wide.png")

    def refuse(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", refuse)
    assert aspect_ratio(tmp_path / "wide.png") == 3.0


def test_a_non_square_shape_resizes_and_crops_each_axis():
    mean, std = NORMALIZATION_STATS["imagenet"]
    wide = Preprocess(image_size=64, center_crop=None, mean=mean, std=std, shape=(64, 160))
    assert wide(Image.new("RGB", (500, 200))).shape == (3, 64, 160) and wide.input_shape == (64, 160)
    cropped = Preprocess(image_size=64, center_crop=48, mean=mean, std=std, shape=(64, 160))
    assert cropped.input_shape == (48, 144) and cropped(Image.new("RGB", (500, 200))).shape == (3, 48, 144)


def test_list_images_is_sorted_and_filters_by_suffix(tmp_path: Path):
    for name in ["b.png", "a.JPG", "c.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png"]
    with pytest.raises(ImageError, match="is not a folder"):
        list_images(tmp_path / "missing")


def test_truncated_empty_tiny_and_huge_files_are_refused_with_the_reason(tmp_path: Path, monkeypatch):
    whole = save(tmp_path, Image.effect_noise((200, 200), 60).convert("RGB"), "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    save(tmp_path, Image.new("RGB", (31, 200)), "tiny.png")
    with pytest.raises(ImageError, match=r"truncated\.png: not a readable image"):
        load_rgb(tmp_path / "truncated.png")
    with pytest.raises(ImageError, match=r"empty\.jpg: not a readable image"):
        load_rgb(tmp_path / "empty.jpg")
    with pytest.raises(ImageError, match=r"31x200 pixels is too small \(at least 32"):
        load_rgb(tmp_path / "tiny.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 200 x 200 is then a decompression bomb
    with pytest.raises(ImageError, match="too large to decode safely"):
        load_rgb(tmp_path / "whole.png")


_SEEDS = {}


def _valid_files() -> dict[str, bytes]:
    """A small valid image in each format, to mutate."""
    if not _SEEDS:
        import io

        picture = Image.effect_noise((48, 40), 50).convert("RGB")
        for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF"):
            buffer = io.BytesIO()
            picture.save(buffer, format=fmt)
            _SEEDS[fmt] = buffer.getvalue()
    return _SEEDS


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    fmt=st.sampled_from(["PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "random"]),
    cut=st.integers(min_value=0, max_value=4000),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=4000), st.integers(0, 255)), max_size=8),
    noise=st.binary(max_size=512),
)
def test_fuzzed_bytes_give_an_image_or_the_clear_error_never_a_crash(tmp_path: Path, fmt, cut, flips, noise):
    data = bytearray(noise if fmt == "random" else _valid_files()[fmt])
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    if fmt != "random" and cut:
        data = data[: max(0, len(data) - cut % (len(data) + 1))]
    path = tmp_path / "fuzzed.img"
    path.write_bytes(bytes(data))
    try:
        image = load_rgb(path)
    except ImageError as error:
        assert str(error).startswith(f"{path}: ")
    else:
        assert image.mode == "RGB" and min(image.size) >= 32


def test_a_tiff_without_its_size_tags_is_a_clear_error(tmp_path: Path):
    # Found by the fuzzer in CI: PIL raises TypeError("Missing dimensions") for it, not OSError.
    data = bytearray(_valid_files()["TIFF"])
    data[130] = 1
    path = tmp_path / "damaged.tif"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=r"damaged\.tif: not a readable image \(TypeError"):
        load_rgb(path)


def test_a_multi_frame_file_is_refused_not_cut_to_its_first_frame(tmp_path: Path):
    frames = [Image.new("RGB", (40, 40), (k * 80, 0, 0)) for k in range(3)]
    path = tmp_path / "stack.tif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="holds 3 frames"):
        load_rgb(path)


def test_a_float_image_with_nan_pixels_is_refused_not_made_black(tmp_path: Path):
    values = np.linspace(0, 1, 40 * 40, dtype=np.float32).reshape(40, 40)
    values[3, 4] = np.nan
    path = save(tmp_path, Image.fromarray(values, mode="F"), "float.tif")
    with pytest.raises(ImageError, match="1 pixels are not finite"):
        load_rgb(path)


def test_left_out_names_each_kind_of_entry_a_folder_listing_skips(tmp_path: Path):
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "b.gif")
    (tmp_path / "notes").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    assert list_images(tmp_path) == [tmp_path / "a.png"]
    images, message = scan_folder(tmp_path)
    assert images == [tmp_path / "a.png"]
    assert message is not None and message.startswith(f"left out of {tmp_path}: ")
    singular = ("1 .gif file ", "1 suffix-less file ", "1 subfolder (not searched)", "1 broken or looping symbolic")
    for part in singular:
        assert part in message
    assert "symbolic links" not in message and "files" not in message
    assert "subfolders" not in (scan_folder(tmp_path, recursive=True)[1] or "")
    (tmp_path / "b.gif").unlink()
    (tmp_path / "notes").unlink()
    (tmp_path / "loop.png").unlink()
    assert scan_folder(tmp_path, recursive=True)[1] is None
