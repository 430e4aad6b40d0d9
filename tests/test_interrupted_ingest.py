"""Ingest killed (SIGKILL) at each stage: the previous bank serves on unchanged, no partial
version is what the category resolves to, and `gc` or the next ingest removes the leftovers.
Everything runs as real `patchcore-milvus` processes, on Milvus Lite and on the real server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import textured_image

from patchcore_milvus.testing.milvus_server import ROOT_TOKEN

CLI = [sys.executable, "-c", "from patchcore_milvus.cli import main; main()"]
# What ingest prints when it enters each stage (progress bars, then its stage lines).
STAGES = {
    "extraction": "features:",
    "coreset": "coreset:",
    "insert": "milvus: inserting",
    "indexing": "milvus: building the",
    "verifying": "milvus: verifying",  # its description is not written yet: a leftover, not a version
}


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=env)


def killed_at(marker: str, args: list[str], env: dict[str, str]) -> str:
    """Start an ingest, SIGKILL it as soon as it prints `marker`; what it printed until then."""
    process = subprocess.Popen([*CLI, *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    seen = b""
    deadline = time.monotonic() + 300
    while marker.encode() not in seen:
        chunk = os.read(process.stderr.fileno(), 4096)
        if not chunk or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"ingest ended before {marker!r}: {seen.decode()[-2000:]}")
        seen += chunk
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    return seen.decode()


def check_interrupted_ingests(settings: Path, env: dict[str, str], tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    for i in range(16):  # enough work that each stage lasts a moment
        textured_image(i, size=128).save(good / f"{i:03d}.png")
    textured_image(101, defect=True).save(tmp_path / "bad.png")
    common = ["--config", str(settings), "--category", "texture"]
    first = run("ingest", *common, "--images", str(good), env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    before = json.loads(run("query", *common, "--json", str(tmp_path / "bad.png"), env=env).stdout)

    for stage, marker in STAGES.items():
        killed_at(marker, ["ingest", *common, "--images", str(good), "--coreset-ratio", "0.5"], env)
        after = run("query", *common, "--json", str(tmp_path / "bad.png"), env=env)
        assert after.returncode == 0, (stage, after.stderr[-2000:])
        answer = json.loads(after.stdout)
        assert answer["bank_version"] == before["bank_version"], stage  # the old bank serves on
        assert answer["score"] == pytest.approx(before["score"], rel=1e-6), stage
        history = run("history", "texture", "--config", str(settings), env=env).stdout
        current = [line.split()[1] for line in history.splitlines() if line.startswith("*")]
        assert current == [before["bank_version"]], (stage, history)

    history = run("history", "texture", "--config", str(settings), env=env).stdout
    assert "incomplete" in history  # the killed ingests left versions behind (insert, indexing, verifying)
    cleaned = run("gc", "--yes", "--config", str(settings), env=env)
    assert cleaned.returncode == 0 and cleaned.stdout.startswith("dropped texture__v"), cleaned.stderr[-2000:]
    history = run("history", "texture", "--config", str(settings), env=env).stdout
    assert "incomplete" not in history and len(history.splitlines()) == 2  # header and the bank itself
    assert run("gc", "--yes", "--config", str(settings), env=env).stdout.strip() == "no leftovers"


def test_an_ingest_killed_at_any_stage_loses_nothing_on_milvus_lite(tmp_path: Path):
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({"uri": str(tmp_path / "banks.db"), "image_size": 64, "holdout_ratio": 0.25}))
    check_interrupted_ingests(settings, dict(os.environ), tmp_path)


@pytest.mark.server
def test_an_ingest_killed_at_any_stage_loses_nothing_on_the_server(milvus_server, tmp_path: Path):
    settings = tmp_path / "settings.yaml"
    values = {"uri": milvus_server.uri, **milvus_server.client_options, "image_size": 64, "holdout_ratio": 0.25}
    settings.write_text(yaml.safe_dump(values))
    check_interrupted_ingests(settings, {**os.environ, "MILVUS_TOKEN": ROOT_TOKEN}, tmp_path)


def test_work_folders_of_killed_ingests_are_removed_and_running_ones_kept(tmp_path: Path, monkeypatch):
    from patchcore_milvus.ingest import WORK_PREFIX, remove_stale_work_folders

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"{WORK_PREFIX}{finished.stdout.strip()}-x1y2"
    alive = tmp_path / f"{WORK_PREFIX}{os.getpid()}-a3b4"
    other = tmp_path / "someone-elses-folder"
    for folder in (dead, alive, other):
        folder.mkdir()
        (folder / "patches.f32").write_bytes(b"\0" * 1024)
    assert remove_stale_work_folders() == [dead]
    assert not dead.exists() and alive.exists() and other.exists()
