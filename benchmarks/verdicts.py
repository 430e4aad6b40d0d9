"""The check every change to search, scoring or thresholds gets: bottle ingested with the default
configuration into a fresh Milvus Lite file and a Milvus 2.3.5 server, then `evaluate --search
all` on each (Milvus, the station-side replica and exact search over the same vectors): metrics,
false positives and negatives at the stored thresholds, and patch recall@1 against exact search,
side by side. The verdicts of every search must agree with exact search's, image by image, and
so must the image scores (each image's worst patches are rechecked exactly), to float32 rounding.

    unshare -n sh -c 'ip link set lo up && python benchmarks/verdicts.py'
    python benchmarks/verdicts.py --lite-only    # where no network namespace can be made
    python benchmarks/verdicts.py --index-type IVF_SQ8    # another index type than the default
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from patchcore_milvus.bank import Bank
from patchcore_milvus.config import Config, load_config
from patchcore_milvus.evaluate import VERSUS_EXACT, evaluate_category
from patchcore_milvus.testing.milvus_server import MilvusTestServer, network_isolation_problem


def check(data: Path, uri: str, label: str, config_file: Path) -> list[str]:
    """Ingest (the CLI, as a user would, with `config_file`) and evaluate (in this process, for each
    image's score) on `uri`; the table's lines for bottle."""
    ingest = ["patchcore-milvus", "ingest", str(data), "--category", "bottle", "--uri", uri, "--no-progress"]
    subprocess.run([*ingest, "--config", str(config_file)], check=True)
    bank = Bank.open("bottle", load_config(config_file, uri=uri, progress=False))
    evaluation = evaluate_category(bank, "bottle", data / "bottle", "all", 256, progress=False)
    entry, scores = evaluation.report, evaluation.scores
    threshold = bank.image_threshold
    exact_verdicts = scores["exact"] > threshold
    lines = []
    for method, metrics in entry["search"].items():
        at = metrics["at_threshold"]
        versus = entry.get(VERSUS_EXACT.get(method, ""), {})
        recall = versus.get("patch_recall_at_1")
        differ = int(((scores[method] > threshold) != exact_verdicts).sum())
        gap = float(np.max(np.abs(scores[method] - scores["exact"]) / scores["exact"]))
        lines.append(
            f"| {label} | {method} | {metrics['image_auroc']:.4f} / {metrics['pixel_auroc']:.4f} / "
            f"{metrics['aupro']:.4f} | {at['false_positives']} / {at['false_negatives']} | "
            f"{'-' if recall is None else f'{recall:.4f}'} | {differ} | {gap:.1e} |"
        )
    bank.store.close()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad"))
    parser.add_argument("--lite-only", action="store_true", help="Skip the Milvus server.")
    parser.add_argument("--index-type", default=Config().index_type)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="verdicts-") as folder:
        work = Path(folder)
        config_file = work / "config.yaml"
        config_file.write_text(f"index_type: {args.index_type}\n")
        rows += check(args.data, str(work / "bottle.db"), "Milvus Lite", config_file)
        if not args.lite_only:
            problem = network_isolation_problem()
            if problem:
                raise SystemExit(f"{problem} (or pass --lite-only)")
            server = MilvusTestServer(work / "server")
            server.start()
            try:
                rows += check(args.data, server.uri, "Milvus 2.3.5 server", config_file)
            finally:
                server.stop()
    print(f"bottle, index_type {args.index_type}")
    print(
        "| bank on | search | image AUROC / pixel AUROC / AUPRO | FP / FN | patch recall@1 | verdicts unlike exact "
        "search's | largest image-score difference from exact (relative) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
