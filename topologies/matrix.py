"""The segmentation matrix: for every ordered pair of hosts and every representative flow,
real traffic through the floor, compared with what the policy semantics say.

Representative flows: every allowed service's protocol and ports (both ends of each range),
the ports just outside each range, ICMP echo, and a seeded random sample of other TCP and
UDP ports. A TCP flow passes when the handshake completes with a real listener; a UDP flow
when the datagram reaches a real receiver; ICMP when the echo reply comes back. The
expected side comes from the policy semantics (compiler/semantics.py), never from the
compiled tables. A mismatch is probed once more on its own before it is reported, so that a
packet lost to load is not mistaken for a segmentation error.
"""

from __future__ import annotations

import json
import os
import random
import select
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from compiler.model import ALL_PORTS, Policy
from compiler.semantics import PolicySemantics
from topologies.network import Floor

QUIET = 0.3  # seconds without a new datagram before the receivers are considered drained


@dataclass(frozen=True, slots=True, order=True)
class Flow:
    proto: str  # tcp | udp | icmp
    port: int = 0

    def __str__(self) -> str:
        return self.proto if self.proto == "icmp" else f"{self.proto}/{self.port}"


def representative_flows(policy: Policy, samples: int = 3, seed: int = 7) -> list[Flow]:
    flows: set[Flow] = {Flow("icmp")}
    for rule in policy.rules:
        protos = ("tcp", "udp") if rule.proto == "ip" else (rule.proto,)
        for proto in protos:
            if proto not in ("tcp", "udp"):
                continue
            ranges = rule.ports if rule.ports != ALL_PORTS else ((80, 80),)
            for lo, hi in ranges:
                for port in (lo, hi, lo - 1, hi + 1):
                    if 1 <= port <= 65535:
                        flows.add(Flow(proto, port))
    rng = random.Random(seed)
    used = {f.port for f in flows}
    for proto in ("tcp", "udp"):
        picked = 0
        while picked < samples:
            port = rng.randrange(1024, 49152)
            if port not in used:
                flows.add(Flow(proto, port))
                used.add(port)
                picked += 1
    return sorted(flows)


Cell = tuple[str, str, Flow]  # source host, destination host, flow


@dataclass
class Matrix:
    hosts: list[str]
    flows: list[Flow]
    expected: dict[Cell, bool]
    observed: dict[Cell, bool] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def mismatches(self) -> list[Cell]:
        return sorted(c for c, want in self.expected.items() if self.observed.get(c) != want)

    def to_json(self) -> dict[str, object]:
        return {
            "hosts": self.hosts,
            "flows": [str(f) for f in self.flows],
            "cells": len(self.expected),
            # per source row, per destination: the flows that passed (None: not probed)
            "grid": [[self._passed(s, d) for d in self.hosts] for s in self.hosts],
            "allowed": sum(self.expected.values()),
            "mismatches": [
                {
                    "src": s,
                    "dst": d,
                    "flow": str(f),
                    "expected": self.expected[(s, d, f)],
                    "observed": self.observed.get((s, d, f)),
                }
                for s, d, f in self.mismatches
            ],
            "seconds": round(self.seconds, 2),
        }

    def _passed(self, src: str, dst: str) -> int | None:
        cells = [self.observed.get((src, dst, f)) for f in self.flows]
        return None if all(c is None for c in cells) else sum(bool(c) for c in cells)

    def render(self, color: bool = False) -> str:
        """Rows: sources; columns: destinations, numbered as the rows; a cell is `.`
        (nothing allowed, nothing passed), the number of allowed flows that passed, or `X`
        with the failures below."""
        width = max(len(h) for h in self.hosts) + 4
        bad = set((s, d) for s, d, _ in self.mismatches)
        green, red, dim, reset = (
            ("\x1b[32m", "\x1b[31;1m", "\x1b[2m", "\x1b[0m") if color else ("",) * 4
        )
        head = " " * (width + 2) + " ".join(f"{i:>3}" for i in range(1, len(self.hosts) + 1))
        lines = [head]
        for row, s in enumerate(self.hosts, start=1):
            cells = []
            for d in self.hosts:
                if s == d:
                    cells.append(f"{dim}  -{reset}")
                elif (s, d) in bad:
                    cells.append(f"{red}  X{reset}")
                else:
                    n = sum(self.expected.get((s, d, f), False) for f in self.flows)
                    cells.append(f"{green}{n:>3}{reset}" if n else f"{dim}  .{reset}")
            lines.append(f"{row:>3} {s:<{width - 4}}  " + " ".join(cells))
        total = len(self.expected)
        allowed = sum(self.expected.values())
        lines.append(
            f"{len(self.hosts)} hosts, {len(self.flows)} flows per pair, {total} probes "
            f"({allowed} allowed by the policy) in {self.seconds:.1f} s: "
            + (
                f"{red}{len(self.mismatches)} MISMATCHES{reset}"
                if self.mismatches
                else f"{green}all as expected{reset}"
            )
        )
        for s, d, f in self.mismatches[:40]:
            want = "allowed" if self.expected[(s, d, f)] else "denied"
            lines.append(
                f"  {s} -> {d} {f}: policy says {want}, traffic {'passed' if self.observed.get((s, d, f)) else 'did not pass'}"
            )
        if len(self.mismatches) > 40:
            lines.append(
                f"  ... and {len(self.mismatches) - 40} more (--output json lists them all)"
            )
        return "\n".join(lines)


def expected_matrix(policy: Policy, floor: Floor, flows: list[Flow]) -> dict[Cell, bool]:
    sem = PolicySemantics(policy)
    ips = {h.name: h.ip for h in floor.inventory.hosts}
    return {
        (s, d, f): sem.flow(ips[s], ips[d], f.proto, f.port).allowed
        for s in ips
        for d in ips
        if s != d
        for f in flows
    }


class LineReader:
    """Lines from a process's stdout, read straight from the pipe: select() and a buffered
    file object disagree about what is left to read, so nothing here buffers but us."""

    def __init__(self, proc: object) -> None:
        self.fd = proc.stdout.fileno()  # type: ignore[attr-defined]
        self.partial = b""
        self.eof = False

    def _take(self) -> list[str]:
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            self.eof = True
            return []
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        return [line.decode(errors="replace") for line in lines]

    def _ready(self, wait: float) -> bool:
        return bool(select.select([self.fd], [], [], wait)[0])

    def until(self, done: Callable[[list[str]], bool], limit: float) -> list[str]:
        """Lines until `done(lines)` holds, the pipe closes or `limit` seconds pass."""
        out: list[str] = []
        deadline = time.monotonic() + limit
        while not done(out) and not self.eof:
            if not self._ready(max(0.0, deadline - time.monotonic())):
                break
            out += self._take()
        return out

    def drain(self, quiet: float) -> list[str]:
        """Lines until none has come for `quiet` seconds."""
        out: list[str] = []
        while not self.eof and self._ready(quiet):
            out += self._take()
        return out


def probe(
    floor: Floor, cells: Iterable[Cell], timeout: float = 1.5, tcp_ports: Iterable[int] = (),
    udp_ports: Iterable[int] = (),
) -> dict[Cell, bool]:  # fmt: skip
    """Send the traffic of `cells` (concurrently per source) and say which passed."""
    cells = list(cells)
    ips = {h.name: h.ip_text for h in floor.inventory.hosts}
    tcp = sorted({*tcp_ports, *(f.port for _, _, f in cells if f.proto == "tcp")})
    udp = sorted({*udp_ports, *(f.port for _, _, f in cells if f.proto == "udp")})
    listeners = {}
    readers: dict[str, LineReader] = {}
    try:
        for dst in sorted({d for _, d, _ in cells}):
            proc = floor.python(dst, "topologies.probe", "listen", ips[dst],
                                "--tcp", ",".join(map(str, tcp)), "--udp", ",".join(map(str, udp)))  # fmt: skip
            listeners[dst] = proc
        for dst, proc in listeners.items():
            readers[dst] = LineReader(proc)
            if readers[dst].until(bool, 15.0) != ["ready"]:
                error = proc.stderr.read() if proc.stderr else ""
                raise RuntimeError(f"the receiver on {dst} did not start: {error}")
        ids = {f"{s}|{d}|{f}": (s, d, f) for s, d, f in cells}
        senders = {}
        for src in sorted({s for s, _, _ in cells}):
            proc = floor.python(
                src, "topologies.probe", "send", ips[src], "--timeout", str(timeout)
            )
            lines = [
                json.dumps({"id": fid, "dst": ips[d], "proto": f.proto, "port": f.port})
                for fid, (s, d, f) in ids.items()
                if s == src
            ]
            assert proc.stdin is not None
            proc.stdin.write("\n".join(lines) + "\n")
            proc.stdin.close()
            senders[src] = proc
        observed: dict[Cell, bool] = {}
        for src, proc in senders.items():
            assert proc.stdout is not None and proc.stderr is not None
            out = proc.stdout.read()
            if proc.wait(timeout=timeout * 20 + 30) != 0:
                raise RuntimeError(f"the sender on {src} failed: {proc.stderr.read().strip()}")
            for line in out.splitlines():
                result = json.loads(line)
                cell = ids[result["id"]]
                if cell[2].proto != "udp":
                    observed[cell] = bool(result["ok"])
        # Datagrams: what each receiver got, read until the receivers fall quiet.
        arrived = {
            json.loads(line)["token"] for reader in readers.values() for line in reader.drain(QUIET)
        }
        for fid, cell in ids.items():
            if cell[2].proto == "udp":
                observed[cell] = fid in arrived
        return observed
    finally:
        for proc in listeners.values():
            proc.terminate()
            proc.wait(timeout=10)


def run_matrix(
    floor: Floor,
    policy: Policy,
    flows: list[Flow] | None = None,
    timeout: float = 1.5,
    cells: Iterable[Cell] | None = None,
) -> Matrix:
    """The matrix of `flows` (default: the representative ones) for every host pair, or only
    for `cells`; a mismatch is probed once more on its own."""
    start = time.monotonic()
    if cells is not None:
        sem = PolicySemantics(policy)
        ips = {h.name: h.ip for h in floor.inventory.hosts}
        expected = {
            (s, d, f): sem.flow(ips[s], ips[d], f.proto, f.port).allowed for s, d, f in cells
        }
        flows = sorted({f for _, _, f in expected})
    else:
        flows = flows if flows is not None else representative_flows(policy)
        expected = expected_matrix(policy, floor, flows)
    matrix = Matrix([h.name for h in floor.inventory.hosts], flows, expected)
    matrix.observed = probe(floor, expected, timeout)
    retry = matrix.mismatches
    if retry:  # once more, on their own: loss under load is not a segmentation error
        matrix.observed.update(probe(floor, retry, timeout * 2))
    matrix.seconds = time.monotonic() - start
    return matrix
