"""A real etcd cluster on loopback for tests: three members (Debian's /usr/bin/etcd) on
ephemeral ports with temporary data directories, started and waited for (every member's
/health says true), killed and removed afterwards even when the test fails.

    def test_x(etcd_cluster: EtcdCluster) -> None:
        etcd_cluster.endpoints        # ("127.0.0.1:41234", ...)
        etcd_cluster.kill(0)          # SIGKILL one member
        etcd_cluster.start(0)         # bring it back on the same data directory
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"


@dataclass
class EtcdCluster:
    root: Path
    members: list[Member] = field(default_factory=list)
    pki: Path | None = None  # tests/pki.py: clients must then speak mTLS (https)

    @property
    def scheme(self) -> str:
        return "http" if self.pki is None else "https"

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.endpoint for m in self.members)

    def _command(self, m: Member) -> list[str]:
        cluster = ",".join(f"{x.name}=http://127.0.0.1:{x.peer_port}" for x in self.members)
        return [
            ETCD, "--name", m.name, "--data-dir", str(m.data_dir),
            "--listen-client-urls", f"{self.scheme}://{m.endpoint}",
            "--advertise-client-urls", f"{self.scheme}://{m.endpoint}",
            "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
            "--initial-cluster", cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", self.root.name,
            # Loopback: fast heartbeats so that losing a member is noticed in well under a second.
            "--heartbeat-interval", "50", "--election-timeout", "500",
            *(() if self.pki is None else (
                "--cert-file", str(self.pki / "server.pem"), "--key-file", str(self.pki / "server.key"),
                "--trusted-ca-file", str(self.pki / "ca.pem"), "--client-cert-auth",
            )),
        ]  # fmt: skip

    def start(self, index: int) -> None:
        m = self.members[index]
        log = (self.root / f"{m.name}.log").open("ab")
        m.process = subprocess.Popen(
            self._command(m), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()

    def kill(self, index: int) -> None:
        """SIGKILL one member (a crash: no goodbye to its peers)."""
        m = self.members[index]
        if m.process is not None and m.process.poll() is None:
            m.process.kill()
            m.process.wait()
        m.process = None

    def healthy(self, index: int) -> bool:
        """The member answers /health with true (it is running and has a raft leader)."""
        url = f"{self.scheme}://{self.members[index].endpoint}/health"
        context = None
        if self.pki is not None:
            context = ssl.create_default_context(cafile=str(self.pki / "ca.pem"))
            context.load_cert_chain(self.pki / "client.pem", self.pki / "client.key")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as response:
                return bool(json.loads(response.read()).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def raft_leader(self) -> int | None:
        """The index of the member raft has elected leader (as a live member says), or None."""
        for i, m in enumerate(self.members):
            if m.process is None:
                continue
            url = f"{self.scheme}://{m.endpoint}/v3/maintenance/status"
            context = None
            if self.pki is not None:
                context = ssl.create_default_context(cafile=str(self.pki / "ca.pem"))
                context.load_cert_chain(self.pki / "client.pem", self.pki / "client.key")
            request = urllib.request.Request(url, b"{}", {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=1, context=context) as response:
                    doc = json.loads(response.read())
            except (OSError, ValueError, urllib.error.URLError):
                continue
            leader, me = doc.get("leader"), doc.get("header", {}).get("member_id")
            if leader is None or me is None:
                continue
            if leader == me:
                return i
        return None

    def wait_healthy(self, indexes: list[int] | None = None, timeout: float = 30.0) -> None:
        indexes = list(range(len(self.members))) if indexes is None else indexes
        deadline = time.monotonic() + timeout
        while not all(self.healthy(i) for i in indexes):
            for i in indexes:
                p = self.members[i].process
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"etcd {self.members[i].name} exited:\n{self.log_tail(i)}")
            if time.monotonic() > deadline:
                tails = "\n".join(self.log_tail(i) for i in indexes)
                raise RuntimeError(f"etcd members {indexes} not healthy in {timeout} s:\n{tails}")
            time.sleep(0.05)  # polling a condition (/health), not waiting for time to pass

    def log_tail(self, index: int, lines: int = 15) -> str:
        path = self.root / f"{self.members[index].name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        for i in range(len(self.members)):
            self.kill(i)


def start_cluster(size: int = 3, pki: Path | None = None) -> EtcdCluster:
    """A started, healthy cluster (mTLS for clients with `pki`); the caller stops it and
    removes `root`."""
    # In memory where the machine has it: a member's fsync on a busy disk can stall its
    # answers past a test's 2 s lease, and these clusters live only as long as one test.
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="p4seg-etcd-", dir=shm if shm.is_dir() else None))
    ports = _free_ports(2 * size)
    cluster = EtcdCluster(root, pki=pki)
    cluster.members = [
        Member(f"m{i}", ports[2 * i], ports[2 * i + 1], root / f"m{i}") for i in range(size)
    ]
    try:
        for i in range(size):
            cluster.start(i)
        cluster.wait_healthy()
    except BaseException:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise
    return cluster


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    if not Path(ETCD).exists():
        pytest.skip("etcd is not installed (Debian: apt-get install etcd-server)")
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
