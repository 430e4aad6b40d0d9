"""A throwaway real Milvus standalone server (PyPI `milvus==2.3.5`) for tests and benchmarks.

That server listens on every network interface and its configuration cannot change it, so
it is only started inside a private network namespace whose one interface is loopback
(`unshare -n`, then `ip link set lo up`); its clients must run in the same namespace.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

GRPC_PORT = 19530
HEALTH_PORT = 9091
URI = f"http://127.0.0.1:{GRPC_PORT}"
ROOT_TOKEN = "root:Milvus"  # Milvus' default credentials, when authentication is on


def network_isolation_problem() -> str | None:
    """Why a server may not be started here, or None inside a loopback-only network namespace."""
    interfaces = sorted(name for _, name in socket.if_nameindex())  # of this process' namespace, unlike /sys
    if interfaces != ["lo"]:
        return (
            "the Milvus 2.3.5 test server binds every network interface, so it runs only in a private "
            f"network namespace with loopback alone (this one has {', '.join(interfaces) or 'none visible'}); "
            "run the tests as `unshare -n sh -c 'ip link set lo up && python3 -m pytest -m server'` "
            "(root or user namespaces needed; .ci/run does this where it is allowed)"
        )
    if shutil.which("milvus-server") is None:
        return "PyPI package `milvus==2.3.5` is not installed (pip install -e '.[test]')"
    if shutil.which("openssl") is None:
        return "openssl is needed to make the test server's TLS certificates"
    return None


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate it signed, for localhost (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in ("ca.pem", "ca.key", "server.pem", "server.key", "server.csr")}

    def openssl(arguments: str, **files: Path) -> None:
        command = ["openssl", *arguments.split()]
        for flag, path in files.items():
            command += [f"-{flag}", str(path)]
        subprocess.run(command, check=True, capture_output=True)

    openssl("req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=test-CA", keyout=paths["ca.key"], out=paths["ca.pem"])
    openssl("req -newkey rsa:2048 -nodes -subj /CN=localhost", keyout=paths["server.key"], out=paths["server.csr"])
    (folder / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        "x509 -req -days 2 -CAcreateserial",
        extfile=folder / "san.cnf",
        CA=paths["ca.pem"],
        CAkey=paths["ca.key"],
        out=paths["server.pem"],
        **{"in": paths["server.csr"]},
    )
    return paths


def _bind_reusable(port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None


class MilvusTestServer:
    """Starts `milvus run standalone` on a data folder; `kill()` is a crash, `start()` again recovers."""

    def __init__(self, data_dir: Path, authentication: bool = False, tls: bool = False):
        from milvus import MilvusServer  # the test extra; imported late so that a skip needs nothing

        self.data_dir = Path(data_dir)
        self.server = MilvusServer(wait_for_started=False)
        self.server.set_base_dir(str(self.data_dir))
        # A killed server's etcd sessions block its successor until they expire (30 s by default).
        self.server.config.set("common.session.ttl", 5)
        # The package probes each port by binding it first; after a kill the ports sit in TIME_WAIT,
        # the probe fails and the server would move to other ports. Milvus itself binds with
        # SO_REUSEADDR, so the probe may too.
        self.server.config.try_bind_port = _bind_reusable
        self.uri = URI
        if authentication:  # the built-in user root, password Milvus
            self.server.config.set("common.security.authorizationEnabled", "true")
        # The client settings for this server: none, or TLS checked against a test CA.
        self.client_options: dict[str, str] = {}
        if tls:
            certificates = make_certificates(self.data_dir / "tls")
            self.server.config.set("tls_mode", 1)  # one-way: clients check the server
            self.server.config.set("server_pem_path", str(certificates["server.pem"]))
            self.server.config.set("server_key_path", str(certificates["server.key"]))
            self.server.config.set("ca_pem_path", str(certificates["ca.pem"]))
            self.uri = f"https://localhost:{GRPC_PORT}"
            self.client_options = {"tls_ca_cert": str(certificates["ca.pem"]), "tls_server_name": "localhost"}

    def start(self, timeout: float = 120.0) -> None:
        self.server.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.server_proc.poll() is not None:
                raise RuntimeError(f"Milvus server exited at start; see {self.data_dir / 'logs'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{HEALTH_PORT}/healthz", timeout=2) as response:
                    if b"OK" in response.read():
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"Milvus server not healthy after {timeout:.0f} s; see {self.data_dir / 'logs'}")

    def kill(self) -> None:
        """SIGKILL, as a crash or power cut would: no graceful shutdown."""
        process = self.server.server_proc
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        self.server.stop()

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing, like a hung machine."""
        os.kill(self.server.server_proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.server.server_proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Graceful stop; whatever is left is killed, so no server outlives the tests."""
        process = self.server.server_proc
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        self.server.stop()
