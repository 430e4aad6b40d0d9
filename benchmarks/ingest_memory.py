"""Peak memory of ingest as the number of training images grows.

Each run ingests N images into a fresh Milvus Lite file in a child process and reports the
child's peak resident memory. The images are bottle's training images, repeated to reach N;
with `--augment` every repeat is a new picture (turned by up to 10 degrees, maybe mirrored,
brightness and contrast changed, written at 256 px), so that its patches are new as well.
Full-dimension patch features stream to a memory-mapped file; only the coreset's 128-dim
projection stays in RAM, so memory should grow far slower than N x patches x dims x 4 bytes
(the size of all features in RAM, printed beside for comparison). The coreset size is fixed
(`--coreset-size`) so that the runs measure memory, not the coreset's time, unless
`--coreset-ratio` asks for the usual share; the coreset's seconds are printed as well.

    python benchmarks/ingest_memory.py --images 200 2000
    python benchmarks/ingest_memory.py --images 200 --backbone wide_resnet50_2 --weights random
    python benchmarks/ingest_memory.py --images 2000 --augment --coreset-ratio 0.1
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

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from patchcore_milvus.images import list_images


def ingest_in_this_process(spec: dict) -> None:
    """The child: one ingest, its figures as a JSON line on stdout."""
    import torch

    from patchcore_milvus import Config, fit_bank

    torch.set_num_threads(2)
    config = Config(
        uri=spec["uri"],
        backbone=spec["backbone"],
        weights=spec["weights"],
        coreset_size=spec["coreset_size"],
        coreset_ratio=spec["coreset_ratio"],
        image_size=256,  # the size its copies are written at and its README figures were measured at
        progress=False,
    )
    summary = fit_bank("bottle", [Path(p) for p in spec["images"]], config)
    print(
        json.dumps(
            {
                "patches": summary.patches,
                "dim": summary.dim,
                "coreset": summary.coreset_size,
                "seconds": summary.seconds,
            }
        )
    )


def augmented(path: Path, seed: int, folder: Path) -> Path:
    """A new picture of the same part: turned, maybe mirrored, lit differently; 256 px PNG."""
    rng = np.random.default_rng(seed)
    image = Image.open(path).convert("RGB").resize((256, 256), Image.Resampling.BILINEAR)
    image = image.rotate(float(rng.uniform(-10, 10)), resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.85, 1.15)))
    image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.85, 1.15)))
    out = folder / f"augmented_{seed:05d}.png"
    image.save(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad"))
    parser.add_argument("--images", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--coreset-size", type=int, default=1000)
    parser.add_argument("--coreset-ratio", type=float, default=None, help="instead of --coreset-size")
    parser.add_argument("--augment", action="store_true", help="every repeat of an image a new picture")
    args = parser.parse_args()
    train = list_images(args.data.resolve() / "bottle" / "train" / "good")
    print(
        f"{'images':>7}{'patches':>10}{'dim':>6}{'peak RSS MiB':>14}{'features in RAM MiB':>21}"
        f"{'coreset':>9}{'coreset s':>11}{'seconds':>9}"
    )
    for n in args.images:
        with tempfile.TemporaryDirectory() as folder:
            images = [train[i % len(train)] for i in range(n)]
            if args.augment:
                images = [
                    augmented(path, i, Path(folder)) if i >= len(train) else path for i, path in enumerate(images)
                ]
            spec = {
                "images": [str(p) for p in images],
                "uri": str(Path(folder) / "m.db"),
                "backbone": args.backbone,
                "weights": args.weights,
                "coreset_size": None if args.coreset_ratio else args.coreset_size,
                "coreset_ratio": args.coreset_ratio or 0.1,
            }
            started = time.perf_counter()
            child = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True
            )
            seconds = time.perf_counter() - started
            if child.returncode != 0:
                sys.exit(child.stderr)
            result = json.loads(child.stdout.strip().splitlines()[-1])
            # ru_maxrss of children is the largest child so far: runs go in ascending N.
            peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            all_features_mib = result["patches"] * result["dim"] * 4 / 2**20
            print(
                f"{n:>7}{result['patches']:>10}{result['dim']:>6}{peak_mib:>14.0f}{all_features_mib:>21.0f}"
                f"{result['coreset']:>9}{result['seconds']['coreset']:>11.1f}{seconds:>9.0f}",
                flush=True,
            )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # measured in a process of its own, so that its peak RSS is its own
        ingest_in_this_process(json.loads(sys.argv[2]))
    else:
        main()
