"""The query path: a station's `patchcore-milvus query` per back end, nearest-neighbour search in
Milvus against in-process search, and where the time of one image goes.

First, as a station runs it, each command in a fresh process: `ingest` bottle into a Milvus Lite
file (and the server with `--server`), then a one-image `query` and a `query` of all 83 test
images, on Milvus Lite, the server and `--search local`; the steady state per image is (wall of
all - wall of one) / 82, as the speed issue measures it. Then, in this process, on that Lite bank
(default configuration: EfficientNet-Lite0, 384 px, 1 % coreset, HNSW), searches the patches of
bottle's test images (2,304 per image) in batches of `batch_size` images, one call per batch,
with: Milvus Lite, a Milvus 2.3.5 server (`--server`; same vectors, same index parameters),
faiss-cpu IndexHNSWFlat (Milvus' HNSW parameters) and exact search (faiss IndexFlatL2); the Milvus
searches both as this project reads them (arrays, `columnar_search`) and through
`MilvusClient.search` (one Python object per hit). Each prints the median ms per image and
recall@1 against exact search (a hit at the exact distance counts, so ties do not). Then the
images are scored end to end with `Bank.score_paths` (the batch after next is decoded and the
next one extracted while this one is searched) and without the overlap, and the median time per
image of each stage is printed.

    python benchmarks/query.py --images 40
    unshare -n sh -c 'ip link set lo up && python benchmarks/query.py --images 40 --server'
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch
from bank_copy import copy_bank

from patchcore_milvus.ann_check import recall_at_1
from patchcore_milvus.bank import Bank
from patchcore_milvus.config import Config
from patchcore_milvus.exact import ExactSearch
from patchcore_milvus.features import FeaturePipeline
from patchcore_milvus.images import list_images, load_rgb
from patchcore_milvus.milvus import BankStore
from patchcore_milvus.milvus.rows import BANK_PARTITION, MAX_NQ, VECTOR_FIELD
from patchcore_milvus.testing.milvus_server import MilvusTestServer, network_isolation_problem

Search = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # queries -> (distances, ids), k = 1


def spread_test_images(data: Path, count: int) -> list[Path]:
    """`count` test images spread evenly over bottle's defect types and good ones."""
    paths = sorted((data / "bottle" / "test").rglob("*.png"))
    return [paths[i] for i in np.linspace(0, len(paths) - 1, min(count, len(paths))).round().astype(int)]


def time_search(
    search: Search, batches: list[np.ndarray], exact: list[tuple[np.ndarray, np.ndarray]], patches_per_image: int
) -> tuple[float, float]:
    """Median ms per image over the batches (after one warm-up call), and recall@1 against exact
    (ann_check's definition: the same row, or one at the same distance)."""
    search(batches[0])
    per_image, hits = [], []
    for queries, (exact_distances, exact_ids) in zip(batches, exact):
        images = len(queries) // patches_per_image
        start = time.perf_counter()
        distances, ids = search(queries)
        per_image.append((time.perf_counter() - start) * 1000 / images)
        norms = np.linalg.norm(queries, axis=1)
        hits.append(recall_at_1(distances[:, 0], ids[:, 0], exact_distances, exact_ids, norms) * len(queries))
    return float(np.median(per_image)), sum(hits) / sum(len(q) for q in batches)


def faiss_search(index: faiss.Index) -> Search:
    def search(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        squared, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
        return np.sqrt(np.maximum(squared, 0)), ids

    return search


def per_hit_search(store: BankStore, collection: str, params: dict) -> Search:
    """The same search through `MilvusClient.search`, which builds one `Hit` per result: the client
    cost that `columnar_search` removes."""

    def search(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hits = []
        for start in range(0, len(queries), MAX_NQ):  # Milvus' limit on queries per call, as rows.search keeps
            hits += store.client.search(
                collection,
                data=queries[start : start + MAX_NQ],
                anns_field=VECTOR_FIELD,
                limit=1,
                output_fields=["id"],
                partition_names=[BANK_PARTITION],
                search_params={"metric_type": "L2", "params": params},
            )
        squared = np.array([h.distances[0] for h in hits], dtype=np.float32)[:, None]
        return np.sqrt(squared), np.array([h.ids[0] for h in hits])[:, None]

    return search


def end_to_end(bank: Bank, paths: list[Path], overlap: bool) -> tuple[float, dict[str, float]]:
    """Wall ms per image for scoring `paths`, and each stage's median ms per image."""
    list(bank.score_paths(paths[: bank.config.batch_size]))  # warm-up
    start = time.perf_counter()
    if overlap:
        results = [result for _, result in bank.score_paths(paths)]
    else:
        results = []
        for begin in range(0, len(paths), bank.config.batch_size):
            batch = paths[begin : begin + bank.config.batch_size]
            loading = time.perf_counter()
            images = [load_rgb(p) for p in batch]
            load_ms = (time.perf_counter() - loading) * 1000 / len(batch)
            for result in bank.score_images(images, [str(p) for p in batch]):
                result.timings_ms["load"] = load_ms
                results.append(result)
    wall = (time.perf_counter() - start) * 1000 / len(paths)
    stages = {k: float(np.median([r.timings_ms[k] for r in results])) for k in results[0].timings_ms}
    return wall, stages


ANOMALIB_MS = 155  # quoted: anomalib 2.7.0 PatchCore's forward, lite0 weights, 10 % coreset, this machine


def _wall(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started


def _search_width(uri: str, env: dict[str, str]) -> str:
    """The search parameters bottle's current version was published with, read in a child process
    (a Milvus Lite file serves one process, and the stations' commands need it afterwards)."""
    script = (
        "import sys; from patchcore_milvus.milvus import BankStore; s = BankStore(sys.argv[1]); "
        "w = s.read_description(s.resolve('bottle')).search; "
        "print(', '.join(f'{k} {v}' for k, v in w.params.items()) if w else '-')"
    )
    done = subprocess.run([sys.executable, "-c", script, uri], check=True, capture_output=True, text=True, env=env)
    return done.stdout.strip()


def station_rows(
    data: Path, lite_uri: str, server_uri: str | None, cache: Path
) -> dict[str, tuple[float, float, float | None, str]]:
    """The CLI as a station runs it, each in a fresh process: ingest, a one-image query, a query
    of all test images. Per back end: (steady ms per image, one-image wall s, ingest wall s, the
    search width the ingest's check chose)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    one = [str(data / "bottle" / "test" / "broken_large" / "000.png")]
    every = [str(data / "bottle" / "test")]
    count = len(list_images(data / "bottle" / "test", recursive=True))
    cli = ["patchcore-milvus"]
    rows: dict[str, tuple[float, float, float | None, str]] = {}
    setups = [
        ("Milvus Lite (default)", lite_uri, []),
        ("search: local (replica of the Lite bank)", lite_uri, ["--search", "local"]),
    ]
    if server_uri is not None:
        setups.insert(1, ("Milvus 2.3.5 server, same 2 cores", server_uri, []))
    ingested: set[str] = set()
    for name, uri, extra in setups:
        ingest = None
        if uri not in ingested:
            ingested.add(uri)
            ingest = _wall([*cli, "ingest", str(data), "--category", "bottle", "--uri", uri, "--no-progress"], env)
        query = [*cli, "query", "--category", "bottle", "--uri", uri, *extra]
        _wall([*query, *one], env)  # warm: page cache, and a local replica built once
        single = _wall([*query, *one], env)
        whole = _wall([*query, *every], env)
        rows[name] = ((whole - single) * 1000 / (count - 1), single, ingest, _search_width(uri, env))
        print(f"{name}: {rows[name][0]:.0f} ms per image, one image {single:.2f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad"))
    parser.add_argument("--images", type=int, default=40, help="test images to score")
    parser.add_argument("--server", action="store_true", help="also a Milvus 2.3.5 server (needs `unshare -n`)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.server and (problem := network_isolation_problem()):
        raise SystemExit(problem)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="query-bench-") as work_dir:
        work = Path(work_dir)
        config = Config(uri=str(work / "lite.db"), progress=False)
        server = None
        if args.server:
            server = MilvusTestServer(work / "server")
            server.start()
        try:
            stations = station_rows(args.data, config.uri, server.uri if server else None, work / "cache")
        except BaseException:
            if server is not None:
                server.stop()
            raise
        store = BankStore.from_config(config)  # the bank the first station row ingested
        version = store.resolve("bottle")
        vectors = store.read_vectors(version).astype(np.float32)
        params = config.effective_search_params

        paths = spread_test_images(args.data, args.images)
        features = FeaturePipeline.from_config(config)
        batches = []
        for begin in range(0, len(paths), config.batch_size):
            images = [features.preprocess(load_rgb(p)) for p in paths[begin : begin + config.batch_size]]
            batches.append(features(np.stack(images)).reshape(-1, features.dim))
        exact_search = ExactSearch(vectors)
        exact = [tuple(column[:, 0] for column in exact_search(queries, 1)) for queries in batches]

        hnsw = faiss.IndexHNSWFlat(vectors.shape[1], config.effective_index_params["M"])
        hnsw.hnsw.efConstruction = config.effective_index_params["efConstruction"]
        hnsw.add(vectors)
        hnsw.hnsw.efSearch = params["ef"]
        searchers: dict[str, Search] = {
            "Milvus Lite, HNSW": lambda q: store.search(version, q, 1, params),
            "Milvus Lite, HNSW, through MilvusClient.search": per_hit_search(store, version, params),
            "faiss IndexHNSWFlat": faiss_search(hnsw),
            "exact (ExactSearch: faiss IndexFlatL2)": lambda q: exact_search(q, 1),
        }
        if server is not None:
            server_store = BankStore(server.uri)
            collection = copy_bank(store, version, server_store, config)
            searchers["Milvus 2.3.5 server, HNSW"] = lambda q: server_store.search(collection, q, 1, params)
            searchers["Milvus 2.3.5 server, HNSW, through MilvusClient.search"] = per_hit_search(
                server_store, collection, params
            )
        try:
            per_image = len(batches[0]) // min(config.batch_size, len(paths))
            rows = {name: time_search(search, batches, exact, per_image) for name, search in searchers.items()}
            lite_bank = Bank.open("bottle", config, store=store, features=features)
            pipelines = {
                "Milvus Lite, overlapped": end_to_end(lite_bank, paths, overlap=True),
                "Milvus Lite, one stage after another": end_to_end(lite_bank, paths, overlap=False),
            }
            if server is not None:
                server_bank = Bank.open("bottle", config.replace(uri=server.uri), features=features)
                pipelines["Milvus server, overlapped"] = end_to_end(server_bank, paths, overlap=True)
        finally:
            if server is not None:
                server.stop()

    print(f"bank: {len(vectors)} x {vectors.shape[1]}")
    print("\n`patchcore-milvus query` over bottle's test images (decoding included), steady state = (wall of all")
    print(f"- wall of one) / (all - 1); anomalib 2.7.0 PatchCore, same weights, 10 %: {ANOMALIB_MS} ms (model forward")
    print("alone, measured on this machine by the issue that set the targets)")
    print(
        "| back end | ms per image, steady state | faster than anomalib | one-image query, wall s | ingest, wall s "
        "| search width (ingest's check) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (steady, one, ingest, width) in stations.items():
        ingest_s = "-" if ingest is None else f"{ingest:.1f}"
        print(f"| {name} | {steady:.0f} | {ANOMALIB_MS / steady:.2f}x | {one:.2f} | {ingest_s} | {width} |")

    per_batch = config.batch_size
    print(f"\n{len(paths)} bottle test images, {per_batch} images (x {per_image:,} patches) per search call, k = 1")
    index = config.effective_index_params
    hnsw_params = f"M {index['M']}, efConstruction {index['efConstruction']}, ef {params['ef']}"
    print(f"bank {len(vectors)} x {vectors.shape[1]}, HNSW {hnsw_params}")
    faiss_ms = rows["faiss IndexHNSWFlat"][0]
    print("| search | ms per image | recall@1 | vs faiss HNSW |")
    print("| --- | --- | --- | --- |")
    for name, (ms, recall) in rows.items():
        print(f"| {name} | {ms:.1f} | {recall:.4f} | {ms / faiss_ms:.1f}x |")
    stages = list(next(iter(pipelines.values()))[1])
    print("\n| end to end | ms per image (wall) | " + " | ".join(f"{s} (median)" for s in stages) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in stages) + " |")
    for name, (wall, times) in pipelines.items():
        print(f"| {name} | {wall:.0f} | " + " | ".join(f"{times[s]:.1f}" for s in stages) + " |")


if __name__ == "__main__":
    main()
