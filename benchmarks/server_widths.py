"""Which search width a Milvus 2.3.5 server's own ingest check chooses, build after build, for a
few HNSW build settings: the server's HNSW misses more than Lite's, and its check widens `ef`
until 99.9 % of the probe patches find their exact neighbour, so a station's speed on the server
moves with each build.

Each setting ingests bottle (default configuration otherwise) `--builds` times into one server
and prints the `search:` line each ingest reports.

    unshare -n sh -c 'ip link set lo up && python benchmarks/server_widths.py --builds 3'
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from patchcore_milvus.testing.milvus_server import MilvusTestServer, network_isolation_problem

SETTINGS = {
    "default (M 16, efConstruction 200)": [],
    "efConstruction 400": ["--index-param", "efConstruction=400"],
    "M 32": ["--index-param", "M=32"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad"))
    parser.add_argument("--builds", type=int, default=3)
    args = parser.parse_args()
    problem = network_isolation_problem()
    if problem:
        raise SystemExit(problem)
    with tempfile.TemporaryDirectory(prefix="server-widths-") as work:
        server = MilvusTestServer(Path(work))
        server.start()
        try:
            for name, flags in SETTINGS.items():
                widths = []
                for _ in range(args.builds):
                    command = ["patchcore-milvus", "ingest", str(args.data), "--category", "bottle"]
                    command += ["--uri", server.uri, "--no-progress", "--keep-versions", "1", *flags]
                    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                    line = next(line for line in out.splitlines() if line.startswith("search:"))
                    widths.append(line.split("(")[0].removeprefix("search:").strip())
                print(f"{name}: {', '.join(widths)}", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
