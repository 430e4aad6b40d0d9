"""The check every change to search, scoring or thresholds gets: bottle ingested with the default
configuration into a fresh Milvus Lite file and a Milvus 2.3.5 server, then `evaluate --search
all` on each (Milvus, the station-side replica and exact search over the same vectors): metrics,
false positives and negatives at the stored thresholds, and patch recall@1 against exact search,
side by side. The verdicts of every search must agree with exact search's.

    unshare -n sh -c 'ip link set lo up && python benchmarks/verdicts.py'
    python benchmarks/verdicts.py --lite-only    # where no network namespace can be made
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from patchcore_milvus.evaluate import VERSUS_EXACT
from patchcore_milvus.testing.milvus_server import MilvusTestServer, network_isolation_problem


def check(data: Path, uri: str, work: Path, label: str) -> list[str]:
    """Ingest and evaluate on `uri`; the report's lines for bottle."""
    subprocess.run(
        ["patchcore-milvus", "ingest", str(data), "--category", "bottle", "--uri", uri, "--no-progress"], check=True
    )
    report = work / f"report-{label}"
    subprocess.run(
        [
            "patchcore-milvus",
            "evaluate",
            str(data),
            "--category",
            "bottle",
            "--uri",
            uri,
            "--search",
            "all",
            "--report",
            str(report),
            "--no-progress",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    entry = json.loads((report / "report.json").read_text())["categories"]["bottle"]
    exact = entry["search"]["exact"]["at_threshold"]
    lines = []
    for method, metrics in entry["search"].items():
        at = metrics["at_threshold"]
        versus = entry.get(VERSUS_EXACT.get(method, ""), {})
        recall = versus.get("patch_recall_at_1")
        same = (at["false_positives"], at["false_negatives"]) == (exact["false_positives"], exact["false_negatives"])
        lines.append(
            f"| {label} | {method} | {metrics['image_auroc']:.4f} / {metrics['pixel_auroc']:.4f} / "
            f"{metrics['aupro']:.4f} | {at['false_positives']} / {at['false_negatives']} | "
            f"{'-' if recall is None else f'{recall:.4f}'} | {'yes' if same else 'NO'} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad"))
    parser.add_argument("--lite-only", action="store_true", help="Skip the Milvus server.")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="verdicts-") as folder:
        work = Path(folder)
        rows += check(args.data, str(work / "bottle.db"), work, "Milvus Lite")
        if not args.lite_only:
            problem = network_isolation_problem()
            if problem:
                raise SystemExit(f"{problem} (or pass --lite-only)")
            server = MilvusTestServer(work / "server")
            server.start()
            try:
                rows += check(args.data, server.uri, work, "Milvus 2.3.5 server")
            finally:
                server.stop()
    print("| bank on | search | image AUROC / pixel AUROC / AUPRO | FP / FN | patch recall@1 | verdicts as exact |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
