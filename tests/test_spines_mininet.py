"""A dead spine survived: the trading floor in Mininet on reference switches, traffic across
racks through both spines, and spine1's process killed under `watch`.

Judged against the policy semantics (compiler/semantics.py), never against the tables:
- cross-rack flows the policy allows and spine1 carried (one way or both) recover: `watch`
  sees spine1 gone and routes the ToRs around it (routing only);
- no probe the policy denies ever passes, before, during or after;
- with spine1 down, `p4seg verify --from-switches` proves what the switches hold, and the
  whole segmentation matrix is as the policy says;
- spine1 back: `watch` writes its tables first, then routes its share back through it.

Figures (detection and reroute, each flow's outage, the restore) are printed: run with -s.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import test_floor_mininet
from p4rt import wait_for
from test_floor_mininet import (
    CONNECT_TIMEOUT,
    DEADLINE,
    INVENTORY,
    Lab,
    Output,
    Stream,
    _t,
    at_least,
    listeners,
    streams,
)

from compiler.semantics import PolicySemantics
from p4seg.cli import _front, _parser, main
from p4seg.spines import read_down
from p4seg.verbs import watch_loop
from topologies.matrix import run_matrix

pytestmark = test_floor_mininet.pytestmark  # root, Mininet
lab = test_floor_mininet.lab  # the trading floor, up once for this module

DEAD = "spine1"
GAP = 0.05  # seconds between a loop's connects to one target
DATAGRAM_GAP = 0.01
# (flow, source, destination, protocol, port): spine1 carries packets to md1's, algo2's,
# oms1's and settle1's racks' hosts of these (round robin by address: docs/pipeline.md).
ALLOWED = [
    ("fix1", "algo1", "oms1", "tcp", 9876),  # orders via spine1, answers via spine2
    ("fix2", "algo2", "oms2", "tcp", 9876),  # orders via spine2, answers via spine1
    ("fills", "oms1", "settle1", "tcp", 7000),  # both ways via spine1
    ("risk", "oms2", "risk1", "tcp", 8443),  # both ways via spine2: never moves
    ("feed", "md1", "algo2", "udp", 30005),  # via spine1
]
DENIED = [
    ("initiate", "oms1", "algo1", "tcp", 9876),  # a router cannot initiate
    ("bypass", "algo1", "risk1", "tcp", 8443),  # engines cannot bypass the router
    ("dev", "dev1", "oms1", "tcp", 9876),  # dev never reaches prod
    ("answer-feed", "algo2", "md1", "udp", 30005),  # the engines never send to the feed
]


@dataclass
class Traffic:
    """The loops and receivers of one phase: TCP connects per source, datagrams received."""

    loops: dict[str, Stream]
    received: dict[str, Stream]  # receiving host -> its udp-recv

    def ok(self, flow: str, lo: float = 0.0) -> list[dict[str, object]]:
        """Connects (or datagrams) of `flow` that passed, started (or sent) after `lo`."""
        for src, dst, proto in _ends(flow):
            if proto == "udp":
                return [e for e in self.received[dst].events(flow) if _t(e, "sent") > lo]
            return self.loops[src].ok(lo, flow=flow)
        raise KeyError(flow)

    def wait_all(self, lo: float, what: str) -> None:
        """Until every allowed flow has passed five times, started (or sent) after `lo`."""
        for flow, src, *_ in ALLOWED:
            stream = self.loops.get(src) or next(iter(self.received.values()))
            stream.wait(at_least(5, partial(self.ok, flow, lo)), f"{flow} {what}")

    def passed_denied(self) -> list[dict[str, object]]:
        return [e for flow, *_ in DENIED for e in self.ok(flow)]


def _ends(flow: str) -> list[tuple[str, str, str]]:
    return [(s, d, p) for f, s, d, p, _ in ALLOWED + DENIED if f == flow]


@contextlib.contextmanager
def traffic(lab: Lab) -> Iterator[Traffic]:
    """Every flow of ALLOWED and DENIED running (TCP connects every GAP s, datagrams every
    DATAGRAM_GAP s) until exit; yields once every allowed flow passes."""
    ip = lab.ip
    tcp: dict[str, set[int]] = {}
    udp: dict[str, set[int]] = {}
    targets: dict[tuple[str, str], list[list[object]]] = {}
    for flow, src, dst, proto, port in ALLOWED + DENIED:
        (tcp if proto == "tcp" else udp).setdefault(dst, set()).add(port)
        targets.setdefault((src, proto), []).append([flow, ip(dst), port])
    with listeners(lab.floor, tcp), streams(lab.floor) as start:
        received = {
            host: start(host, "udp-recv", ip(host), ",".join(map(str, sorted(ports))))
            for host, ports in udp.items()
        }
        for r in received.values():
            r.ready()
        loops = {}
        for (src, proto), flows in targets.items():
            if proto == "udp":
                start(src, "udp-send", ip(src), str(DATAGRAM_GAP), json.dumps(flows))
            else:
                loops[src] = start(src, "tcp-loop", ip(src), str(GAP), str(CONNECT_TIMEOUT),
                                   json.dumps(flows))  # fmt: skip
        running = Traffic(loops, received)
        running.wait_all(0.0, "passing")
        yield running


def outage(running: Traffic, flow: str, since: float) -> tuple[float, float]:
    """(from `since` to the end of the first pass started after it, the gap between the
    last pass before it and that one) for one allowed flow."""
    passes = running.ok(flow)
    key = "arrived" if _ends(flow)[0][2] == "udp" else "end"
    start = "sent" if key == "arrived" else "start"
    before = max((_t(e, key) for e in passes if _t(e, key) < since), default=since)
    after = min(_t(e, key) for e in passes if _t(e, start) > since)
    return after - since, after - before


def test_spine1_killed_under_traffic_is_routed_around_then_restored(lab: Lab) -> None:
    sem = PolicySemantics(lab.effective())
    for flow, src, dst, proto, port in ALLOWED + DENIED:
        allowed = sem.flow(lab.ips[src], lab.ips[dst], proto, port).allowed
        assert allowed == (flow in {f for f, *_ in ALLOWED}), flow
    switch = lab.floor.switches[DEAD]
    args = _parser().parse_args(lab.argv("watch", "--check", "0.5", "--interval", "0.1"))
    stop = threading.Event()
    watcher = threading.Thread(target=watch_loop, args=(args, _front, stop), daemon=True)
    out = Output()
    try:
        with contextlib.redirect_stdout(out):
            watcher.start()
            assert wait_for(lambda: "Applied:" in out.text, DEADLINE), out.text
            # -- spine1 dies --------------------------------------------------------------
            with traffic(lab) as running:
                killed = time.monotonic()
                assert switch.proc is not None
                switch.proc.kill()  # SIGKILL: a crash
                switch.stop(deleteIntfs=False)  # reaps it; its links stay, carrying nothing
                running.wait_all(killed, "passing again")
            assert running.passed_denied() == [], running.passed_denied()
            rerouted = [outage(running, flow, killed) for flow, *_ in ALLOWED]
            assert read_down(lab.state) == [DEAD]
            # -- one spine: proven, and segmented as the policy says -----------------------
            verified = io.StringIO()
            with contextlib.redirect_stdout(verified):
                code = main(["verify", str(lab.policy_path), "-i", str(INVENTORY),
                             "--state", str(lab.state), "--from-switches"])  # fmt: skip
            assert code == 0 and "PROVEN" in verified.getvalue(), verified.getvalue()
            matrix = run_matrix(lab.floor, lab.effective())
            assert not matrix.mismatches, "\n" + matrix.render()
            # -- spine1 back ----------------------------------------------------------------
            with traffic(lab) as running:
                back = time.monotonic()
                switch.start([])  # a fresh process: no pipeline, no entries
                assert switch.proc is not None
                lab.extra_pids.append(switch.proc.pid)
                assert wait_for(lambda: read_down(lab.state) == [], DEADLINE), out.text
                restored = time.monotonic()
                running.wait_all(restored, "passing through spine1 again")
            assert running.passed_denied() == [], running.passed_denied()
            returned = [outage(running, flow, back) for flow, *_ in ALLOWED]
    finally:
        stop.set()
        watcher.join(timeout=60)
    assert not watcher.is_alive(), "watch did not stop"
    text = out.text
    assert f"-- {DEAD}: not answering: routing around" in text, text
    assert f"-- {DEAD}: answering again: restoring its tables first" in text, text
    records = [json.loads(line) for line in (lab.state / "audit.jsonl").read_text().splitlines()]
    down = next(r for r in records if r.get("spines_down") == [DEAD])
    assert all(
        v["written"] == 0 for name, v in down["switches"].items() if name.startswith("spine")
    ), down["switches"]
    restores = [r for r in records if r.get("spine_restored") == DEAD]
    assert all(list(r["switches"]) == [DEAD] for r in restores), restores
    assert restores and restores[-1]["switches"][DEAD]["ok"], restores
    assert sum(r["switches"][DEAD]["written"] for r in restores) > 0, restores

    print(f"\n{DEAD} killed: every allowed cross-rack flow passing again within "
          f"{max(r for r, _ in rerouted):.2f} s of the kill (watch --check 0.5)")  # fmt: skip
    for (flow, src, dst, proto, port), (rec, gap) in zip(ALLOWED, rerouted, strict=True):
        print(f"  {flow:6} {src}->{dst} {proto}/{port}: first pass {rec:.2f} s after the "
              f"kill; longest gap {gap:.2f} s")  # fmt: skip
    print(f"{DEAD} back: down.json cleared {restored - back:.2f} s after its process started")
    for (flow, *_), (_, gap) in zip(ALLOWED, returned, strict=True):
        print(f"  {flow:6}: gap around the restore {gap:.2f} s")
    print(f"matrix with {DEAD} down: {matrix.render().splitlines()[-1]}")
