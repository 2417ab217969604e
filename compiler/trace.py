"""`trace` and `test`: one flow through the switches' tables, and `expect` lines run both on
the policy semantics and on the tables.

A flow is what the matrix sends: a TCP connection (the SYN, then the SYN-ACK back), a UDP
datagram, an ICMP echo (then the reply), or one packet of another protocol. Each packet is
walked through the fabric (compiler/evaluate.py) hop by hop; every table hit is kept, with
the policy rule and line behind it, so a trace says exactly which entry decided and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from compiler.entries import SwitchTables
from compiler.evaluate import Fabric, PacketFields, PathResult
from compiler.inventory import Host, Inventory
from compiler.model import ICMP_NAMES, ExpectCase, Policy, protocol_number
from compiler.protocols import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    OTHER_PROTOCOL,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_SYN,
    TCP_SYN_ACK,
)
from compiler.semantics import EPHEMERAL_PORT, Decision, PolicySemantics, protocol_of


@dataclass(frozen=True, slots=True)
class Leg:
    """One packet of a flow: what the tables did and what the policy says."""

    what: str  # "request", "reply"
    packet: PacketFields
    sender: str
    path: PathResult
    policy: Decision | None  # None when judged without a policy (--from-switches alone)


@dataclass(frozen=True, slots=True)
class Trace:
    src: Host
    dst: Host
    proto: str
    port: int  # icmp: the ICMP type
    legs: tuple[Leg, ...]
    icmp_code: int = 0

    @property
    def passed(self) -> bool:
        return all(leg.path.delivered for leg in self.legs)

    @property
    def policy_allows(self) -> bool | None:
        if any(leg.policy is None for leg in self.legs):
            return None
        return all(leg.policy.allowed for leg in self.legs if leg.policy is not None)


def packets(
    proto: str, src: int, dst: int, port: int, icmp_code: int = 0, other: int = OTHER_PROTOCOL
) -> list[tuple[str, PacketFields, bool]]:
    """The packets of a flow: (what, packet, goes from src to dst). For icmp, `port` is the
    ICMP type (and `icmp_code` its code): an echo request (8) is answered by an echo reply;
    other types are one packet. `ip` sends protocol `other`, one no rule names."""
    if proto == "tcp":
        return [
            ("request", PacketFields(src, dst, PROTO_TCP, EPHEMERAL_PORT, port, TCP_SYN), True),
            ("reply", PacketFields(dst, src, PROTO_TCP, port, EPHEMERAL_PORT, TCP_SYN_ACK), False),
        ]
    if proto == "udp":
        return [("request", PacketFields(src, dst, PROTO_UDP, EPHEMERAL_PORT, port), True)]
    if proto == "icmp":
        request = PacketFields(src, dst, PROTO_ICMP, icmp_type=port, icmp_code=icmp_code)
        if port != ICMP_ECHO_REQUEST:
            return [("request", request, True)]
        return [
            ("request", request, True),
            ("reply", PacketFields(dst, src, PROTO_ICMP, icmp_type=ICMP_ECHO_REPLY), False),
        ]
    number = protocol_number(proto)
    return [("request", PacketFields(src, dst, other if number is None else number), True)]


def trace_flow(
    fabric: Fabric,
    sem: PolicySemantics | None,
    src: Host,
    dst: Host,
    proto: str,
    port: int,
    icmp_code: int = 0,
    other: int | None = None,
) -> Trace:
    """Walk a flow's packets; the reply only if the request got through. An `ip` (or
    `other`) flow sends protocol `other`, by default one `sem`'s policy does not name."""
    legs = []
    if other is None:
        other = protocol_of("other", sem.proto_classes) if sem is not None else OTHER_PROTOCOL
    for what, pkt, forward in packets(proto, src.ip, dst.ip, port, icmp_code, other):
        sender = src if forward else dst
        path = fabric.walk(sender.name, pkt)
        decision = None
        if sem is not None:
            decision = sem.decide(
                pkt.src, pkt.dst, sem.proto_class(pkt.protocol), pkt.sport, pkt.dport,
                ack=bool(pkt.tcp_flags & TCP_ACK), icmp_type=pkt.icmp_type, icmp_code=pkt.icmp_code,
            )  # fmt: skip
        legs.append(Leg(what, pkt, sender.name, path, decision))
        if not path.delivered:
            break
    return Trace(src, dst, proto, port, tuple(legs), icmp_code)


def _fabric(inventory: Inventory, switches: Mapping[str, SwitchTables]) -> Fabric:
    return Fabric(switches, inventory)


@dataclass(frozen=True, slots=True)
class ExpectResult:
    expect: ExpectCase
    semantics_ok: bool
    semantics_note: str
    pairs: int  # host pairs tried on the tables
    tables_ok: bool
    tables_note: str  # the first host pair whose traffic contradicts what is expected
    effective_note: str = ""  # where the effective policy differs from the line, and why

    @property
    def ok(self) -> bool:
        return self.semantics_ok and self.tables_ok


def run_expects(
    policy: Policy,
    inventory: Inventory,
    switches: Mapping[str, SwitchTables],
    effective: Policy | None = None,
) -> list[ExpectResult]:
    """Every `expect` line, on the semantics (over all addresses) and on the tables (over
    every pair of inventory hosts the line covers).

    With `effective` (the policy the switches hold at a moment: grants, quarantines,
    time-bound rules), the tables must do what it does; a pair where it differs from the
    line is reported in `effective_note`, not as a failure of the tables."""
    sem = PolicySemantics(policy, [h.ip for h in inventory.hosts])
    now = PolicySemantics(effective, [h.ip for h in inventory.hosts]) if effective else None
    fabric = _fabric(inventory, switches)
    out = []
    other = protocol_of("other", sem.proto_classes)
    for e in policy.expects:
        failure = sem.expectation_failure(e)
        sem_note = "" if failure is None else _failure_text(failure)
        pairs = 0
        tables_note = effective_note = ""
        # The flows the line stands for (`ip`: one per class the rules tell apart), concrete.
        flows = [
            (proto, sem.ports.representative[p], ICMP_ECHO_REQUEST << 8 if v is None else v)
            for proto, p, v in sem.expectation_flows(e)
        ]
        for s in inventory.hosts:
            if s.ip not in e.src:
                continue
            for d in inventory.hosts:
                if d.ip not in e.dst or d.name == s.name:
                    continue
                pairs += 1
                for proto, port, icmp_value in flows:
                    wanted = e.allowed
                    if now is not None:
                        flow = now.flow(s.ip, d.ip, proto, port, icmp_value)
                        wanted = flow.allowed
                        if wanted != e.allowed and not effective_note:
                            effective_note = (
                                f"{s.name} -> {d.name} is {'allowed' if wanted else 'denied'} "
                                f"now: {flow.deciding.describe()}"
                            )
                    if proto == "icmp":
                        port = icmp_value >> 8
                    t = trace_flow(fabric, None, s, d, proto, port, icmp_value & 0xFF, other)
                    if t.passed != wanted:
                        got = "got through" if t.passed else "was stopped"
                        tables_note = f"{s.name} -> {d.name} {_flow_text(t)} {got}"
                        break
                if tables_note:
                    break
            if tables_note:
                break
        out.append(
            ExpectResult(e, failure is None, sem_note, pairs, not tables_note, tables_note,
                         effective_note)
        )  # fmt: skip
    return out


def icmp_packet_text(icmp_type: int, code: int) -> str:
    """One ICMP packet as `type 3 code 4 (frag-needed)`: numbers, and the name a rule would
    write for it (of the type and code, else of the type), if any."""
    names = {v: k for k, v in ICMP_NAMES.items()}
    name = names.get((icmp_type, code)) or names.get((icmp_type, None))
    return f"type {icmp_type} code {code}" + (f" ({name})" if name else "")


def _flow_text(t: Trace) -> str:
    """A traced flow as `p4seg test` names it: `tcp 443`, `icmp type 3 code 4`, `proto 132`."""
    if t.proto in ("tcp", "udp"):
        return f"{t.proto} {t.port}"
    if t.proto == "icmp":
        return f"icmp {icmp_packet_text(t.port, t.icmp_code)}"
    if t.proto in ("ip", "other"):
        return f"ip (protocol {t.legs[0].packet.protocol})"
    return t.proto


def _failure_text(failure: tuple[int, int, str, int | None, object]) -> str:
    from compiler.addresses import format_ipv4

    src, dst, proto, port, flow = failure
    where = f" {port}" if port is not None else ""
    deciding = getattr(flow, "deciding", None)
    why = deciding.describe() if deciding is not None else ""
    return f"{format_ipv4(src)} -> {format_ipv4(dst)} {proto}{where}: {why}"
