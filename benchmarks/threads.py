"""How a station's two CPU stages share the cores: the extractor (ONNX Runtime) and the search
(faiss' threads of the local replica, or Milvus Lite's engine in this process), each given all
the cores or half of them (the default, config.stage_threads). Each run is a fresh process
scoring bottle's test images with `Bank.score_paths` (the batch after next is decoded and the
next one extracted while this one is searched); the steady state per image leaves the first
batch out.

    python benchmarks/threads.py --uri bottle.db   # after `patchcore-milvus ingest ... --uri bottle.db`
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

LAYOUTS = {"all cores each": os.cpu_count() or 1, "half the cores each (default)": None}


def child(uri: str, search: str, threads: int | None, data: Path) -> None:
    import patchcore_milvus.mirror
    import patchcore_milvus.replica
    from patchcore_milvus.bank import Bank
    from patchcore_milvus.config import Config
    from patchcore_milvus.images import list_images

    if threads is not None:
        patchcore_milvus.replica.stage_threads = lambda: threads  # faiss' threads of the replica
        patchcore_milvus.mirror.stage_threads = lambda: threads  # and of the exact recheck
    bank = Bank.open("bottle", Config(uri=uri, progress=False, search=search, num_threads=threads))
    paths = list_images(data / "bottle" / "test", recursive=True)
    list(bank.score_paths(paths[:8]))
    start = time.perf_counter()
    list(bank.score_paths(paths[8:]))
    print(f"{(time.perf_counter() - start) * 1000 / (len(paths) - 8):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uri", required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # search, threads (0: default)
    args = parser.parse_args()
    if args.child:
        child(args.uri, args.child[0], int(args.child[1]) or None, args.data)
        return
    print(f"{os.cpu_count()} cores; ms per image, {args.repeat} runs each, alternating")
    for search in ("local", "milvus"):
        runs: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        for _ in range(args.repeat):
            for name, threads in LAYOUTS.items():
                command = [sys.executable, __file__, "--uri", args.uri, "--data", str(args.data)]
                command += ["--child", search, str(threads or 0)]
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                runs[name].append(float(out.split()[-1]))
        medians = {name: sorted(ms)[len(ms) // 2] for name, ms in runs.items()}
        cells = [f"{name}: {medians[name]:.1f} (runs {', '.join(f'{m:.0f}' for m in ms)})" for name, ms in runs.items()]
        all_cores, half = medians.values()
        print(f"search {search}: " + "; ".join(cells) + f"; all/half {all_cores / half:.2f}x")


if __name__ == "__main__":
    main()
