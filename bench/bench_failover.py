"""Failover of `p4seg serve --etcd`: a leader killed, until its successor quarantines.

    .venv/bin/python -m bench.bench_failover              # 20 failovers, lease TTL 2 s
    .venv/bin/python -m bench.bench_failover --runs 5 --ttl 3
    .venv/bin/python -m bench.bench_failover --floor trading   # the trading floor's 8 switches

A real 3-member etcd cluster on loopback, in-process reference switches (one ToR, or the 8
of topologies/trading_floor.yaml with the example policy), and two `p4seg serve --etcd`
processes of the floor. Each round waits until the standby has compiled and proved what the
leader applied (`standby_build` in its status), SIGKILLs the leader process and times, from
the kill:
- **leader**: until the standby's `/v1/status` says `"role": "leader"` (lease TTL + etcd's
  expiry tick, bounded below by the TTL: the baseline of the same run);
- **primary everywhere**: until its status says its follower is every switch's primary
  (`following`: at its term's election id, so the switches fence off the dead
  leader's sessions from then on);
- **first quarantine**: until a quarantine through it answers 200 — the new leader has
  pulled the state, won arbitration with its higher election id and written the overlay
  (judged by packets: the host's allowed flow is dropped, hop by hop on the trading floor);
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
from dataclasses import dataclass
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from compiler.inventory import Inventory, load_inventory
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
    """Whether a TCP packet from `src` to `dst`:`dport` of the small site crosses `sw`."""
    (sip, port), (dip, _) = HOSTS[src], HOSTS[dst]
    return bool(sw.inject(port, bytes(Ether() / IP(src=sip, dst=dip) / TCP(dport=dport))))


@dataclass
class Floor:
    """Where the serves run: their policy and inventory arguments, the host the rounds
    quarantine and whether its allowed flow is dropped (judged by packets)."""

    args: list[str]
    host: str
    cut: Callable[[], bool]
    switches: list[ReferenceSwitch]


def one_switch(work: Path) -> Floor:
    """The tests' small site: one reference ToR, four hosts."""
    sw = ReferenceSwitch(device_id=1)
    port = sw.start("127.0.0.1:0")
    hosts = "\n".join(
        f"  {h}: {{ip: {ip}, switch: tor1, port: {p}}}" for h, (ip, p) in HOSTS.items()
    )
    (work / "small.yaml").write_text(
        f'name: small\nswitches:\n  tor1: {{role: tor, device_id: 1, p4rt: "127.0.0.1:{port}"}}\n'
        f"hosts:\n{hosts}\n"
    )  # fmt: skip
    (work / "small.zt").write_text(POLICY)
    return Floor(["small.zt", "-i", "small.yaml"], "h1",
                 lambda: not _passes(sw, "h1", "h3", 8080), [sw])  # fmt: skip


def trading_floor(work: Path, added: str = "") -> tuple[Inventory, dict[str, ReferenceSwitch]]:
    """topologies/trading_floor.yaml's switches as in-process reference switches on loopback
    ports, written to WORK/floor.yaml with those ports, and the example policy (its `expect`
    lines dropped, `added` before its default) to WORK/floor.zt."""
    path = ROOT / "topologies" / "trading_floor.yaml"
    inventory, _ = load_inventory(str(path))
    text = path.read_text()
    switches: dict[str, ReferenceSwitch] = {}
    for s in inventory.switches:
        switches[s.name] = ReferenceSwitch(s.device_id)
        port = switches[s.name].start("127.0.0.1:0")
        text = text.replace(f'p4rt: "{s.p4rt}"', f'p4rt: "127.0.0.1:{port}"')
    (work / "floor.yaml").write_text(text)
    policy = (ROOT / "policies" / "trading_floor.zt").read_text()
    policy = "\n".join(line for line in policy.splitlines() if not line.startswith("expect"))
    (work / "floor.zt").write_text(policy.replace("default deny log", added + "default deny log"))
    return inventory, switches


def trading(work: Path) -> Floor:
    """The trading floor (`trading_floor`); algo1 is quarantined, its flow to oms1 (tcp
    9876, across racks) probed hop by hop."""
    from test_overlay import _delivered

    inventory, switches = trading_floor(work)
    flow = TCP(sport=40000, dport=9876, flags="S")
    return Floor(["floor.zt", "-i", "floor.yaml"], "algo1",
                 lambda: not _delivered(switches, inventory, "algo1", "oms1", flow),
                 list(switches.values()))  # fmt: skip


def _role(ctl: ServeProcesses, name: str) -> str:
    code, doc = _call(ctl.urls[name], "GET", "/v1/status")
    return str(doc.get("role")) if code == 200 else ""


def _primary_everywhere(ctl: ServeProcesses, name: str) -> bool:
    """The serve's follower is every switch's primary (at its term's election id)."""
    code, doc = _call(ctl.urls[name], "GET", "/v1/status")
    switches = doc.get("switches") if code == 200 else None
    return isinstance(switches, list) and all(
        isinstance(s, dict) and s.get("following") for s in switches
    )


def run(runs: int, ttl: int, which: str) -> None:
    cluster = start_cluster()
    work = Path(tempfile.mkdtemp(prefix="p4seg-failover-"))
    floor = (trading if which == "trading" else one_switch)(work)
    (work / "access.yaml").write_text(
        f"tokens:\n  - {{principal: soar, token: {TOKEN}, scopes: [operate]}}\n"
    )
    etcd = ",".join(f"http://{e}" for e in cluster.endpoints)
    ctl = ServeProcesses(work, [*floor.args, "--api-tokens", "access.yaml"], etcd, ttl)
    elected: list[float] = []
    everywhere: list[float] = []
    contained: list[float] = []
    try:
        ctl.start("ctl-a")
        _until(lambda: _role(ctl, "ctl-a") == "leader")
        _until(lambda: not floor.cut())  # its first apply
        ctl.start("ctl-b")
        _until(lambda: _role(ctl, "ctl-b") == "standby")
        leader, standby = "ctl-a", "ctl-b"
        for _ in range(runs):
            _until(lambda s=standby: _warm(ctl, s))  # type: ignore[misc]
            killed = time.monotonic()
            ctl.kill(leader)
            _until(lambda s=standby: _role(ctl, s) == "leader")  # type: ignore[misc]
            elected.append(time.monotonic() - killed)
            _until(lambda s=standby: _primary_everywhere(ctl, s))  # type: ignore[misc]
            everywhere.append(time.monotonic() - killed)
            path = f"/v1/quarantine/{floor.host}"
            while _call(ctl.urls[standby], "PUT", path, {"reason": "bench"})[0] != 200:
                time.sleep(0.01)  # 503 until its first term's state is in hand: ask again
            contained.append(time.monotonic() - killed)
            assert floor.cut()
            code, doc = _call(ctl.urls[standby], "DELETE", path, {"reason": "bench"})
            assert code == 200, doc
            ctl.start(leader)  # a fresh standby under the killed one's name
            _until(lambda s=leader: _role(ctl, s) == "standby")  # type: ignore[misc]
            leader, standby = standby, leader
    finally:
        ctl.stop()
        for sw in floor.switches:
            sw.stop()
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"== serve --etcd failover on the {which} floor ({len(floor.switches)} switches): "
          f"{runs} SIGKILLs of the leader, lease TTL {ttl} s (the baseline: no successor can "
          f"lead sooner)")  # fmt: skip
    for name, samples in (("a standby leads", elected),
                          ("its follower primary everywhere", everywhere),
                          ("its first quarantine (200)", contained)):  # fmt: skip
        med, top = statistics.median(samples), max(samples)
        print(f"   {name:<32} median {med:6.2f} s ({med / ttl:4.2f}x TTL)  max {top:6.2f} s")


def _warm(ctl: ServeProcesses, name: str) -> bool:
    """The standby compiled and proved what the leader applied (p4seg/verbs.py warm)."""
    code, doc = _call(ctl.urls[name], "GET", "/v1/status")
    build = doc.get("standby_build") if code == 200 else None
    return isinstance(build, dict) and build.get("proof") is not None


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=20, help="failovers (default: 20)")
    p.add_argument("--ttl", type=int, default=2, help="the leader's lease (default: 2 s)")
    p.add_argument("--floor", choices=("one", "trading"), default="one",
                   help="one reference ToR (default), or the trading floor's 8 switches")  # fmt: skip
    args = p.parse_args()
    if shutil.which("etcd") is None:
        raise SystemExit("bench_failover: etcd is not installed (Debian package etcd-server)")
    run(args.runs, args.ttl, args.floor)


if __name__ == "__main__":
    main()
