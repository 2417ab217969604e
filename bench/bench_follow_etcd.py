"""`p4seg serve --etcd` following PacketIns: scan to drop on the leader, and how soon
alerts resume after the leader is killed. Figures, never asserted.

    .venv/bin/python -m bench.bench_follow_etcd              # 10 rounds, lease TTL 2 s
    .venv/bin/python -m bench.bench_follow_etcd --rounds 5 --ttl 3

A real 3-member etcd cluster on loopback, a reference switch in the bench's process, and
`p4seg serve` processes of one floor, on a policy with `contain h1 after 3 denies within
1s for 1s`. First the baseline: one serve without --etcd, timed from h1's third denied
SYN until its allowed flow is dropped (PacketIn, engine, overlay quarantine), `--rounds`
times. Then two serve --etcd; each round:
- **scan to drop** on the leader, as the baseline, plus the etcd read and fenced
  transaction of the engine's operation;
- **alerts resume**: the leader is SIGKILLed; from the kill, a logged deny from h3 is
  injected every 50 ms (a new port each) until one shows in the successor's
  `GET /v1/alerts` — the time from the kill to the injection of the first one reported
  (the lease TTL is its floor: the baseline of that figure);
then the killed controller comes back as a standby under its name.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_failover import ROOT, TOKEN, _call, _passes, _until
from runtime.refswitch.switch import ReferenceSwitch
from topologies.switches import terminate

sys.path.insert(0, str(ROOT / "tests"))  # the loopback cluster and the small site the tests use

from etcd_cluster import start_cluster
from test_cli_controller import HOSTS, POLICY

WINDOW = 1.0  # seconds: the `contain` window and hold
CONTAIN = "contain h1 after 3 denies within 1s for 1s\ndefault deny log"
_PORTS = itertools.count(1001)  # each probe its own port: a serve's alerts outlive it
PROBE_EVERY = 0.05  # seconds between logged denies while waiting for alerts to resume


class Serves:
    """`p4seg serve` processes in one work directory, by name."""

    def __init__(self, work: Path, policy: str = "small.zt", inventory: str = "small.yaml") -> None:
        self.work = work
        self.policy, self.inventory = policy, inventory
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.urls: dict[str, str] = {}

    def start(self, name: str, *extra: str) -> str:
        out = self.work / f"{name}.out"
        argv = ["serve", self.policy, "-i", self.inventory, "--api", "127.0.0.1:0", "--api-plain",
                "--api-tokens", "access.yaml", "--state", f"state-{name}", "--build",
                f"build-{name}", "--interval", "0.05", "--hits-interval", "0", *extra]  # fmt: skip
        with out.open("wb") as sink:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "p4seg", *argv], cwd=self.work, stdout=sink,
                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
        _until(lambda: b"/v1/status" in out.read_bytes())
        banner = out.read_text().split("p4seg serve: API on ", 1)[1].split()[0]
        self.urls[name] = banner.removesuffix("/v1/status").rstrip(",")
        return self.urls[name]

    def role(self, name: str) -> str:
        code, doc = _call(self.urls[name], "GET", "/v1/status")
        return str(doc.get("role")) if code == 200 else ""

    def alerted(self, name: str, dports: set[int]) -> set[int]:
        """Which of `dports` the serve's alerts hold."""
        code, doc = _call(self.urls[name], "GET", "/v1/alerts")
        alerts = doc.get("alerts") if code == 200 else None
        if not isinstance(alerts, list):
            return set()
        return dports & {a["dport"] for a in alerts if isinstance(a, dict)}

    def stop(self, name: str | None = None) -> None:
        for n in [name] if name else list(self.procs):
            terminate(self.procs.pop(n), 30)

    def dump(self) -> None:
        """Print the end of every serve's output (a bench that failed shows why)."""
        for out in sorted(self.work.glob("*.out")):
            print(f"==== {out.name}\n" + out.read_text()[-4000:])


def _deny(sw: ReferenceSwitch, src: str, dst: str, dport: int) -> None:
    assert not _passes(sw, src, dst, dport), f"{src} -> {dst}:{dport} passed"


def _scan(sw: ReferenceSwitch, serves: Serves, name: str) -> float:
    """h1 scans h3: seconds from the third denied SYN until h1's allowed flow is dropped.
    Then until serve `name` has released h1 and h1's denies have left the engine's window
    (probes of h1 while it is held would be logged denies that contain it again)."""
    for dport in (21, 22):
        _deny(sw, "h1", "h3", dport)
    _deny(sw, "h1", "h3", 23)
    start = time.perf_counter()
    _until(lambda: not _passes(sw, "h1", "h3", 8080))
    took = time.perf_counter() - start
    _until(lambda: _call(serves.urls[name], "GET", "/v1/status")[1].get("quarantined") == [])
    time.sleep(WINDOW + 0.1)  # pacing: the next scan starts on an empty window
    assert _passes(sw, "h1", "h3", 8080)
    return took


def _reported(sw: ReferenceSwitch, serves: Serves, name: str, since: float) -> float:
    """Seconds from `since` to the injection of the first logged deny (h3 -> h2, a new
    port every PROBE_EVERY) that the serve `name` reports."""
    sent: dict[int, float] = {}
    while True:
        dport = next(_PORTS)
        sent[dport] = time.monotonic()
        _deny(sw, "h3", "h2", dport)
        if seen := serves.alerted(name, set(sent)):
            return sent[min(seen)] - since
        if time.monotonic() - since > 60:
            raise RuntimeError(f"{name} reported no alert")
        time.sleep(PROBE_EVERY)


def run(rounds: int, ttl: int) -> None:
    cluster = start_cluster()
    sw = ReferenceSwitch(device_id=1)
    port = sw.start("127.0.0.1:0")
    work = Path(tempfile.mkdtemp(prefix="p4seg-follow-etcd-"))
    hosts = "\n".join(
        f"  {h}: {{ip: {ip}, switch: tor1, port: {p}}}" for h, (ip, p) in HOSTS.items()
    )
    (work / "small.yaml").write_text(
        f'name: small\nswitches:\n  tor1: {{role: tor, device_id: 1, p4rt: "127.0.0.1:{port}"}}\n'
        f"hosts:\n{hosts}\n"
    )  # fmt: skip
    (work / "small.zt").write_text(POLICY.replace("default deny log", CONTAIN))
    (work / "access.yaml").write_text(
        f"tokens:\n  - {{principal: soar, token: {TOKEN}, scopes: [operate]}}\n"
    )
    etcd = ["--etcd", ",".join(f"http://{e}" for e in cluster.endpoints), "--etcd-ttl", str(ttl)]
    serves = Serves(work)
    alone: list[float] = []
    scans: list[float] = []
    resumed: list[float] = []
    try:
        serves.start("alone")
        _reported(sw, serves, "alone", time.monotonic())  # its follower is the primary
        alone = [_scan(sw, serves, "alone") for _ in range(rounds)]
        serves.stop("alone")
        for name in ("ctl-a", "ctl-b"):
            serves.start(name, *etcd, "--etcd-name", name)
        _until(lambda: {serves.role("ctl-a"), serves.role("ctl-b")} == {"leader", "standby"})
        leader, standby = (
            ("ctl-a", "ctl-b") if serves.role("ctl-a") == "leader" else ("ctl-b", "ctl-a")
        )
        _reported(sw, serves, leader, time.monotonic())
        for _ in range(rounds):
            scans.append(_scan(sw, serves, leader))
            serves.procs[leader].kill()  # SIGKILL: no resignation
            killed = time.monotonic()
            serves.procs[leader].wait()
            resumed.append(_reported(sw, serves, standby, killed))
            serves.stop(leader)
            serves.start(leader, *etcd, "--etcd-name", leader)  # back, as a standby
            _until(lambda s=leader: serves.role(s) == "standby")  # type: ignore[misc]
            leader, standby = standby, leader
    except BaseException:
        serves.dump()
        raise
    finally:
        serves.stop()
        sw.stop()
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"== serve following one ToR, {rounds} rounds; --etcd: 3-member etcd, lease TTL {ttl} s")
    base = statistics.median(alone)
    for label, runs, ratio in (
        ("3rd denied SYN -> h1 dropped, without --etcd", alone, ""),
        ("3rd denied SYN -> h1 dropped, --etcd leader", scans,
         f"{statistics.median(scans) / base:5.2f}x without"),
        ("leader SIGKILLed -> first deny reported", resumed,
         f"{statistics.median(resumed) / ttl:5.2f}x TTL"),
    ):  # fmt: skip
        med, top = statistics.median(runs), max(runs)
        print(f"   {label:<46} median {med * 1e3:7.1f} ms  max {top * 1e3:7.1f} ms  {ratio}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=10, help="rounds (default: 10)")
    p.add_argument("--ttl", type=int, default=2, help="the leader's lease (default: 2 s)")
    args = p.parse_args()
    if shutil.which("etcd") is None:
        raise SystemExit("bench_follow_etcd: etcd is not installed (Debian package etcd-server)")
    run(args.rounds, args.ttl)


if __name__ == "__main__":
    main()
