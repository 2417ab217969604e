"""How long `p4seg compile` takes and how many entries it writes: figures, never asserted.

    python -m bench.bench_compile            # 1k and 10k rules, 1k hosts, 48 ToRs
    python -m bench.bench_compile --quick    # the 1k-rule case, one run

For each generated floor (bench/gen_policy.py) it times lower (policy -> per-switch entries)
and the whole build (lower + fit + render + P4Info + files as text) for the ref and tofino
targets, with the check of the same policy, measured in the same run, as the baseline, and
prints the identity tag fields used (of the 64 of the 256-bit vector, compiler/tags.py) and
the tofino build's TCAM estimate for `policy`. Entries are compared (bench/baselines.py), on
the same placement (each ToR: packets from or to its hosts, with the same reply entries),
with a host-pair x single-port expansion, and with the stricter one entry per host pair with
port ranges kept. Targets (issue 3): the 10k-rule build in under 2 s, and at least 10x fewer
policy entries than the naive expansion.

A one-rule edit (one rule's destination and port changed) is compiled with the previous
build's allocation (`build(..., allocation=previous.allocation)`: what the build's
allocation.json is kept for) and, as the baseline, without it: the entries that differ from
the previous build's, per ToR (the set difference both ways), are what a controller rewrites.
"""

from __future__ import annotations

import argparse
import functools
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench.baselines import baselines, total
from bench.gen_policy import generate
from compiler.check import check_policy
from compiler.emit import Build, build, tofino_resources
from compiler.inventory import Inventory, parse_inventory
from compiler.lower import lower
from compiler.memo import forget
from compiler.model import Policy
from compiler.targets import make_target
from p4src.spec import TAG_BITS

T = TypeVar("T")
TARGET_S = 2.0
TARGET_REDUCTION = 10.0
FIELDS = TAG_BITS // 4
SIZES = {"policy": 1 << 20, "src_identity": 1 << 16, "dst_identity": 1 << 16, "routing": 1 << 16}
# A single-port allow between two services: the edit moves it to another service and port.
ALLOW = re.compile(r"^(allow\s+\S+\s+->\s+)(\S+)(\s+tcp\s+)(\d+)(\s*)$", re.MULTILINE)


def timed(
    fn: Callable[[], T], repeat: int, setup: Callable[[], object] | None = None
) -> tuple[float, T]:
    runs, result = [], None
    for _ in range(repeat):
        if setup is not None:
            setup()
        start = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - start)
    assert result is not None
    return statistics.median(runs), result


def checked(text: str, inventory: Inventory) -> Policy:
    policy = check_policy(text, "policy.zt", inventory).policy
    assert policy is not None, "the generated policy must check clean"
    return policy


def run_case(
    rules: int, services: int, hosts: int, tors: int, repeat: int, targets: tuple[str, ...]
) -> None:
    floor = generate(rules=rules, services=services, hosts=hosts, tors=tors)
    inventory = parse_inventory(floor.inventory, "inventory.yaml")
    print(
        f"\n== {floor.rules} rules, {floor.services} services, {hosts} hosts, {tors} ToRs (median of {repeat})"
    )
    # as a new process checks it (a long-running one finds an unchanged text's rules again)
    t_check, policy = timed(lambda: checked(floor.policy, inventory), repeat, forget)
    print(f"   {'check (baseline)':<34}{t_check:8.3f} s    1.00x")
    # lower and build from nothing each time, as a new process does: the memos an earlier
    # run filled (each entry's line by value, each rule's inputs) would make it warm
    t_lower, lowered = timed(lambda: lower(policy, inventory), repeat, forget)
    print(
        f"   {'lower':<34}{t_lower:8.3f} s   {t_lower / t_check:5.2f}x   "
        f"(up to {lowered.tag_fields} of {FIELDS} tag fields on one side of a ToR)"
    )
    ref: Build | None = None
    for target in targets:
        t_build, built = timed(
            functools.partial(build, policy, inventory, floor.policy, target, SIZES), repeat, forget
        )
        ref = built if target == "ref" else ref
        tor_policy = [len(sw.table("policy")) for sw in built.switches if sw.role == "tor"]
        verdict = "under" if t_build < TARGET_S else "OVER"
        print(
            f"   {'build --target ' + target:<34}{t_build:8.3f} s   {t_build / t_check:5.2f}x   "
            f"{verdict} the {TARGET_S:.0f} s target; policy entries {sum(tor_policy)} "
            f"(max {max(tor_policy)} on one ToR)"
        )
        if target == "tofino":
            tofino(built)
    verb = compile_verb(floor.policy, floor.inventory, repeat)
    print(
        f"   {'p4seg compile, a new process':<34}{verb:8.3f} s   {verb / t_check:5.2f}x   "
        f"(start, check, build, write the directory)"
    )
    baseline = total(baselines(policy, inventory))
    naive, pairs = baseline.naive, baseline.host_pairs
    ref_total = sum(len(sw.table("policy")) for sw in lowered.switches if sw.role == "tor")
    ratio = naive / ref_total if ref_total else float("inf")
    mark = "meets" if ratio >= TARGET_REDUCTION else "MISSES"
    print(
        f"   host-pair x single-port expansion, same placement: {naive} entries -> {ratio:.1f}x "
        f"p4seg's {ref_total} ({mark} the {TARGET_REDUCTION:.0f}x target)"
    )
    print(
        f"   stricter, one entry per host pair with port ranges kept: {pairs} -> {pairs / ref_total:.1f}x"
    )
    if ref is not None:
        one_rule_edit(floor.policy, inventory, ref)


def compile_verb(policy: str, inventory: str, repeat: int) -> float:
    """`p4seg compile` of the floor into a new directory, as a user runs it: a new process
    (imports, check, build, every file written), median wall time of `repeat` runs."""
    with tempfile.TemporaryDirectory(prefix="p4seg-bench-") as tmp:
        paths = [Path(tmp, "policy.zt"), Path(tmp, "inventory.yaml")]
        for path, text in zip(paths, (policy, inventory), strict=True):
            path.write_text(text)
        runs = []
        for i in range(repeat):
            out = Path(tmp, f"build-{i}")
            command = [sys.executable, "-m", "p4seg", "compile", str(paths[0]), "-i",
                       str(paths[1]), "-o", str(out)]  # fmt: skip
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)


def tofino(built: Build) -> None:
    """The tofino estimate (compiler.emit.tofino_resources) with each table sized to the
    busiest switch's entries: what these entries cost, whatever sizes the build declared."""
    tables = ("src_identity", "dst_identity", "policy")
    most = {t: max(len(sw.table(t)) for sw in built.switches) for t in tables}
    fitted = make_target("tofino", most).pipeline
    for row in tofino_resources(fitted, built.switches):
        if row["table"] in tables:
            blocks = row.get("tcam_blocks", row.get("sram_blocks"))
            memory = "TCAM" if "tcam_blocks" in row else "SRAM"
            print(
                f"   {'':<34}tofino {row['table']}: key {row['key_bits']} bits, "
                f"{row['max_entries_per_switch']:,} entries on the busiest switch -> {blocks} "
                f"{memory} blocks, action data {row['action_data_bits']} bits -> "
                f"{row['action_sram_blocks']} SRAM blocks"
            )


def one_rule_edit(text: str, inventory: Inventory, previous: Build) -> None:
    """The entries a one-rule edit changes, with the previous allocation and without: one
    rule moved to another destination service and port, then one rule's port alone (its
    ToRs tag the same sets as before: compiler/lower.py `_retagged`)."""
    allows = list(ALLOW.finditer(text))
    edit, other = allows[len(allows) // 2], allows[len(allows) // 3]
    moved = f"{edit[1]}{other[2]}{edit[3]}{int(edit[4]) + 1}{edit[5]}"
    port = f"{edit[1]}{edit[2]}{edit[3]}{int(edit[4]) + 1}{edit[5]}"
    for line, cases in ((moved, 3), (port, 1)):
        if cases == 1:  # the build before it again: the last one, as a controller has it
            previous = build(checked(text, inventory), inventory, text, "ref", SIZES,
                             previous.allocation)  # fmt: skip
        edited = text[: edit.start()] + line + text[edit.end() :]
        _rebuilt(edited, inventory, previous, edit[0], line, cases)


def _rebuilt(
    edited: str,
    inventory: Inventory,
    previous: Build,
    old_line: str,
    line: str,
    cases: int,
) -> None:
    """The edited policy built again: with a fresh allocation (the baseline), with the
    previous one, and incrementally from the previous build (the last `cases` of those)."""
    policy = checked(edited, inventory)
    print(f"   one-rule edit: {old_line.split()!r} -> {line.split()!r}")
    full_s = 0.0
    for label, allocation, before in (
        ("fresh allocation (baseline)", None, None),
        ("previous allocation", previous.allocation, None),
        ("incremental (previous build)", previous.allocation, previous),
    )[-cases:]:
        if cases == 1:  # the baseline: the full build of the first edit, this one's check
            full_s = timed(functools.partial(checked, edited, inventory), 1)[0]
            print(f"   {'  checked (baseline)':<34}{full_s:8.3f} s   1.00x")
        t, built = timed(
            functools.partial(build, policy, inventory, edited, "ref", SIZES, allocation, before),
            1,
        )
        full_s = full_s or t
        reused = (
            f"; {len(built.lowered.reused)}/{len(built.switches)} switches reused, "
            f"{len(built.lowered.retagged)} with their tags kept"
            if before is not None and built.lowered is not None
            else ""
        )
        print(
            f"   {'  rebuilt, ' + label:<34}{t:8.3f} s   {t / full_s:5.2f}x   "
            + _changes(previous, built)
            + reused
        )


def _changes(before: Build, after: Build) -> str:
    """Entries added plus removed, per ToR: policy and identity tables."""
    old = {sw.switch: sw for sw in before.switches if sw.role == "tor"}
    moved: dict[str, list[int]] = {"policy": [], "identity": []}
    for sw in after.switches:
        if sw.role != "tor":
            continue
        for kind, tables in (
            ("policy", ("policy",)),
            ("identity", ("src_identity", "dst_identity")),
        ):
            a = {e for t in tables for e in old[sw.switch].table(t)}
            b = {e for t in tables for e in sw.table(t)}
            moved[kind].append(len(a ^ b))
    return "; ".join(
        f"{kind} entries changed on {sum(1 for n in per if n)}/{len(per)} ToRs: "
        f"{sum(per):,} in all, max {max(per):,}"
        for kind, per in moved.items()
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
        run_case(10_000, 1_000, 1_000, 48, repeat, ("ref", "tofino"))


if __name__ == "__main__":
    main()
