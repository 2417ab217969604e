"""Table entries, target neutral: what `lower` produces, `fit` adapts and `emit` writes.

A match names its field and kind; a field left out of an entry is a wildcard. Entries
are plain values so that plans, diffs and golden files compare them exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from compiler.diagnostics import Span


@dataclass(frozen=True, slots=True)
class FieldMatch:
    """exact: value; lpm: value/prefix_len (arg); ternary: value&&&mask (arg); range: value..arg."""

    field: str
    kind: str  # exact | lpm | ternary | range
    value: int
    arg: int = 0
    # The hash, once computed: a floor's hundreds of thousands of entries share a few
    # thousand matches (compiler/rule_entries.py `field_match`), and each entry's first
    # hash would otherwise hash each of its matches afresh. (`dataclasses.field`: `field`
    # here is the match's own.)
    _hash: int = dataclasses.field(default=0, init=False, repr=False, compare=False)

    def __hash__(self) -> int:
        h = self._hash
        if h == 0:
            h = hash((self.field, self.kind, self.value, self.arg)) or 1
            object.__setattr__(self, "_hash", h)
        return h

    def covers(self, x: int) -> bool:
        if self.kind == "exact":
            return x == self.value
        if self.kind == "ternary":
            return x & self.arg == self.value
        if self.kind == "range":
            return self.value <= x <= self.arg
        raise ValueError("lpm needs the field width: use covers_lpm")

    def covers_lpm(self, x: int, bits: int) -> bool:
        shift = bits - self.arg
        return (x >> shift) == (self.value >> shift) if self.arg else True

    def to_json(self) -> object:
        if self.kind == "exact":
            return {"exact": self.value}
        if self.kind == "lpm":
            return {"lpm": [self.value, self.arg]}
        if self.kind == "ternary":
            return {"ternary": [self.value, self.arg]}
        return {"range": [self.value, self.arg]}


@dataclass(frozen=True, slots=True)
class MeterConfig:
    """A direct meter's two-rate three-colour configuration (P4Runtime MeterConfig), in the
    meter's unit (packets for `policy_meter`): rates per second, bursts in packets."""

    cir: int
    cburst: int
    pir: int
    pburst: int

    def to_json(self) -> dict[str, int]:
        return {"cir": self.cir, "cburst": self.cburst, "pir": self.pir, "pburst": self.pburst}

    def describe(self) -> str:
        """`100pps burst 10` (PIR = CIR, PBS = CBS, as compiled) or every figure."""
        if (self.pir, self.pburst) == (self.cir, self.cburst):
            return f"{self.cir}pps burst {self.cburst}"
        return f"cir {self.cir}pps cbs {self.cburst} pir {self.pir}pps pbs {self.pburst}"


def meter_for_rate(rate_pps: int) -> MeterConfig:
    """The meter of a `rate R pps` allow: CIR = PIR = R, CBS = PBS = max(1, ceil(R/10)).

    Bursts hold 100 ms of traffic at the rate (at least one packet), so a paced flow at the
    rate is never cut while a flood is held to R pps. PIR = CIR and PBS = CBS: a packet
    is green or red, never yellow, so the programs (which drop RED only) enforce exactly R.
    """
    burst = max(1, -(-rate_pps // 10))
    return MeterConfig(rate_pps, burst, rate_pps, burst)


@dataclass(frozen=True, slots=True)
class TableEntry:
    table: str
    matches: tuple[FieldMatch, ...]
    action: str
    params: tuple[tuple[str, int], ...]
    priority: int = 0  # P4Runtime: higher wins; 0 for tables without ternary/range keys
    rule_id: int | None = None  # the policy rule this entry implements, for traces and alerts
    role: str = ""  # why it exists: forward, reply, reverse-deny, default-log, host, uplink, ...
    meter: MeterConfig | None = None  # the direct meter's config (metered allows only)
    # The hash, once computed: entries are the keys of every by-value memo (their JSON
    # lines, encodings, digests) and of the sets a proof compares, and hashing the nested
    # matches again each time cost more than the lookups.
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __hash__(self) -> int:
        h = self._hash
        if h == 0:
            h = hash((self.table, self.matches, self.action, self.params, self.priority,
                      self.rule_id, self.role, self.meter)) or 1  # fmt: skip
            object.__setattr__(self, "_hash", h)
        return h

    def match(self, name: str) -> FieldMatch | None:
        for m in self.matches:  # (a loop: the proofs ask it tens of thousands of times)
            if m.field == name:
                return m
        return None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "table": self.table,
            "match": {m.field: m.to_json() for m in self.matches},
            "action": self.action,
            "params": dict(self.params),
        }
        if self.priority:
            out["priority"] = self.priority
        if self.rule_id is not None:
            out["rule_id"] = self.rule_id
        if self.role:
            out["role"] = self.role
        if self.meter is not None:
            out["meter"] = self.meter.to_json()
        return out


@dataclass(frozen=True, slots=True)
class DefaultAction:
    table: str
    action: str
    params: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class SwitchTables:
    """Everything one switch must hold."""

    switch: str
    role: str  # tor | spine
    device_id: int
    entries: tuple[TableEntry, ...]
    defaults: tuple[DefaultAction, ...]
    span: Span | None = None  # the switch in the inventory, for diagnostics

    def table(self, name: str) -> list[TableEntry]:
        return [e for e in self.entries if e.table == name]
