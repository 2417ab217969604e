"""Evidence from the switches: alerts from logged denies, and per-rule hit counts.

Alerts: every `deny ... log` (and `default deny log`) clones the denied packet to the CPU
port; it reaches the primary controller as a PacketIn with the ingress port and the rule
id. Each becomes one JSON line — time, switch, port, 5-tuple, rule id and the policy line
that decided — rate-limited per source address so that a port scan cannot flood the log:
past the burst, a source's alerts are counted, and the next one let through says how many
were suppressed.

Hits: the direct counter of every `policy` entry, summed per rule over every switch. An
allow rule with zero hits is an unused permission — what an access review should remove.
For a `rate` allow, the packets its meters marked RED (dropped over the rate) come from
the indexed counter `policy_red_drops`, one cell per rule id, which every target counts;
a switch whose cell could not be read leaves the rule's red count unknown (None), never 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from finsy import P4Client, Switch
from finsy.proto import p4r

from compiler.addresses import format_ipv4
from compiler.model import Action, Policy
from p4src.spec import REASON_DENY_LOG, REASON_SPOOF, RED_DROPS, Pipeline
from runtime.controller import (
    ControllerError,
    ControllerOptions,
    PipelineFiles,
    SwitchTarget,
    session_options,
)

_PROTO = {1: "icmp", 6: "tcp", 17: "udp"}


@dataclass(frozen=True, slots=True)
class Alert:
    time: str
    switch: str
    ingress_port: int
    src: str
    dst: str
    proto: str
    sport: int
    dport: int
    tcp_flags: int
    rule_id: int
    rule: str  # "line N: <rule>" from the build's report
    kind: str = "deny"  # deny (a logged deny) | spoof (a source its port does not own)
    suppressed: int = 0  # alerts from this source dropped by the rate limit since the last

    def to_json(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__slots__}


def alert_of(
    switch: str, payload: bytes, metadata: dict[str, int], rules: dict[int, str], now: float
) -> Alert:
    """An alert from one PacketIn (payload: the denied frame)."""
    src = dst = "?"
    proto, sport, dport, flags = "?", 0, 0, 0
    if len(payload) >= 34 and payload[12:14] == b"\x08\x00":
        ihl = (payload[14] & 0x0F) * 4
        number = payload[23]
        proto = _PROTO.get(number, str(number))
        src, dst = (
            format_ipv4(struct.unpack_from("!I", payload, 26)[0]),
            format_ipv4(struct.unpack_from("!I", payload, 30)[0]),
        )
        l4 = 14 + ihl
        if number in (6, 17) and len(payload) >= l4 + 4:
            sport, dport = struct.unpack_from("!HH", payload, l4)
            if number == 6 and len(payload) >= l4 + 14:
                flags = payload[l4 + 13]
        elif number == 1 and len(payload) >= l4 + 2:
            dport = payload[l4] << 8 | payload[l4 + 1]  # type << 8 | code, as the tables see it
    rule_id = int(metadata.get("rule_id", 0))
    spoof = int(metadata.get("reason", REASON_DENY_LOG)) == REASON_SPOOF
    rule = (
        "spoofed source: the address is not bound to this port (src_identity)"
        if spoof
        else rules.get(rule_id, "")
    )
    return Alert(
        dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="milliseconds"),
        switch,
        int(metadata.get("ingress_port", 0)),
        src,
        dst,
        proto,
        sport,
        dport,
        flags,
        rule_id,
        rule,
        "spoof" if spoof else "deny",
    )


@dataclass(slots=True)
class RateLimiter:
    """A token bucket per key: `rate` alerts per second, bursts of `burst`."""

    rate: float = 5.0
    burst: int = 20
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # tokens, last
    _suppressed: dict[str, int] = field(default_factory=dict)

    def admit(self, key: str, now: float) -> int | None:
        """None: suppress this one; otherwise how many were suppressed before it."""
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._buckets[key] = (tokens - 1, now)
        return self._suppressed.pop(key, 0)


async def follow(
    switches: Sequence[SwitchTarget],
    files: PipelineFiles,
    options: ControllerOptions,
    rules: dict[int, str],
    sink: Callable[[Alert], None],
    limiter: RateLimiter | None = None,
    clock: Callable[[], float] | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Receive PacketIns from every switch (as primary: only the primary gets them) and
    hand each admitted alert to `sink`, until cancelled. `on_ready(switch)` is called once
    a switch's packets are being received."""
    limiter = limiter or RateLimiter()
    now = clock or (lambda: dt.datetime.now(dt.UTC).timestamp())

    async def one(target: SwitchTarget) -> None:
        opts = session_options(target, files, options, set_pipeline=False, fail_fast=False)
        async with Switch(target.name, target.address, opts) as sw:
            if not sw.is_primary:
                raise ControllerError(
                    f"{target.name}: not the primary controller (election id "
                    f"{options.election_id}, primary {sw.primary_id}): PacketIns go to the primary"
                )
            packets = aiter(sw.read_packets())
            pending = asyncio.ensure_future(anext(packets))
            await asyncio.sleep(0)  # one turn: the generator has subscribed to PacketIns
            if on_ready is not None:
                on_ready(target.name)
            while True:
                packet = await pending
                pending = asyncio.ensure_future(anext(packets))
                alert = alert_of(target.name, packet.payload, packet.metadata, rules, now())
                suppressed = limiter.admit(alert.src, now())
                if suppressed is not None:
                    sink(dataclasses.replace(alert, suppressed=suppressed))

    await asyncio.gather(*(one(t) for t in switches))


# -- hits ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleHits:
    rule_id: int
    rule: str
    action: str
    packets: int
    bytes: int
    switches: tuple[str, ...]  # where it was hit
    rate_pps: int | None = None  # a metered allow's rate
    red: int | None = None  # metered: packets dropped over the rate (None: not reported)


async def read_counters(
    target: SwitchTarget, pipeline: Pipeline, options: ControllerOptions
) -> list[p4r.TableEntry]:
    """Every policy entry of a switch with its direct counter."""
    entity = p4r.Entity()
    entity.table_entry.table_id = pipeline.table("policy").id
    entity.table_entry.counter_data.SetInParent()
    out: list[p4r.TableEntry] = []
    async with P4Client(target.address, options.tls, wait_for_ready=False) as client:
        request = p4r.ReadRequest(device_id=target.device_id, entities=[entity])
        async for reply in client.request_iter(request):
            out.extend(e.table_entry for e in reply.entities)
    return out


async def read_red_drops(
    target: SwitchTarget, pipeline: Pipeline, options: ControllerOptions, rule_ids: Iterable[int]
) -> dict[int, int]:
    """Packets the meters of each rule dropped over its rate on one switch: the
    `policy_red_drops` counter's cell of each rule id (one CounterEntry per rule)."""
    counter = pipeline.counter(RED_DROPS.name)
    entities = []
    for rule_id in sorted(set(rule_ids)):
        e = p4r.Entity()
        e.counter_entry.counter_id = counter.id
        e.counter_entry.index.index = rule_id
        entities.append(e)
    out: dict[int, int] = {}
    if not entities:
        return out
    async with P4Client(target.address, options.tls, wait_for_ready=False) as client:
        request = p4r.ReadRequest(device_id=target.device_id, entities=entities)
        async for reply in client.request_iter(request):
            for e in reply.entities:
                out[e.counter_entry.index.index] = e.counter_entry.data.packet_count
    return out


def hits_by_rule(
    policy: Policy,
    pipeline: Pipeline,
    counters: dict[str, list[p4r.TableEntry]],
    red_drops: Mapping[str, Mapping[int, int]] | None = None,
) -> list[RuleHits]:
    """Counters summed per rule over every switch, for every rule of the policy (zeros
    included: those are the point). `red_drops`: per switch, the `policy_red_drops` cells
    read (read_red_drops); a metered rule's red count is known only when every switch of
    `counters` has its cell, otherwise it is None."""
    rule_param = {a.id: p.id for a in pipeline.actions for p in a.params if p.name == "rule_id"}
    packets: dict[int, int] = {}
    octets: dict[int, int] = {}
    where: dict[int, set[str]] = {}
    for switch, entries in counters.items():
        for e in entries:
            pid = rule_param.get(e.action.action.action_id)
            value = next((p.value for p in e.action.action.params if p.param_id == pid), None)
            if value is None:
                continue
            rule_id = int.from_bytes(value, "big")
            packets[rule_id] = packets.get(rule_id, 0) + e.counter_data.packet_count
            octets[rule_id] = octets.get(rule_id, 0) + e.counter_data.byte_count
            if e.counter_data.packet_count:
                where.setdefault(rule_id, set()).add(switch)

    def red(rule_id: int) -> int | None:
        cells = [(red_drops or {}).get(switch, {}).get(rule_id) for switch in counters]
        return None if None in cells else sum(c for c in cells if c is not None)

    out = [
        RuleHits(
            r.id,
            f"line {r.span.line}: {r.describe()}",
            r.action.value,
            packets.get(r.id, 0),
            octets.get(r.id, 0),
            tuple(sorted(where.get(r.id, ()))),
            r.rate_pps,
            None if r.rate_pps is None else red(r.id),
        )
        for r in policy.rules
    ]
    out.append(
        RuleHits(0, "default deny", Action.DENY.value, packets.get(0, 0), octets.get(0, 0),
                 tuple(sorted(where.get(0, ()))))
    )  # fmt: skip
    return out
