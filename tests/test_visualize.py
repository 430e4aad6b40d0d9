"""Output files: names that stay inside --out whatever the input is called, and atomic writes."""

from pathlib import Path

import pytest

from patchcore_milvus.visualize import output_stems, save_atomically


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
