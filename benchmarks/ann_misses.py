"""How often, and by how much, an HNSW search misses the exact nearest neighbour of real patches:
Milvus Lite and the Milvus 2.3.5 server (`--server`) over bottle's bank (default configuration),
the patches of 8 test images, at several `ef`. What `ann_check.py` guards against.

    unshare -n sh -c 'ip link set lo up && python benchmarks/ann_misses.py --server'
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from bank_copy import copy_bank

from patchcore_milvus import Bank, Config, fit_bank
from patchcore_milvus.ann_check import same_distance
from patchcore_milvus.exact import ExactSearch
from patchcore_milvus.images import list_images, load_rgb
from patchcore_milvus.milvus import BankStore
from patchcore_milvus.mvtec import train_folder
from patchcore_milvus.testing.milvus_server import MilvusTestServer, network_isolation_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad"))
    parser.add_argument("--server", action="store_true", help="also a Milvus 2.3.5 server (needs `unshare -n`)")
    parser.add_argument("--ef", type=int, nargs="+", default=[16, 64, 256, 1024])
    args = parser.parse_args()
    if args.server and (problem := network_isolation_problem()):
        raise SystemExit(problem)
    with tempfile.TemporaryDirectory(prefix="ann-misses-") as work:
        config = Config(uri=str(Path(work) / "lite.db"), progress=False)
        fit_bank("bottle", list_images(train_folder(args.data, "bottle")), config, root=args.data / "bottle")
        store = BankStore.from_config(config)
        bank = Bank.open("bottle", config, store=store)
        vectors = store.read_vectors(bank.version)
        tests = list_images(args.data / "bottle" / "test" / "good")[:4]
        tests += list_images(args.data / "bottle" / "test" / "broken_large")[:4]
        patches = bank.features(np.stack([bank.features.preprocess(load_rgb(p)) for p in tests]))
        queries = patches.reshape(-1, patches.shape[-1])
        exact, _ = ExactSearch(vectors)(queries, 1)
        norms = np.linalg.norm(queries, axis=1)
        targets = {"Milvus Lite": (store, bank.version)}
        server = None
        if args.server:
            server = MilvusTestServer(Path(work) / "server")
            server.start()
            server_store = BankStore(server.uri)
            targets["Milvus 2.3.5 server"] = (server_store, copy_bank(store, bank.version, server_store, config))
        try:
            print(f"bank {len(vectors)} x {vectors.shape[1]}, HNSW M 16, efConstruction 200; {len(queries)} patches")
            print("| Milvus | ef | misses | worst distance error |")
            print("| --- | --- | --- | --- |")
            for name, (target, version) in targets.items():
                for ef in args.ef:
                    found, _ = target.search(version, queries, 1, {"ef": ef})
                    missed = ~same_distance(found[:, 0], exact[:, 0], norms)
                    worst = float((found[:, 0] - exact[:, 0]).max())
                    print(f"| {name} | {ef} | {int(missed.sum())} | {worst:.1f} |", flush=True)
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
