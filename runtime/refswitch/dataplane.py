"""The reference switch's packet pipeline: frames in, frames out, as the v1model program does.

`Dataplane.process(port, frame)` runs the parser, then epoch -> src_identity ->
dst_identity -> policy (direct counter, direct meter, clone to CPU) -> routing with the
shared table evaluator (compiler/evaluate.py), and returns the frames to send:
`(egress_port, frame)`. A frame for the CPU port starts with the packet_in header, exactly
as BMv2 emits it, and the P4Runtime server turns it into a PacketIn. A frame arriving on
the CPU port starts with the packet_out header (a PacketOut) and leaves by the port it names.

Fail closed: before a pipeline is set nothing is forwarded, and so is everything the
program drops (non-IPv4, IPv4 options, non-first fragments, unbound sources, misses).

Decisions are cached per flow (the header fields the tables read) until the next write,
so a steady flow costs a dictionary lookup; counters and meters still run per packet. A new
flow is decided by the evaluator's table indexes (compiler/evaluate.py `TableIndex`), which
the snapshot after a write builds on its first miss, reusing what the last one prepared.

Meters: a `permit_metered` packet meets its entry's direct meter (a two-rate three-colour
marker in packets, configured by the entry's P4Runtime `meter_config`); RED is dropped,
GREEN and YELLOW pass, exactly as the programs do. An entry without a config is unmetered
(all green), as on BMv2. A RED packet is counted in `policy_red_drops` at its rule id, as
the programs count it; the meter also counts each colour for `meter_counter_data` reads.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from compiler.evaluate import PacketFields, evaluate
from compiler.protocols import PROTO_ICMP, PROTO_TCP, PROTO_UDP
from p4src.spec import CPU_CLONE_SESSION, PIPELINE, RED_DROPS
from runtime.refswitch.device import RED, Device, Snapshot, Stored

_IPV4 = b"\x08\x00"
_PACKET_IN = struct.Struct(
    "!" + "".join({8: "B", 16: "H"}[f.bits] for f in PIPELINE.packet_in.fields)
)
_PACKET_OUT = struct.Struct("!H")
assert [f.bits for f in PIPELINE.packet_out.fields] == [16]
_ADDRS = struct.Struct("!II")
_PORTS = struct.Struct("!HH")
FLOW_CACHE_SIZE = 1 << 16

FlowKey = tuple[int, int, int, int, int, int, int]  # port, src, dst, proto, sport, dport, flags


@dataclass(frozen=True, slots=True)
class Decision:
    """What the pipeline does with every packet of one flow."""

    egress_port: int | None  # None: dropped
    entry: Stored | None  # the policy entry hit: its counter (and meter) run per packet
    metered: bool
    rule_id: int  # the policy entry's rule (for policy_red_drops)
    clone_header: bytes | None  # the packet_in header for a logged deny's CPU copy


def parse(frame: bytes) -> tuple[int, int, int, int, int, int] | None:
    """(src, dst, protocol, l4 source, l4 destination, tcp flags) as the program's parser
    sets them; None for what the program drops before any table (not plain IPv4)."""
    if len(frame) < 34 or frame[12:14] != _IPV4 or frame[14] & 0x0F != 5:
        return None
    if frame[20] & 0x1F or frame[21]:  # fragment offset
        return None
    proto = frame[23]
    src, dst = _ADDRS.unpack_from(frame, 26)
    sport = dport = flags = 0
    if proto == PROTO_TCP and len(frame) >= 54:
        sport, dport = _PORTS.unpack_from(frame, 34)
        flags = frame[47]
    elif proto == PROTO_UDP and len(frame) >= 42:
        sport, dport = _PORTS.unpack_from(frame, 34)
    elif proto == PROTO_ICMP and len(frame) >= 38:
        dport = frame[34] << 8 | frame[35]
    return src, dst, proto, sport, dport, flags


class Dataplane:
    def __init__(self, device: Device, clock: Callable[[], float] = time.monotonic) -> None:
        self.device = device
        self.clock = clock  # the meters' time base (tests pace packets on a simulated clock)
        self._cache: dict[FlowKey, Decision] = {}
        self._cache_version = -1
        self._red_drops: list[int] = []  # policy_red_drops, by rule id (the device's cells)
        self.dropped = 0

    def process(self, port: int, frame: bytes) -> list[tuple[int, bytes]]:
        """The frames the switch sends when `frame` arrives on `port`."""
        snap = self.device.snapshot()
        if snap is None:
            self.dropped += 1
            return []
        if port == self.device.cpu_port:
            if len(frame) < _PACKET_OUT.size:
                return []
            (egress,) = _PACKET_OUT.unpack_from(frame)
            return [(egress, frame[_PACKET_OUT.size :])]
        fields = parse(frame)
        if fields is None:
            self.dropped += 1
            return []
        if snap.version != self._cache_version:
            self._cache.clear()
            self._cache_version = snap.version
            self._red_drops = self.device.counters[RED_DROPS.id]
        key = (port, *fields)
        decision = self._cache.get(key)
        if decision is None:
            decision = self._decide(snap, key)
            if len(self._cache) >= FLOW_CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = decision
        out: list[tuple[int, bytes]] = []
        entry = decision.entry
        if entry is not None:
            entry.packets += 1
            entry.bytes += len(frame)
        if decision.clone_header is not None:
            out.extend(
                (p, decision.clone_header + frame)
                for p in snap.clone_ports.get(CPU_CLONE_SESSION, ())
            )
        egress = decision.egress_port
        if egress is None or egress == self.device.cpu_port:
            self.dropped += 1
            return out
        meter = entry.meter if decision.metered and entry is not None else None
        if meter is not None and meter.color(self.clock()) == RED:  # RED: dropped, as in P4
            self.dropped += 1
            self._red_drops[decision.rule_id] += 1
            return out
        out.append((egress, frame))
        return out

    def _decide(self, snap: Snapshot, key: FlowKey) -> Decision:
        port, src, dst, proto, sport, dport, flags = key
        icmp = proto == PROTO_ICMP
        pkt = PacketFields(
            src,
            dst,
            proto,
            sport,
            0 if icmp else dport,
            flags,
            dport >> 8 if icmp else 8,
            dport & 0xFF if icmp else 0,
        )
        result = evaluate(snap.switch, port, pkt)
        policy = next((h for h in result.hits if h.table == "policy"), None)
        stored = snap.stored.get(id(policy.entry)) if policy and policy.entry else None
        clone = None
        if result.logged:
            clone = _PACKET_IN.pack(port, result.rule_id or 0, result.reason)
        metered = policy is not None and policy.action == "permit_metered"
        rule_id = result.rule_id or 0  # the policy entry's rule id (evaluate reads it)
        return Decision(result.egress_port, stored, metered, rule_id, clone)


def packet_in_fields(frame: bytes) -> tuple[tuple[int, ...], bytes]:
    """A CPU-port frame split into the packet_in header's field values and the payload."""
    return _PACKET_IN.unpack_from(frame), frame[_PACKET_IN.size :]


def packet_out_frame(egress_port: int, payload: bytes) -> bytes:
    """A PacketOut as the program's parser sees it on the CPU port."""
    return _PACKET_OUT.pack(egress_port) + payload
