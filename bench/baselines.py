"""What p4seg's policy entries are measured against: entry counts of simpler encodings.

The compiler writes one `policy` entry per rule and ToR (compiler.lower); these are
the counts the same policy would need without identities, on the same placement: each ToR
holds entries for the packets from or to its hosts — for a rule, (src ∩ local) x dst and
(src \\ local) x (dst ∩ local) — with the same reply entries (compiler.rule_entries.reply_matches).

- naive: one entry per host pair and single port (a rule without ports: one per pair);
- host pairs: one entry per host pair, port ranges kept as the compiler keeps them.

Figures for bench/ only: nothing here is compiled or written to a build.

    >>> from bench.gen_policy import generate
    >>> from compiler.check import check_policy
    >>> from compiler.inventory import parse_inventory
    >>> floor = generate(rules=60, services=20, hosts=40, tors=4)
    >>> inventory = parse_inventory(floor.inventory, "inventory.yaml")
    >>> policy = check_policy(floor.policy, "policy.zt", inventory).policy
    >>> total(baselines(policy, inventory))
    Baseline(switch='', naive=326313, host_pairs=6836)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from compiler.addresses import Interval
from compiler.inventory import Inventory
from compiler.model import ALL_PORTS, Action, Policy
from compiler.rule_entries import reply_matches
from compiler.semantics import PolicySemantics, bits


@dataclass(frozen=True, slots=True)
class Baseline:
    """A ToR's `policy` entries under the two simpler encodings ('' for a sum of ToRs)."""

    switch: str
    naive: int  # one per host pair and single port
    host_pairs: int  # one per host pair, port ranges kept


def baselines(policy: Policy, inventory: Inventory) -> tuple[Baseline, ...]:
    """Each ToR's baseline counts for a checked `policy` on `inventory`, by device id."""
    semantics = PolicySemantics(policy, pinned=(h.ip for h in inventory.hosts))
    part = semantics.addresses
    full = part.full
    hosts_in = [0] * part.count
    local_of: dict[str, int] = {}
    for host in inventory.hosts:
        atom = part.atom_of(host.ip)
        hosts_in[atom] += 1
        local_of[host.switch] = local_of.get(host.switch, 0) | 1 << atom
    counted: dict[int, int] = {}

    def hosts(mask: int) -> int:
        n = counted.get(mask)
        if n is None:
            n = counted[mask] = sum(hosts_in[a] for a in bits(mask))
        return n

    out = []
    for switch in sorted(inventory.switches, key=lambda s: s.device_id):
        if switch.role != "tor":
            continue
        local = local_of.get(switch.name, 0)
        naive = pairs = 0
        for rule, (_, src, dst, _) in zip(policy.rules, semantics.boxes, strict=True):
            if not (src & local or dst & local):
                continue  # no host of this rack is involved
            replies = reply_matches(rule, udp_always=rule.action is Action.DENY)
            for s, d, sport, dport in [(src, dst, ALL_PORTS, rule.ports)] + [
                (dst, src, m.sport, m.dport) for m in replies
            ]:
                n = hosts(s & local) * hosts(d) + hosts(s & ~local & full) * hosts(d & local)
                naive += n * _single_ports(sport) * _single_ports(dport)
                pairs += n * len(sport) * len(dport)
        out.append(Baseline(switch.name, naive, pairs))
    return tuple(out)


def total(per_tor: Iterable[Baseline]) -> Baseline:
    """The sum over ToRs."""
    rows = list(per_tor)
    return Baseline("", sum(b.naive for b in rows), sum(b.host_pairs for b in rows))


def _single_ports(ports: tuple[Interval, ...]) -> int:
    # No ports (every port) is one wildcard entry, not 65,536.
    return 1 if ports == ALL_PORTS else sum(hi - lo + 1 for lo, hi in ports)
