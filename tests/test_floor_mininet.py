"""The trading floor in Mininet with real packets: eight reference-switch processes, 19
hosts, the example policy applied by the controller — and the scenarios an operator cares
about, each judged against the policy semantics (compiler/semantics.py), never against the
compiled tables:

1. the segmentation matrix of the whole floor;
2. a compromised engine scanning the risk and settlement racks: nothing answers that the
   policy does not allow, and every denied attempt is an alert naming the deciding rule;
3. dev never reaches prod (nor prod dev), and a responder cannot initiate;
4. a live policy change under continuous traffic is per-packet consistent;
5. quarantine under traffic cuts the host everywhere and nothing else; release restores it;
6. a switch process killed and restarted comes up empty, and `watch` restores it.

The floor comes up once for the module and is torn down whatever happens; the teardown
asserts nothing of it is left on the machine. Figures (quarantine and restore times, the
packets a policy change drops in flight) are printed: run with `-s` to see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
from conftest import TABLES
from p4rt import wait_for

from compiler.check import check_policy
from compiler.emit import build
from compiler.inventory import Inventory, load_inventory
from compiler.model import ALL_PORTS, Policy
from compiler.semantics import PolicySemantics
from p4seg.cli import _front, _parser, main
from p4seg.control import _rule_lines
from p4seg.verbs import watch_loop
from runtime.alerts import Alert, RateLimiter, follow
from runtime.controller import ControllerOptions, PipelineFiles, targets
from runtime.live import LiveState, effective_policy
from topologies.matrix import (
    Cell,
    Flow,
    LineReader,
    Matrix,
    expected_matrix,
    representative_flows,
    run_matrix,
)
from topologies.network import Floor, _alive

ROOT = Path(__file__).resolve().parent.parent
INVENTORY = ROOT / "topologies" / "trading_floor.yaml"
POLICY = ROOT / "policies" / "trading_floor.zt"

pytestmark = [
    pytest.mark.mininet,
    pytest.mark.skipif(os.geteuid() != 0, reason="Mininet needs root (network namespaces, veth)"),
    pytest.mark.skipif(shutil.which("mnexec") is None, reason="Mininet's mnexec is not on PATH"),
]

DEADLINE = 20.0  # seconds: an upper bound for something that must happen, never a pause
TICK = 0.02  # seconds between a stream's TCP connects
CONNECT_TIMEOUT = 0.5  # a stream's connect that has not completed by then failed (SYN RTO: 1 s)
DATAGRAM_GAP = 0.005  # seconds between a stream's datagrams
LOCK = Path(tempfile.gettempdir()) / "p4seg-trading-floor.lock"
LOCK_WAIT = 600.0  # seconds another run of this module may hold the floor

# -- helper programs run inside the hosts ---------------------------------------------------

# Streams of traffic with timestamps (CLOCK_MONOTONIC is the same in every namespace):
#   udp-send SRC GAP TARGETS  one datagram every GAP s, round robin over TARGETS
#                             ([[flow, dst, port], ...]), one sequence number across them
#   udp-recv ADDR PORTS       one line per datagram: its payload and arrival time
#   tcp-loop SRC GAP TIMEOUT TARGETS  per target, a TCP connect starting every GAP s:
#                             its start, end and whether it connected
# Each prints JSON lines and runs until its stdin closes.
STREAM = r"""
import json, select, socket, sys, threading, time
mode, addr = sys.argv[1], sys.argv[2]
lock, stop = threading.Lock(), threading.Event()

def emit(doc):
    with lock:
        print(json.dumps(doc), flush=True)

def until_stdin_closes():
    sys.stdin.read()
    stop.set()

threading.Thread(target=until_stdin_closes, daemon=True).start()
if mode == "udp-recv":
    socks = []
    for port in map(int, sys.argv[3].split(",")):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((addr, port))
        socks.append(s)
    emit("ready")
    while not stop.is_set():
        for s in select.select(socks, [], [], 0.1)[0]:
            data = s.recv(2048)
            emit({**json.loads(data), "port": s.getsockname()[1], "arrived": time.monotonic()})
elif mode == "udp-send":
    gap, targets = float(sys.argv[3]), json.loads(sys.argv[4])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, 0))
    seq, due = 0, time.monotonic()
    while not stop.is_set():
        flow, dst, port = targets[seq % len(targets)]
        seq += 1
        s.sendto(json.dumps({"flow": flow, "seq": seq, "sent": time.monotonic()}).encode(), (dst, port))
        due += gap
        time.sleep(max(0.0, due - time.monotonic()))
    emit({"total": seq})
elif mode == "tcp-loop":
    gap, timeout, targets = float(sys.argv[3]), float(sys.argv[4]), json.loads(sys.argv[5])

    def connect(flow, dst, port):
        start = time.monotonic()
        try:
            socket.create_connection((dst, port), timeout, (addr, 0)).close()
            ok = True
        except OSError:
            ok = False
        emit({"flow": flow, "start": start, "end": time.monotonic(), "ok": ok})

    # A connect starts every GAP s whether or not the last one is done: failing connects
    # (which take TIMEOUT) do not make the stream coarser.
    running, due = [], time.monotonic()
    while not stop.is_set():
        for target in targets:
            running.append(threading.Thread(target=connect, args=target))
            running[-1].start()
        running = [t for t in running if t.is_alive()]
        due += gap
        time.sleep(max(0.0, due - time.monotonic()))
    for t in running:
        t.join()
"""


Events = list[dict[str, object]]


def _t(event: dict[str, object], key: str) -> float:
    value = event[key]
    assert isinstance(value, float | int), event
    return float(value)


def _seqs(events: Events) -> list[int]:
    return sorted(int(_t(e, "seq")) for e in events)


def at_least(n: int, measure: Callable[[], int | Sized]) -> Callable[[], bool]:
    """A condition to wait for: `measure()` (a number, or the size of what it returns)
    has reached `n`."""

    def reached() -> bool:
        value = measure()
        return (value if isinstance(value, int) else len(value)) >= n

    return reached


class Stream:
    """A STREAM helper in a host; a thread collects the JSON lines it prints."""

    def __init__(self, floor: Floor, host: str, *args: str) -> None:
        self.host = host
        self.proc: subprocess.Popen[str] = floor.hosts[host].popen(
            [sys.executable, "-c", STREAM, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[object] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def events(self, flow: str | None = None) -> Events:
        """Connects or datagrams (of one flow, or all)."""
        return [
            e
            for e in list(self.lines)
            if isinstance(e, dict) and "flow" in e and flow in (None, e["flow"])
        ]

    def count(self) -> int:
        return len(self.events())

    def ok(self, lo: float = 0.0, hi: float = float("inf"), flow: str | None = None) -> Events:
        """Connects that started after `lo`, completed before `hi` and passed."""
        return [
            e for e in self.events(flow) if e["ok"] and lo < _t(e, "start") and _t(e, "end") < hi
        ]

    def tried(self, lo: float, flow: str | None = None) -> Events:
        """Connects that started after `lo` and are done."""
        return [e for e in self.events(flow) if _t(e, "start") > lo]

    def last_seq(self) -> int:
        return max(_seqs(self.events()), default=0)

    def total(self) -> int:
        """How many datagrams a stopped udp-send sent."""
        return next(int(_t(e, "total")) for e in self.lines if isinstance(e, dict) and "total" in e)

    def wait(self, condition: Callable[[], bool], what: str) -> None:
        if not wait_for(lambda: condition() or self.proc.poll() is not None, DEADLINE):
            raise AssertionError(f"{self.host}: {what}: not within {DEADLINE:g} s")
        if not condition():
            raise AssertionError(f"{self.host}: {what}: the helper exited: {self.stop()}")

    def ready(self) -> None:
        self.wait(lambda: "ready" in self.lines, "receiver ready")

    def stop(self) -> str:
        """Close stdin (the helper finishes), collect what it printed; its stderr."""
        assert self.proc.stdin is not None and self.proc.stderr is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=10)
        return self.proc.stderr.read()


@contextlib.contextmanager
def streams(floor: Floor) -> Iterator[Callable[..., Stream]]:
    """Start STREAM helpers with the function yielded; every one is stopped on exit."""
    started: list[Stream] = []

    def start(host: str, *args: str) -> Stream:
        started.append(Stream(floor, host, *args))
        return started[-1]

    try:
        yield start
    finally:
        for s in started:
            s.stop()


@contextlib.contextmanager
def listeners(floor: Floor, tcp: Mapping[str, Iterable[int]]) -> Iterator[None]:
    """topologies.probe TCP listeners (accept, close) on hosts, until exit."""
    procs = []
    try:
        for host, ports in tcp.items():
            ip = floor.inventory.hosts_by_name[host].ip_text
            proc = floor.python(host, "topologies.probe", "listen", ip, "--tcp",
                                ",".join(map(str, sorted(ports))))  # fmt: skip
            procs.append(proc)
            if LineReader(proc).until(bool, DEADLINE) != ["ready"]:
                raise RuntimeError(f"the listener on {host} did not start: {proc.stderr.read()}")  # type: ignore[union-attr]
        yield
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


# -- the floor ------------------------------------------------------------------------------


@dataclass
class Lab:
    """The running floor, the policy file it was applied from, and the controller's state."""

    floor: Floor
    inventory: Inventory
    policy_path: Path
    state: Path
    build: Path
    extra_pids: list[int] = field(default_factory=list)  # switch processes started by a test

    @property
    def ips(self) -> dict[str, int]:
        return {h.name: h.ip for h in self.inventory.hosts}

    def ip(self, host: str) -> str:
        return self.inventory.hosts_by_name[host].ip_text

    def argv(self, verb: str, *args: str) -> list[str]:
        """A p4seg command line on this floor: `apply`/`watch` take the policy as their
        argument, the live verbs (`quarantine HOST`, ...) with -p."""
        where = ["-i", str(INVENTORY), "--state", str(self.state), "--build", str(self.build)]
        if verb in ("apply", "watch"):
            return [verb, str(self.policy_path), *args, *where]
        return [verb, *args, "-p", str(self.policy_path), *where]

    def cli(self, verb: str, *args: str) -> int:
        return main(self.argv(verb, *args))

    def checked(self) -> Policy:
        text = self.policy_path.read_text()
        result = check_policy(text, str(self.policy_path), self.inventory)
        assert result.policy is not None, result.diagnostics
        return result.policy

    def effective(self) -> Policy:
        """What the switches must enforce now: the policy file, `during` windows and the
        live state (quarantines) — as `apply` computes it."""
        state = LiveState.load(self.state)
        return effective_policy(self.checked(), state, time.time(), self.ips)


@contextlib.contextmanager
def one_floor_per_machine() -> Iterator[None]:
    """The trading floor's switch names and P4Runtime ports are the inventory's, so two
    runs of this module on one machine would collide: the second waits for the first."""
    with LOCK.open("a") as lock:

        def taken() -> bool:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        if not wait_for(taken, LOCK_WAIT):
            pytest.fail(f"another trading floor held {LOCK} for {LOCK_WAIT:g} s")
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The trading floor up in Mininet with the example policy applied by `p4seg apply`;
    torn down after the module's last test, and nothing of it may be left."""
    work = tmp_path_factory.mktemp("floor")
    shutil.copy(POLICY, work / "trading_floor.zt")
    inventory, _ = load_inventory(str(INVENTORY))
    floor = Floor(inventory, "ref", progress=lambda text: print(f"floor: {text}"))
    lab = Lab(floor, inventory, work / "trading_floor.zt", work / "state", work / "build")
    # Nothing the controller writes may land in the repository: chdir as well as --state.
    with one_floor_per_machine(), pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        start = time.monotonic()
        with floor:
            print(f"floor: up in {time.monotonic() - start:.1f} s")
            start = time.monotonic()
            assert lab.cli("apply") == 0
            print(f"floor: policy applied in {time.monotonic() - start:.1f} s")
            yield lab
        left = floor.leftovers() + [
            f"process {pid} (a restarted switch)" for pid in lab.extra_pids if _alive(pid)
        ]
    assert left == []


# -- checking cells against the semantics ---------------------------------------------------


def check_cells(lab: Lab, cells: Iterable[Cell], policy: Policy | None = None) -> Matrix:
    """Send `cells` for real and compare with the policy semantics (the effective policy by
    default); a mismatch is probed once more on its own, as `run_matrix` does."""
    return run_matrix(lab.floor, policy or lab.effective(), cells=cells)


def matrix_around(lab: Lab, hosts: set[str]) -> Matrix:
    """The segmentation matrix restricted to the pairs with one of `hosts` at either end."""
    policy = lab.effective()
    cells = [
        c
        for c in expected_matrix(policy, lab.floor, representative_flows(policy))
        if c[0] in hosts or c[1] in hosts
    ]
    return check_cells(lab, cells, policy)


def policy_ports(policy: Policy) -> list[int]:
    """Every TCP/UDP port the policy names (each port of every range)."""
    return sorted(
        {
            p
            for r in policy.rules
            if r.ports != ALL_PORTS
            for lo, hi in r.ports
            for p in range(lo, hi + 1)
        }
    )


def members(lab: Lab, policy: Policy, service: str) -> list[str]:
    addresses = next(s.addresses for s in policy.services if s.name == service)
    return [h.name for h in lab.inventory.hosts if h.ip in addresses]


# -- 1. the segmentation matrix -------------------------------------------------------------


def test_segmentation_matrix_of_the_trading_floor(lab: Lab) -> None:
    matrix = run_matrix(lab.floor, lab.effective())
    print(matrix.render())
    assert sum(matrix.expected.values()) > 0
    assert not matrix.mismatches, "\n" + matrix.render()


# -- 2. a compromised engine scans the risk and settlement racks ----------------------------

SCANNER = "algo1"
SCANNED = ("risk1", "risk2", "riskdb", "settle1", "settle2", "ledger")


class Follower:
    """runtime.alerts.follow on one switch, in a thread with its own event loop."""

    def __init__(self, lab: Lab, policy: Policy, switch: str) -> None:
        built = build(policy, lab.inventory, lab.policy_path.read_text(), "ref")
        rules = _rule_lines(built)
        target = next(t for t in targets(lab.inventory, built.switches, TABLES) if t.name == switch)
        self.alerts: list[Alert] = []
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()  # bound to the loop that first waits on it
        follow_one = follow([target], PipelineFiles.of(lab.build, "ref"), ControllerOptions(),
                            rules, self.alerts.append, RateLimiter(rate=1e9, burst=10**9),
                            on_ready=lambda _name: self.ready.set())  # fmt: skip
        self.thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._main(follow_one),)
        )
        self.thread.start()

    async def _main(self, following: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(following)
        stop = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            self.error = task.exception() or RuntimeError("follow returned")
            self.ready.set()
        task.cancel()
        stop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def wait_ready(self) -> None:
        assert self.ready.wait(DEADLINE) and self.error is None, (
            f"alerts --follow did not start: {self.error}"
        )

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stopping.set)
        self.thread.join(timeout=DEADLINE)
        assert not self.thread.is_alive(), "alerts --follow did not stop"
        self._loop.close()


def scan_ports(policy: Policy, seed: int = 1729, samples: int = 40) -> list[int]:
    """1-1024, every port the policy names, and a seeded sample of the others."""
    ports = set(range(1, 1025)) | set(policy_ports(policy))
    rng = random.Random(seed)
    ports |= set(rng.sample(sorted(set(range(1025, 65536)) - ports), samples))
    return sorted(ports)


def test_a_compromised_engine_scans_risk_and_settlement(lab: Lab) -> None:
    policy = lab.effective()
    sem = PolicySemantics(policy)
    ips, src = lab.ips, lab.ips[SCANNER]
    ports = scan_ports(policy)
    verdicts = {(d, p): sem.flow(src, ips[d], "tcp", p) for d in SCANNED for p in ports}
    expected = {cell: v.allowed for cell, v in verdicts.items()}
    denied = {cell for cell, allowed in expected.items() if not allowed}
    assert all(verdicts[c].deciding.log for c in denied), "the example policy logs every deny"
    control = ("oms1", 9876)  # algo1's one allowed destination: the scanner's connects work
    assert sem.flow(src, ips[control[0]], "tcp", control[1]).allowed

    follower = Follower(lab, policy, lab.inventory.hosts_by_name[SCANNER].switch)
    try:
        follower.wait_ready()
        # Warm the PacketIn path up with denied datagrams to a host outside the scan.
        warm = lab.ip("md1")

        def warmed() -> bool:
            lab.floor.hosts[SCANNER].cmd(f"echo warm > /dev/udp/{warm}/9")
            return wait_for(lambda: any(a.dst == warm for a in follower.alerts), 1.0)

        assert wait_for(warmed, DEADLINE), "no alert for a logged deny: no PacketIns arrive"

        start = time.monotonic()
        observed: dict[tuple[str, int], bool] = {}
        with listeners(lab.floor, {**{d: ports for d in SCANNED}, control[0]: [control[1]]}):
            # One sender per destination (probe.py runs 256 connects at a time per process).
            senders = {}
            for dst in [*SCANNED, control[0]]:
                proc = lab.floor.python(SCANNER, "topologies.probe", "send", lab.ip(SCANNER),
                                        "--timeout", "1.0")  # fmt: skip
                wanted = ports if dst in SCANNED else [control[1]]
                lines = [json.dumps({"id": f"{dst}|{p}", "dst": lab.ip(dst), "proto": "tcp", "port": p})
                         for p in wanted]  # fmt: skip
                assert proc.stdin is not None
                proc.stdin.write("\n".join(lines) + "\n")
                proc.stdin.close()
                senders[dst] = proc
            for dst, proc in senders.items():
                assert proc.stdout is not None and proc.stderr is not None
                out = proc.stdout.read()
                assert proc.wait(timeout=60) == 0, f"the sender to {dst}: {proc.stderr.read()}"
                for line in out.splitlines():
                    result = json.loads(line)
                    host, port = result["id"].split("|")
                    observed[(host, int(port))] = bool(result["ok"])
        scan_seconds = time.monotonic() - start
        assert observed.pop(control), f"{SCANNER} -> {control[0]} tcp {control[1]} did not connect"

        # Every denied SYN was cloned to the CPU port: wait until each one's alert is in.
        names = {lab.ip(d): d for d in SCANNED}

        def alerted() -> set[tuple[str, int]]:
            return {
                (names[a.dst], a.dport)
                for a in list(follower.alerts)
                if a.src == lab.ip(SCANNER) and a.proto == "tcp" and a.dst in names
            }

        wait_for(lambda: alerted() >= denied, DEADLINE)
        scan_alerts = [a for a in list(follower.alerts) if a.dst in names]
    finally:
        follower.stop()

    answered = sorted(c for c, ok in observed.items() if ok != expected[c])
    print(f"scan: {len(observed)} connects from {SCANNER} in {scan_seconds:.1f} s, "
          f"{sum(observed.values())} answered, {len(scan_alerts)} alerts")  # fmt: skip
    assert not answered, f"{len(answered)} connects not as the policy says: " + ", ".join(
        f"{d}:{p} ({'answered' if observed[(d, p)] else 'no answer'})" for d, p in answered[:40]
    )
    got = alerted()
    assert got == denied, (
        f"{len(denied - got)} denied connects without an alert "
        f"(first: {sorted(denied - got)[:10]}), {len(got - denied)} alerts for allowed ones "
        f"(first: {sorted(got - denied)[:10]})"
    )
    wrong = []
    for a in scan_alerts:
        deciding = verdicts[(names[a.dst], a.dport)].deciding
        rule_id = deciding.rule.id if deciding.rule else 0
        span = deciding.rule.span if deciding.rule else policy.default_span
        assert span is not None
        if a.rule_id != rule_id or not a.rule.startswith(f"line {span.line}: "):
            wrong.append(
                f"{a.dst}:{a.dport} rule {a.rule_id} '{a.rule}' (want {rule_id}, line {span.line})"
            )
    assert not wrong, f"{len(wrong)} alerts name the wrong rule: {wrong[:10]}"


# -- 3. environments never cross; responders never initiate ---------------------------------


def test_dev_never_reaches_prod_and_a_responder_cannot_initiate(lab: Lab) -> None:
    policy = lab.effective()
    dev, prod = members(lab, policy, "dev"), members(lab, policy, "prod")
    assert len(dev) == 3 and len(prod) == 15  # jump1 is in neither
    flows = [Flow("icmp")] + [
        Flow(proto, p) for p in policy_ports(policy) for proto in ("tcp", "udp")
    ]
    crossing = [
        (s, d, f) for a, b in ((dev, prod), (prod, dev)) for s in a for d in b for f in flows
    ]
    fix = Flow("tcp", 9876)
    matrix = check_cells(lab, [*crossing, ("algo1", "oms1", fix), ("oms1", "algo1", fix)], policy)
    # The policy says so (the semantics), and so do the packets (the matrix).
    assert not any(matrix.expected[c] for c in crossing), "the policy lets dev and prod cross"
    assert matrix.expected[("algo1", "oms1", fix)] and not matrix.expected[("oms1", "algo1", fix)]
    print(matrix.render())
    assert not matrix.mismatches, "\n" + matrix.render()


# -- 4. a live policy change under continuous traffic ---------------------------------------

CHANGED = ("algo1", "oms1")  # flows A and B: udp to PORT_A and PORT_B, algo1 -> oms1
PORT_A, PORT_B = 40001, 40002


def _with_rule(text: str, rule: str) -> str:
    head, sep, tail = text.partition("\ndefault deny log")
    assert sep, "the example policy ends with `default deny log`"
    return f"{head}\n{rule}{sep}{tail}"


def test_a_policy_change_under_traffic_is_per_packet_consistent(lab: Lab) -> None:
    """P1 allows flow A (algo1 -> oms1 udp 40001) and denies B (udp 40002); P2 the
    reverse. One sender in algo1 interleaves numbered datagrams of A and B, one sequence
    number across both, while the controller moves the floor from P1 to P2.

    Why max(delivered A) < min(delivered B) is per-packet consistency seen from outside:
    a datagram crosses tor-alg (algo1's ToR), a spine and tor-oms, and is judged whole by
    each ToR under the epoch that ToR stamps when the packet arrives (docs/controller.md,
    "Across switches"). Both flows enter tor-alg on the same port, in sequence order, and
    tor-alg flips once, between two packets: every packet before the flip is judged by P1
    there, every packet after it by P2. A delivered A was judged by P1 at tor-alg, so it
    came before the flip; a delivered B was judged by P2, so it came after it — whatever
    tor-oms did, and whenever. A datagram judged by P1 at one ToR and by P2 at the other is
    denied by one of them (A under P2, B under P1) and dropped. So every delivered A
    precedes every delivered B. A packet judged by a mix of the two policies at one switch
    (half-written tables) could break the order, or pass although neither policy allows it.
    """
    src, dst = CHANGED
    base = lab.policy_path.read_text()
    p1 = _with_rule(base, f"allow {src} -> {dst} udp {PORT_A}   # P1: flow A")
    p2 = _with_rule(base, f"allow {src} -> {dst} udp {PORT_B}   # P2: flow B")
    for text, allowed in ((p1, PORT_A), (p2, PORT_B)):
        lab.policy_path.write_text(text)
        sem = PolicySemantics(lab.effective())
        verdicts = {
            p: sem.flow(lab.ips[src], lab.ips[dst], "udp", p).allowed for p in (PORT_A, PORT_B)
        }
        assert verdicts == {PORT_A: allowed == PORT_A, PORT_B: allowed == PORT_B}
    enough = 50
    try:
        lab.policy_path.write_text(p1)
        assert lab.cli("apply") == 0
        with streams(lab.floor) as start:
            receiver = start(dst, "udp-recv", lab.ip(dst), f"{PORT_A},{PORT_B}")
            receiver.ready()
            flows = [["A", lab.ip(dst), PORT_A], ["B", lab.ip(dst), PORT_B]]
            sender = start(src, "udp-send", lab.ip(src), "0.002", json.dumps(flows))
            receiver.wait(at_least(enough, partial(receiver.events, "A")), "datagrams of A")
            lab.policy_path.write_text(p2)
            swap_start = time.monotonic()
            assert lab.cli("apply") == 0
            swap_end = time.monotonic()
            receiver.wait(at_least(enough, partial(receiver.events, "B")), "datagrams of B")
            sender.stop()
            sent = sender.total()
            # The last datagram is a B (even) or follows one: wait until it is in, or lost.
            wait_for(at_least(sent - 1, receiver.last_seq), 5.0)
    finally:
        lab.policy_path.write_text(base)
        assert lab.cli("apply") == 0

    a, b = _seqs(receiver.events("A")), _seqs(receiver.events("B"))
    early_b = [e for e in receiver.events("B") if _t(e, "arrived") < swap_start]
    late_a = [e for e in receiver.events("A") if _t(e, "sent") > swap_end]
    lost_a = sorted(set(range(1, a[-1] + 1, 2)) - set(a)) if a else []  # A: odd numbers
    lost_b = sorted(set(range(b[0], sent + 1, 2)) - set(b)) if b else []  # B: even
    print(f"policy change P1 -> P2 under traffic: apply took {swap_end - swap_start:.2f} s; "
          f"{sent} datagrams sent; A delivered #1-#{a[-1] if a else '-'} ({len(a)}, "
          f"{len(lost_a)} lost), B delivered #{b[0] if b else '-'}-#{sent} ({len(b)}, "
          f"{len(lost_b)} lost); {b[0] - a[-1] - 1 if a and b else '?'} in between dropped, "
          f"each denied at one ToR or both by the policy that does not allow it")  # fmt: skip
    assert len(a) >= enough and len(b) >= enough
    assert a[-1] < b[0], (
        f"B #{b[0]} was delivered before the last A, #{a[-1]}: B delivered "
        f"{[s for s in b if s < a[-1]][:20]}, A delivered {[s for s in a if s > b[0]][:20]}"
    )
    assert not early_b, f"B delivered before the change began: {early_b[:5]}"
    assert not late_a, f"A sent after the change was applied and still delivered: {late_a[:5]}"


# -- 5. quarantine under traffic ------------------------------------------------------------

SUSPECT = "algo1"


@dataclass
class Traffic:
    """Streams through the floor: TCP connect loops (one event per connect) and datagram
    streams (one event per datagram received)."""

    connects: dict[str, Stream]  # by source host
    received: dict[str, Stream]  # by destination host
    senders: dict[str, Stream]  # datagram senders, by source host

    def stop_datagrams(self, passing: Iterable[str]) -> dict[str, list[int]]:
        """Stop the datagram senders; per destination in `passing`, wait for the last
        datagram and say which were lost."""
        lost = {}
        for src, dst in DATAGRAMS:
            if src not in self.senders:
                continue
            self.senders[src].stop()
            if dst in passing:
                sent, receiver = self.senders[src].total(), self.received[dst]
                wait_for(at_least(sent, receiver.last_seq), 5.0)
                lost[dst] = sorted(set(range(1, sent + 1)) - set(_seqs(receiver.events())))
        return lost


# algo1's flows to two hosts on tor-oms and from the feed on tor-md, and other hosts'
# flows through the same ToRs (algo2 shares algo1's ToR): flow name, destination, port.
CONNECTS: dict[str, list[tuple[str, str, int]]] = {
    SUSPECT: [("S1", "oms1", 9876), ("S2", "oms2", 9876)],
    "algo2": [("C1", "oms1", 9876)],
}
DATAGRAMS: dict[tuple[str, str], tuple[str, int]] = {
    ("md1", SUSPECT): ("S3", 30005),
    ("md2", "algo3"): ("C2", 30006),
}


def start_traffic(lab: Lab, start: Callable[..., Stream], sources: Iterable[str]) -> Traffic:
    ip = lab.ip
    sources = set(sources)
    received, senders, connects = {}, {}, {}
    for (src, dst), (flow, port) in DATAGRAMS.items():
        if src in sources:
            received[dst] = start(dst, "udp-recv", ip(dst), str(port))
            received[dst].ready()
            senders[src] = start(src, "udp-send", ip(src), str(DATAGRAM_GAP),
                                 json.dumps([[flow, ip(dst), port]]))  # fmt: skip
    for src, flows in CONNECTS.items():
        if src in sources:
            wanted = [[flow, ip(dst), port] for flow, dst, port in flows]
            connects[src] = start(src, "tcp-loop", ip(src), str(TICK), str(CONNECT_TIMEOUT),
                                  json.dumps(wanted))  # fmt: skip
    return Traffic(connects, received, senders)


def test_quarantine_under_traffic_cuts_the_host_everywhere(lab: Lab) -> None:
    sem = PolicySemantics(lab.effective())
    ips = lab.ips
    for src, flows in CONNECTS.items():
        for _, dst, port in flows:
            assert sem.flow(ips[src], ips[dst], "tcp", port).allowed
    for (src, dst), (_, port) in DATAGRAMS.items():
        assert sem.flow(ips[src], ips[dst], "udp", port).allowed
    tcp_listeners: dict[str, Iterable[int]] = {
        dst: [port] for flows in CONNECTS.values() for _, dst, port in flows
    }
    quarantined = False
    try:
        with listeners(lab.floor, tcp_listeners), streams(lab.floor) as start:
            traffic = start_traffic(lab, start, [SUSPECT, "algo2", "md1", "md2"])
            for src, flows in CONNECTS.items():
                for flow, _, _ in flows:
                    stream = traffic.connects[src]
                    stream.wait(at_least(5, partial(stream.ok, 0.0, float("inf"), flow)), flow)
            for dst, receiver in traffic.received.items():
                receiver.wait(at_least(20, receiver.count), f"datagrams to {dst}")
            q_start = time.monotonic()
            assert lab.cli("quarantine", SUSPECT) == 0
            quarantined = True
            q_end = time.monotonic()
            # Watch the cut for a while: a second of connects of each of algo1's flows.
            suspect = traffic.connects[SUSPECT]
            for flow in ("S1", "S2"):
                suspect.wait(at_least(50, partial(suspect.tried, q_end, flow)), f"{flow} tried")
            window_end = time.monotonic()
            lost = traffic.stop_datagrams(["algo3"])

        suspect_udp = traffic.received[SUSPECT].events()
        leaked = traffic.connects[SUSPECT].ok(q_end, window_end) + [
            e for e in suspect_udp if _t(e, "sent") > q_end
        ]
        arrivals = [_t(e, "end") for e in traffic.connects[SUSPECT].events() if e["ok"]]
        arrivals += [_t(e, "arrived") for e in suspect_udp]
        control_failed = [
            e
            for e in traffic.connects["algo2"].events()
            if not e["ok"] and _t(e, "start") > q_start - 1
        ]
        c_seqs, c_lost = _seqs(traffic.received["algo3"].events()), lost["algo3"]
        last = max(arrivals, default=q_start)
        print(f"quarantine {SUSPECT}: the command took {q_end - q_start:.2f} s; {SUSPECT}'s "
              f"traffic stopped arriving {last - q_start:.3f} s after it started; other hosts "
              f"meanwhile: {len(traffic.connects['algo2'].ok(q_start))} connects, "
              f"{len(c_seqs)} datagrams ({len(c_lost)} lost)")  # fmt: skip
        assert not leaked, f"{SUSPECT}'s traffic passed after the quarantine: {leaked[:5]}"
        assert not control_failed, f"other hosts' connects failed: {control_failed[:5]}"
        assert not c_lost, f"other hosts' datagrams lost around the quarantine: {c_lost[:20]}"
        assert traffic.connects["algo2"].ok(q_end), "no connect of other hosts after the quarantine"

        # Every flow to and from algo1, on every ToR, as the quarantined policy says.
        matrix = matrix_around(lab, {SUSPECT})
        assert not any(v for (s, d, _), v in matrix.expected.items() if SUSPECT in (s, d))
        assert not matrix.mismatches, "\n" + matrix.render()

        # Release under traffic: algo1's flows come back.
        with listeners(lab.floor, tcp_listeners), streams(lab.floor) as start:
            traffic = start_traffic(lab, start, [SUSPECT, "md1"])
            traffic.connects[SUSPECT].wait(at_least(4, partial(traffic.connects[SUSPECT].tried, 0.0)),
                                           "connects while quarantined")  # fmt: skip
            r_start = time.monotonic()
            assert lab.cli("release", SUSPECT) == 0
            quarantined = False
            r_end = time.monotonic()
            suspect = traffic.connects[SUSPECT]
            for flow in ("S1", "S2"):
                suspect.wait(at_least(1, partial(suspect.ok, r_end, float("inf"), flow)), flow)
            traffic.received[SUSPECT].wait(
                lambda: any(_t(e, "sent") > r_end for e in traffic.received[SUSPECT].events()),
                "S3 after the release",
            )
            early = traffic.connects[SUSPECT].ok(0, r_start) + [
                e for e in traffic.received[SUSPECT].events() if _t(e, "arrived") < r_start
            ]
            back_tcp = min(_t(e, "end") for e in traffic.connects[SUSPECT].events() if e["ok"])
            back_udp = min(_t(e, "arrived") for e in traffic.received[SUSPECT].events())
        print(f"release {SUSPECT}: the command took {r_end - r_start:.2f} s; its first connect "
              f"passed {back_tcp - r_start:.3f} s and its first datagram arrived "
              f"{back_udp - r_start:.3f} s after it started")  # fmt: skip
        assert not early, f"{SUSPECT}'s traffic passed while still quarantined: {early[:5]}"
    finally:
        if quarantined:
            assert lab.cli("release", SUSPECT) == 0


# -- 6. a switch restarts under a running watch ---------------------------------------------

RESTARTED = "tor-rsk"


class Output:
    """A thread-safe stand-in for stdout (the watch loop prints from its thread)."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(list(self.parts))


def test_a_restarted_switch_is_restored_by_watch(lab: Lab) -> None:
    ip = lab.ip
    switch = lab.floor.switches[RESTARTED]
    rack = sorted(h.name for h in lab.inventory.hosts if h.switch == RESTARTED)
    # Through the restarted ToR: from another rack (oms1 -> risk1) and within it.
    loops = {"oms1": [["across", ip("risk1"), 8443]], "risk1": [["inside", ip("riskdb"), 5432]]}
    sem = PolicySemantics(lab.effective())
    assert sem.flow(lab.ips["oms1"], lab.ips["risk1"], "tcp", 8443).allowed
    assert sem.flow(lab.ips["risk1"], lab.ips["riskdb"], "tcp", 5432).allowed
    audit_log = lab.state / "audit.jsonl"
    records_before = len(audit_log.read_text().splitlines())
    args = _parser().parse_args(lab.argv("watch", "--check", "0.5", "--interval", "0.1"))
    stop = threading.Event()
    watcher = threading.Thread(target=watch_loop, args=(args, _front, stop), daemon=True)
    out = Output()
    try:
        with (
            contextlib.redirect_stdout(out),
            listeners(lab.floor, {"risk1": [8443], "riskdb": [5432]}),
            streams(lab.floor) as start,
        ):
            watcher.start()
            connects = {src: start(src, "tcp-loop", ip(src), str(TICK), str(CONNECT_TIMEOUT),
                                   json.dumps(flows)) for src, flows in loops.items()}  # fmt: skip
            for src, c in connects.items():
                c.wait(at_least(5, c.ok), f"connects from {src}")
            # The watch's first apply (nothing to write) is done before the switch goes.
            assert wait_for(lambda: "Applied:" in out.text, DEADLINE), out.text
            killed = time.monotonic()
            assert switch.proc is not None
            old_pid = switch.proc.pid
            switch.proc.kill()  # SIGKILL: a crash, nothing saved
            switch.stop(deleteIntfs=False)  # reaps it; the interfaces stay
            switch.start([])  # a fresh process: no pipeline, no entries
            assert switch.proc is not None and switch.proc.pid != old_pid
            lab.extra_pids.append(switch.proc.pid)
            up = time.monotonic()
            for src, c in connects.items():
                c.wait(at_least(1, partial(c.ok, up)), f"connects from {src} again")
    finally:
        stop.set()
        watcher.join(timeout=60)
    assert not watcher.is_alive(), "watch did not stop"
    text = out.text
    assert f"{RESTARTED}: pipeline lost" in text, text
    records = [json.loads(line) for line in audit_log.read_text().splitlines()[records_before:]]
    assert [r["event"] for r in records] == ["watch"], records
    restored = records[0]["switches"]
    assert restored[RESTARTED]["written"] > 0, restored
    assert all(v["written"] == 0 for name, v in restored.items() if name != RESTARTED), restored

    events = [e for c in connects.values() for e in c.events()]
    last_before = max(_t(e, "end") for e in events if e["ok"] and _t(e, "end") < killed)
    first_after = min(_t(e, "end") for e in events if e["ok"] and _t(e, "start") > killed)
    empty = [e for e in events if not e["ok"] and _t(e, "start") > up]  # met the empty switch
    print(f"{RESTARTED} restarted: process down and up again in {up - killed:.2f} s; traffic "
          f"through it back {first_after - up:.2f} s after the new process was ready "
          f"(outage {first_after - last_before:.2f} s; {len(empty)} connects failed on the "
          f"empty switch)")  # fmt: skip

    matrix = matrix_around(lab, set(rack))
    print(matrix.render())
    assert not matrix.mismatches, "\n" + matrix.render()
