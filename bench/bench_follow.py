"""`p4seg serve` following its switch: from a scan's Nth denied packet to the source being
dropped, and the follower's gap during an apply. Figures, never asserted.

    python -m bench.bench_follow               # 5 rounds
    python -m bench.bench_follow --repeat 9

One in-process ReferenceSwitch on loopback (four hosts on one ToR) and a serve of a policy
with `contain after 3 denies within 10s for 10m`. Each round h1 sends three denied TCP SYNs
(injected into the switch's data plane); the time runs from the third until h1's allowed
flow is dropped (the PacketIn reaches the follower, the engine decides, the quarantine
overlay is proven and written). Then serve's clock moves past the containment and the watch
loop releases h1. Printed with them: how many of those applies were written through the
follower's own session (`Follower.lent`), and the follower's gaps, from stepping aside for
an apply with a session of its own to being the primary again (`Follower.gaps`), during
which a logged deny on that switch reaches no controller.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

import p4seg.verbs
from bench.bench_controller import TIMEOUT, median_ms, spread_ms
from bench.bench_failover import ROOT
from bench.bench_serve import _certificates, _serving, _until
from runtime.refswitch.switch import ReferenceSwitch

sys.path.insert(0, str(ROOT / "tests"))  # the one-ToR floor the tests use

from test_cli_controller import HOSTS
from test_cli_controller import POLICY as SMALL

# test_cli_controller's one-ToR policy, with a contain rule
POLICY = SMALL.replace(
    "default deny log", "contain after 3 denies within 10s for 10m\ndefault deny log"
)


def _passes(sw: ReferenceSwitch, src: str, dst: str, dport: int, sport: int = 40000) -> bool:
    (sip, port), (dip, _) = HOSTS[src], HOSTS[dst]
    frame = bytes(Ether() / IP(src=sip, dst=dip) / TCP(sport=sport, dport=dport, flags="S"))
    return bool(sw.inject(port, frame))


def bench(repeat: int) -> None:
    sw = ReferenceSwitch(device_id=1)
    port = sw.start("127.0.0.1:0")
    shift = 0.0
    real = p4seg.verbs.clock
    try:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            hosts = "\n".join(
                f"  {h}: {{ip: {ip}, switch: tor1, port: {p}}}" for h, (ip, p) in HOSTS.items()
            )
            (d / "small.yaml").write_text(
                f'name: small\nswitches:\n  tor1: {{role: tor, device_id: 1, p4rt: '
                f'"127.0.0.1:{port}"}}\nhosts:\n{hosts}\n'
            )  # fmt: skip
            (d / "small.zt").write_text(POLICY)
            _certificates(d)
            argv = ["serve", str(d / "small.zt"), "-i", str(d / "small.yaml"),
                    "--state", str(d / "state"), "--build", str(d / "build"),
                    "--api", "127.0.0.1:0", "--api-cert", str(d / "api.pem"),
                    "--api-key", str(d / "api.key"), "--api-tokens", str(d / "access.yaml"),
                    "--check", "0.2", "--interval", "0.05"]  # fmt: skip
            p4seg.verbs.clock = lambda: real() + shift
            scans: list[float] = []
            gaps: list[float] = []
            lent = 0
            with _serving(argv, d / "access.yaml") as service:
                service.ops.watched.wait(TIMEOUT)
                follower = service.follower
                assert follower is not None
                _until(lambda: follower.is_following("tor1"))
                for _ in range(repeat):
                    follower.gaps.clear()
                    before = follower.lent
                    for i, dport in enumerate((21, 22, 23)):
                        assert not _passes(sw, "h1", "h3", dport, 41000 + i)
                    start = time.perf_counter()
                    _until(lambda: not _passes(sw, "h1", "h3", 8080))
                    scans.append(time.perf_counter() - start)
                    shift += 601  # past `for 10m`: the engine (and the watch loop) release h1
                    _until(lambda: not service.ops.live().quarantined)
                    _until(lambda: _passes(sw, "h1", "h3", 8080))
                    _until(lambda: follower.is_following("tor1"))
                    lent += follower.lent - before
                    gaps.extend(follower.gaps)
    finally:
        p4seg.verbs.clock = real
        sw.stop()
    print(f"== serve follows one ToR; {repeat} scans of 3 denied packets by h1")
    print(f"   {'3rd denied packet -> h1 dropped':<54}{median_ms(scans)}  {spread_ms(scans)}")
    print(f"   applies written through the follower's session: {lent} "
          f"({repeat} quarantines and their releases)")  # fmt: skip
    if gaps:
        print(f"   {'follower gap: stepped aside for an apply':<54}{median_ms(gaps)}  "
              f"{spread_ms(gaps)} ({len(gaps)} gaps)")  # fmt: skip
    else:
        print("   follower gaps: none (it never stepped aside: no logged deny went unreported)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    bench(parser.parse_args().repeat)


if __name__ == "__main__":
    main()
