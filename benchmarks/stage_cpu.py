"""Where a station's time goes: the CPU time of each stage per image, one stage at a time, and the
wall time of each step of a one-image query, on a bank of bottle in a Milvus Lite file.

    python benchmarks/stage_cpu.py --uri bottle.db   # after `patchcore-milvus ingest ... --uri bottle.db`
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

started = time.perf_counter()
from patchcore_milvus.bank import Bank, Extracted  # noqa: E402  (the import is what is timed)
from patchcore_milvus.config import Config  # noqa: E402
from patchcore_milvus.images import list_images, load_rgb  # noqa: E402
from patchcore_milvus.milvus import BankStore  # noqa: E402

IMPORT_S = time.perf_counter() - started


def cpu_ms(job, images: int) -> tuple[object, float]:
    """`job()`'s result and the process CPU time it took, in ms per image (all threads)."""
    start = time.process_time()
    result = job()
    return result, (time.process_time() - start) * 1000 / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uri", required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad"))
    parser.add_argument("--images", type=int, default=40)
    args = parser.parse_args()
    one = args.data / "bottle" / "test" / "good" / "000.png"

    t0 = time.perf_counter()
    store = BankStore(args.uri, existing=True)
    t1 = time.perf_counter()
    config = Config(uri=args.uri, progress=False)
    bank = Bank.open("bottle", config, store=store)
    t2 = time.perf_counter()
    list(bank.score_paths([one]))
    t3 = time.perf_counter()
    print(
        f"one-image query, in process: import {IMPORT_S:.2f} s, connect {t1 - t0:.2f} s, open the bank (description, "
        f"extractor, collection) {t2 - t1:.2f} s, score {t3 - t2:.2f} s"
    )

    paths = list_images(args.data / "bottle" / "test", recursive=True)[: args.images]
    for search in ("milvus", "local"):
        scored = Bank.open("bottle", config.replace(search=search), store=store)
        list(scored.score_paths(paths[:8]))  # warm
        split = stage_split(scored, paths, config.batch_size)
        total = sum(split.values())
        stages = ", ".join(f"{name} {ms:.1f}" for name, ms in split.items())
        print(f"search {search}: CPU ms per image: {stages}; total {total:.1f}, at best {total / 2:.0f} ms on 2 cores")


def stage_split(bank: Bank, paths: list[Path], size: int) -> dict[str, float]:
    """CPU ms per image of each stage, run one after another over `paths`."""
    n = len(paths)
    images, decode = cpu_ms(lambda: [load_rgb(p) for p in paths], n)
    inputs, resize = cpu_ms(lambda: [bank.features.preprocess(i) for i in images], n)
    starts = range(0, n, size)
    features, extract = cpu_ms(lambda: [bank.features(np.stack(inputs[i : i + size])) for i in starts], n)
    batches = [
        Extracted(
            [str(p) for p in paths[i : i + size]], images[i : i + size], features[k], [0.0] * size, 0.0, bank.features
        )
        for k, i in enumerate(starts)
    ]
    _, search_post = cpu_ms(lambda: [bank.score_extracted(b) for b in batches], n)
    return {"decode": decode, "resize": resize, "extract": extract, "search and post": search_post}


if __name__ == "__main__":
    main()
