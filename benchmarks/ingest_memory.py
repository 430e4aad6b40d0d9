"""Peak memory of ingest as the number of training images grows.

Each run ingests N images (bottle's training images, repeated in order to reach N) into a
fresh Milvus Lite file in a child process and reports the child's peak resident memory.
Full-dimension patch features stream to a memory-mapped file; only the coreset's 128-dim
projection stays in RAM, so memory should grow far slower than N x patches x dims x 4 bytes
(the size of all features in RAM, printed beside for comparison). The coreset size is fixed
(`--coreset-size`) so that the runs measure memory, not the coreset's time.

    python benchmarks/ingest_memory.py --images 200 2000
    python benchmarks/ingest_memory.py --images 200 --backbone wide_resnet50_2 --weights random
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, torch
from pathlib import Path
from patchcore_milvus import Config, fit_bank
from patchcore_milvus.images import list_images
args = json.loads(sys.argv[1])
torch.set_num_threads(2)
train = list_images(Path(args["data"]) / "bottle" / "train" / "good")
images = [train[i % len(train)] for i in range(args["images"])]
config = Config(uri=args["uri"], backbone=args["backbone"], weights=args["weights"],
                coreset_size=args["coreset_size"], progress=False)
summary = fit_bank("bottle", images, config)
print(json.dumps({"patches": summary.patches, "dim": summary.dim, "seconds": summary.seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad"))
    parser.add_argument("--images", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--coreset-size", type=int, default=1000)
    args = parser.parse_args()
    print(f"{'images':>7}{'patches':>10}{'dim':>6}{'peak RSS MiB':>14}{'features in RAM MiB':>21}{'seconds':>9}")
    for n in args.images:
        with tempfile.TemporaryDirectory() as folder:
            spec = {
                "data": str(args.data.resolve()),
                "images": n,
                "uri": str(Path(folder) / "m.db"),
                "backbone": args.backbone,
                "weights": args.weights,
                "coreset_size": args.coreset_size,
            }
            started = time.perf_counter()
            child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
            seconds = time.perf_counter() - started
            if child.returncode != 0:
                sys.exit(child.stderr)
            result = json.loads(child.stdout.strip().splitlines()[-1])
            # ru_maxrss of children is the largest child so far: runs go in ascending N.
            peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            all_features_mib = result["patches"] * result["dim"] * 4 / 2**20
            print(
                f"{n:>7}{result['patches']:>10}{result['dim']:>6}{peak_mib:>14.0f}{all_features_mib:>21.0f}"
                f"{seconds:>9.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
