"""An inspection station for the server tests: scores the same images over and over until told
to stop, one JSON line per batch (the bank version and scores, or the error), never exiting on
a Milvus fault. Run: python station.py CONFIG.yaml CATEGORY OUT.jsonl STOP_FILE IMAGE..."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from patchcore_milvus.bank import Bank
from patchcore_milvus.config import load_config
from patchcore_milvus.errors import PatchcoreMilvusError
from patchcore_milvus.images import load_rgb


def main(config_file: Path, category: str, out: Path, stop: Path, images: list[Path]) -> None:
    torch.set_num_threads(1)
    # Short timeouts and retries, so that an outage shows up as errors within seconds.
    config = load_config(config_file, milvus_timeout=10, retry_seconds=2, progress=False)
    bank = Bank.open(category, config)
    loaded = [load_rgb(path) for path in images]
    names = [path.name for path in images]
    with out.open("a") as log:
        while not stop.exists():
            started = time.time()
            try:
                results = bank.score_images(loaded, names)
                record = {
                    "t": started,
                    "ok": True,
                    "versions": sorted({r.bank_version for r in results}),
                    "scores": {r.path: r.image_score for r in results},
                }
            except PatchcoreMilvusError as exc:
                record = {"t": started, "ok": False, "error": str(exc)}
                time.sleep(0.5)
            log.write(json.dumps(record) + "\n")
            log.flush()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), [Path(p) for p in sys.argv[5:]])
