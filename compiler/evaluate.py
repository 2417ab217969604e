"""The table evaluator: what a switch holding some entries does with one packet.

It executes the pipeline of p4src/spec.py on target-neutral entries — the same walk the
P4 program makes — and is shared by the tests (fixture pairs), the verifier and the
reference switch. `Fabric.walk` follows a packet across switches along the inventory's links.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from compiler.entries import DefaultAction, SwitchTables, TableEntry
from compiler.inventory import Inventory
from p4src.spec import PIPELINE, REASON_DENY_LOG, REASON_SPOOF, UNKNOWN_GROUP

_WIDTH = {k.name: k.bits for t in PIPELINE.tables for k in t.keys}
PROTO_TCP, PROTO_UDP, PROTO_ICMP = 6, 17, 1
MAX_HOPS = 16


@dataclass(frozen=True, slots=True)
class PacketFields:
    """The header fields the pipeline reads (ICMP: type/code, ports as the parser sets them)."""

    src: int
    dst: int
    protocol: int
    sport: int = 0
    dport: int = 0
    tcp_flags: int = 0
    icmp_type: int = 8
    icmp_code: int = 0

    def l4(self) -> tuple[int, int]:
        if self.protocol in (PROTO_TCP, PROTO_UDP):
            return self.sport, self.dport
        if self.protocol == PROTO_ICMP:
            return 0, (self.icmp_type << 8) | self.icmp_code
        return 0, 0


@dataclass(frozen=True, slots=True)
class Hit:
    table: str
    entry: TableEntry | None  # None: the table's default action
    action: str
    params: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class SwitchResult:
    switch: str
    hits: tuple[Hit, ...]
    egress_port: int | None  # None: dropped
    logged: bool  # a copy went to the controller (a logged deny, or a spoofed source)
    rule_id: int | None  # the policy entry's rule_id, when the policy table was reached
    reason: int = 0  # packet_in.reason of the copy when logged


def _matches(entry: TableEntry, values: dict[str, int]) -> bool:
    for m in entry.matches:
        x = values[m.field]
        if m.kind == "lpm":
            if not m.covers_lpm(x, _WIDTH[m.field]):
                return False
        elif not m.covers(x):
            return False
    return True


def _rank(entry: TableEntry) -> tuple[int, int]:
    plen = max((m.arg for m in entry.matches if m.kind == "lpm"), default=0)
    return (entry.priority, plen)


def lookup(entries: list[TableEntry], values: dict[str, int]) -> TableEntry | None:
    """The winning entry: highest priority, then longest prefix (routing has no priority)."""
    best: TableEntry | None = None
    for e in entries:
        if _matches(e, values) and (best is None or _rank(e) > _rank(best)):
            best = e
    return best


@dataclass(frozen=True, slots=True)
class IndexedSwitch:
    """A switch's entries grouped by table, built once and reused for every packet."""

    tables: SwitchTables
    by_table: dict[str, list[TableEntry]]
    defaults: dict[str, DefaultAction]

    @classmethod
    def of(cls, tables: SwitchTables) -> IndexedSwitch:
        by_table: dict[str, list[TableEntry]] = {}
        for e in tables.entries:
            by_table.setdefault(e.table, []).append(e)
        return cls(tables, by_table, {d.table: d for d in tables.defaults})


def evaluate(
    switch: SwitchTables | IndexedSwitch, ingress_port: int, pkt: PacketFields
) -> SwitchResult:
    """One switch's verdict on one packet, following the program's apply block."""
    idx = switch if isinstance(switch, IndexedSwitch) else IndexedSwitch.of(switch)
    tables = idx.tables
    sport, dport = pkt.l4()
    values = {
        "ingress_port": ingress_port,
        "src_addr": pkt.src,
        "dst_addr": pkt.dst,
        "protocol": pkt.protocol,
        "l4_src_port": sport,
        "l4_dst_port": dport,
        "tcp_flags": pkt.tcp_flags if pkt.protocol == PROTO_TCP else 0,
    }
    hits: list[Hit] = []
    epoch = idx.defaults.get("epoch")
    values["epoch"] = dict(epoch.params)["value"] if epoch else 0
    hits.append(Hit("epoch", None, "set_epoch", (("value", values["epoch"]),)))

    def apply(table: str, default_action: str, default_params: tuple[tuple[str, int], ...]) -> Hit:
        entry = lookup(idx.by_table.get(table, []), values)
        hit = Hit(
            table,
            entry,
            entry.action if entry else default_action,
            entry.params if entry else default_params,
        )
        hits.append(hit)
        return hit

    src = apply("src_identity", "drop_spoofed", ())
    if src.action != "set_src_group":
        spoofed = src.action == "drop_spoofed"
        return SwitchResult(
            tables.switch, tuple(hits), None, spoofed, None, REASON_SPOOF if spoofed else 0
        )
    values["src_group"] = dict(src.params)["group"]
    dst = apply("dst_identity", "set_dst_group", (("group", UNKNOWN_GROUP),))
    values["dst_group"] = dict(dst.params)["group"]
    verdict = apply("policy", "deny", (("rule_id", 0),))
    rule_id = dict(verdict.params)["rule_id"]
    if verdict.action not in ("permit", "permit_metered"):  # meters are all green here
        logged = verdict.action == "deny_and_log"
        return SwitchResult(
            tables.switch, tuple(hits), None, logged, rule_id, REASON_DENY_LOG if logged else 0
        )
    route = apply("routing", "drop", ())
    port = dict(route.params).get("port") if route.action == "forward" else None
    return SwitchResult(tables.switch, tuple(hits), port, False, rule_id)


@dataclass(frozen=True, slots=True)
class PathResult:
    """A packet's fate across the fabric: delivered to a host port, or where it died."""

    hops: tuple[SwitchResult, ...]
    delivered_to: str | None  # host name
    loop: bool = False

    @property
    def delivered(self) -> bool:
        return self.delivered_to is not None

    @property
    def deciding(self) -> SwitchResult:
        """The first switch that judged the packet by policy (a ToR)."""
        return next((h for h in self.hops if h.rule_id is not None), self.hops[-1])


class Fabric:
    """The switches of an inventory with their entries, indexed once, to walk packets through."""

    def __init__(self, tables: Mapping[str, SwitchTables], inventory: Inventory) -> None:
        self.inventory = inventory
        self.switches = {name: IndexedSwitch.of(t) for name, t in tables.items()}
        self.peer: dict[tuple[str, int], tuple[str, int]] = {}
        for link in inventory.links:
            self.peer[(link.a, link.a_port)] = (link.b, link.b_port)
            self.peer[(link.b, link.b_port)] = (link.a, link.a_port)
        self.host_at = {(h.switch, h.port): h.name for h in inventory.hosts}

    def walk(self, src_host: str, pkt: PacketFields) -> PathResult:
        """Send `pkt` from `src_host` and follow it switch by switch."""
        host = self.inventory.hosts_by_name[src_host]
        switch, port = host.switch, host.port
        hops: list[SwitchResult] = []
        for _ in range(MAX_HOPS):
            result = evaluate(self.switches[switch], port, pkt)
            hops.append(result)
            if result.egress_port is None:
                return PathResult(tuple(hops), None)
            out = (switch, result.egress_port)
            if out in self.host_at:
                return PathResult(tuple(hops), self.host_at[out])
            if out not in self.peer:
                return PathResult(tuple(hops), None)
            switch, port = self.peer[out]
        return PathResult(tuple(hops), None, loop=True)
