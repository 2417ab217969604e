"""How long `p4seg verify` takes to prove a floor's tables: figures, never asserted.

    python -m bench.bench_verify            # the trading floor, then generated floors
    python -m bench.bench_verify --quick    # the trading floor and the smallest generated one
    python -m bench.bench_verify --edits    # only the chains of one-rule edits (no full proof)
    python -m bench.bench_verify --by-pairs # also every pair walked on the 10k floor (minutes)

For each floor: compile (ref target) as the baseline measured in the same run, then verify
(rule by rule per ToR, what that leaves pair by pair, and the spoofing classes), and on
floors of up to 1,000 rules the proof by pairs alone next to it. Target (issue 7): under
10 s for the trading floor and for a generated 10k-rule policy on a 48-ToR inventory.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from bench.bench_compile import ALLOW
from bench.gen_policy import generate
from compiler.check import check_policy
from compiler.emit import Build, build
from compiler.fit import CapacityError
from compiler.inventory import Inventory, load_inventory, parse_inventory
from compiler.model import ALL_PORTS, Policy
from compiler.protocols import MAX_PORT
from compiler.verify import DERIVED, VerifyResult, differential_scope, proof_record, verify

TARGET_S = 10.0
BY_PAIRS_UP_TO = 1_000  # rules: larger floors are proven by pairs only with --by-pairs
BIG_POLICY_TABLE = 65_536
ROOT = Path(__file__).resolve().parent.parent


def run(
    name: str,
    policy_text: str,
    inventory: Inventory,
    edits_only: bool = False,
    by_pairs: bool = False,
) -> None:
    checked = check_policy(policy_text, "policy.zt", inventory, expectations=False)
    assert checked.policy is not None, checked.diagnostics
    sizes = None
    try:
        build(checked.policy, inventory, policy_text, "ref")
    except CapacityError:  # the 10k floor's busiest ToRs: a larger policy table, as --size
        sizes = {"policy": BIG_POLICY_TABLE}
    start = time.perf_counter()
    built = build(checked.policy, inventory, policy_text, "ref", sizes)
    t_build = time.perf_counter() - start
    if edits_only:  # the full proof of a 10k-rule floor takes minutes
        print(f"\n== {name}: {len(checked.policy.rules)} rules, {len(inventory.hosts)} hosts, "
              f"{len(inventory.switches)} switches (no full proof: --edits)")  # fmt: skip
        print(f"   {'compile (baseline)':<22}{t_build:8.2f} s   1.00x")
        _edit_chain(
            checked.policy, policy_text, inventory, sizes, built, t_build, "the full compile"
        )
        return
    switches = {s.switch: s for s in built.switches}
    result = verify(checked.policy, inventory, switches)
    print(f"\n== {name}: {len(checked.policy.rules)} rules, {len(inventory.hosts)} hosts, "
          f"{len(inventory.switches)} switches")  # fmt: skip
    print(f"   {'compile (baseline)':<22}{t_build:8.2f} s   1.00x")
    by = result.by_rules
    assert by is not None
    print(
        f"   {'verify':<22}{result.seconds:8.2f} s   {result.seconds / t_build:5.2f}x   "
        f"{by.tors} ToRs rule by rule ({by.checks} rule checks, {by.entries} entries), "
        f"{by.left_pairs()} pairs left ({result.classes} packet classes), "
        f"{result.spoof_classes} spoofing classes: {_verdict(result)}"
        f"   (target < {TARGET_S:g} s: {'met' if result.seconds < TARGET_S else 'MISSED'})"
    )
    if by_pairs or len(checked.policy.rules) <= BY_PAIRS_UP_TO:
        exact = verify(checked.policy, inventory, switches, exact=True)
        print(
            f"   {'verify --by-pairs':<22}{exact.seconds:8.2f} s   {exact.seconds / t_build:5.2f}x"
            f"   {exact.classes} packet classes: {_verdict(exact)}"
        )
    _one_rule_edit(checked.policy, inventory, policy_text, sizes, built, result.seconds)
    _edit_chain(
        checked.policy, policy_text, inventory, sizes, built, result.seconds, "the full proof"
    )


def _how(result: VerifyResult) -> str:
    by = result.by_rules
    if by is None:
        return f"by pairs ({result.pairs} pairs)"
    return f"rule by rule from the last proof ({by.tors} ToRs, {result.pairs} pairs left)"


def _verdict(result: VerifyResult) -> str:
    return "proven" if result.proven else f"{len(result.counterexamples)} counterexamples"


def _one_rule_edit(
    policy: Policy,
    inventory: Inventory,
    policy_text: str,
    sizes: dict[str, int] | None,
    built: Build,
    full_s: float,
) -> None:
    """A one-rule edit (the last rule with ports gets the next port too) after a proven
    build: its differential proof, next to the full proof of the same run."""
    rule = next(
        (r for r in reversed(policy.rules) if r.ports != ALL_PORTS and r.proto == "tcp"), None
    )
    if rule is None:
        return
    lo, hi = rule.ports[-1]
    edited = dataclasses.replace(rule, ports=(*rule.ports[:-1], (lo, min(hi + 1, MAX_PORT))))
    new_policy = dataclasses.replace(
        policy, rules=tuple(edited if r is rule else r for r in policy.rules)
    )
    start = time.perf_counter()
    rebuilt = build(new_policy, inventory, policy_text, "ref", sizes, built.allocation, built)
    t_build = time.perf_counter() - start
    old = {s.switch: s for s in built.switches}
    new = {s.switch: s for s in rebuilt.switches}
    roles = {s.name: s.role for s in inventory.switches}
    scope = differential_scope(
        proof_record(policy, inventory, old), proof_record(new_policy, inventory, new), roles
    )
    # As the long-running controller that proved the old build just now: rule by rule from
    # its ToRs' proofs (compiler/rule_proof.py), and by pairs with what the proof derived
    # from each switch at hand (DERIVED).
    previous = (policy, inventory, old)
    t_rules, by_rules = _timed(lambda: verify(new_policy, inventory, new, previous=previous))
    t_warm, warm = _timed(lambda: verify(new_policy, inventory, new, previous=previous, exact=True))
    # The rest as a new process would: nothing derived before.
    DERIVED.clear()
    t_tors, result = _timed(lambda: verify(new_policy, inventory, new, scope))
    what = "full (no scope)" if scope is None else f"on {len(scope)} ToR(s), rule by rule"
    print(
        f"   one-rule edit: compile {t_build:.2f} s (incremental), differential verify "
        f"by ToRs {t_tors:.2f} s {what}, {t_tors / full_s:.2f}x the full proof: "
        f"{_verdict(result)}"
    )
    by = by_rules.by_rules
    how = "by pairs" if by is None else f"rule by rule from the last proof ({by.tors} ToRs)"
    print(
        f"   {'':<15}differential verify {how}, long-running {t_rules:.3f} s, "
        f"{t_rules / full_s:.3f}x the full proof: {_verdict(by_rules)} "
        f"(target < 0.1 s: {'met' if t_rules < 0.1 else 'MISSED'})"
    )
    DERIVED.clear()
    t_pairs, pairs = _timed(
        lambda: verify(new_policy, inventory, new, previous=previous, exact=True)
    )
    for label, t, r in (("", t_pairs, pairs), (", long-running", t_warm, warm)):
        print(
            f"   {'':<15}differential verify by pairs{label} {t:.3f} s ({r.pairs} (sender, "
            f"destination) pairs, {r.classes} packet classes; setup included), "
            f"{t / full_s:.3f}x the full proof: {_verdict(r)}"
        )


def _edit_chain(
    first: Policy,
    policy_text: str,
    inventory: Inventory,
    sizes: dict[str, int] | None,
    built: Build,
    base_s: float,
    base: str,
) -> None:
    """A long-running controller's one-rule edits, each a new text: the middle single-port
    allow between two services gets port + 1, + 2, ... Each is checked as the verbs check
    it (errors only; the semantics it makes are the proof's), built from the last build and
    proven against it (rule by rule from its proof). Medians of the chain, its first edit
    left out."""
    allows = list(ALLOW.finditer(policy_text))
    if len(allows) < 3:
        return
    edit = allows[len(allows) // 2]
    times: dict[str, list[float]] = {"check": [], "compile": [], "proof": []}
    last, last_policy = built, first
    result = None
    for step in range(1, 6):
        line = f"{edit[1]}{edit[2]}{edit[3]}{int(edit[4]) + step}{edit[5]}"
        text = policy_text[: edit.start()] + line + policy_text[edit.end() :]
        start = time.perf_counter()
        policy = check_policy(text, "policy.zt", inventory, warnings=False).policy
        times["check"].append(time.perf_counter() - start)
        assert policy is not None, "the edited policy must check clean"
        start = time.perf_counter()
        new = build(policy, inventory, text, "ref", sizes, last.allocation, last)
        times["compile"].append(time.perf_counter() - start)
        old = {s.switch: s for s in last.switches}
        switches = {s.switch: s for s in new.switches}
        start = time.perf_counter()
        result = verify(policy, inventory, switches, previous=(last_policy, inventory, old))
        times["proof"].append(time.perf_counter() - start)
        last, last_policy = new, policy
    assert result is not None
    medians = {k: statistics.median(v[1:]) for k, v in times.items()}
    print(
        f"   one-rule edits of `{' '.join(edit[0].split())}`, each a new text (median of 4 after "
        f"the first): check {medians['check'] * 1e3:.0f} ms, compile {medians['compile'] * 1e3:.0f} "
        f"ms (incremental; target < 50 ms: {'met' if medians['compile'] < 0.05 else 'MISSED'}), "
        f"differential proof {_how(result)} {medians['proof'] * 1e3:.0f} ms "
        f"({medians['proof'] / base_s:.4f}x {base}): "
        f"{'proven' if result.proven else 'NOT proven'} (target < 0.1 s: "
        f"{'met' if medians['proof'] < 0.1 else 'MISSED'})"
    )


def _timed(fn: Callable[[], VerifyResult]) -> tuple[float, VerifyResult]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="the trading floor and 100 rules only")
    p.add_argument(
        "--floor",
        metavar="RULES,SERVICES,HOSTS,TORS",
        action="append",
        help="generated floors to run instead of the default ones (repeatable)",
    )
    p.add_argument(
        "--edits",
        action="store_true",
        help="only the chain of one-rule edits on each floor (no full proof: minutes at 10k)",
    )
    p.add_argument(
        "--by-pairs",
        action="store_true",
        help="also walk every pair on floors over 1,000 rules (the 10k floor: minutes)",
    )
    args = p.parse_args()
    floor, _ = load_inventory(str(ROOT / "topologies" / "trading_floor.yaml"))
    run(
        "trading floor",
        (ROOT / "policies" / "trading_floor.zt").read_text(),
        floor,
        args.edits,
        args.by_pairs,
    )
    sizes = (
        [(100, 50, 100, 8)]
        if args.quick
        else [(100, 50, 100, 8), (1_000, 200, 300, 16), (10_000, 1_000, 1_000, 48)]
    )
    if args.floor:
        sizes = []
        for f in args.floor:
            rules, services, hosts, tors = (int(x) for x in f.split(","))
            sizes.append((rules, services, hosts, tors))
    for rules, services, hosts, tors in sizes:
        g = generate(rules=rules, services=services, hosts=hosts, tors=tors)
        inventory = parse_inventory(g.inventory, "inventory.yaml")
        run(f"generated {rules} rules", g.policy, inventory, args.edits, args.by_pairs)


if __name__ == "__main__":
    main()
