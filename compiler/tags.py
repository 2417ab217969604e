"""Identity tags: how a ToR tells its `policy` table which endpoint sets an address is in.

Each ToR's identity tables give every address an *identity*: a vector of TAG_BITS bits cut
into fields of TAG_FIELD_BITS. Each endpoint set a rule names (its source or destination,
keyed by its normalised text) holds one *tag* on the ToRs that need it: a (field, value)
slot. An address carries value v in field f when it is in the set holding (f, v); the sets
sharing a field never share an address, so one field holds one value. A rule's entry then
matches its source tag and its destination tag as ternary slices of the two vectors:
one entry per rule (per protocol and port range) and ToR, however scattered its services
are — the size follows the rules, not the layout of the addresses.

Where exactness is needed. A ToR judges only packets from its hosts or to them. A set
used only by rules whose packets leave this rack (source side: the rule's destination has
no host here) need only be exact on this rack's hosts, and symmetrically; so a set is
tagged on its *universe* (all hosts, or every address, or just this rack's hosts), and two
sets may share a field when they are disjoint there. Sets equal on their universe share
one tag. `any` (every address) needs no match at all; a set that misses its universe
entirely makes the rule's entries unnecessary on this ToR. Only `any` goes unmatched: a set that happens to cover its universe still gets a tag, or a rule
that widens the universe would change the entries of every rule naming the set.

Stability. Tags are allocated with compiler.allocation: a set keeps its tag across
compiles as long as it stays disjoint from its field-mates; a new set takes the lowest free
slot; a freed slot is retired until the controller says no switch holds it any more.
Changing one rule therefore changes that rule's entries and the identity entries of the
addresses whose memberships changed — nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from compiler.allocation import SideTags, Tag
from compiler.semantics import bits
from p4src.spec import TAG_BITS, TAG_FIELD_BITS

FIELD_VALUES = (1 << TAG_FIELD_BITS) - 1  # value 0: in none of the field's sets
FIELD_MASK = FIELD_VALUES
MAX_FIELDS = TAG_BITS // TAG_FIELD_BITS


class TagSpaceError(Exception):
    """More fields are needed than the identity vector has (the pipeline's TAG_BITS)."""

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(f"needs {needed} tag fields, the pipeline has {available}")
        self.needed, self.available = needed, available


@dataclass(frozen=True, slots=True)
class SideCodes:
    """One side of one ToR: each key's match (a tag, ANY, or NONE) and each atom's vector."""

    of_key: Mapping[str, Tag | bool]  # a tag; ANY: every address here; NONE: none here
    vector_of_atom: Mapping[int, int]  # atoms with a non-zero vector
    fields: int  # fields in use

    def match(self, key: str) -> tuple[int, int] | bool:
        """(value, mask) over the vector; ANY: no match needed; NONE: matches nothing here."""
        code = self.of_key[key]
        if isinstance(code, bool):
            return code
        f, v = code
        shift = f * TAG_FIELD_BITS
        return v << shift, FIELD_MASK << shift


ANY, NONE = True, False


def allocate_side(
    needs: Mapping[str, tuple[int, int]],
    previous: SideTags,
    max_fields: int,
    everything: int,
    digest: Callable[[int], str] = str,
) -> tuple[SideCodes, SideTags]:
    """Tags for one side of one ToR.

    `needs`: key -> (atoms of the set, atoms of its universe); `previous`: what the last
    compile allocated; `everything`: the atoms of every address (a set that is all of them
    needs no match); `digest`: names a set of atoms by its addresses, the same from one
    compile to the next. Deterministic given all (keys are visited in sorted order).
    """
    of_key: dict[str, Tag | bool] = {}
    holders: dict[int, list[str]] = {}  # restricted set -> keys, in key order
    for key in sorted(needs):
        mask, universe = needs[key]
        restricted = mask & universe
        if mask == everything:
            of_key[key] = ANY
        elif not restricted:
            of_key[key] = NONE
        else:
            holders.setdefault(restricted, []).append(key)
    order = sorted(holders, key=lambda r: holders[r][0])
    # Keep each set's previous tag (the one most of its keys held), if still disjoint
    # from the sets kept before it in that field.
    kept: dict[int, Tag] = {}
    taken: set[Tag] = set()
    union: dict[int, int] = {}
    claims: dict[Tag, set[int]] = {}
    for restricted in order:
        for key in holders[restricted]:
            if (tag := previous.tags.get(key)) is not None:
                claims.setdefault(tag, set()).add(restricted)
    # A tag several keys shared stays with the set it stood for when its keys now stand for
    # different sets (a quarantine carves a piece out of a service: the piece moves).
    owner = {
        tag: next((r for r in sorted(rs) if digest(r) == previous.shared.get(tag)), None)
        for tag, rs in claims.items()
        if len(rs) > 1
    }
    for restricted in order:
        votes: dict[Tag, int] = {}
        for key in holders[restricted]:
            tag = previous.tags.get(key)
            if tag is not None and tag not in taken and owner.get(tag, restricted) == restricted:
                votes[tag] = votes.get(tag, 0) + 1
        if not votes:
            continue
        tag = min(votes, key=lambda t: (-votes[t], t))
        f = tag[0]
        if f >= max_fields or union.get(f, 0) & restricted:
            continue
        kept[restricted] = tag
        taken.add(tag)
        union[f] = union.get(f, 0) | restricted
    used: dict[int, set[int]] = {}  # slots held, retired, or being retired now
    for f, v in taken | set(previous.retired) | set(previous.tags.values()):
        used.setdefault(f, set()).add(v)
    fields = max((f + 1 for f, _ in taken), default=0)
    # New sets, largest first (first fit packs best that way), then by key.
    fresh = sorted(
        (r for r in order if r not in kept), key=lambda r: (-r.bit_count(), holders[r][0])
    )
    free = [
        [v for v in range(FIELD_VALUES, 0, -1) if v not in used.get(f, ())]
        for f in range(max_fields)
    ]  # per field, its free values, the lowest last
    open_fields = [f for f in range(max_fields) if free[f]]
    for restricted in fresh:
        found = next((f for f in open_fields if not union.get(f, 0) & restricted), None)
        if found is None:
            raise TagSpaceError(max_fields + 1, max_fields)
        slot = (found, free[found].pop())
        if not free[found]:
            open_fields.remove(found)
        kept[restricted] = slot
        union[found] = union.get(found, 0) | restricted
        fields = max(fields, found + 1)
    vectors: dict[int, int] = {}
    held: dict[str, Tag] = {}
    shared: dict[Tag, str] = {}
    for restricted, (f, v) in kept.items():
        for key in holders[restricted]:
            of_key[key] = held[key] = (f, v)
        if len(holders[restricted]) > 1:
            shared[(f, v)] = digest(restricted)
        part = v << (f * TAG_FIELD_BITS)
        for atom in bits(restricted):
            vectors[atom] = vectors.get(atom, 0) | part
    now = set(kept.values())
    retired = frozenset(previous.retired | {t for t in previous.tags.values() if t not in now})
    return SideCodes(of_key, vectors, fields), SideTags(held, retired, shared)
