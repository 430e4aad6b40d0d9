"""Inspection stations sharing one Milvus server: images per second and latency per image.

Builds bottle's bank (default configuration) on a real Milvus 2.3.5 standalone server, copies
the same vectors and description into a Milvus Lite file, then runs 1, 2 and 4 station
processes against the server and one against Milvus Lite. Each station scores bottle's test
images one at a time, as a station fed by a camera would (torch on 1 thread per station), and
the script prints images per second (all stations together) and the median and 95th percentile
latency per image. The server listens on every interface, so run this in a private network
namespace with loopback alone:

    unshare -n sh -c 'ip link set lo up && python benchmarks/stations.py --images 40'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bank_copy import copy_bank

from patchcore_milvus.config import Config
from patchcore_milvus.images import list_images
from patchcore_milvus.ingest import fit_bank
from patchcore_milvus.milvus import BankStore
from patchcore_milvus.testing.milvus_server import MilvusTestServer, network_isolation_problem


def station(uri: str, count: int, start_at: float, out: Path, data: Path) -> None:
    """One station: open the bank, wait for the common start, score `count` images one by one."""
    import torch

    from patchcore_milvus.bank import Bank
    from patchcore_milvus.images import load_rgb

    torch.set_num_threads(1)
    config = Config(uri=uri, progress=False)
    bank = Bank.open("bottle", config)
    paths = sorted(p for p in (data / "bottle" / "test").rglob("*.png"))[:count]
    images = [load_rgb(p) for p in paths]
    bank.score_images(images[:1], ["warm-up"])
    time.sleep(max(0.0, start_at - time.time()))
    latencies, stages = [], []
    for path, image in zip(paths, images):
        t = time.perf_counter()
        [result] = bank.score_images([image], [path.name])
        latencies.append((time.perf_counter() - t) * 1000)
        stages.append(result.timings_ms)
    out.write_text(json.dumps({"latencies": latencies, "stages": stages, "end": time.time()}))


def copy_to_lite(server_uri: str, lite_uri: str) -> None:
    """The server's bottle bank, vector for vector, as a Milvus Lite bank."""
    config = Config(uri=server_uri, progress=False)
    source = BankStore.from_config(config)
    copy_bank(source, source.resolve("bottle"), BankStore(lite_uri), config)


def run_stations(uri: str, stations: int, count: int, data: Path, work: Path) -> dict[str, float]:
    start_at = time.time() + 30  # after every station has loaded torch, the model and its images
    outs = [work / f"{uri.replace('/', '_')}_{stations}_{i}.json" for i in range(stations)]
    processes = [
        subprocess.Popen([sys.executable, __file__, "--station", uri, str(count), str(start_at), str(out), str(data)])
        for out in outs
    ]
    for process in processes:
        if process.wait() != 0:
            raise SystemExit(f"a station failed (exit {process.returncode})")
    results = [json.loads(out.read_text()) for out in outs]
    latencies = np.concatenate([r["latencies"] for r in results])
    wall = max(r["end"] for r in results) - start_at
    stages = [s for r in results for s in r["stages"]]
    return {
        "images_per_s": len(latencies) / wall,
        "p50": float(np.percentile(latencies, 50)),
        "p95": float(np.percentile(latencies, 95)),
        **{f"{k}_ms": float(np.median([s[k] for s in stages])) for k in ("extract", "search", "post")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad"))
    parser.add_argument("--images", type=int, default=40, help="images scored by each station")
    parser.add_argument("--stations", default="1,2,4")
    args = parser.parse_args()
    problem = network_isolation_problem()
    if problem:
        raise SystemExit(problem)
    with tempfile.TemporaryDirectory(prefix="stations-") as work_dir:
        work = Path(work_dir)
        server = MilvusTestServer(work / "server")
        server.start()
        try:
            config = Config(uri=server.uri, progress=False)
            t = time.perf_counter()
            summary = fit_bank("bottle", list_images(args.data / "bottle" / "train" / "good"), config)
            print(f"ingest on the server: {time.perf_counter() - t:.0f} s, {summary.coreset_size} vectors", flush=True)
            lite_uri = str(work / "lite.db")
            # In a process of its own: a Milvus Lite file stays locked until its process ends.
            subprocess.run([sys.executable, __file__, "--copy", server.uri, lite_uri], check=True)
            rows = [("Milvus Lite", 1, run_stations(lite_uri, 1, args.images, args.data, work))]
            for n in [int(s) for s in args.stations.split(",")]:
                rows.append(("Milvus 2.3.5 server", n, run_stations(server.uri, n, args.images, args.data, work)))
        finally:
            server.stop()
    print(f"\n{args.images} bottle test images per station, one image per call, torch on 1 thread per station")
    print("| Milvus | stations | images/s (all) | p50 ms/image | p95 ms/image | extract | search | post |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, stations, r in rows:
        print(
            f"| {name} | {stations} | {r['images_per_s']:.2f} | {r['p50']:.0f} | {r['p95']:.0f} | "
            f"{r['extract_ms']:.0f} | {r['search_ms']:.0f} | {r['post_ms']:.0f} |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--station":
        uri, count, start_at, out, data = sys.argv[2:7]
        station(uri, int(count), float(start_at), Path(out), Path(data))
    elif len(sys.argv) > 1 and sys.argv[1] == "--copy":
        copy_to_lite(sys.argv[2], sys.argv[3])
    else:
        main()
