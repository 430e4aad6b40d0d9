"""Shared fixtures: synthetic textured images and fast settings on a fresh Milvus Lite file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from patchcore_milvus.bank import Bank, Inspection
from patchcore_milvus.config import Config
from patchcore_milvus.description import (
    BankDescription,
    CoresetDescription,
    ExtractorDescription,
    IndexDescription,
    TrainingImages,
)
from patchcore_milvus.testing.milvus_server import MilvusTestServer, network_isolation_problem

torch.set_num_threads(2)

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"  # ../shared beside the repo


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory: pytest.TempPathFactory):
    """Exported extractors and replicas in a cache of the test session's own, not the user's
    (CLI subprocesses inherit it)."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(scope="session")
def bottle_root() -> Path:
    """MVTec AD bottle, or a skip that says where it was looked for."""
    if not (BOTTLE / "train" / "good").is_dir():
        pytest.skip(f"MVTec AD bottle not found at {BOTTLE} (see ../shared/data/README.md)")
    return BOTTLE


def textured_image(seed: int, size: int = 96, defect: bool = False, width: int | None = None) -> Image.Image:
    """A regular stripe texture with slight noise, `size` tall and `width` (default `size`) wide; a
    `defect` is a bright square blob."""
    rng = np.random.default_rng(seed)
    width = width or size
    y, x = np.mgrid[0:size, 0:width]
    base = 128 + 60 * np.sin(x / 3.0) * np.cos(y / 5.0)
    pixels = np.stack([base, base * 0.8 + 20, 255 - base], axis=-1) + rng.normal(0, 4, (size, width, 3))
    if defect:
        pixels[size // 3 : size // 3 + size // 5, width // 2 : width // 2 + size // 5] = [250, 10, 240]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def score_good_and_bad(bank: Bank, folder: Path, width: int | None = None) -> tuple[Inspection, Inspection]:
    """`bank`'s inspections of a good and a defective `textured_image` (seeds 100 and 101, `width`
    wide), written to `folder` as good.png and bad.png."""
    textured_image(100, width=width).save(folder / "good.png")
    textured_image(101, defect=True, width=width).save(folder / "bad.png")
    results = dict(bank.score_paths([folder / "good.png", folder / "bad.png"]))
    return results[folder / "good.png"], results[folder / "bad.png"]


@pytest.fixture
def good_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(8):
        textured_image(i).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture
def small_config(tmp_path: Path) -> Config:
    """Fast settings for synthetic 96 px images, on a fresh Milvus Lite file."""
    return Config(
        uri=str(tmp_path / "banks.db"),
        image_size=64,
        coreset_ratio=0.25,
        holdout_ratio=0.25,
        batch_size=4,
        progress=False,
        review_folder=str(tmp_path / "review"),
    )


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory):
    """A real Milvus 2.3.5 standalone server with authentication and TLS on, for the whole
    session; stopped (its process killed if need be) at the end, also when tests fail."""
    problem = network_isolation_problem()
    if problem:
        pytest.skip(problem)
    server = MilvusTestServer(tmp_path_factory.mktemp("milvus-server"), authentication=True, tls=True)
    server.start()
    yield server
    server.stop()


def sample_description(category: str, images: list[str] | None = None) -> BankDescription:
    """A complete description with made-up values, for store tests that need one."""
    return BankDescription(
        category=category,
        package_version="0",
        created="2026-01-01T00:00:00+00:00",
        origin="ingest",
        extractor=ExtractorDescription("efficientnet_lite0", "0" * 64, ["a", "b"], 64, None, {}, "-", None, 8),
        coreset=CoresetDescription(8, 0, 0.1, 1, 10, 1.0),
        index=IndexDescription("HNSW", {"M": 8, "efConstruction": 64}),
        training_images=[TrainingImages("root", images or ["ünïcode ok.png"])],
    )


CLI = [sys.executable, "-c", "from patchcore_milvus.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(uri: str, log: Path, *options: str) -> Iterator[str]:
    """`patchcore-milvus serve` on a free loopback port, as a process of its own (a Lite file serves
    one process: ingest it in a child too); yields its address once /healthz answers, and stops
    it with Ctrl-C, which must end it cleanly."""
    port = free_port()
    with log.open("wb") as written:
        server = subprocess.Popen([*CLI, "serve", "--uri", uri, "--port", str(port), *options], stderr=written)
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()
            try:
                if httpx.get(f"{address}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve never answered"
            time.sleep(0.3)
        yield address
        server.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop, no traceback
        assert server.wait(timeout=60) == 0 and "Traceback" not in log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
