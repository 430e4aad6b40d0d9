"""The command line as a user runs it, on synthetic images and a real Milvus Lite file."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import textured_image
from PIL import Image

from patchcore_milvus.cli import main
from patchcore_milvus.milvus import BankStore


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "cli.db")


@pytest.fixture
def ingested(good_folder: Path, db: str) -> str:
    result = CliRunner().invoke(
        main,
        [
            "ingest",
            "--category",
            "texture",
            "--images",
            str(good_folder),
            "--uri",
            db,
            "--image-size",
            "64",
            "--coreset-ratio",
            "0.25",
            "--holdout-ratio",
            "0.25",
            "--no-progress",
            "--index",
            "IVF_FLAT",
            "--index-param",
            "nlist=8",
            "--search-param",
            "nprobe=8",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "coreset: 128 x 152 dims, index IVF_FLAT" in result.output  # 25 % of all 8 images' patches
    assert "images: 6 in the bank, 2 held out" in result.output
    return db


def query(db: str, *args: str):
    """`patchcore-milvus query` against the bank `ingested` builds, with its extractor and index settings."""
    settings = ["--category", "texture", "--uri", db, "--image-size", "64", "--search-param", "nprobe=8"]
    return CliRunner().invoke(main, ["query", *settings, *args])


def test_a_full_disk_while_writing_outputs_is_a_message_not_a_traceback(ingested: str, tmp_path: Path, monkeypatch):
    import errno

    import numpy

    textured_image(100).save(tmp_path / "good.png")

    def disk_full(target, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(numpy, "save", disk_full)
    result = query(ingested, "--out", str(tmp_path / "out"), str(tmp_path / "good.png"))
    assert result.exit_code == 2 and "No space left on device" in result.output, result.output
    assert "Free some space" in result.output and "Traceback" not in result.output
    assert list((tmp_path / "out").iterdir()) == []  # no half-written or temporary file


def test_a_query_killed_while_writing_leaves_nothing_the_next_one_does_not_clear(ingested: str, tmp_path: Path):
    import os
    import signal
    import subprocess
    import sys

    from patchcore_milvus.files import _writer_prefix

    textured_image(100).save(tmp_path / "good.png")
    out = tmp_path / "out"
    out.mkdir()
    # A query SIGKILLed inside save_atomically: its temporary file stays, named with its PID.
    writer = (
        "import os, signal, sys; from pathlib import Path; from patchcore_milvus.files import save_atomically; "
        "save_atomically(Path(sys.argv[1]), lambda p: (Path(p).write_bytes(b'half'), os.kill(os.getpid(), 9)))"
    )
    killed = subprocess.run([sys.executable, "-c", writer, str(out / "good_map.npy")], timeout=60)
    assert killed.returncode == -signal.SIGKILL
    [left] = out.glob(".tmp-*")
    mine = out / f"{_writer_prefix(os.getpid())}busy.png"  # a live writer's file is not touched
    elsewhere = out / ".tmp-otherhost-1-busy.png"  # nor another host's (a shared folder)
    elsewhere.write_bytes(b"")
    mine.write_bytes(b"")
    result = query(ingested, "--out", str(out), str(tmp_path / "good.png"))
    assert result.exit_code == 0, result.output
    assert f"removed {left.name}, left by an interrupted query" in result.output
    assert not left.exists() and mine.exists() and elsewhere.exists() and (out / "good_map.npy").is_file()


def test_a_query_killed_while_drawing_leaves_no_part_of_that_images_outputs(ingested: str, tmp_path: Path):
    import signal
    import subprocess
    import sys

    textured_image(100).save(tmp_path / "good.png")
    out = tmp_path / "out"
    out.mkdir()
    # The map is written, then the process is SIGKILLed while the overlay is drawn.
    writer = (
        "import os, sys; from pathlib import Path; from patchcore_milvus.files import save_together; "
        "out = Path(sys.argv[1]); save_together([(out / 'good_map.npy', lambda p: Path(p).write_bytes(b'map')), "
        "(out / 'good_overlay.png', lambda p: os.kill(os.getpid(), 9))])"
    )
    killed = subprocess.run([sys.executable, "-c", writer, str(out)], timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name.startswith(".tmp-") for p in out.iterdir()] == [True, True]  # no map without its overlay
    result = query(ingested, "--out", str(out), str(tmp_path / "good.png"))
    assert result.exit_code == 0, result.output
    assert result.output.count("left by an interrupted query") == 2
    assert sorted(p.name for p in out.iterdir()) == ["good_map.npy", "good_mask.png", "good_overlay.png"]


def test_query_writes_map_overlay_and_mask(ingested: str, tmp_path: Path):
    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "in" / "b").mkdir(parents=True)
    textured_image(101, defect=True).save(tmp_path / "in" / "a" / "000.png")
    textured_image(100).save(tmp_path / "in" / "b" / "000.png")
    out = tmp_path / "out"
    result = query(
        ingested, "--json", "--out", str(out), str(tmp_path / "in" / "a"), str(tmp_path / "in" / "b" / "000.png")
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines()]
    assert records[0]["verdict"] == "DEFECT"
    assert records[0]["score"] > 3 * records[1]["score"]
    # Same file name in two folders: the outputs must not overwrite each other.
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{s}_{k}" for s in ("a_000", "b_000") for k in ("map.npy", "mask.png", "overlay.png")]
    amap = np.load(out / "a_000_map.npy")
    assert amap.shape == (96, 96) and amap.dtype == np.float32
    mask = np.asarray(Image.open(out / "a_000_mask.png"))
    assert set(np.unique(mask)) <= {0, 255} and mask.any()
    overlay = Image.open(out / "a_000_overlay.png")
    assert overlay.width == 2 * 96 and overlay.height > 96
    previous = os.umask(0o022)
    try:  # files a dashboard can read: the mode any new file gets, not mkstemp's 0600
        assert query(ingested, "--out", str(tmp_path / "shared"), str(tmp_path / "in" / "a")).exit_code == 0
    finally:
        os.umask(previous)
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "shared").iterdir()} == {"0o644"}
    named_like_a_file = query(ingested, "--out", str(tmp_path / "result.png"), str(tmp_path / "in" / "a"))
    assert named_like_a_file.exit_code == 2 and "--out names a folder" in named_like_a_file.output
    assert not (tmp_path / "result.png").exists()


def test_outputs_of_inputs_with_similar_names_never_overwrite_each_other(ingested: str, tmp_path: Path):
    inputs = tmp_path / "in"
    for folder in ("same", "a_b", "a"):
        (inputs / folder).mkdir(parents=True)
    textured_image(100).save(inputs / "same" / "img.png")  # good
    textured_image(101, defect=True).save(inputs / "same" / "img.jpg", quality=95)  # defect, same stem
    textured_image(102).save(inputs / "a_b" / "c.png")  # a_b/c and a/b_c both flatten to a_b_c
    textured_image(103, defect=True).save(inputs / "a" / "b_c.png")
    out = tmp_path / "out"
    result = query(ingested, "--json", "--out", str(out), str(inputs))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines()]
    files = [name for record in records for name in record["files"]]
    assert len(records) == 4 and len(set(files)) == len(files) == 12
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(f).name for f in files)  # each one still there
    by_input = {Path(r["path"]).relative_to(inputs).as_posix(): r for r in records}
    defect_map = np.load(next(f for f in by_input["same/img.jpg"]["files"] if f.endswith("_map.npy")))
    good_map = np.load(next(f for f in by_input["same/img.png"]["files"] if f.endswith("_map.npy")))
    assert defect_map.max() > 2 * good_map.max()  # the defect's files are the defect's


def test_query_text_lines_and_a_bad_file(ingested: str, tmp_path: Path):
    textured_image(100).save(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    result = query(ingested, str(tmp_path / "empty.png"), str(tmp_path / "good.png"))
    assert result.exit_code == 1
    assert "empty.png: not a readable image" in result.output
    assert "good.png  score " in result.output and "threshold" in result.output
    assert "1 of 2 files could not be scored" in result.output


def test_query_skips_a_file_this_user_may_not_read_and_scores_the_others(
    ingested: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """As a user without read permission on one file (root reads everything, so the denial is
    what the kernel answers a non-root user: os.access false, open raising PermissionError)."""
    import builtins
    import os

    textured_image(100).save(tmp_path / "good.png")
    textured_image(101).save(tmp_path / "noperm.png")
    denied = str(tmp_path / "noperm.png")
    access, opener = os.access, builtins.open
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: str(path) != denied and access(path, mode, **kw))

    def guarded_open(file, *args, **kwargs):
        if str(file) == denied:
            raise PermissionError(13, "Permission denied", denied)
        return opener(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    result = query(ingested, denied, str(tmp_path / "good.png"))
    assert result.exit_code == 1, result.output
    assert "noperm.png: this user may not read it (Permission denied); check its permissions" in result.output
    assert "good.png  score " in result.output and "1 of 2 files could not be scored" in result.output


def test_query_says_so_when_this_user_may_not_read_a_folder(
    ingested: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import os

    folder = tmp_path / "locked"
    folder.mkdir()
    textured_image(100).save(folder / "good.png")
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: str(path) != str(folder) and access(path, mode, **kw))
    result = query(ingested, str(folder))
    assert result.exit_code != 0 and "this user may not read the folder; check its permissions" in result.output
    assert "Traceback" not in result.output


def test_query_says_what_a_folder_left_out_and_keeps_each_result_on_one_line(ingested: str, tmp_path: Path):
    folder = tmp_path / "parts"
    folder.mkdir()
    textured_image(100).save(folder / "line\nbreak.png")
    textured_image(101).save(folder / "animation.gif")
    (folder / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(folder / "camera.png")
    result = query(ingested, str(folder))
    assert result.exit_code == 0, result.output
    assert f"left out of {folder}: 1 .gif file (not .png" in result.output
    assert "1 broken or looping symbolic link;" in result.output
    assert "1 entry that is not a regular file" in result.output
    [line] = [line for line in result.output.splitlines() if "score" in line]
    assert line.startswith(str(folder / "line\\nbreak.png")), line


def test_ctrl_c_while_inserting_says_so_drops_the_unfinished_version_and_keeps_the_bank(
    ingested: str, good_folder: Path, monkeypatch
):
    from patchcore_milvus.milvus import BankStore

    before = CliRunner().invoke(main, ["history", "texture", "--uri", ingested]).output

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(BankStore, "insert", interrupted)
    settings = ["--category", "texture", "--images", str(good_folder), "--uri", ingested, "--image-size", "64"]
    result = CliRunner().invoke(main, ["ingest", *settings, "--no-progress", "--index", "IVF_FLAT"])
    assert result.exit_code == 130 and "interrupted: nothing half-done was kept" in result.output, result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output
    assert CliRunner().invoke(main, ["history", "texture", "--uri", ingested]).output == before
    assert "no leftovers" in CliRunner().invoke(main, ["gc", "--uri", ingested]).output


def test_gc_removes_the_temporary_folders_of_killed_ingests(ingested: str, tmp_path: Path, monkeypatch):
    import subprocess
    import tempfile

    from patchcore_milvus.ingest import WORK_PREFIX

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()  # a PID no process holds any more
    stale, live = tmp_path / f"{WORK_PREFIX}{dead.pid}-abc", tmp_path / f"{WORK_PREFIX}{os.getpid()}-def"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "patches.f32").write_bytes(b"\0" * 1024)
    result = CliRunner().invoke(main, ["gc", "--uri", ingested])
    assert result.exit_code == 0, result.output
    assert f"removed {stale}: the patch features of an ingest that was killed" in result.output
    assert not stale.exists() and live.is_dir()  # a running ingest's folder stays


def test_gc_refuses_a_name_that_cannot_be_a_category(ingested: str):
    result = CliRunner().invoke(main, ["gc", "--category", "../x", "--uri", ingested])
    assert result.exit_code == 2 and "invalid category name '../x'" in result.output, result.output


def test_collections_and_drop(ingested: str):
    listing = CliRunner().invoke(main, ["collections", "--uri", ingested])
    assert listing.exit_code == 0
    header, row = listing.output.splitlines()
    assert header.split()[:6] == ["category", "vectors", "dim", "index", "backbone", "created"]
    store = BankStore(ingested)
    vectors = store.vector_count(store.resolve("texture"))
    assert row.split()[:5] == ["texture", str(vectors), "152", "IVF_FLAT", "efficientnet_lite0"]
    declined = CliRunner().invoke(main, ["drop", "texture", "--uri", ingested], input="n\n")
    assert declined.exit_code == 0 and "(1 version(s), none kept)?" in declined.output
    assert "nothing dropped" in declined.output and "Aborted" not in declined.output
    dropped = CliRunner().invoke(main, ["drop", "texture", "--yes", "--uri", ingested])
    assert dropped.exit_code == 0 and "dropped texture" in dropped.output
    assert "no banks" in CliRunner().invoke(main, ["collections", "--uri", ingested]).output


def test_reading_a_bank_file_that_is_not_there_creates_nothing(tmp_path: Path):
    missing = tmp_path / "typo.db"
    textured_image(100).save(tmp_path / "good.png")
    query = ["query", "--category", "texture", str(tmp_path / "good.png")]
    for command in (["collections"], ["history", "texture"], query):
        result = CliRunner().invoke(main, [*command, "--uri", str(missing)])
        assert result.exit_code == 2 and f"no Milvus Lite file at {missing}" in result.output, result.output
    assert not missing.exists()


def test_a_read_only_bank_file_is_a_message_that_says_so(ingested: str, tmp_path: Path):
    """A bank on a read-only disk (as root, a read-only bind mount in a mount namespace of its own;
    otherwise the file's write permission taken away)."""
    import shutil
    import subprocess
    import sys

    textured_image(100).save(tmp_path / "good.png")
    command = ["query", "--category", "texture", "--uri", ingested, "--image-size", "64", str(tmp_path / "good.png")]
    cli = [sys.executable, "-c", "from patchcore_milvus.cli import main; main()", *command]
    folder = Path(ingested).parent
    if os.geteuid() == 0:
        if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
            pytest.skip("root, and no mount namespace for a read-only mount (unshare -m)")
        script = f'mount --bind -o ro {folder} {folder} && exec "$@"'
        result = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *cli], capture_output=True, text=True)
    else:
        modes = {p: p.stat().st_mode for p in [Path(ingested), *Path(ingested).rglob("*")]}
        for path in modes:
            path.chmod(modes[path] & ~0o222)
        try:
            result = subprocess.run(cli, capture_output=True, text=True)
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
    assert result.returncode == 2, result.stderr
    assert "is read-only here, and Milvus Lite writes to its file even to read a bank" in result.stderr
    assert "Traceback" not in result.stderr and "one process at a time" not in result.stderr


def test_query_with_another_extractor_is_refused(ingested: str, tmp_path: Path):
    textured_image(100).save(tmp_path / "good.png")
    settings = ["query", "--category", "texture", "--uri", ingested, str(tmp_path / "good.png")]
    result = CliRunner().invoke(main, [*settings, "--image-size", "96"])
    assert result.exit_code == 2
    assert "does not match bank 'texture'" in result.output and "image_size: bank has 64" in result.output
    # Without extractor options the bank's own extractor (64 px, carried by the bank) scores it.
    same = CliRunner().invoke(main, [*settings, "--json"])
    assert same.exit_code == 0, same.output
    with_flags = json.loads(query(ingested, "--json", settings[-1]).output)
    assert json.loads(same.output)["score"] == pytest.approx(with_flags["score"])


def test_config_show_merges_file_and_flags_and_hides_the_secrets(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MILVUS_TOKEN", "root:S3cret")
    config = tmp_path / "station.yaml"
    config.write_text("uri: http://milvus.plant:19530\ncoreset_ratio: 0.2\nindex_type: IVF_SQ8\n")
    result = CliRunner().invoke(main, ["config", "show", "--config", str(config), "--coreset-ratio", "0.05"])
    assert result.exit_code == 0, result.output
    assert "uri: http://milvus.plant:19530" in result.output
    assert "coreset_ratio: 0.05" in result.output and "nlist: 1024" in result.output
    assert "S3cret" not in result.output and "token from $MILVUS_TOKEN (hidden)" in result.output
    monkeypatch.delenv("MILVUS_TOKEN")
    monkeypatch.setenv("MILVUS_USER", "station7")
    monkeypatch.setenv("MILVUS_PASSWORD", "S3cret")
    result = CliRunner().invoke(main, ["config", "show"])
    assert "S3cret" not in result.output and "user 'station7'" in result.output


def test_a_password_written_into_the_uri_is_never_printed():
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://station7:S3cret@127.0.0.1:{port}"
    shown = CliRunner().invoke(main, ["config", "show", "--uri", uri])
    assert shown.exit_code == 0 and f"uri: http://***@127.0.0.1:{port}" in shown.output
    failed = CliRunner().invoke(main, ["collections", "--uri", uri, "--milvus-timeout", "1", "--retry-seconds", "1"])
    assert failed.exit_code != 0 and f"http://***@127.0.0.1:{port}" in failed.output
    assert "S3cret" not in shown.output + failed.output


def test_clear_errors_for_bad_input(tmp_path: Path, db: str):
    runner = CliRunner()
    config = tmp_path / "bad.yaml"
    config.write_text("coreset_ratio: 2\n")
    result = runner.invoke(main, ["config", "show", "--config", str(config)])
    assert result.exit_code == 2 and "coreset_ratio must be in (0, 1]" in result.output
    result = runner.invoke(main, ["ingest", str(tmp_path), "--category", "bottle", "--uri", db])
    assert result.exit_code == 2 and "bottle/train/good does not exist" in result.output
    result = runner.invoke(main, ["ingest", str(tmp_path), "--category", "metal-nut", "--uri", db])
    assert result.exit_code == 2 and "invalid category name 'metal-nut'" in result.output
    result = runner.invoke(main, ["query", "--category", "cable", "--uri", db, str(config)])
    assert result.exit_code == 2 and "no Milvus Lite file at" in result.output  # nothing was ingested
    for seed in ("-1", str(2**64)):
        result = runner.invoke(main, ["config", "show", "--seed", seed])
        assert result.exit_code == 2 and "seed must be a whole number from 0 to" in result.output
    result = runner.invoke(main, ["config", "show", "--num-threads", "100000"])
    assert result.exit_code == 2 and "num_threads must be between 1 and 256" in result.output
    result = runner.invoke(main, ["evaluate", str(tmp_path), "--category", "bottle", "--uri", db, "--pixel-size", "0"])
    assert result.exit_code == 2 and "'--pixel-size': 0 is not in the range" in result.output


def test_history_and_rollback_switch_what_queries_score_against(ingested: str, good_folder: Path, tmp_path: Path):
    from patchcore_milvus.config import Config
    from patchcore_milvus.images import list_images
    from patchcore_milvus.ingest import fit_bank

    textured_image(101, defect=True).save(tmp_path / "bad.png")
    before = json.loads(query(ingested, "--json", str(tmp_path / "bad.png")).output)
    settings = Config(uri=ingested, image_size=64, coreset_size=10, index_type="IVF_FLAT", progress=False)
    second = fit_bank("texture", list_images(good_folder), settings.replace(index_params={"nlist": 8})).collection
    after = json.loads(query(ingested, "--json", str(tmp_path / "bad.png")).output)
    assert after["bank_version"] == second != before["bank_version"] and after["score"] != before["score"]

    listing = CliRunner().invoke(main, ["history", "texture", "--uri", ingested])
    assert listing.exit_code == 0, listing.output
    header, old, new = listing.output.splitlines()
    assert header.split()[:4] == ["version", "created", "images", "vectors"]
    vectors = BankStore(ingested).vector_count(before["bank_version"])
    assert old.split()[0] == before["bank_version"] and old.split()[3] == str(vectors)
    assert new.split()[:2] == ["*", second] and new.split()[4] == "10"

    rolled = CliRunner().invoke(main, ["rollback", "texture", "--uri", ingested])
    assert rolled.exit_code == 0 and rolled.output.strip() == f"texture -> {before['bank_version']}"
    again = json.loads(query(ingested, "--json", str(tmp_path / "bad.png")).output)
    assert again["bank_version"] == before["bank_version"] and again["score"] == pytest.approx(before["score"])
    missing = CliRunner().invoke(main, ["rollback", "texture", "v1999", "--uri", ingested])
    assert missing.exit_code == 2 and "has no version 'v1999'" in missing.output


def test_ingest_skips_unusable_files_says_why_and_strict_stops(good_folder: Path, db: str, tmp_path: Path):
    (good_folder / "zz_empty.png").write_bytes(b"")
    (good_folder / "zz_text.jpg").write_text("not an image")
    Image.new("RGB", (20, 20)).save(good_folder / "zz_tiny.png")
    settings = ["--category", "texture", "--images", str(good_folder), "--uri", db, "--image-size", "64"]
    settings += ["--coreset-ratio", "0.25", "--holdout-ratio", "0.25", "--no-progress"]
    result = CliRunner().invoke(main, ["ingest", *settings])
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.output.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 3 and "zz_empty.png: not a readable image" in result.output
    assert "zz_tiny.png: 20x20 pixels is too small" in result.output
    assert "3 unusable files skipped" in result.output
    strict = CliRunner().invoke(main, ["ingest", *settings, "--strict"])
    assert strict.exit_code == 2 and "error: " in strict.output and "not a readable image" in strict.output

    bad_only = tmp_path / "bad_only"
    bad_only.mkdir()
    (bad_only / "a.png").write_bytes(b"\x89PNG broken")
    (bad_only / "b.png").write_bytes(b"")
    settings[settings.index(str(good_folder))] = str(bad_only)
    nothing = CliRunner().invoke(main, ["ingest", *settings])
    assert nothing.exit_code == 2, nothing.output
    assert "none of the 1 images for the bank could be used (1 more set aside" in nothing.output
    fresh = tmp_path / "fresh.db"  # a first ingest that fails leaves no empty bank file
    settings[settings.index(db)] = str(fresh)
    assert CliRunner().invoke(main, ["ingest", *settings]).exit_code == 2 and not fresh.exists()


def test_ingest_with_unusable_weights_says_so_and_creates_no_bank_file(good_folder: Path, tmp_path: Path):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"not a safetensors file")
    db = tmp_path / "never.db"
    args = ["ingest", "--category", "texture", "--images", str(good_folder), "--uri", str(db)]
    args += ["--weights", str(weights)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and f"cannot load weights from {weights}" in result.output, result.output
    assert not db.exists()


def test_an_ingest_that_would_not_fit_is_refused_before_it_starts(good_folder: Path, tmp_path: Path, monkeypatch):
    from collections import namedtuple

    from patchcore_milvus import ingest

    shutil_usage = namedtuple("usage", "total used free")
    db = tmp_path / "never.db"
    args = ["ingest", "--category", "texture", "--images", str(good_folder), "--uri", str(db), "--image-size", "64"]
    monkeypatch.setattr(ingest, "_available_memory", lambda: 1000)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "this ingest of 8 images (512 patches of 152 dims) needs about" in result.output
    assert "MiB of memory (0 MiB available)" in result.output and "nothing was started" in result.output
    assert not db.exists()
    monkeypatch.setattr(ingest, "_available_memory", lambda: None)  # where it cannot be read: not checked
    monkeypatch.setattr(ingest.shutil, "disk_usage", lambda folder: shutil_usage(0, 0, 1000))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "MiB of temporary disk in" in result.output and not db.exists()
    monkeypatch.undo()
    assert CliRunner().invoke(main, [*args, "--coreset-ratio", "0.25", "--no-progress"]).exit_code == 0


def test_numpy_running_out_of_space_without_an_errno_is_a_message(ingested: str, tmp_path: Path, monkeypatch):
    import numpy

    textured_image(100).save(tmp_path / "good.png")

    def short(target, *args, **kwargs):  # numpy's own words for a full disk on a large array
        raise OSError("Not enough free space to write 36000000 bytes after offset 128")

    monkeypatch.setattr(numpy, "save", short)
    result = query(ingested, "--out", str(tmp_path / "out"), str(tmp_path / "good.png"))
    assert result.exit_code == 2 and "Free some space" in result.output and "Traceback" not in result.output
    assert "error: a file: " in result.output and "point --out elsewhere" in result.output


def test_a_target_dim_above_the_backbone_s_dims_is_refused(good_folder: Path, tmp_path: Path):
    settings = ["--images", str(good_folder), "--uri", str(tmp_path / "t.db"), "--image-size", "64"]
    result = CliRunner().invoke(main, ["ingest", "--category", "t", *settings, "--target-dim", "153"])
    assert result.exit_code == 2 and "target_dim 153 is more than the 152 dims" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "t.db").exists()
