"""The feature extractor on each runtime: ms per image and how far ONNX Runtime's features are
from torch's, on bottle's test images (EfficientNet-Lite0 to block 3, 256 px, batch 8).

    python benchmarks/extractor.py --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from patchcore_milvus.config import Config
from patchcore_milvus.features import FeaturePipeline
from patchcore_milvus.images import list_images, load_rgb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    paths = list_images(args.data / "bottle" / "test", recursive=True)[:8]
    runtimes = {
        name: FeaturePipeline.from_config(Config(runtime=name, num_threads=args.threads, image_size=256))
        for name in ("torch", "onnx")
    }
    batch = np.stack([runtimes["onnx"].preprocess(load_rgb(path)) for path in paths])
    outputs, timings = {}, {}
    for name, pipeline in runtimes.items():
        outputs[name] = pipeline(batch)  # warm-up
        started = time.perf_counter()
        for _ in range(args.repeats):
            pipeline(batch)
        timings[name] = (time.perf_counter() - started) * 1000 / args.repeats / len(batch)
    difference = float(np.abs(outputs["onnx"] - outputs["torch"]).max())
    scale = float(np.abs(outputs["torch"]).max())
    print(f"{len(batch)} images of 256 x 256, {args.threads} threads, mean of {args.repeats} batches")
    print("| runtime | ms per image | vs torch |")
    print("| --- | --- | --- |")
    for name, ms in timings.items():
        print(f"| {name} | {ms:.1f} | {timings['torch'] / ms:.1f}x faster |")
    print(f"largest difference from torch: {difference:.2e} (features up to {scale:.1f}: {difference / scale:.1e})")


if __name__ == "__main__":
    main()
