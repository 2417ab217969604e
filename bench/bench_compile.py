"""How long `p4seg compile` takes and how many entries it writes: figures, never asserted.

    python -m bench.bench_compile            # 1k and 10k rules, 1k hosts, 48 ToRs
    python -m bench.bench_compile --quick    # the 1k-rule case, one run

For each generated floor (bench/gen_policy.py) it times lower (policy -> per-switch entries)
and the whole build (lower + fit + render + P4Info + files as text) for the ref and tofino
targets, with the check of the same policy, measured in the same run, as the baseline.
Entries are compared (bench/baselines.py), on the same placement (each ToR: packets from or
to its hosts, with the same reply entries), with a host-pair x single-port expansion, and
with the stricter one entry per host pair with port ranges kept. Targets (issue 3): the 10k-rule build in
under 2 s, and at least 10x fewer policy entries than the naive expansion.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

from bench.baselines import baselines, total
from bench.gen_policy import generate
from compiler.check import check_policy
from compiler.emit import build
from compiler.inventory import parse_inventory
from compiler.lower import lower

T = TypeVar("T")
TARGET_S = 2.0
TARGET_REDUCTION = 10.0


def timed(fn: Callable[[], T], repeat: int) -> tuple[float, T]:
    runs, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - start)
    assert result is not None
    return statistics.median(runs), result


def run_case(
    rules: int, services: int, hosts: int, tors: int, repeat: int, targets: tuple[str, ...]
) -> None:
    floor = generate(rules=rules, services=services, hosts=hosts, tors=tors)
    inventory = parse_inventory(floor.inventory, "inventory.yaml")
    print(
        f"\n== {floor.rules} rules, {floor.services} services, {hosts} hosts, {tors} ToRs (median of {repeat})"
    )
    t_check, checked = timed(lambda: check_policy(floor.policy, "policy.zt", inventory), repeat)
    policy = checked.policy
    assert policy is not None, "the generated policy must check clean"
    print(f"   {'check (baseline)':<34}{t_check:8.3f} s    1.00x")
    t_lower, (groups_of, switches) = timed(lambda: lower(policy, inventory), repeat)
    most = max(g.count for g in groups_of.values())
    print(
        f"   {'lower':<34}{t_lower:8.3f} s   {t_lower / t_check:5.2f}x   (up to {most} groups on a ToR)"
    )
    for target in targets:
        t_build, built = timed(
            functools.partial(
                build,
                policy,
                inventory,
                floor.policy,
                target,
                {
                    "policy": 1 << 20,
                    "src_identity": 1 << 16,
                    "dst_identity": 1 << 16,
                    "routing": 1 << 16,
                },
            ),
            repeat,
        )
        tor_policy = [len(sw.table("policy")) for sw in built.switches if sw.role == "tor"]
        entries = sum(tor_policy)
        verdict = "under" if t_build < TARGET_S else "OVER"
        print(
            f"   {'build --target ' + target:<34}{t_build:8.3f} s   {t_build / t_check:5.2f}x   "
            f"{verdict} the {TARGET_S:.0f} s target; policy entries {entries} (max {max(tor_policy)} on one ToR)"
        )
    baseline = total(baselines(policy, inventory))
    naive, pairs = baseline.naive, baseline.host_pairs
    ref_total = sum(len(sw.table("policy")) for sw in switches if sw.role == "tor")
    ratio = naive / ref_total if ref_total else float("inf")
    mark = "meets" if ratio >= TARGET_REDUCTION else "MISSES"
    print(
        f"   host-pair x single-port expansion, same placement: {naive} entries -> {ratio:.1f}x "
        f"p4seg's {ref_total} ({mark} the {TARGET_REDUCTION:.0f}x target)"
    )
    print(
        f"   stricter, one entry per host pair with port ranges kept: {pairs} -> {pairs / ref_total:.1f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="the 1k-rule case only, one run")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    repeat = 1 if args.quick else args.repeat
    run_case(1_000, 200, 1_000, 48, repeat, ("ref", "tofino"))
    if not args.quick:
        # Tofino's ternary expansion of the 10k case takes minutes: the ref build shows the scale.
        run_case(10_000, 1_000, 1_000, 48, repeat, ("ref",))


if __name__ == "__main__":
    main()
