"""Stable numbers across policy versions: rule ids and identity tags, allocated once and kept.

Like Cilium's numeric security identities, a number is keyed by what it names and keeps
its value from one compile to the next; a new key takes a free number, and a number freed
by a removed key is *retired* — never handed out again until every switch has left the
version that used it (the controller says so with :meth:`Allocation.settled`). The
allocation is an input and an output of every compile, and the compile is deterministic
given it: the same policy, inventory and allocation always give the same entries.

- rules: a rule's stable key (its name, else a hash of its normalised text and
  occurrence) -> its rule id, which is also its priority slot (compiler.lower) and the id
  alerts and counters report.
- tags: per ToR and per side (`src`, `dst`), an endpoint set's key (its normalised text)
  -> its tag: a (field, value) slot of the identity vector the ToR's identity tables
  set (compiler.tags).

Stored as JSON (`allocation.json` in a build and in the controller's state directory).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from compiler.diagnostics import P4segError, error
from compiler.memo import ByObject, also_forget, differing_places
from compiler.model import Policy, PolicyRule
from p4src.spec import TAG_BITS, TAG_FIELD_BITS

FORMAT = "p4seg-allocation/1"

Tag = tuple[int, int]  # (field, value)
MAX_RULE_ID = 0xFFFE  # 0 is the default deny, 0xFFFF the fabric's permit


class AllocationError(ValueError):
    """An allocation file that cannot be used (bad JSON, wrong format, bad numbers)."""


class RuleIdsExhausted(P4segError):
    """Every rule id is held or retired: no id for a new rule (E504)."""


@dataclass(frozen=True, slots=True)
class SideTags:
    """One side (`src` or `dst`) of one ToR: endpoint-set key -> tag."""

    tags: Mapping[str, Tag] = field(default_factory=dict)
    retired: frozenset[Tag] = frozenset()
    shared: Mapping[Tag, str] = field(default_factory=dict)  # a tag several keys hold -> its set


def _side_json(t: SideTags) -> str:
    return json.dumps(
        {
            "tags": {k: list(v) for k, v in sorted(t.tags.items())},
            "retired": sorted(list(r) for r in t.retired),
            "shared": [[*r, d] for r, d in sorted(t.shared.items())],
        }
    )


# Per SideTags object: its JSON. A compile hands the sides of the switches it did not
# change on as the same objects; a quarantine's allocation changed one side of 100.
_SIDE_JSON: ByObject[SideTags, str] = ByObject(16)


@dataclass(frozen=True, slots=True)
class Allocation:
    rules: Mapping[str, int] = field(default_factory=dict)
    retired_rules: frozenset[int] = frozenset()
    tags: Mapping[tuple[str, str], SideTags] = field(default_factory=dict)  # (switch, side)

    def settled(self) -> Allocation:
        """The same allocation once no switch holds a retired number any more: they are free.
        Itself when nothing is retired, and each side without retired tags as the same
        object (its JSON is made once per object)."""
        if not self.retired_rules and not any(v.retired for v in self.tags.values()):
            return self
        return Allocation(
            self.rules,
            frozenset(),
            {
                k: SideTags(v.tags, frozenset(), v.shared) if v.retired else v
                for k, v in self.tags.items()
            },
        )

    def to_json(self) -> str:
        """The allocation as JSON (allocation.json), made once per object: a build and the
        controller's state both write it."""
        return _JSON.get(self, Allocation._json)

    def _json(self) -> str:
        # One line per rule and per switch side: readable, diffable, and only the C encoder
        # runs (`indent` switches json to its pure-Python one: seconds on a large floor).
        rules = ",\n".join(f"  {json.dumps(k)}: {v}" for k, v in sorted(self.rules.items()))
        _SIDE_JSON.hold(len(self.tags))
        tags = ",\n".join(
            f"  {json.dumps(f'{switch}/{side}')}: " + _SIDE_JSON.get(t, _side_json)
            for (switch, side), t in sorted(self.tags.items())
        )
        return (
            f'{{\n"format": {json.dumps(FORMAT)},\n'
            f'"retired_rules": {json.dumps(sorted(self.retired_rules))},\n'
            f'"rules": {{\n{rules}\n}},\n"tags": {{\n{tags}\n}}\n}}\n'
        )

    @staticmethod
    def from_json(text: str, source: str = "allocation.json") -> Allocation:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AllocationError(f"{source}:{exc.lineno}:{exc.colno}: {exc.msg}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise AllocationError(f"{source}: not a p4seg allocation (format {FORMAT!r})")
        try:
            rules = {str(k): _number(v, 1, 0xFFFE) for k, v in doc.get("rules", {}).items()}
            if len(set(rules.values())) != len(rules):
                raise AllocationError(f"{source}: two rule keys share one rule id")
            retired = frozenset(_number(v, 1, 0xFFFE) for v in doc.get("retired_rules", []))
            tags: dict[tuple[str, str], SideTags] = {}
            for name, side in doc.get("tags", {}).items():
                switch, _, which = str(name).rpartition("/")
                if which not in ("src", "dst") or not switch:
                    raise AllocationError(f"{source}: bad tag table name {name!r}")
                # Keys whose sets are equal where it matters share one tag (compiler.tags).
                held = {str(k): _tag(v) for k, v in side.get("tags", {}).items()}
                shared = {_tag(v[:2]): str(v[2]) for v in side.get("shared", []) if len(v) == 3}
                tags[(switch, which)] = SideTags(
                    held, frozenset(_tag(v) for v in side.get("retired", [])), shared
                )
        except (AttributeError, TypeError) as exc:
            raise AllocationError(f"{source}: malformed allocation ({exc})") from None
        return Allocation(rules, retired, tags)


def _number(value: object, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise AllocationError(f"expected an integer in {lo}..{hi}, got {value!r}")
    return value


def _tag(value: object) -> Tag:
    if not isinstance(value, list) or len(value) != 2:
        raise AllocationError(f"expected a tag [field, value], got {value!r}")
    return _number(value[0], 0, TAG_BITS // TAG_FIELD_BITS - 1), _number(
        value[1], 1, (1 << TAG_FIELD_BITS) - 1
    )


_JSON: ByObject[Allocation, str] = ByObject(4)


def assign_rule_ids(policy: Policy, allocation: Allocation) -> tuple[Policy, Allocation]:
    """Give every rule of `policy` its stable id, and the allocation that records them.

    A key the allocation holds keeps its id; a new key takes, in file order, the lowest
    id that is neither held nor retired; the ids of keys the policy no longer has are
    retired (see :meth:`Allocation.settled`). With an empty allocation the ids are the
    file positions. Deterministic: the same policy and allocation give the same ids.
    Raises RuleIdsExhausted (nothing assigned) when a new rule finds no free id.
    """
    found = _by_difference(policy.rules, allocation)
    if found is None:
        found = _in_full(policy.rules, allocation)
    rules, out = found
    _LAST[:] = [_Assigned(policy.rules, rules, out)]
    return dataclasses.replace(policy, rules=rules), out


@dataclass(frozen=True, slots=True)
class _Assigned:
    """The last `assign_rule_ids`: the rules it was given, the rules with their ids, and
    the allocation it made (the next one, given that allocation and a policy whose rules
    are mostly the same objects at the same places, works by difference)."""

    given: tuple[PolicyRule, ...]
    rules: tuple[PolicyRule, ...]
    allocation: Allocation
    places: dict[str, int] = field(default_factory=dict)  # key -> place, made when first asked

    def place_of(self, key: str) -> int | None:
        if not self.places:
            self.places.update((r.key, i) for i, r in enumerate(self.given))
        return self.places.get(key)


_LAST: list[_Assigned] = []
also_forget(_LAST.clear)
_MOST_CHANGED = 16  # rules at other places than the last call's: more, and it works in full


def _by_difference(
    given: tuple[PolicyRule, ...], allocation: Allocation
) -> tuple[tuple[PolicyRule, ...], Allocation] | None:
    """`_in_full`, from the last call when `allocation` is the one it made and `given`
    differs from its rules at a few places (the same count): the other rules keep their
    keys and ids; a changed place's old key is retired unless the new rule has it, and
    each new key takes, in file order, the lowest id neither held nor retired — all that
    the full assignment would do. None: assign in full."""
    last = _LAST[0] if _LAST else None
    if last is None or last.allocation is not allocation or len(last.given) != len(given):
        return None
    before = last.given
    moved = differing_places(before, given)
    if len(moved) > _MOST_CHANGED:
        return None
    gone = {before[i].key for i in moved}
    came = [given[i].key for i in moved]
    if "" in came or len(set(came)) != len(came):
        return None  # `_in_full` says what is wrong
    for key in came:
        if key not in gone and last.place_of(key) is not None:
            return None  # another rule's key: two rules with one key
    ids = dict(allocation.rules)
    retired = set(allocation.retired_rules)
    for key in gone - set(came):
        retired.add(ids.pop(key))
    taken = set(allocation.rules.values()) | retired
    candidate = 1
    rules = list(last.rules)
    for i in moved:  # in file order
        r = given[i]
        if r.key not in ids:
            while candidate in taken:
                candidate += 1
            if candidate > MAX_RULE_ID:
                return None  # `_in_full` reports it
            ids[r.key] = candidate
            taken.add(candidate)
        rules[i] = _with_id(r, ids[r.key])
    return tuple(rules), Allocation(ids, frozenset(retired), allocation.tags)


def _in_full(
    given: tuple[PolicyRule, ...], allocation: Allocation
) -> tuple[tuple[PolicyRule, ...], Allocation]:
    keys = {r.key for r in given}
    if len(keys) != len(given) or "" in keys:  # resolve keys every rule, uniquely
        raise ValueError("rules without a key, or two rules with one key")
    kept = {k: v for k, v in allocation.rules.items() if k in keys}
    retired = set(allocation.retired_rules) | {
        v for k, v in allocation.rules.items() if k not in keys
    }
    taken = set(kept.values()) | retired
    ids = dict(kept)
    candidate = 1
    for r in given:
        if r.key in ids:
            continue
        while candidate in taken:
            candidate += 1
        if candidate > MAX_RULE_ID:
            new = sum(r.key not in kept for r in given)
            raise RuleIdsExhausted(
                [
                    error(
                        "E504",
                        f"no free rule id for {r.label} `{r.describe()}`: {len(kept)} rules "
                        f"keep theirs, {len(retired)} are retired and {new} are new, of "
                        f"{MAX_RULE_ID}; apply to every switch so that retired ids are freed",
                        r.span,
                    )
                ]
            )
        ids[r.key] = candidate
        taken.add(candidate)
    rules = tuple(_with_id(r, ids[r.key]) for r in given)
    return rules, Allocation(ids, frozenset(retired), allocation.tags)


def _with_id(rule: PolicyRule, rule_id: int) -> PolicyRule:
    """`rule` with its stable id: the same object when it has it, and the same copy for
    the same rule object (a long-running controller's effective policies share most of
    their rule objects, build after build)."""
    if rule.id == rule_id:
        return rule
    found = _WITH_IDS.get(id(rule))
    if found is not None and found[0] is rule and found[1].id == rule_id:
        return found[1]
    out = dataclasses.replace(rule, id=rule_id)
    if len(_WITH_IDS) >= _WITH_IDS_MAX:
        _WITH_IDS.clear()
        _ORIGINALS.clear()
    _WITH_IDS[id(rule)] = (rule, out)  # holds `rule`: its id stays its own while remembered
    _ORIGINALS[id(out)] = (out, rule)
    return out


def unnumbered(rules: tuple[PolicyRule, ...]) -> tuple[PolicyRule, ...]:
    """The rules `assign_rule_ids` was given for these (each the same object when it kept
    its id, or when its copy is no longer remembered): the resolved policy's, whose
    semantics `check` made already (compiler.semantics.semantics_of)."""
    originals = _ORIGINALS
    return tuple(
        found[1] if (found := originals.get(id(r))) is not None and found[0] is r else r
        for r in rules
    )


_WITH_IDS: dict[int, tuple[PolicyRule, PolicyRule]] = {}
_ORIGINALS: dict[int, tuple[PolicyRule, PolicyRule]] = {}  # by id of a copy: (copy, rule)
_WITH_IDS_MAX = 100_000
also_forget(_WITH_IDS.clear)
also_forget(_ORIGINALS.clear)
