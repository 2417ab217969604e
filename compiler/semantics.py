"""The meaning of a policy: which packets and which flows it allows, decided exactly.

This is the reference every other part is measured against: `check` evaluates `expect`
lines with it, the compiled tables are verified against it, and the Mininet matrix takes
its expected side from it — never from the tables.

Semantics (docs/language.md has the full text):
- default deny; a packet matching a `deny` is dropped whatever the allows say;
- an `allow` passes matching packets (forward direction, any TCP flags);
- replies: a packet going back along an allowed flow passes if it is TCP with ACK set,
  an ICMP echo reply answering a rule that covers echo requests, or UDP under an allow
  with `reply` — unless a deny covers the reply itself or the flow it answers (then that
  deny decides, whatever the allows);
- protocols are judged by class: tcp, udp, icmp, one class per IP protocol number a rule
  or expectation names (`proto 132`), and `other` for every protocol none names;
- ICMP type and code are judged as the pipeline sees them: type << 8 | code, on the same
  axis as ports (an `icmp echo-request` rule has the "ports" 0x0800-0x08FF);
- time-bound rules (`for`, `during`) count as active unless the caller says otherwise.

Addresses and ports are partitioned into atoms — maximal sets no rule tells apart — so
a decision per (source atom, destination atom, protocol class, port atom) is exact for
every packet, and every question is answered with integer bit masks.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import random
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

from compiler.addresses import MAX_ADDRESS, AddressSet, Interval, merge_intervals
from compiler.allocation import unnumbered
from compiler.memo import also_forget
from compiler.model import Action, ExpectCase, Policy, PolicyRule, format_icmp_types
from compiler.protocols import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REPLY_RANGE,
    ICMP_ECHO_REQUEST,
    ICMP_ECHO_REQUEST_RANGE,
    MAX_PORT,
    OTHER_PROTOCOL,
    PROTOCOL_NUMBERS,
)

PROTO_CLASSES = ("tcp", "udp", "icmp", "other")  # the classes of a policy naming no `proto N`
EPHEMERAL_PORT = 49152  # the client port flows are judged with (start of the IANA dynamic range)
_MAX_BOXES = 4096  # past this many fragments a coverage question is left unanswered


def protocol_classes(*policies: Policy) -> tuple[str, ...]:
    """The protocol classes that tell apart every protocol these policies distinguish:
    tcp, udp, icmp, `proto N` for each protocol number a rule or expectation names, and
    `other` (every protocol none of them names). Judge each class once (see
    :meth:`PolicySemantics.flow`); :func:`protocol_of` gives a protocol number for it."""
    protos = [r.proto for p in policies for r in p.rules] + [
        e.proto for p in policies for e in p.expects
    ]
    named = sorted({int(proto[6:]) for proto in protos if proto.startswith("proto ")})
    other = ("other",) if len(named) + len(PROTOCOL_NUMBERS) < 256 else ()
    return ("tcp", "udp", "icmp", *(f"proto {n}" for n in named), *other)


def protocol_of(proto_class: str, classes: Sequence[str] = PROTO_CLASSES) -> int:
    """An IP protocol number in `proto_class` (of `classes`, from :func:`protocol_classes`)."""
    if proto_class in PROTOCOL_NUMBERS:
        return PROTOCOL_NUMBERS[proto_class]
    if proto_class.startswith("proto "):
        return int(proto_class[6:])
    taken = {protocol_of(c) for c in classes if c != "other"}
    if OTHER_PROTOCOL not in taken:
        return OTHER_PROTOCOL
    return min(n for n in range(256) if n not in taken)


def bits(mask: int) -> Iterator[int]:
    """Indices of the set bits of `mask`, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class Partition:
    """A universe [0, top] cut into atoms: classes of values that no given set tells apart."""

    def __init__(
        self, sets: Iterable[Sequence[Interval]], top: int, pinned: Iterable[int] = ()
    ) -> None:
        # Overlaps would cancel XOR tags, so each set is merged: once per object (rules
        # naming one service share its intervals: 20,000 sides of a 10k-rule policy are
        # about 1,400 sets), then once per value.
        unique = {id(s): s for s in sets}
        distinct = {merge_intervals(s) for s in set(map(tuple, unique.values()))}
        pinned = sorted(set(pinned))
        distinct |= {((v, v),) for v in pinned}
        cuts = {0}
        for intervals in distinct:
            for lo, hi in intervals:
                cuts.add(lo)
                if hi < top:
                    cuts.add(hi + 1)
        self.top = top
        self.starts = sorted(cuts)
        index = {v: i for i, v in enumerate(self.starts)}
        # XOR of one random 128-bit tag per set: equal signatures <=> same membership.
        rng = random.Random(0x5E6)
        diff = [0] * (len(self.starts) + 1)
        for intervals in sorted(distinct):
            tag = rng.getrandbits(128)
            for lo, hi in intervals:
                diff[index[lo]] ^= tag
                diff[index[hi + 1] if hi < top else len(self.starts)] ^= tag
        sig, atom_of_sig = 0, dict[int, int]()
        self.element_atom: list[int] = []
        for i in range(len(self.starts)):
            sig ^= diff[i]
            self.element_atom.append(atom_of_sig.setdefault(sig, len(atom_of_sig)))
        self.count = len(atom_of_sig)
        self.full = (1 << self.count) - 1
        self.representative = [-1] * self.count
        for v in pinned:  # prefer a pinned value (an inventory host) as an atom's example
            atom = self.atom_of(v)
            if self.representative[atom] < 0:
                self.representative[atom] = v
        for i, start in enumerate(self.starts):
            atom = self.element_atom[i]
            if self.representative[atom] < 0:
                self.representative[atom] = start
        self._masks: dict[tuple[Interval, ...], int] = {}
        self._exact: dict[tuple[Interval, ...], int | None] = {}
        self._sizes: list[int] | None = None  # per atom, how many elements it has

    def atom_of(self, value: int) -> int:
        return self.element_atom[bisect.bisect_right(self.starts, value) - 1]

    def exact_mask(self, intervals: Sequence[Interval]) -> int | None:
        """The atoms of a set that is a union of atoms (every atom wholly in it or wholly out
        of it), or None: a set these atoms do not tell apart from others (cutting it would
        take new atoms). A set the partition was made of always is one."""
        key = tuple(intervals)
        if key in self._exact:
            return self._exact[key]
        if self._sizes is None:
            self._sizes = [0] * self.count
            for atom in self.element_atom:
                self._sizes[atom] += 1
        starts, last = self.starts, len(self.starts)
        atoms: set[int] = set()
        elements = 0
        found: int | None = None
        for lo, hi in merge_intervals(key):
            i = bisect.bisect_right(starts, lo) - 1
            j = bisect.bisect_right(starts, hi)  # the element after hi's
            if starts[i] != lo or (hi < self.top and (j == last or starts[j] != hi + 1)):
                break  # an edge inside an element
            elements += j - i
            atoms.update(self.element_atom[i:j])
        else:
            if elements == sum(self._sizes[a] for a in atoms):
                found = sum(1 << a for a in atoms)
        self._exact[key] = found
        return found

    def refined(self, intervals: Sequence[Interval]) -> tuple[Partition, list[tuple[int, int]]]:
        """This partition with `intervals` made a union of atoms: each atom the set cuts
        keeps its number for its part outside the set, and its part inside becomes a new
        atom, numbered after the others. The atoms' numbers otherwise stay, so masks over
        these atoms hold over the new ones once each split atom's new part is added to
        every mask holding it. Returns the new partition and the splits (atom, new atom)."""
        merged = merge_intervals(tuple(intervals))
        cuts = set(self.starts)
        for lo, hi in merged:
            cuts.add(lo)
            if hi < self.top:
                cuts.add(hi + 1)
        starts = sorted(cuts)
        inside = [False] * len(starts)
        k = 0
        for i, start in enumerate(starts):
            while k < len(merged) and merged[k][1] < start:
                k += 1
            inside[i] = k < len(merged) and merged[k][0] <= start
        old_atom = [self.element_atom[bisect.bisect_right(self.starts, v) - 1] for v in starts]
        sides: dict[int, set[bool]] = {}
        for atom, within in zip(old_atom, inside, strict=True):
            sides.setdefault(atom, set()).add(within)
        splits: list[tuple[int, int]] = []
        new_of: dict[int, int] = {}
        for atom in sorted(a for a, seen in sides.items() if len(seen) == 2):
            new_of[atom] = self.count + len(splits)
            splits.append((atom, new_of[atom]))
        out = copy.copy(self)
        out.starts = starts
        out.element_atom = [
            new_of.get(atom, atom) if within else atom
            for atom, within in zip(old_atom, inside, strict=True)
        ]
        out.count = self.count + len(splits)
        out.full = (1 << out.count) - 1
        representative = self.representative + [-1] * len(splits)
        for atom, _part in splits:  # an example of each part, where the old one is not
            if out.atom_of(representative[atom]) != atom:
                representative[atom] = -1
        for i, start in enumerate(starts):
            atom = out.element_atom[i]
            if representative[atom] < 0:
                representative[atom] = start
        out.representative = representative
        out._masks, out._exact, out._sizes = {}, {}, None
        return out, splits

    def mask(self, intervals: Sequence[Interval]) -> int:
        key = tuple(intervals)
        cached = self._masks.get(key)
        if cached is not None:
            return cached
        mask = 0
        if key == ((0, self.top),):
            mask = self.full
        else:
            for lo, hi in key:
                i = bisect.bisect_right(self.starts, lo) - 1
                j = bisect.bisect_right(self.starts, hi)
                for atom in set(self.element_atom[i:j]):
                    mask |= 1 << atom
        self._masks[key] = mask
        return mask


@dataclass(frozen=True, slots=True)
class Decision:
    """How one packet is treated, and which rule said so (None: the default deny)."""

    allowed: bool
    rule: PolicyRule | None
    reason: str  # "allow", "deny", "reply", "reply-of-denied", "default"
    log: bool

    def describe(self) -> str:
        if self.rule is None:
            return "denied by the default deny"
        verb = "allowed" if self.allowed else "denied"
        how = {"reply": " as a reply", "reply-of-denied": " (a reply to a denied flow)"}.get(
            self.reason, ""
        )
        return f"{verb}{how} by `{self.rule.describe()}` at {self.rule.span}"


@dataclass(frozen=True, slots=True)
class FlowResult:
    """Whether a flow works end to end: the opening packet and, where needed, the answer."""

    allowed: bool
    forward: Decision
    back: Decision | None

    @property
    def deciding(self) -> Decision:
        """The decision that made the outcome: the answer's when only it was refused."""
        if self.forward.allowed and self.back is not None and not self.back.allowed:
            return self.back
        return self.forward


@dataclass(frozen=True, slots=True)
class Coverage:
    rule: PolicyRule
    by_deny: bool
    covering: tuple[PolicyRule, ...]


class PolicySemantics:
    """A policy compiled to atom bit masks, answering packet, flow and coverage questions."""

    def __init__(
        self,
        policy: Policy,
        pinned: Iterable[int] = (),
        sets: Iterable[Sequence[Interval]] = (),
    ) -> None:
        """`pinned`: addresses that get atoms of their own; `sets`: more address sets the
        atoms must not straddle (compiler.lower: the `remediation` service)."""
        self.policy = policy
        rules = policy.rules
        self.rules = rules
        addr_sets: list[Sequence[Interval]] = []
        # ICMP echo requests and replies are flows and answers: never in one atom with others
        port_sets: list[Sequence[Interval]] = [
            ((EPHEMERAL_PORT, EPHEMERAL_PORT),),
            (ICMP_ECHO_REQUEST_RANGE,),
            (ICMP_ECHO_REPLY_RANGE,),
        ]
        for r in rules:
            addr_sets += [r.src.intervals, r.dst.intervals]
            port_sets.append(r.ports)
        for e in policy.expects:
            addr_sets += [e.src.intervals, e.dst.intervals]
            if e.port is not None:
                port_sets.append(((e.port, e.port),))
            if e.icmp_types:
                port_sets.append(e.icmp_types)
        addr_sets += sets
        pinned = list(pinned)
        self.addresses = Partition(addr_sets, MAX_ADDRESS, pinned)
        self.pinned_atoms = {self.addresses.atom_of(v) for v in pinned}
        self.ports = Partition(port_sets, MAX_PORT)
        self.proto_classes = protocol_classes(policy)
        self._class_of: dict[str | int, str] = {c: c for c in self.proto_classes}
        self._class_of.update((protocol_of(c), c) for c in self.proto_classes if c != "other")
        self.proto_index = {c: 0 for c in self.proto_classes}

        n_addr, n_port = self.addresses.count, self.ports.count
        self.src_index = [0] * n_addr
        self.dst_index = [0] * n_addr
        self.port_index = [0] * n_port
        self.echo_bits = 0  # rules whose flows include ICMP echo requests: replies answer them
        self.boxes: list[tuple[int, int, int, int]] = []
        self.deny_bits = self.allow_bits = self.reply_bits = self.log_bits = self.metered_bits = 0
        # The rules of each mask of a dimension, indexed atom by atom after: rules naming
        # the same services share their masks, so each mask's atoms are walked once.
        by_src: dict[int, int] = {}
        by_dst: dict[int, int] = {}
        by_ports: dict[int, int] = {}
        side_masks: dict[int, int] = {}  # by id of a rule side's intervals (shared per service)

        def side_mask(intervals: tuple[Interval, ...]) -> int:
            found = side_masks.get(id(intervals))
            if found is None:
                found = side_masks[id(intervals)] = self.addresses.mask(intervals)
            return found

        # Per protocol as a rule writes it: its classes, and their bits (as in `boxes`).
        protos_of = {proto: self._proto_bits(proto) for proto in {r.proto for r in rules}}
        for i, r in enumerate(rules):
            bit = 1 << i
            src, dst = side_mask(r.src.intervals), side_mask(r.dst.intervals)
            ports = self.ports.mask(r.ports)
            classes, protos = protos_of[r.proto]
            self.boxes.append((protos, src, dst, ports))
            by_src[src] = by_src.get(src, 0) | bit
            by_dst[dst] = by_dst.get(dst, 0) | bit
            by_ports[ports] = by_ports.get(ports, 0) | bit
            for c in classes:
                self.proto_index[c] |= bit
            self._flag(bit, r)
        # Rules that match every atom of a dimension (`any`, no ports) are kept apart:
        # indexing them atom by atom would cost atoms x rules.
        self.src_any = _indexed(self.src_index, by_src, self.addresses.full)
        self.dst_any = _indexed(self.dst_index, by_dst, self.addresses.full)
        self.port_any = _indexed(self.port_index, by_ports, self.ports.full)
        self.all_rules = (1 << len(rules)) - 1
        # Bit i is the i-th rule of the policy; the deciding rule is the lowest *id*, which
        # is the lowest bit as long as ids grow in file order (a fresh allocation).
        self._ids_ascending = all(a.id < b.id for a, b in pairwise(rules))
        self._atom_class: list[int] | None = None
        self._port_reps: list[int] | None = None
        self._icmp_reps: list[int] | None = None
        self._representatives: dict[int, list[int]] = {}  # `any` and services recur
        self._unions: dict[tuple[int, int], int] = {}  # (id of an index, mask) -> rules

    def _proto_bits(self, proto: str) -> tuple[tuple[str, ...], int]:
        """The classes of a protocol as a rule writes it, and their bits (as in `boxes`)."""
        classes = self.proto_classes if proto == "ip" else (self.proto_class(proto),)
        return classes, sum(1 << self.proto_classes.index(c) for c in classes)

    def _flag(self, bit: int, r: PolicyRule) -> None:
        """Set the rule's bit in the masks of its kind (deny, logged, allow, ...)."""
        if r.answers_pings:
            self.echo_bits |= bit
        if r.action is Action.DENY:
            self.deny_bits |= bit
            if r.log:
                self.log_bits |= bit
        else:
            self.allow_bits |= bit
            if r.reply:
                self.reply_bits |= bit
            if r.rate_pps is not None:
                self.metered_bits |= bit

    def amended(self, policy: Policy) -> PolicySemantics | None:
        """These semantics for `policy`, whose rules are this one's with some replaced in
        their places and others appended — a quarantine's carve of the rules naming its
        hosts — made by moving those rules' bits alone, on these atoms. None when that
        cannot be: the expectations, the default's logging or the protocol classes differ,
        or a set of a new rule is not a union of these atoms (it would cut them anew).
        Decisions are those of semantics made afresh; atoms may be finer than they need."""
        old, new = self.rules, policy.rules
        n = len(old)
        if (
            len(new) < n
            or policy.default_log != self.policy.default_log
            or not _same_objects(policy.expects, self.policy.expects)
            or protocol_classes(policy) != self.proto_classes
        ):
            return None
        moved = [i for i in range(n) if new[i] is not old[i]] + list(range(n, len(new)))
        # Port atoms a new rule's ports cut are split (ports are no host's, and no table
        # entry depends on their atoms); address atoms must hold the rules as they are.
        ports, splits = self.ports, []
        for i in moved:
            if ports.exact_mask(new[i].ports) is None:
                ports, split = ports.refined(new[i].ports)
                splits += split
        boxes = {}
        protos_of = {proto: self._proto_bits(proto)[1] for proto in {new[i].proto for i in moved}}
        for i in moved:
            r = new[i]
            src = self.addresses.exact_mask(r.src.intervals)
            dst = self.addresses.exact_mask(r.dst.intervals)
            port_mask = ports.exact_mask(r.ports)
            if src is None or dst is None or port_mask is None:
                return None
            boxes[i] = (protos_of[r.proto], src, dst, port_mask)
        out = copy.copy(self)
        out.policy, out.rules = policy, new
        out.src_index, out.dst_index = self.src_index[:], self.dst_index[:]
        out.port_index, out.proto_index = self.port_index[:], dict(self.proto_index)
        out.boxes = self.boxes[:n]
        if splits:
            out.ports = ports
            out._split_ports(splits)
        keep = out.all_rules = (1 << len(new)) - 1
        for i in moved:
            if i < n:
                out._move(i, out.boxes[i], boxes[i])
                out.boxes[i] = boxes[i]
                keep &= ~(1 << i)
            else:
                out._move(i, None, boxes[i])
                out.boxes.append(boxes[i])
        out.echo_bits, out.deny_bits, out.log_bits = (
            self.echo_bits & keep,
            self.deny_bits & keep,
            self.log_bits & keep,
        )
        out.allow_bits, out.reply_bits, out.metered_bits = (
            self.allow_bits & keep,
            self.reply_bits & keep,
            self.metered_bits & keep,
        )
        for i in moved:
            out._flag(1 << i, new[i])
        out._ids_ascending = all(a.id < b.id for a, b in pairwise(new))
        out._atom_class = out._port_reps = out._icmp_reps = None
        out._representatives, out._unions = {}, {}
        return out

    def _split_ports(self, splits: list[tuple[int, int]]) -> None:
        """Each split port atom's new part (`Partition.refined`) into every mask and index
        entry that holds the atom: the rules' boxes, the port index."""
        for atom, part in splits:
            self.port_index.append(self.port_index[atom])
            assert len(self.port_index) == part + 1
            bit, add = 1 << atom, 1 << part
            self.boxes = [(b[0], b[1], b[2], b[3] | add) if b[3] & bit else b for b in self.boxes]

    def _move(
        self,
        i: int,
        was: tuple[int, int, int, int] | None,
        box: tuple[int, int, int, int],
    ) -> None:
        """Put the `i`-th rule in the indexes by its masks `box`, where it was by `was` (None:
        a new rule): only the atoms it leaves or joins are touched (a carve takes a host's
        atom out of a service's)."""
        bit = 1 << i
        old = was or (0, 0, 0, 0)
        protos = old[0] ^ box[0]
        for k in bits(protos):
            c = self.proto_classes[k]
            self.proto_index[c] ^= bit
        for before, after, index, full, any_name in (
            (old[1], box[1], self.src_index, self.addresses.full, "src_any"),
            (old[2], box[2], self.dst_index, self.addresses.full, "dst_any"),
            (old[3], box[3], self.port_index, self.ports.full, "port_any"),
        ):
            if before == after:
                continue
            if before == full:  # from the rules of every atom to an index of its own
                setattr(self, any_name, getattr(self, any_name) & ~bit)
                before = 0
            if after == full:
                setattr(self, any_name, getattr(self, any_name) | bit)
                after = 0
            for a in atoms_of(before & ~after):
                index[a] &= ~bit
            for a in atoms_of(after & ~before):
                index[a] |= bit

    def renumbered(self, policy: Policy) -> PolicySemantics:
        """These semantics for `policy`, whose rules are this one's in the same order with
        other ids (the atoms and masks are shared: they depend on the rules' sets, not on
        their ids); which rule decides among several still goes by the lowest id."""
        assert len(policy.rules) == len(self.rules)
        out = copy.copy(self)
        out.policy, out.rules = policy, policy.rules
        out._ids_ascending = all(a.id < b.id for a, b in pairwise(policy.rules))
        return out

    # -- packets -----------------------------------------------------------------------------

    def proto_class(self, proto: str | int) -> str:
        """The class of a protocol: a class name, `proto N` or a protocol number (so a class
        of another policy, such as `proto 132` where this one names no 132, maps to `other`)."""
        if isinstance(proto, str):
            known = self._class_of.get(proto)
            if known is not None:
                return known
            if not proto.startswith("proto ") or not proto[6:].isdigit():
                raise ValueError(f"unknown protocol class {proto!r}")
            proto = int(proto[6:])
        named = next((c for c, n in PROTOCOL_NUMBERS.items() if n == proto), None)
        if named is not None:
            return named
        return f"proto {proto}" if f"proto {proto}" in self._class_of else "other"

    def decide_atoms(
        self,
        src: int,
        dst: int,
        proto: str | int,
        sport: int,
        dport: int,
        ack: bool = False,
        icmp_type: int = ICMP_ECHO_REQUEST,
        active: int | None = None,
        icmp_code: int = 0,
    ) -> Decision:
        """Decide a packet given as atoms (address atoms, port atoms) and protocol class;
        ICMP is judged by `icmp_type` and `icmp_code` (the port atoms are not used)."""
        active_rules = self.all_rules if active is None else active
        proto = self._class_of.get(proto) or self.proto_class(proto)
        has_ports = proto in ("tcp", "udp")
        if proto == "icmp":  # type << 8 | code, on the ports' axis as in the pipeline
            dport = self.ports.atom_of((icmp_type & 0xFF) << 8 | icmp_code & 0xFF)
        fwd = (
            (self.src_index[src] | self.src_any)
            & (self.dst_index[dst] | self.dst_any)
            & self.proto_index[proto]
            & active_rules
        )
        if has_ports or proto == "icmp":
            fwd &= self.port_index[dport] | self.port_any
        denied = fwd & self.deny_bits
        if denied:
            return self._deny(denied, "deny")
        allowed = fwd & self.allow_bits
        if allowed:
            return Decision(True, self._deciding_allow(allowed), "allow", False)
        rev = (
            (self.src_index[dst] | self.src_any)
            & (self.dst_index[src] | self.dst_any)
            & self.proto_index[proto]
            & active_rules
        )
        if has_ports:
            rev &= self.port_index[sport] | self.port_any
        # A packet shaped like an answer (TCP with ACK, any UDP, ICMP echo reply) that
        # answers a denied flow is denied by that deny; otherwise an allow whose flow it
        # answers lets it through (UDP only with `reply`).
        if proto == "tcp" and ack:
            replies = rev & self.allow_bits
        elif proto == "udp":
            replies = rev & self.reply_bits
        elif proto == "icmp" and icmp_type == ICMP_ECHO_REPLY:
            rev &= self.echo_bits  # an echo reply answers only rules that let pings through
            replies = rev & self.allow_bits
        else:
            return Decision(False, None, "default", self.policy.default_log)
        reverse_denied = rev & self.deny_bits
        if reverse_denied:
            return self._deny(reverse_denied, "reply-of-denied")
        if replies:
            return Decision(True, self.first(replies), "reply", False)
        return Decision(False, None, "default", self.policy.default_log)

    def _deny(self, denied: int, reason: str) -> Decision:
        # A logging deny wins over a silent one, so that a logged flow is always logged.
        logged = denied & self.log_bits
        rule = self.first(logged or denied)
        return Decision(False, rule, reason, rule.log)

    def _deciding_allow(self, allowed: int) -> PolicyRule:
        # Metered allows take precedence (the lowest rate first), then the lowest rule id.
        metered = allowed & self.metered_bits
        if metered:
            return min(
                (self.rules[i] for i in bits(metered)), key=lambda r: (r.rate_pps or 0, r.id)
            )
        return self.first(allowed)

    def first(self, mask: int) -> PolicyRule:
        """The rule of `mask` (a non-empty bit mask of rules) with the lowest rule id."""
        if self._ids_ascending:
            return self.rules[next(bits(mask))]
        return min((self.rules[i] for i in bits(mask)), key=lambda r: r.id)

    def decide(
        self,
        src: int,
        dst: int,
        proto: str | int,
        sport: int = EPHEMERAL_PORT,
        dport: int = 0,
        ack: bool = False,
        icmp_type: int = ICMP_ECHO_REQUEST,
        icmp_code: int = 0,
    ) -> Decision:
        """Decide one concrete packet (addresses as integers; proto: a class of
        `proto_classes`, `proto N` or an IP protocol number)."""
        a, p = self.addresses, self.ports
        return self.decide_atoms(
            a.atom_of(src),
            a.atom_of(dst),
            proto,
            p.atom_of(sport),
            p.atom_of(dport),
            ack,
            icmp_type,
            icmp_code=icmp_code,
        )

    # -- flows -------------------------------------------------------------------------------

    def flow_atoms(
        self, src: int, dst: int, proto: str | int, port: int, icmp_value: int | None = None
    ) -> FlowResult:
        """Whether a connection (tcp), datagram (udp), ping (icmp) or packet (any other
        class, e.g. `proto 132` or `other`) gets through. With `icmp_value` (type << 8 |
        code), an ICMP flow is that message: an echo request is a ping, others one packet."""
        eph = self.ports.atom_of(EPHEMERAL_PORT)
        proto = self._class_of.get(proto) or self.proto_class(proto)
        if proto == "tcp":
            fwd = self.decide_atoms(src, dst, "tcp", eph, port)
            back = self.decide_atoms(dst, src, "tcp", port, eph, ack=True) if fwd.allowed else None
            return FlowResult(fwd.allowed and back is not None and back.allowed, fwd, back)
        if proto == "icmp":
            value = ICMP_ECHO_REQUEST << 8 if icmp_value is None else icmp_value
            fwd = self.decide_atoms(
                src, dst, "icmp", 0, 0, icmp_type=value >> 8, icmp_code=value & 0xFF
            )
            if value >> 8 != ICMP_ECHO_REQUEST:
                return FlowResult(fwd.allowed, fwd, None)
            back = (
                self.decide_atoms(dst, src, "icmp", 0, 0, icmp_type=ICMP_ECHO_REPLY)
                if fwd.allowed
                else None
            )
            return FlowResult(fwd.allowed and back is not None and back.allowed, fwd, back)
        fwd = self.decide_atoms(src, dst, proto, eph, port)
        return FlowResult(fwd.allowed, fwd, None)

    def flow(
        self, src: int, dst: int, proto: str | int, port: int = 0, icmp_value: int | None = None
    ) -> FlowResult:
        """A flow between two addresses; `proto` as for :meth:`decide` (enumerate the classes
        of one or more policies with :func:`protocol_classes`), `icmp_value` as for
        :meth:`flow_atoms`."""
        a, p = self.addresses, self.ports
        return self.flow_atoms(a.atom_of(src), a.atom_of(dst), proto, p.atom_of(port), icmp_value)

    def expectation_flows(self, expect: ExpectCase) -> list[tuple[str, int, int | None]]:
        """The flows an `expect` line stands for, one per class of flows the rules tell apart:
        (protocol class, port atom, ICMP type << 8 | code or None for a ping). `ip` is every
        class: tcp and udp on every port, icmp of every type (echo replies answer pings and
        are no flow of their own), every `proto N` and `other`."""
        if expect.proto == "ip":
            cases: list[tuple[str, int, int | None]] = [
                (c, p, None) for c in ("tcp", "udp") for p in self._port_classes()
            ]
            cases += [("icmp", 0, self.ports.representative[p]) for p in self._icmp_classes()]
            cases += [(c, 0, None) for c in self.proto_classes if c not in PROTOCOL_NUMBERS]
            return cases
        if expect.icmp_types:
            atoms = bits(self.ports.mask(expect.icmp_types))
            return [("icmp", 0, self.ports.representative[p]) for p in atoms]
        if expect.port is None:
            return [(expect.proto, 0, None)]
        return [(expect.proto, self.ports.atom_of(expect.port), None)]

    def expectation_failure(
        self, expect: ExpectCase
    ) -> tuple[int, int, str, int | None, FlowResult] | None:
        """The first concrete flow contradicting an `expect` line, or None if it holds."""
        srcs = self.addresses.mask(expect.src.intervals)
        dsts = self.addresses.mask(expect.dst.intervals)
        cases = self.expectation_flows(expect)
        for sa in self._class_representatives(srcs):
            for da in self._class_representatives(dsts):
                for proto, port_atom, icmp_value in cases:
                    result = self.flow_atoms(sa, da, proto, port_atom, icmp_value)
                    if result.allowed != expect.allowed:
                        port = expect.port
                        if expect.proto == "ip" and proto in ("tcp", "udp"):
                            port = self.ports.representative[port_atom]
                        if icmp_value is not None:  # the message, as a rule names it
                            proto = f"icmp {format_icmp_types(((icmp_value, icmp_value),))}"
                        rep = self.addresses.representative
                        return rep[sa], rep[da], proto, port, result
        return None

    def _port_classes(self) -> list[int]:
        """One port atom per class of port atoms that the same rules match (they decide
        alike), computed once: `ip` expectations would otherwise pay for every port atom."""
        if self._port_reps is None:
            first: dict[int, int] = {}
            for p in range(self.ports.count):
                first.setdefault(self.port_index[p], p)
            self._port_reps = list(first.values())
        return self._port_reps

    def _icmp_classes(self) -> list[int]:
        """One port atom per class of ICMP messages that flow alike (the same rules match
        them, and echo requests are pings), echo replies left out (they only answer pings);
        computed once, like :meth:`_port_classes`."""
        if self._icmp_reps is None:
            first: dict[tuple[int, bool], int] = {}
            for p in range(self.ports.count):
                kind = self.ports.representative[p] >> 8  # atoms never mix echo and others
                if kind != ICMP_ECHO_REPLY:
                    first.setdefault((self.port_index[p], kind == ICMP_ECHO_REQUEST), p)
            self._icmp_reps = list(first.values())
        return self._icmp_reps

    def _class_representatives(self, mask: int) -> list[int]:
        """One address atom of `mask` per class of atoms that every rule treats alike (the
        same rules match them as source and as destination), so flows need checking once
        per class, not per atom. Each class is represented by its first atom holding an
        inventory host, else its first atom, and representatives come hosts first: the
        counterexample found is the one a scan of every atom would find first."""
        cached = self._representatives.get(mask)
        if cached is not None:
            return cached
        if self._atom_class is None:
            classes: dict[tuple[int, int], int] = {}
            self._atom_class = [
                classes.setdefault((self.src_index[a], self.dst_index[a]), len(classes))
                for a in range(self.addresses.count)
            ]
        pinned = self.pinned_atoms
        first: dict[int, int] = {}
        for atom in atoms_of(mask):
            c = self._atom_class[atom]
            held = first.get(c)
            if held is None or (atom in pinned and held not in pinned):
                first[c] = atom
        # Counterexamples read best with a named host, so atoms holding one come first.
        found = sorted(first.values(), key=lambda a: (a not in pinned, a))
        self._representatives[mask] = found
        return found

    def rules_meeting(self, a: AddressSet, b: AddressSet) -> tuple[PolicyRule, ...]:
        """The rules (in the policy's order) that can match a packet between `a` and `b`
        either way: from `a` to `b`, or from `b` to `a` (a reply). The only rules that can
        decide a flow between the two, forward or back."""
        full = self.addresses.full
        sa, sb = self.addresses.mask(a.intervals), self.addresses.mask(b.intervals)
        src_a = self._union(self.src_index, self.src_any, sa, full)
        dst_b = self._union(self.dst_index, self.dst_any, sb, full)
        src_b = self._union(self.src_index, self.src_any, sb, full)
        dst_a = self._union(self.dst_index, self.dst_any, sa, full)
        return tuple(self.rules[i] for i in bits((src_a & dst_b) | (src_b & dst_a)))

    # -- replies -----------------------------------------------------------------------------

    def denied_replies(self) -> list[tuple[PolicyRule, tuple[PolicyRule, ...]]]:
        """Denies that refuse the replies of allowed flows, each with those allows.

        A reply (TCP with ACK, ICMP echo reply, UDP under `reply`) goes from the allow's
        destination to its source, to the client's port; a deny matching it wins."""
        client_port = self.ports.atom_of(EPHEMERAL_PORT)
        full = self.addresses.full
        out = []
        for j in bits(self.deny_bits):
            protos, src, dst, ports = self.boxes[j]
            if not ports >> client_port & 1:
                continue
            reverse = (
                self._union(self.dst_index, self.dst_any, src, full)
                & self._union(self.src_index, self.src_any, dst, full)
                & self.allow_bits
            )
            hurt = tuple(
                self.rules[i]
                for i in bits(reverse)
                if protos & self._reply_protocols(self.rules[i])
            )
            if hurt:
                out.append((self.rules[j], hurt))
        return out

    def _reply_protocols(self, rule: PolicyRule) -> int:
        """Protocol-class bits of the replies an allow lets back: tcp, icmp echo replies when
        it passes echo requests, udp with `reply`."""
        bit = {c: 1 << i for i, c in enumerate(self.proto_classes)}
        answered = bit["tcp"] | (bit["udp"] if rule.reply else 0)
        answered |= bit["icmp"] if rule.answers_pings else 0
        classes = self.proto_classes if rule.proto == "ip" else (self.proto_class(rule.proto),)
        return answered & sum(bit[c] for c in classes)

    # -- coverage (dead rules) ---------------------------------------------------------------

    def overlapping_denies(self, i: int) -> list[PolicyRule]:
        """The denies that match some packet the `i`-th rule (0-based, in the policy's
        order) matches."""
        return [self.rules[j] for j in bits(self._candidates(i) & self.deny_bits)]

    def _candidates(self, i: int) -> int:
        protos, src, dst, ports = self.boxes[i]
        cand = 0
        for c in bits(protos):
            cand |= self.proto_index[self.proto_classes[c]]
        cand &= self._union(self.src_index, self.src_any, src, self.addresses.full)
        cand &= self._union(self.dst_index, self.dst_any, dst, self.addresses.full)
        cand &= self._union(self.port_index, self.port_any, ports, self.ports.full)
        return cand & ~(1 << i)

    def _union(self, index: list[int], matches_any: int, mask: int, full: int) -> int:
        """Rules matching at least one atom of `mask` in one dimension (kept per mask: the
        rules naming one service ask for the same)."""
        if mask == full:
            return self.all_rules
        key = (id(index), mask)
        out = self._unions.get(key)
        if out is None:
            out = matches_any
            for a in bits(mask):
                out |= index[a]
            self._unions[key] = out
        return out

    def _covered_by(self, i: int, pool: int) -> tuple[int, ...] | None:
        """Rules of `pool` that together cover rule i's forward space, or None."""
        remaining = [self.boxes[i]]
        used = []
        for j in bits(pool):
            cover = self.boxes[j]
            after: list[tuple[int, int, int, int]] = []
            hit = False
            for box in remaining:
                pieces = _subtract(box, cover)
                if pieces is None:
                    after.append(box)
                else:
                    hit = True
                    after.extend(pieces)
            if hit:
                used.append(j)
            remaining = after
            if not remaining:
                return tuple(used)
            if len(remaining) > _MAX_BOXES:
                return None
        return None

    def dead_rules(self, down_to: int = 0) -> list[Coverage]:
        """Allow rules that never decide a packet: covered by denies or by other allows.
        `down_to`: only the rules with an id at least that (the same verdicts for them: a
        rule's depends only on the rules of higher ids, judged before it)."""
        dead: list[Coverage] = []
        alive = self.allow_bits
        # Highest id first: of two copies, the lower id decides, so the other is reported.
        for i in sorted(range(len(self.rules)), key=lambda i: self.rules[i].id, reverse=True):
            rule = self.rules[i]
            if rule.id < down_to:
                break
            if rule.action is not Action.ALLOW:
                continue
            cand = self._candidates(i)
            by_deny = self._covered_by(i, cand & self.deny_bits) if cand & self.deny_bits else None
            if by_deny is not None:
                dead.append(Coverage(rule, True, tuple(self.rules[j] for j in by_deny)))
                alive &= ~(1 << i)
                continue
            stronger = 0
            for j in bits(cand & alive):
                if _decides_over(self.rules[j], rule):
                    stronger |= 1 << j
            if not stronger:
                continue
            covering = self._covered_by(i, (cand & self.deny_bits) | stronger)
            if covering is not None:
                dead.append(Coverage(rule, False, tuple(self.rules[j] for j in covering)))
                alive &= ~(1 << i)
        return sorted(dead, key=lambda c: (c.rule.position, c.rule.id))


def _indexed(index: list[int], rules_by_mask: dict[int, int], full: int) -> int:
    """Add each mask's rules to the index entries of its atoms; return the rules of the
    full mask (those matching every atom), which are left out of the index."""
    for mask, rules in rules_by_mask.items():
        if mask != full:
            for a in bits(mask):
                index[a] |= rules
    return rules_by_mask.get(full, 0)


def atoms_of(mask: int) -> Iterator[int]:
    """Like :func:`bits`, in time linear in the mask's width when many bits are set."""
    if mask.bit_count() <= 64:
        yield from bits(mask)
        return
    text = bin(mask)[:1:-1]  # lowest bit first
    i = text.find("1")
    while i >= 0:
        yield i
        i = text.find("1", i + 1)


def _decides_over(other: PolicyRule, rule: PolicyRule) -> bool:
    """Would `other` decide every packet of `rule` that both match (making `rule` moot)?"""
    if other.is_time_bound and (other.duration_s, other.window) != (rule.duration_s, rule.window):
        return False
    if rule.reply and not other.reply:
        return False
    if rule.rate_pps is not None:
        return other.rate_pps is not None and other.rate_pps <= rule.rate_pps
    return True


def _subtract(
    box: tuple[int, int, int, int], cover: tuple[int, int, int, int]
) -> list[tuple[int, int, int, int]] | None:
    """box minus cover as disjoint boxes; None when they do not intersect."""
    if not all(a & b for a, b in zip(box, cover, strict=True)):
        return None
    out = []
    current = list(box)
    for dim in range(4):
        outside = current[dim] & ~cover[dim]
        if outside:
            piece = list(current)
            piece[dim] = outside
            out.append((piece[0], piece[1], piece[2], piece[3]))
            current[dim] &= cover[dim]
    return out


# The semantics of the last few policies asked for, by what it reads of them (rules,
# expects, the default's logging), the pinned addresses and the extra set: a long-running
# controller's quarantines, releases and grants compile and prove the same ordinary
# (uncarved) rules again and again, each time in new but equal objects. Read-only once made.
_RECENT: OrderedDict[tuple[object, ...], PolicySemantics] = OrderedDict()
_RECENT_MAX = 4
also_forget(_RECENT.clear)
# The same, by the identity of the rules and expectations (each holds its policy's).
_RECENT_IDS: OrderedDict[tuple[object, ...], PolicySemantics] = OrderedDict()
also_forget(_RECENT_IDS.clear)


def _renumbered(policy: Policy, made_from: tuple[object, ...]) -> PolicySemantics | None:
    """The semantics of `policy` from those of the same rules before they took their stable
    ids (compiler.allocation.assign_rule_ids; `check` made them), if they are at hand: the
    atoms and bit masks do not depend on ids."""
    originals = tuple(map(id, unnumbered(policy.rules)))
    for (rules, _expects, *rest), sem in reversed(_RECENT_IDS.items()):
        if rules == originals and tuple(rest) == made_from and sem.policy.expects == policy.expects:
            return sem.renumbered(policy)
    return None


def _carved(policy: Policy, pinned: tuple[int, ...]) -> PolicySemantics | None:
    """The semantics of a quarantine's carved policy from those of its rules before the
    carve, when at hand (the last proof's, or the compile's: any extra set only makes
    their atoms finer), by moving the carved rules' bits (:meth:`PolicySemantics.amended`)."""
    if policy.quarantine is None:
        return None
    plain = policy.uncarved()
    rules, expects = tuple(map(id, plain.rules)), tuple(map(id, plain.expects))
    for (r, e, log, held, _extra), sem in reversed(_RECENT_IDS.items()):
        if (r, e, log, held) == (rules, expects, plain.default_log, pinned):
            return sem.amended(policy)
    return None


def _appended(
    policy: Policy, pinned: tuple[int, ...], extra: Sequence[Interval] | None
) -> PolicySemantics | None:
    """The semantics of `policy` from those of a recent policy whose rules are its first
    ones, the same objects, with the same expectations (a grant's rules come after the
    policy's, as the controller's last compile held them): the rules after moved in
    (:meth:`PolicySemantics.amended`, port atoms split as their ports need)."""
    rules, expects = tuple(map(id, policy.rules)), tuple(map(id, policy.expects))
    for (r, e, log, held, more), sem in reversed(_RECENT_IDS.items()):
        if (
            (e, log, held, more) == (expects, policy.default_log, pinned, extra)
            and isinstance(r, tuple)
            and len(r) < len(rules)
            and rules[: len(r)] == r
        ):
            return sem.amended(policy)
    return None


def _same_objects(a: Sequence[object], b: Sequence[object]) -> bool:
    return a is b or (len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True)))


def around(policy: Policy, down_to: int) -> Policy:
    """`policy` cut down to what `dead_rules(down_to)`, and `overlapping_denies` of those
    rules, look at — the same answers from semantics made in a fraction of the time (a
    grant's check of its own effect, p4seg/verbs.py): the rules of ids from `down_to` up,
    and every rule whose addresses meet one of theirs on both sides (all their candidates,
    whatever the protocols and ports). Expectations are left out."""
    judged = [r for r in policy.rules if r.id >= down_to]
    kept = tuple(
        r
        for r in policy.rules
        if r.id >= down_to or any(r.src.meets(j.src) and r.dst.meets(j.dst) for j in judged)
    )
    return dataclasses.replace(policy, rules=kept, expects=())


def semantics_of(
    policy: Policy, pinned: tuple[int, ...], extra: Sequence[Interval] | None = None
) -> PolicySemantics:
    """PolicySemantics(policy, pinned, [extra]), made once for equal inputs.

    Found first by the identity of the rules and expectations, then by their value (equal
    rules in new objects: a quarantine's uncarved rules), then as the semantics `check` made
    for the same rules before they took their stable ids (`_renumbered`)."""
    same = (tuple(map(id, policy.rules)), tuple(map(id, policy.expects)))
    by_ids = (*same, policy.default_log, pinned, extra)
    found = _RECENT_IDS.get(by_ids)
    if found is not None:
        _RECENT_IDS.move_to_end(by_ids)
        return found
    key = (policy.rules, policy.expects, policy.default_log, pinned, extra)
    found = _RECENT.get(key)
    if found is not None:
        _RECENT.move_to_end(key)
    else:
        found = _renumbered(policy, (policy.default_log, pinned, extra))
        if found is None:
            found = _carved(policy, pinned)
        if found is None:
            found = _appended(policy, pinned, extra)
        if found is None:
            found = PolicySemantics(policy, pinned, sets=[extra] if extra is not None else ())
        _RECENT[key] = found
        if len(_RECENT) > _RECENT_MAX:
            _RECENT.popitem(last=False)
    if not (
        _same_objects(found.rules, policy.rules)
        and _same_objects(found.policy.expects, policy.expects)
    ):  # equal objects: these hold this policy's, whose ids the key names
        found = found.renumbered(policy)
    _RECENT_IDS[by_ids] = found
    if len(_RECENT_IDS) > _RECENT_MAX:
        _RECENT_IDS.popitem(last=False)
    return found
