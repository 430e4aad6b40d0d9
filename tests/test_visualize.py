"""Output files: names that stay inside --out whatever the input is called, and atomic writes."""

from pathlib import Path

import pytest

from patchcore_milvus.files import save_atomically
from patchcore_milvus.visualize import output_stems


def test_crafted_input_names_cannot_write_outside_the_output_folder(tmp_path: Path):
    inputs = tmp_path / "in"
    (inputs / "a" / "...").mkdir(parents=True)
    paths = [
        inputs / "a" / ".." / ".." / "escape.png",  # resolves to tmp_path/escape.png
        inputs / "a" / "...",
        inputs / "a" / "..png",
        inputs / "a" / "x:y;rm -rf.png",
        Path("/etc/passwd"),
    ]
    stems = output_stems(paths)
    out = tmp_path / "out"
    for stem in stems:
        assert "/" not in stem and stem not in ("", ".", "..")
        target = (out / f"{stem}_map.npy").resolve()
        assert target.parent == out.resolve()
    assert len(set(stems)) == len(stems)


def test_a_failed_write_leaves_neither_a_half_file_nor_a_temporary(tmp_path: Path):
    target = tmp_path / "map.npy"
    target.write_text("old")

    def crash(temporary: str) -> None:
        Path(temporary).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_atomically(target, crash)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["map.npy"]
    save_atomically(target, lambda temporary: Path(temporary).write_text("new"))
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["map.npy"]


def inspection_of(amap, score: float, image_threshold: float, pixel_threshold: float, path: str = "x.png"):
    """An Inspection of a flat grey image with the given map, without a bank."""
    import numpy as np
    from PIL import Image

    from patchcore_milvus.bank import Inspection

    height, width = amap.shape
    return Inspection(
        path=path,
        image_score=score,
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        anomaly_map=amap,
        nearest_patch={},
        timings_ms={},
        image=Image.new("RGB", (width, height), (90, 90, 90)),
        patch_distances=np.zeros((8, 8)),
        patch_ids=np.zeros((8, 8), dtype=np.int64),
        patch_norms=np.ones((8, 8)),
    )


def test_a_large_image_is_drawn_at_a_bounded_size_with_its_defect_outlined(tmp_path: Path):
    import numpy as np
    from PIL import Image

    from patchcore_milvus.visualize import OUTLINE_COLOR, PANEL_SIDE, overlay_figure, write_outputs

    height, width = 3000, 4800
    amap = np.zeros((height, width), dtype=np.float32)
    amap[1000:1400, 2000:2600] = 10.0  # one defect region above the pixel threshold
    inspection = inspection_of(amap, 12.0, 5.0, 5.0, "big.png")
    figure = overlay_figure(inspection)
    assert max(figure.width // 2, figure.height) <= PANEL_SIDE + 200  # the caption and the colour bar add a strip
    overlay = np.asarray(figure)[-PANEL_SIDE * height // width :, figure.width // 2 :]
    assert (overlay == OUTLINE_COLOR).all(axis=-1).any()
    written = write_outputs(tmp_path, "big", inspection)
    assert np.load(written[0]).shape == (height, width)  # the data keeps the image's size
    with Image.open(written[2]) as mask:
        assert mask.size == (width, height)


def test_an_ok_verdict_never_comes_with_an_outlined_defect():
    import numpy as np

    from patchcore_milvus.visualize import OUTLINE_COLOR, overlay_figure

    amap = np.zeros((64, 64), dtype=np.float32)
    amap[10:20, 10:20] = 9.0  # above the pixel threshold, but the image score is below its own
    inspection = inspection_of(amap, 4.0, 5.0, 6.0, "good_019.png")
    assert inspection.verdict == "OK" and not inspection.mask.any()
    assert inspection.summary()["defect_pixels"] == 0
    assert not (np.asarray(overlay_figure(inspection)) == OUTLINE_COLOR).all(axis=-1).any()
    inspection.image_score = 7.0
    assert inspection.verdict == "DEFECT" and inspection.mask.sum() == 100


def test_the_overlay_carries_its_colour_bar_and_says_what_the_outline_means():
    import numpy as np

    from patchcore_milvus.visualize import OUTLINE_COLOR, heat_colors, overlay_figure

    amap = np.zeros((400, 400), dtype=np.float32)
    amap[100:200, 100:200] = 9.0
    figure = np.asarray(overlay_figure(inspection_of(amap, 12.0, 5.0, 6.0, "part.png")))
    header = figure[: figure.shape[0] - 400]  # above the two panels
    for end in (heat_colors(np.array(0.0)), heat_colors(np.array(1.0))):  # both ends of the scale
        assert (header == end).all(axis=-1).any()
    assert (header == OUTLINE_COLOR).all(axis=-1).any()  # the legend's swatch beside its words


def test_evaluate_s_sheet_outlines_the_ground_truth_on_the_original_beside_the_prediction():
    import numpy as np

    from patchcore_milvus.visualize import OUTLINE_COLOR, TRUTH_COLOR, overlay_figure

    amap = np.zeros((200, 300), dtype=np.float32)
    amap[20:60, 30:90] = 10.0  # predicted here
    truth = np.zeros((200, 300), dtype=bool)
    truth[120:180, 200:280] = True  # the defect is elsewhere: a mislocation, plain to see
    inspection = inspection_of(amap, 12.0, 5.0, 5.0, "crack.png")
    figure = np.asarray(overlay_figure(inspection, truth=truth))
    caption = figure.shape[0] - 200
    original, overlay = figure[caption:, :300], figure[caption:, 300:]
    truth_pixels = np.argwhere((original == TRUTH_COLOR).all(axis=-1))
    assert len(truth_pixels) and truth_pixels[:, 0].min() >= 115 and truth_pixels[:, 1].min() >= 195
    assert not (overlay == TRUTH_COLOR).all(axis=-1).any()
    predicted = np.argwhere((overlay == OUTLINE_COLOR).all(axis=-1))
    assert len(predicted) and predicted[:, 0].max() <= 65
    assert (figure[:caption] == TRUTH_COLOR).all(axis=-1).any()  # the legend names it
    assert not (np.asarray(overlay_figure(inspection)) == TRUTH_COLOR).all(axis=-1).any()
