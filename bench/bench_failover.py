"""Failover of `p4seg serve --etcd`: a leader killed, until its successor quarantines.

    .venv/bin/python -m bench.bench_failover              # 20 failovers, lease TTL 2 s
    .venv/bin/python -m bench.bench_failover --runs 5 --ttl 3

A real 3-member etcd cluster on loopback, a reference switch, and two `p4seg serve --etcd`
processes of one floor. Each round SIGKILLs the leader process and times, from the kill:
- **leader**: until the standby's `/v1/status` says `"role": "leader"` (lease TTL + etcd's
  expiry tick, bounded below by the TTL: the baseline of the same run);
- **first quarantine**: until a quarantine through it answers 200 — the new leader has
  pulled the state, won arbitration on the switch with its higher election id and written
  the overlay (judged by a packet: the host's allowed flow is dropped);
then releases the host through the new leader and starts a fresh standby under the killed
one's name for the next round. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from runtime.refswitch.switch import ReferenceSwitch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the loopback cluster and the small site the tests use

from etcd_cluster import start_cluster  # noqa: E402
from serve_process import ServeProcesses  # noqa: E402
from test_cli_controller import HOSTS, POLICY  # noqa: E402

TOKEN = "failover-bench-token-0001"
TIMEOUT = 60.0  # seconds: an upper bound for something that must happen


def _until(check: Callable[[], object], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{check} never held")
        time.sleep(0.01)  # polling a condition


def _call(url: str, method: str, path: str, body: object = None) -> tuple[int, dict[str, object]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url + path, data, {"Authorization": f"Bearer {TOKEN}"}, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
    except (urllib.error.URLError, ConnectionError):
        return 0, {}


def _passes(sw: ReferenceSwitch, src: str, dst: str, dport: int) -> bool:
    (sip, port), (dip, _) = HOSTS[src], HOSTS[dst]
    return bool(sw.inject(port, bytes(Ether() / IP(src=sip, dst=dip) / TCP(dport=dport))))


def _role(ctl: ServeProcesses, name: str) -> str:
    code, doc = _call(ctl.urls[name], "GET", "/v1/status")
    return str(doc.get("role")) if code == 200 else ""


def run(runs: int, ttl: int) -> None:
    cluster = start_cluster()
    sw = ReferenceSwitch(device_id=1)
    port = sw.start("127.0.0.1:0")
    work = Path(tempfile.mkdtemp(prefix="p4seg-failover-"))
    hosts = "\n".join(
        f"  {h}: {{ip: {ip}, switch: tor1, port: {p}}}" for h, (ip, p) in HOSTS.items()
    )
    (work / "small.yaml").write_text(
        f'name: small\nswitches:\n  tor1: {{role: tor, device_id: 1, p4rt: "127.0.0.1:{port}"}}\n'
        f"hosts:\n{hosts}\n"
    )  # fmt: skip
    (work / "small.zt").write_text(POLICY)
    (work / "access.yaml").write_text(
        f"tokens:\n  - {{principal: soar, token: {TOKEN}, scopes: [operate]}}\n"
    )
    etcd = ",".join(f"http://{e}" for e in cluster.endpoints)
    ctl = ServeProcesses(work, ["small.zt", "-i", "small.yaml", "--api-tokens", "access.yaml"],
                         etcd, ttl)  # fmt: skip
    elected: list[float] = []
    contained: list[float] = []
    try:
        ctl.start("ctl-a")
        _until(lambda: _role(ctl, "ctl-a") == "leader")
        _until(lambda: _passes(sw, "h1", "h3", 8080))  # its first apply
        ctl.start("ctl-b")
        _until(lambda: _role(ctl, "ctl-b") == "standby")
        leader, standby = "ctl-a", "ctl-b"
        for _ in range(runs):
            killed = time.monotonic()
            ctl.kill(leader)
            _until(lambda s=standby: _role(ctl, s) == "leader")  # type: ignore[misc]
            elected.append(time.monotonic() - killed)
            while (
                _call(ctl.urls[standby], "PUT", "/v1/quarantine/h1", {"reason": "bench"})[0] != 200
            ):
                time.sleep(0.01)  # 503 until its first term's state is in hand: ask again
            contained.append(time.monotonic() - killed)
            assert not _passes(sw, "h1", "h3", 8080)
            code, doc = _call(ctl.urls[standby], "DELETE", "/v1/quarantine/h1", {"reason": "bench"})
            assert code == 200, doc
            ctl.start(leader)  # a fresh standby under the killed one's name
            _until(lambda s=leader: _role(ctl, s) == "standby")  # type: ignore[misc]
            leader, standby = standby, leader
    finally:
        ctl.stop()
        sw.stop()
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"== serve --etcd failover: {runs} SIGKILLs of the leader, lease TTL {ttl} s "
          f"(the baseline: no successor can lead sooner)")  # fmt: skip
    for name, samples in (("a standby leads", elected), ("its first quarantine (200)", contained)):
        med, top = statistics.median(samples), max(samples)
        print(f"   {name:<28} median {med:6.2f} s ({med / ttl:4.2f}x TTL)  max {top:6.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=20, help="failovers (default: 20)")
    p.add_argument("--ttl", type=int, default=2, help="the leader's lease (default: 2 s)")
    args = p.parse_args()
    if shutil.which("etcd") is None:
        raise SystemExit("bench_failover: etcd is not installed (Debian package etcd-server)")
    run(args.runs, args.ttl)


if __name__ == "__main__":
    main()
