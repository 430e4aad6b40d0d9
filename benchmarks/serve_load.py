"""`patchcore-milvus serve` under load: clients posting bottle's test images to one station process.

Bottle is ingested (default configuration) in a child process, then `serve` runs in another, and
`--clients` threads post every test image once each (raw PNG bytes; each client starts at another
image), after one client alone did the same. Per row: requests, failed ones, images answered per
second, p50 / p95 latency of the answered ones (request sent to answer read), and the mean
micro-batch of that row (from `/metrics`). It exits non-zero if any request failed.
With `--server`, the same against a Milvus 2.3.5 server, and a third row whose load runs while a
re-ingest publishes a new version and a rollback points the alias back (each client posts the
images three times, to span both): the versions that answered are printed, and every request
must still succeed.

    python benchmarks/serve_load.py
    unshare -n sh -c 'ip link set lo up && python benchmarks/serve_load.py --server'
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from patchcore_milvus.images import list_images
from patchcore_milvus.testing.milvus_server import MilvusTestServer, network_isolation_problem

CLI = [sys.executable, "-c", "from patchcore_milvus.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Station:
    """`serve` in a child process, on a loopback port."""

    def __init__(self, uri: str, env: dict[str, str]):
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        command = [*CLI, "serve", "--uri", uri, "--port", port, "--category", "bottle"]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"serve exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("serve did not answer within 180 s")
            time.sleep(0.3)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)

    def batches(self) -> tuple[float, float]:
        """Images searched so far and the searches they took (from /metrics)."""
        text = httpx.get(f"{self.url}/metrics").text
        total = float(re.search(r"^patchcore_batch_images_sum (\S+)$", text, re.M).group(1))
        count = float(re.search(r"^patchcore_batch_images_count (\S+)$", text, re.M).group(1))
        return total, count


def load(station: Station, images: list[bytes], clients: int) -> dict[str, object]:
    """Every client posts every image once; latencies, failures and the versions that answered."""
    latencies: list[float] = []
    failures: list[str] = []
    versions: set[str] = set()
    lock = threading.Lock()

    def client(offset: int) -> None:
        with httpx.Client(timeout=300) as http:
            for k in range(len(images)):
                body = images[(k + offset) % len(images)]
                sent = time.perf_counter()
                try:
                    answer = http.post(f"{station.url}/v1/inspect?category=bottle", content=body)
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    if answer.status_code == 200:
                        latencies.append(time.perf_counter() - sent)
                        versions.add(answer.json()["bank_version"])
                    else:
                        failures.append(f"{answer.status_code}: {answer.text[:200]}")

    images_before, searches_before = station.batches()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [i * len(images) // clients for i in range(clients)]))
    wall = time.perf_counter() - started
    images_after, searches_after = station.batches()
    ms = np.array(latencies or [np.nan]) * 1000
    return {
        "requests": clients * len(images),
        "failed": len(failures),
        "per_s": len(latencies) / wall,
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "batch": (images_after - images_before) / max(searches_after - searches_before, 1.0),
        "versions": versions,
        "first_failures": failures[:3],
    }


def ingest(data: Path, uri: str, env: dict[str, str]) -> None:
    subprocess.run(
        [*CLI, "ingest", str(data), "--category", "bottle", "--uri", uri, "--no-progress"],
        check=True,
        stdout=subprocess.DEVNULL,
        env=env,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad"))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--server", action="store_true", help="also a Milvus 2.3.5 server (needs `unshare -n`)")
    args = parser.parse_args()
    if args.server and (problem := network_isolation_problem()):
        raise SystemExit(problem)
    images = [path.read_bytes() for path in list_images(args.data / "bottle" / "test", recursive=True)]
    rows: list[tuple[str, dict[str, object]]] = []
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as work_dir:
        work = Path(work_dir)
        env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache")}
        backends = [("Milvus Lite", str(work / "lite.db"))]
        server = None
        if args.server:
            server = MilvusTestServer(work / "server")
            server.start()
            backends.append(("Milvus 2.3.5 server", server.uri))
        try:
            for name, uri in backends:
                ingest(args.data, uri, env)
                station = Station(uri, env)
                try:
                    load(station, images[:4], 1)  # warm
                    rows.append((f"{name}, 1 client", load(station, images, 1)))
                    rows.append((f"{name}, {args.clients} clients", load(station, images, args.clients)))
                    if name.endswith("server"):
                        rows.append(
                            (
                                f"{name}, {args.clients} clients, re-ingest and rollback",
                                swap(station, images, args, uri, env),
                            )
                        )
                finally:
                    station.stop()
        finally:
            if server is not None:
                server.stop()
    print(f"\n{len(images)} bottle test images per client; latency = request sent to answer read")
    print("| station | requests | failed | images/s | p50 ms | p95 ms | mean batch | versions that answered |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows:
        print(
            f"| {name} | {row['requests']} | {row['failed']} | {row['per_s']:.2f} | {row['p50']:.0f} | "
            f"{row['p95']:.0f} | {row['batch']:.2f} | {len(row['versions'])} |"
        )
        for failure in row["first_failures"]:
            print(f"  failed: {failure}")
    if any(row["failed"] for _, row in rows):
        raise SystemExit("some requests failed (above)")


def swap(station: Station, images: list[bytes], args: argparse.Namespace, uri: str, env: dict[str, str]) -> dict:
    """The load while another process re-ingests (a new version) and then rolls the alias back."""

    def publish_and_roll_back() -> None:
        ingest(args.data, uri, env)
        subprocess.run([*CLI, "rollback", "bottle", "--uri", uri], check=True, stdout=subprocess.DEVNULL, env=env)

    writer = threading.Thread(target=publish_and_roll_back)
    writer.start()
    row = load(station, images * 3, args.clients)  # long enough to span both
    writer.join()
    return row


if __name__ == "__main__":
    main()
