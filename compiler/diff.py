"""The semantic difference between two policies: which flows become allowed or denied.

Not a text diff: both policies are judged flow by flow (compiler/semantics.py) over the
classes of addresses and ports that either one can tell apart, so renaming a service or
reordering rules gives an empty diff, and a changed port range shows as exactly the ports
that changed. Flows are TCP connections (with their replies), UDP datagrams, ICMP echoes
and packets of other protocols — what `p4seg check` and the matrix judge too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from compiler.addresses import format_ipv4
from compiler.inventory import Inventory
from compiler.model import Policy
from compiler.semantics import Partition, PolicySemantics

MAX_ADDRESS = (1 << 32) - 1
MAX_PORT = 65535
PROTOS = ("tcp", "udp", "icmp", "other")


@dataclass(frozen=True, slots=True)
class FlowChange:
    allowed: bool  # True: newly allowed; False: newly denied
    src: str  # the addresses, named by inventory hosts where they are hosts
    dst: str
    proto: str
    ports: str  # "" for protocols without ports

    def describe(self) -> str:
        sign = "+ allowed" if self.allowed else "- denied "
        ports = f" {self.ports}" if self.ports else ""
        return f"{sign}  {self.src} -> {self.dst} {self.proto}{ports}"

    def to_json(self) -> dict[str, object]:
        return {
            "change": "allowed" if self.allowed else "denied",
            "src": self.src,
            "dst": self.dst,
            "proto": self.proto,
            "ports": self.ports,
        }


def _ranges(values: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(values):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _port_text(intervals: list[tuple[int, int]]) -> str:
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in intervals)


def _atom_intervals(part: Partition) -> list[list[tuple[int, int]]]:
    out: list[list[tuple[int, int]]] = [[] for _ in range(part.count)]
    for i, start in enumerate(part.starts):
        end = part.starts[i + 1] - 1 if i + 1 < len(part.starts) else part.top
        out[part.element_atom[i]].append((start, end))
    return out


def _name(intervals: list[tuple[int, int]], hosts: dict[int, str]) -> str:
    names = []
    for lo, hi in intervals:
        inside = [hosts[ip] for ip in sorted(hosts) if lo <= ip <= hi]
        if inside and hi - lo + 1 == len(inside):
            names += inside
        elif lo == hi:
            names.append(format_ipv4(lo))
        else:
            names.append(f"{format_ipv4(lo)}-{format_ipv4(hi)}")
    return ", ".join(names)


def semantic_diff(old: Policy, new: Policy, inventory: Inventory) -> list[FlowChange]:
    """Every flow class whose verdict differs between `old` and `new`, grouped for reading."""
    hosts = {h.ip: h.name for h in inventory.hosts}
    addr_sets = [s for p in (old, new) for r in p.rules for s in (r.src.intervals, r.dst.intervals)]
    port_sets = [r.ports for p in (old, new) for r in p.rules]
    addresses = Partition(addr_sets, MAX_ADDRESS, hosts)
    ports = Partition(port_sets, MAX_PORT)
    a_sem, b_sem = PolicySemantics(old), PolicySemantics(new)
    addr_iv = _atom_intervals(addresses)
    port_iv = _atom_intervals(ports)
    # (src atom, dst atom, proto, allowed-now) -> port intervals
    changed: dict[tuple[int, int, str, bool], list[tuple[int, int]]] = {}
    for s in range(addresses.count):
        src = addresses.representative[s]
        for d in range(addresses.count):
            dst = addresses.representative[d]
            for proto in PROTOS:
                port_atoms = range(ports.count) if proto in ("tcp", "udp") else (None,)
                for p in port_atoms:
                    port = ports.representative[p] if p is not None else 0
                    before = a_sem.flow(src, dst, proto, port).allowed
                    after = b_sem.flow(src, dst, proto, port).allowed
                    if before != after:
                        ivs = port_iv[p] if p is not None else [(0, 0)]
                        changed.setdefault((s, d, proto, after), []).extend(ivs)
    # Rows that differ only in the source (or destination) atom are merged for reading.
    Ports = tuple[tuple[int, int], ...]
    by_rest: dict[tuple[int, str, bool, Ports], list[int]] = {}
    for (src_atom, dst_atom, proto, after), ivs in changed.items():
        by_rest.setdefault((dst_atom, proto, after, tuple(_ranges(ivs))), []).append(src_atom)
    merged: dict[tuple[tuple[int, ...], str, bool, Ports], list[int]] = {}
    for (dst_atom, proto, after, port_ranges), sources in by_rest.items():
        key = (tuple(sorted(sources)), proto, after, port_ranges)
        merged.setdefault(key, []).append(dst_atom)
    out = []
    for (src_atoms, proto, after, port_ranges), dst_atoms in merged.items():
        src_text = _name(_ranges([iv for a in src_atoms for iv in addr_iv[a]]), hosts)
        dst_text = _name(_ranges([iv for a in dst_atoms for iv in addr_iv[a]]), hosts)
        ports_text = _port_text(list(port_ranges)) if proto in ("tcp", "udp") else ""
        out.append(FlowChange(after, src_text, dst_text, proto, ports_text))
    return sorted(out, key=lambda c: (not c.allowed, c.src, c.dst, c.proto, c.ports))
