"""A spine going down: what it costs to route around it. Figures, never asserted.

    python -m bench.bench_spines            # 1k rules, 1k hosts, 48 ToRs; 2 and 4 spines
    python -m bench.bench_spines --quick    # 2 spines, one run

For a generated floor (bench/gen_policy.py) it builds the policy, then the build with one
spine down given the first (incremental: what `watch` does when a spine stops answering)
and, as the baseline measured in the same run, the same build from scratch. It prints how
the destinations spread over the spines, what the spine's death changes (routing entries
per ToR, anything else), and the full proof of the result (compiler/verify.py). The time
a real floor takes to recover (detection + this + the apply) is measured in Mininet by
tests/test_spines_mininet.py and printed there.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from typing import TypeVar

from bench.bench_compile import timed
from bench.gen_policy import generate
from compiler.allocation import Allocation, assign_rule_ids
from compiler.check import check_policy
from compiler.emit import Build, build
from compiler.inventory import parse_inventory
from compiler.lower import lower
from compiler.verify import verify

T = TypeVar("T")
SIZES = {"policy": 1 << 20, "src_identity": 1 << 16, "dst_identity": 1 << 16, "routing": 1 << 16}


def run_case(spines: int, repeat: int) -> None:
    floor = generate(rules=1_000, services=200, hosts=1_000, tors=48, spines=spines)
    inventory = parse_inventory(floor.inventory, "inventory.yaml")
    checked = check_policy(floor.policy, "policy.zt", inventory).policy
    assert checked is not None, "the generated policy must check clean"
    policy, allocation = assign_rule_ids(checked, Allocation())
    print(f"\n== {len(policy.rules)} rules, {len(inventory.hosts)} hosts, 48 ToRs, {spines} "
          f"spines (median of {repeat})")  # fmt: skip
    first = build(policy, inventory, floor.policy, "ref", SIZES, allocation)
    uplinks = {(k.a, k.a_port): k.b for k in inventory.links} | {
        (k.b, k.b_port): k.a for k in inventory.links
    }

    def carried(b: Build) -> Counter[str]:
        return Counter(
            uplinks[(sw.switch, dict(e.params)["port"])]
            for sw in b.switches
            if sw.role == "tor"
            for e in sw.table("routing")
            if (sw.switch, dict(e.params)["port"]) in uplinks
        )

    print(f"   routes per spine, all ToRs: {dict(sorted(carried(first).items()))}")
    dead = sorted(s.name for s in inventory.switches if s.role == "spine")[0]
    gone = inventory.with_down([dead])
    alloc = first.allocation
    t_lower_full, _ = timed(lambda: lower(policy, gone, alloc), repeat)
    t_lower, _ = timed(lambda: lower(policy, gone, alloc, first.lowered), repeat)
    t_full, full = timed(lambda: build(policy, gone, floor.policy, "ref", SIZES, alloc), repeat)
    t_incr, incr = timed(
        lambda: build(policy, gone, floor.policy, "ref", SIZES, alloc, previous=first), repeat
    )
    assert [s.entries for s in incr.switches] == [s.entries for s in full.switches]
    for what, t, base in (
        ("lower, from scratch (baseline)", t_lower_full, t_lower_full),
        ("lower, given the last build", t_lower, t_lower_full),
        ("build, from scratch (baseline)", t_full, t_full),
        ("build, given the last build", t_incr, t_full),
    ):
        print(f"   {dead + ' down: ' + what:<46}{t:8.3f} s   {t / base:5.2f}x")
    before = {s.switch: set(s.entries) for s in first.switches}
    moved: Counter[str] = Counter()  # switch -> routing entries rewritten
    others: Counter[str] = Counter()  # table -> entries added or removed, routing aside
    for sw in incr.switches:
        now = set(sw.entries)
        moved[sw.switch] += sum(1 for e in now - before[sw.switch] if e.table == "routing")
        others.update(e.table for e in now ^ before[sw.switch] if e.table != "routing")
    per_tor = [n for n in moved.values() if n]
    print(f"   changed: routing on {len(per_tor)} switches, rewritten per ToR median "
          f"{statistics.median(per_tor):.0f}, max {max(per_tor)} of {len(inventory.hosts)} "
          f"routes; other tables: {dict(others) or 'nothing'}")  # fmt: skip
    print(f"   routes per spine after: {dict(sorted(carried(incr).items()))}")
    t_proof, proof = timed(lambda: verify(policy, gone, {s.switch: s for s in incr.switches}), 1)
    by = proof.by_rules
    how = f"{by.tors} ToRs rule by rule, " if by is not None else ""
    print(f"   full proof with {dead} down: {'PROVEN' if proof.proven else 'NOT PROVEN'} "
          f"in {t_proof:.2f} s ({how}{proof.classes} packet classes by pairs)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 spines, one run")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    for spines in (2,) if args.quick else (2, 4):
        run_case(spines, 1 if args.quick else args.repeat)


if __name__ == "__main__":
    main()
