"""Two ways around Milvus Lite's cost per query vector, measured: a slimmer collection, and Lite's
engine in a process of its own.

1. Schema. Lite turns every hit into a dict of all its row's fields (`Segment.row_to_dict` in
   milvus_lite/storage/segment.py). The vectors of a bank version (read from `--uri`) go into
   three collections of a fresh Lite file: this project's schema (id, vector, image, patch y and
   x, description), id + vector + one text field, and id + vector alone; each gets the bank's
   HNSW index and the same 8,192 test patches, searched as this project searches (arrays,
   `columnar_search`): µs per query vector.
2. Process. Lite 3 serves a .db file from threads of the process that opens it, so its pure-Python
   engine takes the GIL from the station's own threads. The same Lite file is served instead by a
   child process (milvus_lite's own gRPC server on a loopback port), and bottle's test images are
   scored end to end (`Bank.score_paths`) in both ways: ms per image, steady state.

    python benchmarks/lite_engine.py --uri bottle.db   # after `patchcore-milvus ingest ... --uri bottle.db`
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pymilvus import DataType, MilvusClient

from patchcore_milvus.milvus.columnar import columnar_search

SCHEMAS = {
    "this project's (id, vector, image, patch_y, patch_x, description)": ["image", "patch_y", "patch_x", "description"],
    "id, vector, one text field": ["description"],
    "id, vector": [],
}
_TYPES = {
    "image": DataType.VARCHAR,
    "description": DataType.VARCHAR,
    "patch_y": DataType.INT32,
    "patch_x": DataType.INT32,
}
SERVE = """
import sys
from milvus_lite.adapter.grpc.server import start_server_in_thread
server, db, port = start_server_in_thread(data_dir=sys.argv[1], host="127.0.0.1", port=0)
print(port, flush=True)
sys.stdin.read()  # until the parent closes the pipe (or dies)
server.stop(grace=1)
db.close()
"""


def bank_and_patches(uri: str, data: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """In a child process, so that this one never opens the Lite file the others will serve."""
    script = f"""
import numpy as np, sys
from patchcore_milvus.bank import Bank
from patchcore_milvus.config import Config
from patchcore_milvus.images import list_images, load_rgb
bank = Bank.open("bottle", Config(uri={uri!r}, progress=False))
paths = list_images(__import__("pathlib").Path({str(data)!r}) / "bottle" / "test", recursive=True)[::10][:8]
patches = bank.features(np.stack([bank.features.preprocess(load_rgb(p)) for p in paths]))
np.savez(sys.argv[1], vectors=bank.store.read_vectors(bank.version), patches=patches.reshape(-1, patches.shape[-1]))
print(repr(bank.description.index.params))
"""
    with tempfile.TemporaryDirectory() as work:
        target = Path(work) / "bank.npz"
        out = subprocess.run([sys.executable, "-c", script, str(target)], check=True, capture_output=True, text=True)
        loaded = np.load(target)
        return loaded["vectors"], loaded["patches"], ast.literal_eval(out.stdout.strip().splitlines()[-1])


def schema_costs(vectors: np.ndarray, patches: np.ndarray, index_params: dict) -> None:
    with tempfile.TemporaryDirectory() as work:
        client = MilvusClient(str(Path(work) / "schemas.db"))
        for k, (name, extra) in enumerate(SCHEMAS.items()):
            collection = f"schema{k}"
            schema = MilvusClient.create_schema(auto_id=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=vectors.shape[1])
            for field in extra:
                length = {"max_length": 65535} if _TYPES[field] == DataType.VARCHAR else {}
                schema.add_field(field, _TYPES[field], **length)
            client.create_collection(collection, schema=schema)
            values = {"image": "good/000.png", "patch_y": 3, "patch_x": 5, "description": ""}
            rows = [{"id": i, "embedding": v.tolist(), **{f: values[f] for f in extra}} for i, v in enumerate(vectors)]
            for start in range(0, len(rows), 5000):
                client.insert(collection, rows[start : start + 5000])
            client.flush(collection)
            index = client.prepare_index_params()
            index.add_index("embedding", index_type="HNSW", metric_type="L2", params={"params": index_params})
            client.create_index(collection, index)
            client.load_collection(collection)

            def search(name: str = collection) -> None:
                columnar_search(client, name, patches, 1, {"ef": 64}, "embedding", "_default", "id", 600)

            search()
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                search()
                runs.append((time.perf_counter() - start) * 1e6 / len(patches))
            print(f"| {name} | {sorted(runs)[1]:.1f} |")


def scored_ms(uri: str, data: Path) -> float:
    script = f"""
import time
from pathlib import Path
from patchcore_milvus.bank import Bank
from patchcore_milvus.config import Config
from patchcore_milvus.images import list_images
bank = Bank.open("bottle", Config(uri={uri!r}, progress=False))
paths = list_images(Path({str(data)!r}) / "bottle" / "test", recursive=True)
list(bank.score_paths(paths[:8]))
start = time.perf_counter()
list(bank.score_paths(paths[8:]))
print((time.perf_counter() - start) * 1000 / (len(paths) - 8))
"""
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def process_costs(uri: str, data: Path, repeat: int) -> None:
    runs: dict[str, list[float]] = {"in the station's process (as today)": [], "in a child process": []}
    for _ in range(repeat):
        runs["in the station's process (as today)"].append(scored_ms(uri, data))
        child = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(Path(uri).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            port = int(child.stdout.readline())
            runs["in a child process"].append(scored_ms(f"http://127.0.0.1:{port}", data))
        finally:
            child.stdin.close()
            child.wait(timeout=60)
    for name, ms in runs.items():
        print(f"| Lite {name} | {sorted(ms)[len(ms) // 2]:.1f} | {', '.join(f'{m:.0f}' for m in ms)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uri", required=True, help="a Milvus Lite file with a bank of bottle")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    vectors, patches, index_params = bank_and_patches(args.uri, args.data)
    print(f"bank {vectors.shape[0]} x {vectors.shape[1]}, {len(patches)} query patches, HNSW {index_params}, ef 64")
    print("| schema of the bank collection | Lite µs per query vector |\n| --- | --- |")
    schema_costs(vectors, patches, index_params)
    print(f"\nbottle's test images scored end to end, {args.repeat} runs each, alternating")
    print("| Milvus Lite served | ms per image (median) | runs |\n| --- | --- | --- |")
    process_costs(args.uri, args.data, args.repeat)


if __name__ == "__main__":
    main()
