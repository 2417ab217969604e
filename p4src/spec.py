"""The p4seg pipeline: one Python description from which everything else is derived.

The v1model (BMv2) and TNA (Tofino) programs are rendered from it by Jinja2, our P4Info
is built from it, and the reference switch executes it. Every P4Runtime id is fixed here
and written into the programs as `@id`, so that p4c's P4Info and ours agree exactly.

Ingress, in order (DESIGN.md "The pipeline"):
  epoch        keyless; its default action stamps the packet's policy epoch
  src_identity (epoch, ingress port, source address) -> source identity (tag vector); miss = drop and
               log (spoofing: the CPU copy says why, packet_in.reason = 2)
  dst_identity (epoch, destination address) -> destination identity; miss = no tags (0)
  policy       (epoch, tags, protocol, L4 ports, TCP flags) -> permit / deny /
               deny-and-log / permit-metered, with a direct counter and a direct meter
               (RED is dropped and counted by rule id in `policy_red_drops`); default deny
  routing      destination address -> egress port; miss = drop

Refinements of DESIGN.md, and why:
- Identities are tag vectors matched ternary in `policy` (compiler/tags.py): each endpoint
  set a rule names holds a (field, value) slot, so one rule needs one entry per ToR (per
  protocol and port range) however its services are scattered, and ids stay stable.
- ICMP has no ports: the parser puts type<<8 | code in the L4 destination-port field, so
  echo replies (type 0) are one range and need no extra key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# P4Runtime id prefixes (p4info.proto, P4Ids.Prefix): the top byte names the resource kind.
ACTION_PREFIX = 0x01
TABLE_PREFIX = 0x02
CONTROLLER_HEADER_PREFIX = 0x04
COUNTER_PREFIX = 0x12
DIRECT_COUNTER_PREFIX = 0x13
DIRECT_METER_PREFIX = 0x15

PORT_BITS = 9  # v1model standard_metadata ports
TAG_BITS = 256  # each address's identity vector (compiler/tags.py) ...
TAG_FIELD_BITS = 4  # ... in fields of 4 bits: 64 fields of 15 tags each
RULE_ID_BITS = 16
NO_TAGS = 0  # an address in none of the sets a ToR tags (dst_identity's default)
DEFAULT_RULE_ID = 0  # the default deny
CPU_CLONE_SESSION = 100  # the clone session the controller points at the CPU port


def make_id(prefix: int, index: int) -> int:
    return (prefix << 24) | index


@dataclass(frozen=True, slots=True)
class HeaderField:
    name: str
    bits: int


@dataclass(frozen=True, slots=True)
class Header:
    name: str  # header type name is <name>_t
    fields: tuple[HeaderField, ...]

    @property
    def bits(self) -> int:
        return sum(f.bits for f in self.fields)


@dataclass(frozen=True, slots=True)
class MetadataField:
    """A field of the user metadata both programs carry through ingress."""

    name: str
    bits: int
    cloned: bool = False  # travels with the CPU copy of a logged deny


@dataclass(frozen=True, slots=True)
class ControllerHeader:
    """packet_in / packet_out: the metadata P4Runtime carries with PacketIn/PacketOut."""

    name: str
    id: int
    fields: tuple[HeaderField, ...]


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    bits: int
    id: int


@dataclass(frozen=True, slots=True)
class Action:
    name: str
    id: int
    params: tuple[Param, ...] = ()


@dataclass(frozen=True, slots=True)
class Key:
    name: str  # the P4Info match field name (@name on the key element)
    expr: str  # the P4 expression, in terms of the shared `meta`/`hdr` names
    bits: int
    match: str  # exact | ternary | lpm | range
    id: int


@dataclass(frozen=True, slots=True)
class ActionRef:
    name: str
    scope: str = "TABLE_AND_DEFAULT"  # or DEFAULT_ONLY / TABLE_ONLY


@dataclass(frozen=True, slots=True)
class DirectCounter:
    name: str
    id: int
    unit: str  # PACKETS | BYTES | BOTH


@dataclass(frozen=True, slots=True)
class Counter:
    """An indexed counter the program updates (read with P4Runtime CounterEntry)."""

    name: str
    id: int
    unit: str  # PACKETS | BYTES | BOTH
    size: int


@dataclass(frozen=True, slots=True)
class DirectMeter:
    name: str
    id: int
    unit: str  # PACKETS | BYTES


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    id: int
    keys: tuple[Key, ...]
    actions: tuple[ActionRef, ...]
    default_action: str
    default_args: tuple[int, ...]
    const_default: bool
    size: int
    counter: DirectCounter | None = None
    meter: DirectMeter | None = None

    def key(self, name: str) -> Key:
        return next(k for k in self.keys if k.name == name)

    @property
    def range_kind(self) -> str:
        """How the table matches port ranges: `range`, or `ternary` where a target has none."""
        return next((k.match for k in self.keys if k.name == "l4_dst_port"), "range")

    @property
    def needs_priority(self) -> bool:
        return any(k.match in ("ternary", "range") for k in self.keys) or (
            sum(k.match == "lpm" for k in self.keys) > 1
        )


@dataclass(frozen=True, slots=True)
class Pipeline:
    name: str
    headers: tuple[Header, ...]
    metadata: tuple[MetadataField, ...]
    packet_in: ControllerHeader
    packet_out: ControllerHeader
    actions: tuple[Action, ...]
    tables: tuple[Table, ...]
    control: str = "P4segIngress"  # control type name: P4Info names are "<control>.<object>"
    sizes: dict[str, int] = field(default_factory=dict)
    counters: tuple[Counter, ...] = ()
    # By name, built once: the controller asks per entry, hundreds of thousands of times.
    _tables: dict[str, Table] = field(init=False, repr=False, compare=False)
    _actions: dict[str, Action] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_tables", {t.name: t for t in self.tables})
        object.__setattr__(self, "_actions", {a.name: a for a in self.actions})

    def table(self, name: str) -> Table:
        return self._tables[name]

    def action(self, name: str) -> Action:
        return self._actions[name]

    def qualified(self, name: str) -> str:
        return f"{self.control}.{name}"

    def counter(self, name: str) -> Counter:
        return next(c for c in self.counters if c.name == name)


HEADERS = (
    Header(
        "ethernet",
        (HeaderField("dst_addr", 48), HeaderField("src_addr", 48), HeaderField("ether_type", 16)),
    ),
    Header(
        "ipv4",
        (
            HeaderField("version", 4),
            HeaderField("ihl", 4),
            HeaderField("diffserv", 8),
            HeaderField("total_len", 16),
            HeaderField("identification", 16),
            HeaderField("flags", 3),
            HeaderField("frag_offset", 13),
            HeaderField("ttl", 8),
            HeaderField("protocol", 8),
            HeaderField("hdr_checksum", 16),
            HeaderField("src_addr", 32),
            HeaderField("dst_addr", 32),
        ),
    ),
    Header(
        "tcp",
        (
            HeaderField("src_port", 16),
            HeaderField("dst_port", 16),
            HeaderField("seq_no", 32),
            HeaderField("ack_no", 32),
            HeaderField("data_offset", 4),
            HeaderField("res", 4),
            HeaderField("flags", 8),
            HeaderField("window", 16),
            HeaderField("checksum", 16),
            HeaderField("urgent_ptr", 16),
        ),
    ),
    Header(
        "udp",
        (
            HeaderField("src_port", 16),
            HeaderField("dst_port", 16),
            HeaderField("length", 16),
            HeaderField("checksum", 16),
        ),
    ),
    Header("icmp", (HeaderField("type", 8), HeaderField("code", 8), HeaderField("checksum", 16))),
)

METADATA = (
    MetadataField("ingress_port", PORT_BITS),
    MetadataField("epoch", 1),
    MetadataField("src_tags", TAG_BITS),
    MetadataField("dst_tags", TAG_BITS),
    MetadataField("l4_src_port", 16),  # ICMP: 0
    MetadataField("l4_dst_port", 16),  # ICMP: type << 8 | code
    MetadataField("tcp_flags", 8),
    MetadataField("log_rule_id", RULE_ID_BITS, cloned=True),
    MetadataField("log_reason", 8, cloned=True),  # packet_in.reason of the CPU copy
)

# Why each packet reached the controller (packet_in.reason).
REASON_DENY_LOG = 1  # a `log` deny (or the default deny with `log`)
REASON_SPOOF = 2  # src_identity missed: a source address not bound to that port

PACKET_IN = ControllerHeader(
    "packet_in",
    make_id(CONTROLLER_HEADER_PREFIX, 1),
    (
        HeaderField("ingress_port", 16),
        HeaderField("rule_id", RULE_ID_BITS),
        HeaderField("reason", 8),
    ),
)
PACKET_OUT = ControllerHeader(
    "packet_out",
    make_id(CONTROLLER_HEADER_PREFIX, 2),
    (HeaderField("egress_port", 16),),
)


# Packets a `permit_metered` entry's meter marked RED (dropped over the rule's rate), by
# rule id: an indexed counter every target can count and P4Runtime can read (CounterEntry),
# where per-entry colour counts (meter_counter_data, P4Runtime 1.4) are not everywhere.
RED_DROPS = Counter("policy_red_drops", make_id(COUNTER_PREFIX, 1), "PACKETS", 1 << RULE_ID_BITS)


def _action(index: int, name: str, *params: tuple[str, int]) -> Action:
    return Action(
        name,
        make_id(ACTION_PREFIX, index),
        tuple(Param(p, bits, i) for i, (p, bits) in enumerate(params, start=1)),
    )


ACTIONS = (
    _action(1, "set_epoch", ("value", 1)),  # `epoch` would shadow the table
    _action(2, "set_src_tags", ("tags", TAG_BITS)),
    _action(3, "set_dst_tags", ("tags", TAG_BITS)),
    _action(4, "drop"),
    _action(5, "permit", ("rule_id", RULE_ID_BITS)),
    _action(6, "permit_metered", ("rule_id", RULE_ID_BITS)),
    _action(7, "deny", ("rule_id", RULE_ID_BITS)),
    _action(8, "deny_and_log", ("rule_id", RULE_ID_BITS)),
    _action(9, "forward", ("port", PORT_BITS)),
    _action(10, "drop_spoofed"),  # src_identity's miss: drop, and tell the controller
)


def _keys(*keys: tuple[str, str, int, str]) -> tuple[Key, ...]:
    return tuple(
        Key(name, expr, bits, match, i) for i, (name, expr, bits, match) in enumerate(keys, start=1)
    )


EPOCH = ("epoch", "meta.epoch", 1, "ternary")

DEFAULT_SIZES = {
    "src_identity": 4096,
    "dst_identity": 4096,
    "policy": 16384,
    "routing": 4096,
}


def build_pipeline(sizes: dict[str, int] | None = None, range_kind: str = "range") -> Pipeline:
    """The pipeline with the given table sizes (defaults: DEFAULT_SIZES).

    `range_kind="ternary"` gives the variant for targets whose compiled entries carry
    ranges as ternary prefixes (compiler/fit.py expands them).
    """
    size = {**DEFAULT_SIZES, **(sizes or {})}
    rk = range_kind
    tables = (
        Table(
            "epoch",
            make_id(TABLE_PREFIX, 1),
            keys=(),
            actions=(ActionRef("set_epoch", "DEFAULT_ONLY"),),
            default_action="set_epoch",
            default_args=(0,),
            const_default=False,
            size=1,
        ),
        Table(
            "src_identity",
            make_id(TABLE_PREFIX, 2),
            keys=_keys(
                EPOCH,
                ("ingress_port", "meta.ingress_port", PORT_BITS, "exact"),
                ("src_addr", "hdr.ipv4.src_addr", 32, "lpm"),
            ),
            actions=(
                ActionRef("set_src_tags", "TABLE_ONLY"),
                ActionRef("drop"),
                ActionRef("drop_spoofed", "DEFAULT_ONLY"),
            ),
            default_action="drop_spoofed",
            default_args=(),
            const_default=True,
            size=size["src_identity"],
        ),
        Table(
            "dst_identity",
            make_id(TABLE_PREFIX, 3),
            keys=_keys(EPOCH, ("dst_addr", "hdr.ipv4.dst_addr", 32, "lpm")),
            actions=(ActionRef("set_dst_tags"),),
            default_action="set_dst_tags",
            default_args=(NO_TAGS,),
            const_default=True,
            size=size["dst_identity"],
        ),
        Table(
            "policy",
            make_id(TABLE_PREFIX, 4),
            keys=_keys(
                EPOCH,
                ("src_tags", "meta.src_tags", TAG_BITS, "ternary"),
                ("dst_tags", "meta.dst_tags", TAG_BITS, "ternary"),
                ("protocol", "hdr.ipv4.protocol", 8, "ternary"),
                ("l4_src_port", "meta.l4_src_port", 16, rk),
                ("l4_dst_port", "meta.l4_dst_port", 16, rk),
                ("tcp_flags", "meta.tcp_flags", 8, "ternary"),
            ),
            actions=(
                ActionRef("permit", "TABLE_ONLY"),
                ActionRef("permit_metered", "TABLE_ONLY"),
                ActionRef("deny"),
                ActionRef("deny_and_log"),
            ),
            default_action="deny",
            default_args=(DEFAULT_RULE_ID,),
            const_default=True,
            size=size["policy"],
            counter=DirectCounter("policy_counter", make_id(DIRECT_COUNTER_PREFIX, 1), "BOTH"),
            meter=DirectMeter("policy_meter", make_id(DIRECT_METER_PREFIX, 1), "PACKETS"),
        ),
        Table(
            "routing",
            make_id(TABLE_PREFIX, 5),
            keys=_keys(("dst_addr", "hdr.ipv4.dst_addr", 32, "lpm")),
            actions=(ActionRef("forward", "TABLE_ONLY"), ActionRef("drop")),
            default_action="drop",
            default_args=(),
            const_default=True,
            size=size["routing"],
        ),
    )
    return Pipeline(
        "p4seg",
        HEADERS,
        METADATA,
        PACKET_IN,
        PACKET_OUT,
        ACTIONS,
        tables,
        sizes=size,
        counters=(RED_DROPS,),
    )


PIPELINE = build_pipeline()
