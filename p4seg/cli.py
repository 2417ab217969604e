"""The `p4seg` command line."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import difflib
import functools
import gc
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from compiler.check import CheckResult, check_appended, check_policy
from compiler.diagnostics import (
    Diagnostic,
    InventoryError,
    P4segError,
    SourceError,
    SourceFiles,
    decode_for_display,
    read_source,
    render_all,
    summary_line,
)
from compiler.fmt import format_policy
from compiler.inventory import Inventory, parse_inventory
from compiler.memo import collection_paused
from compiler.model import Action, Policy
from compiler.targets import TARGET_NAMES
from p4seg.analysis import HANDLERS as ANALYSIS_HANDLERS
from p4seg.analysis import register as register_analysis_verbs
from p4seg.commands import REMOTE_VERBS
from p4seg.commands import VERBS as CONTROLLER_VERBS
from p4seg.commands import register as register_controller_verbs
from p4seg.spines import take_down
from p4src.spec import PIPELINE
from runtime.shell import BACKUP_ELECTION_ID, ShellOptions, election_id_arg, run_shell

if TYPE_CHECKING:
    from compiler.emit import Build
    from p4seg.control import Compiled

EXIT_OK, EXIT_ERROR = 0, 1

_MAIN_HELP = """\
p4seg turns a zero-trust segmentation policy into P4 tables on top-of-rack switches.

A policy names services and the few flows allowed between them; everything else is denied:

    policy trading_floor
    service algo         = algo1, algo2          # inventory host names
    service order_router = 10.0.3.10
    allow algo -> order_router tcp 9876          # replies allowed, initiation back is not
    default deny log
    expect algo1 -> order_router tcp 9876 allowed

Start with:
    p4seg check policies/trading_floor.zt -i topologies/trading_floor.yaml
    p4seg fmt --check policies/*.zt
    p4seg shell tor-alg -i topologies/trading_floor.yaml    # p4runtime-shell on a live switch

The language reference, with every error code, is docs/language.md.
"""

_CHECK_HELP = """\
Parse and resolve a policy against an inventory, then analyse it: dead rules (covered by
denies or by other allows), unused services, and every `expect` line, evaluated exactly
over all the flows it names. Nothing is written anywhere.

exit status: 0 no errors (warnings allowed unless --strict), 1 errors

examples:
    p4seg check policies/trading_floor.zt -i topologies/trading_floor.yaml
    p4seg check policy.zt -i floor.yaml --strict --error-format json
"""

_COMPILE_HELP = """\
Compile a policy for the switches of an inventory: the P4 program for the target, its
P4Info, and every switch's table entries, plus a report (rule ids -> policy lines, entries
and utilisation per table, and for Tofino a resource estimate).
Checks the policy first; on any error nothing is written. Outputs are byte-identical for
the same inputs. With p4c-bm2-ss on PATH, bmv2 builds also get p4c's BMv2 JSON
(p4/bmv2/p4seg.json); ref builds get the reference switch's device config there. With
--runtime-listings, each switch's entries also in the p4lang tutorials' runtime format
(entries/SWITCH-runtime.json, for their tooling against simple_switch_grpc): as much
text again as the entries files, so only when asked.

Rule ids are stable: every rule has a key (its `name`, else a hash of its text) and the
build's allocation.json maps keys to ids. A compile into a directory that already holds a
p4seg build starts from that build's allocation.json (or from --allocation FILE), so a
rule keeps its id and its entries' priorities, a new rule takes a free id, and the id of
a removed rule is retired (not reused; the controller frees it once every switch has
left the version that used it). Without an allocation, ids are the rules' positions.

targets: ref (the built-in reference switch), bmv2 (simple_switch_grpc), tofino (TNA)

exit status: 0 built, 1 errors (policy, inventory, capacity, p4c)

examples:
    p4seg compile policies/trading_floor.zt -i topologies/trading_floor.yaml -o build/
    p4seg compile policy.zt -i floor.yaml --target tofino --size policy=32768 -o out/
"""

_FMT_HELP = """\
Print policies in canonical form: one statement per line, aligned columns, options in a
fixed order, comments kept. Idempotent and meaning-preserving.

exit status: 0 formatted (or already canonical with --check), 1 syntax errors or, with
--check, a file that is not canonical (its diff is printed)

examples:
    p4seg fmt policy.zt                 # canonical text on stdout
    p4seg fmt -w policies/*.zt          # rewrite in place
    p4seg fmt --check policies/*.zt     # for CI
"""


_SHELL_HELP = """\
Open p4runtime-shell (an IPython prompt for P4Runtime) on one switch of an inventory. Its
P4Runtime address and device id come from the inventory; its tables and actions from the
P4Info the switch runs (P4segIngress.routing, P4segIngress.forward, ...). Without
--push-config the switch must run a pipeline already, and its entries are kept.

The shell joins as a backup by default (election id 0,1; the p4seg controller uses 10):
it prints "You are not the primary client, you only have read access to the server",
reads work (table_entry["P4segIngress.routing"].read(print)) and every write fails with
PERMISSION_DENIED. For writes, pass an --election-id above the controller's: the shell
becomes primary and the controller a backup until it arbitrates higher again. A switch
remembers the highest election id it has seen, so once a controller has been primary, 0,1
stays a backup even after that controller leaves. Two shells on one switch need different
election ids (the second is refused with "Failed to establish session").

--push-config loads the pipeline of --build DIR (or of --policy POLICY, compiled for the
ref target) before the shell starts: SetForwardingPipelineConfig, which deletes every table
entry, default action and clone session on the switch, and needs the primary role. Without
it, --build/--policy only check that the switch runs that P4Info (a warning if not).

p4runtime-shell runs from .venv-shell (`make venv-shell`): its protobuf pins clash with
p4seg's own. Commands can come on stdin instead of a terminal.

exit status: the shell's (0 at the end of its input, even after a failed command); 1 when
it cannot start (unknown switch, inventory errors, switch unreachable or without pipeline,
.venv-shell missing)

examples:
    p4seg shell tor-alg -i topologies/trading_floor.yaml
    p4seg shell tor-alg -i topologies/trading_floor.yaml --election-id 0,1000    # writable
    p4seg shell tor-alg -i floor.yaml --build build/ --push-config --election-id 0,1000
    p4seg shell tor-alg -i floor.yaml --grpc-addr 127.0.0.1:9559 --dry-run
    echo 'table_entry["P4segIngress.routing"].read(print)' | p4seg shell tor-alg -i floor.yaml
"""


def _register_up(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from p4seg.up import register

    register(sub, _policy_arguments)


def _policy_arguments(parser: argparse.ArgumentParser, inventory_required: bool) -> None:
    """POLICY, -i INVENTORY and --error-format: the same on every verb that reads a policy."""
    parser.add_argument("policy", metavar="POLICY", help="policy file (.zt)")
    parser.add_argument(
        "-i",
        "--inventory",
        metavar="INVENTORY",
        required=inventory_required,
        help="inventory YAML (hosts, switches, links); needed to use host names",
    )
    parser.add_argument(
        "--error-format",
        choices=("human", "json"),
        default="human",
        help="how to print diagnostics (default: human)",
    )
    parser.add_argument(
        "--down",
        metavar="SPINE",
        action="append",
        default=[],
        help="a spine out of service: routing goes around it (repeatable; adds to the "
        "inventory's `down` and, with --state, the controller's down.json)",
    )


@functools.cache
def _parser() -> argparse.ArgumentParser:
    """The command line's parser, made once per process (360 arguments: 20 ms of a
    long-running caller's every verb); `_arguments` keeps its defaults unshared."""
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="p4seg", description=_MAIN_HELP, formatter_class=raw)
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    c = sub.add_parser(
        "check",
        help="check a policy (syntax, names, dead rules, expect lines)",
        description=_CHECK_HELP,
        formatter_class=raw,
    )
    _policy_arguments(c, inventory_required=False)
    c.add_argument("--strict", action="store_true", help="fail (exit 1) on warnings too")
    c.add_argument(
        "--summary",
        action="store_true",
        help="after a clean check, print the policy's services, rules and expectations",
    )

    k = sub.add_parser(
        "compile",
        help="compile a policy to P4 program, P4Info and entries",
        description=_COMPILE_HELP,
        formatter_class=raw,
    )
    _policy_arguments(k, inventory_required=True)
    k.add_argument("-t", "--target", choices=TARGET_NAMES, default="ref", help="default: ref")
    k.add_argument(
        "-o",
        "--output-dir",
        metavar="DIR",
        required=True,
        help="build directory: new, empty, or a p4seg build (only its own files are replaced)",
    )
    k.add_argument(
        "--size",
        metavar="TABLE=N",
        action="append",
        default=[],
        help="table size for the program (repeatable), e.g. policy=32768",
    )
    k.add_argument(
        "--allocation",
        metavar="FILE",
        help="start from this allocation.json (rule ids, identity tags) instead of DIR's",
    )
    k.add_argument(
        "--runtime-listings",
        action="store_true",
        help="also write entries/SWITCH-runtime.json (the p4lang tutorials' runtime format)",
    )
    k.add_argument(
        "--output",
        choices=("human", "json"),
        default="human",
        help="stdout format (json: the report)",
    )

    f = sub.add_parser(
        "fmt", help="print policies in canonical form", description=_FMT_HELP, formatter_class=raw
    )
    f.add_argument("policies", metavar="POLICY", nargs="+", help="policy files (.zt)")
    mode = f.add_mutually_exclusive_group()
    mode.add_argument(
        "--check", action="store_true", help="only report files that are not canonical"
    )
    mode.add_argument("-w", "--write", action="store_true", help="rewrite files in place")
    f.add_argument("--error-format", choices=("human", "json"), default="human")

    sh = sub.add_parser(
        "shell",
        help="open p4runtime-shell on a switch of the inventory",
        description=_SHELL_HELP,
        formatter_class=raw,
    )
    sh.add_argument("switch", metavar="SWITCH", help="switch name in the inventory")
    sh.add_argument("-i", "--inventory", metavar="INVENTORY", required=True, help="inventory YAML")
    source = sh.add_mutually_exclusive_group()
    source.add_argument(
        "--build", metavar="DIR", help="a `p4seg compile --target ref` build directory"
    )
    source.add_argument(
        "--policy", metavar="POLICY", help="compile POLICY for the ref target and use that build"
    )
    sh.add_argument(
        "--push-config",
        action="store_true",
        help="load the build's pipeline first: DELETES every entry on the switch",
    )
    high, low = BACKUP_ELECTION_ID
    sh.add_argument(
        "--election-id",
        metavar="HIGH,LOW",
        type=election_id_arg,
        default=BACKUP_ELECTION_ID,
        help=f"P4Runtime election id (default {high},{low}: a read-only backup)",
    )
    sh.add_argument(
        "--grpc-addr", metavar="ADDR", help="P4Runtime address (default: the inventory's p4rt)"
    )
    sh.add_argument(
        "--dry-run", action="store_true", help="print the p4runtime-shell command, run nothing"
    )
    register_controller_verbs(sub, _policy_arguments)
    _register_up(sub)
    register_analysis_verbs(sub, _policy_arguments)
    return p


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        print(f"p4seg: error: cannot read '{path}': {reason}", file=sys.stderr)
        return None


def _report(
    diags: Sequence[Diagnostic],
    sources: SourceFiles,
    fmt: str,
    extra: dict[str, object] | None = None,
) -> None:
    """Diagnostics: human text on stderr, or one JSON document on stdout."""
    if fmt == "json":
        errors = sum(d.is_error for d in diags)
        doc = {
            "errors": errors,
            "warnings": len(diags) - errors,
            "diagnostics": [d.to_json() for d in diags],
            **(extra or {}),
        }
        print(json.dumps(doc, indent=2))
    elif diags:
        print(render_all(diags, sources), file=sys.stderr)


def _load(
    args: argparse.Namespace, sources: SourceFiles, text: str | None = None
) -> tuple[Inventory, str] | None:
    """The inventory and the policy text of a command line (`text`, when given, instead of
    reading the policy file), or None (already reported)."""
    inventory = Inventory.empty()
    try:
        if args.inventory:
            inventory, inv_text = _PARSED.inventory(args.inventory)
            sources.add(args.inventory, inv_text)
            inventory = take_down(inventory, args)
        policy_text = read_source(args.policy, "E000", "policy") if text is None else text
    except (InventoryError, SourceError) as exc:
        for path in (args.inventory, args.policy):
            if path and path not in sources.texts:
                with contextlib.suppress(OSError):  # the diagnostic says why
                    sources.add(path, decode_for_display(Path(path).read_bytes()))
        _report(exc.diagnostics, sources, args.error_format, {"ok": False})
        return None
    sources.add(args.policy, policy_text)
    return inventory, policy_text


def _cmd_check(args: argparse.Namespace) -> int:
    sources = SourceFiles()
    loaded = _load(args, sources)
    if loaded is None:
        return EXIT_ERROR
    inventory, policy_text = loaded
    result = check_policy(policy_text, args.policy, inventory)
    failed = result.errors > 0 or (args.strict and result.warnings > 0)
    extra: dict[str, object] = {"ok": not failed}
    if result.policy is not None and args.error_format == "json":
        extra["policy"] = _policy_json(result.policy, inventory)
    _report(result.diagnostics, sources, args.error_format, extra)
    if args.error_format == "human" and not failed and result.policy is not None:
        print(f"{args.policy}: ok — {_one_line(result)}")
        if args.summary:
            print(_summary(result.policy, inventory))
    return EXIT_ERROR if failed else EXIT_OK


def _one_line(result: CheckResult) -> str:
    assert result.policy is not None
    p = result.policy
    return (
        f"policy {p.name}: {_count(len(p.services), 'service')}, {_count(len(p.rules), 'rule')}, "
        f"{_count(len(p.expects), 'expectation')} hold; {summary_line(result.errors, result.warnings)}"
    )


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _summary(policy: Policy, inventory: Inventory) -> str:
    hosts = {h.ip: h.name for h in inventory.hosts}
    lines = ["", f"services ({len(policy.services)}):"]
    width = max((len(s.name) for s in policy.services), default=0)
    for s in policy.services:
        members = [hosts[ip] for ip in sorted(hosts) if ip in s.addresses]
        count = s.addresses.size()
        who = ", ".join(members) if members else "no inventory hosts"
        noun = "address" if count == 1 else "addresses"
        lines.append(f"  {s.name:<{width}}  {count:>9} {noun:<9}  {who}")
    allows = [r for r in policy.rules if r.action is Action.ALLOW]
    denies = [r for r in policy.rules if r.action is Action.DENY]
    lines += [
        "",
        f"rules ({len(allows)} allow, {len(denies)} deny, default deny"
        f"{' log' if policy.default_log else ''}):",
    ]
    for r in policy.rules:
        named = f"  name {r.name}" if r.name else ""
        lines.append(f"  #{r.id:<3} line {r.span.line:<4} {r.describe()}{named}")
    automatic = policy.automatic()
    if automatic:
        lines += ["", f"signals and containment ({len(automatic)}):"]
        lines += [f"  line {a.span.line:<4} {a.describe()}" for a in automatic]
    lines += ["", f"expectations ({len(policy.expects)}, all hold):"]
    lines += [f"  ok  {e.describe()}" for e in policy.expects]
    return "\n".join(lines)


def _policy_json(policy: Policy, inventory: Inventory) -> dict[str, object]:
    hosts = {h.ip: h.name for h in inventory.hosts}
    return {
        "name": policy.name,
        "services": [
            {
                "name": s.name,
                "addresses": str(s.addresses),
                "hosts": [hosts[ip] for ip in sorted(hosts) if ip in s.addresses],
                "line": s.span.line,
            }
            for s in policy.services
        ],
        "rules": [
            {"id": r.id, "key": r.key, "line": r.span.line, "rule": r.describe()}
            | ({"name": r.name} if r.name else {})
            for r in policy.rules
        ],
        "default": "deny log" if policy.default_log else "deny",
        "signals": [
            {
                "line": s.span.line,
                "name": s.name,
                "sources": list(s.sources),
                "effect": "remediation" if s.profile is None else "restrict",
                "profile": s.profile,
            }
            for s in policy.signals
        ],
        "containment": [
            {
                "line": c.span.line,
                "sources": c.src_text or "any",
                "addresses": str(c.src),
                "denies": c.denies,
                "within_s": c.within_s,
                "for_s": c.for_s,
            }
            for c in policy.containment
        ],
        "protected": [
            {
                "line": p.span.line,
                "hosts": [hosts[ip] for ip in sorted(hosts) if ip in p.hosts],
                "addresses": str(p.hosts),
                "during": str(p.window) if p.window else None,
            }
            for p in policy.protected
        ],
        "expectations": [
            {"line": e.span.line, "expect": e.describe(), "holds": True} for e in policy.expects
        ],
    }


def _sizes(specs: list[str]) -> dict[str, int] | None:
    sizes = {}
    known = {t.name for t in PIPELINE.tables if t.keys}
    for spec in specs:
        name, _, value = spec.partition("=")
        if (
            name not in known
            or not value.isascii()
            or not value.isdigit()
            or len(value) > 8
            or not 1 <= int(value) <= 1 << 20
        ):
            print(
                f"p4seg: error: --size {spec!r}: expected TABLE=N with TABLE one of "
                f"{', '.join(sorted(known))} and N from 1 to {1 << 20}",
                file=sys.stderr,
            )
            return None
        sizes[name] = int(value)
    return sizes


@collection_paused(freeze=True)  # a one-shot process: a million objects built, none garbage
def _cmd_compile(args: argparse.Namespace) -> int:
    # The back end pulls in networkx, Jinja2 and the protobufs: only `compile` pays for them.
    from compiler.allocation import AllocationError, assign_rule_ids
    from compiler.emit import (
        OutputDirError,
        build,
        previous_allocation,
        summary,
        write_build,
    )
    from compiler.p4c import p4c_artifacts
    from p4seg.allocations import read_allocation

    sizes = _sizes(args.size)
    if sizes is None:
        return EXIT_ERROR
    sources = SourceFiles()
    loaded = _load(args, sources)
    if loaded is None:
        return EXIT_ERROR
    inventory, policy_text = loaded
    result = check_policy(policy_text, args.policy, inventory)
    if result.diagnostics:
        _report(result.diagnostics, sources, args.error_format, {"ok": result.policy is not None})
    if result.policy is None:
        return EXIT_ERROR
    try:
        previous = (
            read_allocation(args.allocation)
            if args.allocation
            else previous_allocation(args.output_dir)
        )
    except (AllocationError, OutputDirError) as err:
        print(f"p4seg: error: {err}; nothing written", file=sys.stderr)
        return EXIT_ERROR
    try:
        policy, allocation = assign_rule_ids(result.policy, previous)
        built = build(policy, inventory, policy_text, args.target, sizes, allocation,
                      listings=args.runtime_listings)  # fmt: skip
        built.files.update(p4c_artifacts(built))
    except P4segError as exc:
        _report(exc.diagnostics, sources, args.error_format, {"ok": False})
        return EXIT_ERROR
    try:
        write_build(built, args.output_dir)
    except (OutputDirError, OSError) as err:
        print(f"p4seg: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    if args.output == "json":
        print(json.dumps(built.report, indent=2, sort_keys=True))
    else:
        print(f"wrote {args.output_dir}: {len(built.files)} files")
        print(summary(built))
    return EXIT_OK


def _checked(args: argparse.Namespace) -> tuple[Policy, Inventory, str] | None:
    """Load and check the policy of a command line; errors are reported (None: failed).
    `p4seg test` reports failed expectations itself, so they are not errors there."""
    sources = SourceFiles()
    loaded = _load(args, sources)
    if loaded is None:
        return None
    inventory, text = loaded
    result = check_policy(text, args.policy, inventory, expectations=args.verb != "test")
    errors = [d for d in result.diagnostics if d.is_error]
    if errors:
        _report(errors, sources, args.error_format)
    if result.policy is None:
        return None
    return result.policy, inventory, text


# A long-running verb (`watch`, the live verbs `up` starts) compiles again and again: the
# last build per build directory lets the next compile reuse what did not change.
_LAST_BUILD: dict[str, Build] = {}


class _Parsed:
    """The last inventory parsed and the last policy checked per file, for the verbs that
    compile again and again (watch, serve): a quarantine, a release or a signal changes the
    effective policy, not the text, and parsing 1,000 rules and 1,000 hosts again costs
    more than the rest of their compile. Keyed by the whole text (and the inventory
    object the check resolved names against): any edit parses afresh. Both are frozen."""

    def __init__(self) -> None:
        self._inventories: dict[str, tuple[str, Inventory]] = {}
        self._checks: dict[tuple[str, str], tuple[str, Inventory, CheckResult]] = {}
        self._lock = threading.Lock()  # serve's worker thread and `up`'s live verbs

    def inventory(self, path: str) -> tuple[Inventory, str]:
        """compiler.inventory.load_inventory, parsed again only when the text changed."""
        try:
            text = read_source(path, "E301", "inventory")
        except SourceError as exc:
            raise InventoryError(exc.diagnostics) from None
        with self._lock:
            found = self._inventories.get(path)
        if found is not None and found[0] == text:
            return found[1], text
        inventory = parse_inventory(text, path)
        with self._lock:
            self._inventories[path] = (text, inventory)
        return inventory, text

    def clear(self) -> None:
        with self._lock:
            self._inventories.clear()
            self._checks.clear()

    def check(
        self, text: str, path: str, inventory: Inventory, file_text: str | None = None
    ) -> CheckResult:
        """check_policy without its warnings (the verbs that drive switches report errors
        alone), run again only when the text or the inventory changed. `text` may
        be `file_text` (the policy file's) with live grants appended: then the file's own
        check is the one kept, and the grants are resolved against it (check_appended)."""
        if file_text is not None and text != file_text:
            checked = self.check(file_text, path, inventory)
            if checked.policy is not None and checked.resolved is not None:
                return self._checked((path, "+"), text, inventory,
                                     lambda: check_appended(checked, file_text, text, path,
                                                            inventory))  # fmt: skip
        return self._checked((path, ""), text, inventory,  # the verbs report errors alone
                             lambda: check_policy(text, path, inventory, warnings=False))  # fmt: skip

    def _checked(
        self,
        key: tuple[str, str],
        text: str,
        inventory: Inventory,
        run: Callable[[], CheckResult],
    ) -> CheckResult:
        with self._lock:
            found = self._checks.get(key)
        if found is not None and found[0] == text and found[1] is inventory:
            return found[2]
        result = run()
        with self._lock:
            self._checks[key] = (text, inventory, result)
        return result


_PARSED = _Parsed()


def parsed() -> _Parsed:
    """This process's parsed inventories and checked policies (the verbs share them)."""
    return _PARSED


def forget() -> None:
    """Drop everything this process keeps between verbs, as a new `p4seg` process starts:
    the last build (incremental compile), the parsed inventory and policy, what it applied
    and proved, and the compiler's per-switch memos. Benchmarks and tests use it to measure
    or check a one-shot command against a long-running controller (watch, serve)."""
    from compiler.memo import forget as forget_memos
    from compiler.verify import DERIVED
    from p4seg import control, verbs

    _LAST_BUILD.clear()
    _PARSED.clear()
    control._APPLIED.clear()
    verbs._PROVEN.clear()
    verbs._RECORDS.clear()
    verbs._KEPT.clear()
    DERIVED.clear()
    forget_memos()


def _front(
    args: argparse.Namespace,
    text_transform: Callable[[str], str],
    policy_transform: Callable[[Policy, Inventory], Policy],
    text: str | None = None,
    write: bool | None = True,
) -> Compiled | None:
    """The front end of every verb that drives switches: load, check and compile the
    (effective) policy, its rule ids from the state directory's allocation, and write the
    build; diagnostics are reported here (None: failed).
    `text`: compile this policy text instead of the file's (watch's last good text).
    Not `write`: the build is written when the caller calls `Compiled.write` (a
    quarantine's overlay goes onto its switch first); None: here only if the build
    directory does not hold its pipeline files yet (the switches are set from them: an
    apply writes the rest after the switches)."""
    from compiler.allocation import Allocation, AllocationError, assign_rule_ids
    from compiler.emit import build
    from compiler.p4c import p4c_artifacts
    from p4seg.allocations import state_allocation
    from p4seg.control import Compiled

    sources = SourceFiles()
    loaded = _load(args, sources, text)
    if loaded is None:
        return None
    inventory, file_text = loaded
    compiled_text = text_transform(file_text)
    sources.add(args.policy, compiled_text)
    result = _PARSED.check(compiled_text, args.policy, inventory, file_text)
    errors = [d for d in result.diagnostics if d.severity.value == "error"]
    if errors:
        _report(errors, sources, args.error_format)
    if result.policy is None:
        return None
    effective = policy_transform(result.policy, inventory)
    state = getattr(args, "state", None)
    try:
        previous = state_allocation(Path(state)) if state else Allocation()
    except AllocationError as err:
        print(f"p4seg: error: {err}; nothing written", file=sys.stderr)
        return None
    build_dir = Path(args.build or Path("build") / inventory.name)
    last = _LAST_BUILD.get(str(build_dir.resolve()))
    try:
        effective, allocation = assign_rule_ids(effective, previous)
        built = build(
            effective, inventory, compiled_text, args.target, allocation=allocation, previous=last
        )
        built.files.update(p4c_artifacts(built))
    except P4segError as exc:
        _report(exc.diagnostics, sources, args.error_format)
        return None
    _LAST_BUILD[str(build_dir.resolve())] = built
    compiled = Compiled(built, build_dir, inventory, effective, file_text, built.allocation)
    if write is None:
        write = not compiled.holds_pipeline(args.target)
    if write and not compiled.write():
        return None
    return compiled


def _cmd_fmt(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for path in args.policies:
        text = _read(path)
        if text is None:
            status = EXIT_ERROR
            continue
        try:
            formatted = format_policy(text, path)
        except P4segError as exc:
            sources = SourceFiles()
            sources.add(path, text)
            _report(exc.diagnostics, sources, args.error_format)
            status = EXIT_ERROR
            continue
        if args.check:
            if formatted != text:
                diff = difflib.unified_diff(
                    text.splitlines(keepends=True),
                    formatted.splitlines(keepends=True),
                    fromfile=path,
                    tofile=f"{path} (formatted)",
                )
                sys.stdout.writelines(diff)
                print(
                    f"p4seg: {path} is not canonical (run `p4seg fmt -w {path}`)", file=sys.stderr
                )
                status = EXIT_ERROR
        elif args.write:
            if formatted != text:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(formatted)
                print(f"formatted {path}", file=sys.stderr)
        else:
            sys.stdout.write(formatted)
    return status


def _cmd_shell(args: argparse.Namespace) -> int:
    return run_shell(
        ShellOptions(
            switch=args.switch,
            inventory=args.inventory,
            build_dir=args.build,
            policy=args.policy,
            election_id=args.election_id,
            grpc_addr=args.grpc_addr,
            push_config=args.push_config,
            dry_run=args.dry_run,
        )
    )


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a killed writer


# The one-shot verbs whose process may end without freeing what it built (`run`): each
# writes its files through closed handles, and leaves no thread behind.
_QUICK_EXIT = frozenset({"check", "compile", "plan", "apply", "grant", "revoke", "quarantine",
                         "release", "signal", "verify", "diff", "trace", "test"})  # fmt: skip
_ran: list[str] = []  # the verb `main` last ran


def run() -> NoReturn:
    """The `p4seg` command: `main`, then the end of the process. A one-shot verb runs
    without the cyclic garbage collector (each full collection walks the build, the proof
    and their memos — millions of objects that live until the process ends — to find
    nothing), and ends without the interpreter freeing them object by object on its way
    out (0.4 s after a 48-ToR apply): once the exit handlers have run and the standard
    streams and logging are flushed. Any other verb (serve, up, ...), or a thread still
    running, gets the ordinary exit."""
    status = main(one_shot=True)
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if not _ran or _ran[-1] not in _QUICK_EXIT or any(not t.daemon for t in others):
        sys.exit(status)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


def main(argv: Sequence[str] | None = None, one_shot: bool = False) -> int:
    """Run one verb; a reader that closes the pipe early (`| head`) ends it quietly.
    `one_shot`: the process ends with the verb (`run`)."""
    try:
        status = _main(argv, one_shot)
        sys.stdout.flush()  # inside the try: a pipe closed early fails here, not at exit
        return status
    except BrokenPipeError:
        # Python's recipe: point stdout at /dev/null so the flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """`argv` parsed; a list, set or dict in it is its own (an option left out is given the
    parser's default object itself, and the parser is made once)."""
    args = _parser().parse_args(argv)
    for name, value in vars(args).items():
        if isinstance(value, list | set | dict):
            setattr(args, name, type(value)(value))
    return args


def _main(argv: Sequence[str] | None, one_shot: bool = False) -> int:
    args = _arguments(argv)
    _ran[:] = [args.verb]
    if one_shot and args.verb in _QUICK_EXIT:
        gc.disable()  # (`run`)
    try:
        if args.verb == "check":
            return _cmd_check(args)
        if args.verb == "compile":
            return _cmd_compile(args)
        if args.verb == "shell":
            return _cmd_shell(args)
        if args.verb in ANALYSIS_HANDLERS:
            return ANALYSIS_HANDLERS[args.verb](args, _checked)
        if args.verb == "up":
            from p4seg.up import run_up

            logging.getLogger("finsy").setLevel(logging.ERROR)
            return run_up(args, _front)
        if args.verb in REMOTE_VERBS:
            from p4seg.remote import run_remote, server_of

            if server_of(args):
                return run_remote(args)
            if not (args.policy and args.inventory):
                print(f"p4seg {args.verb}: error: -p/--policy and -i/--inventory are required "
                      "(or --server URL: a running p4seg serve)", file=sys.stderr)  # fmt: skip
                return 2
            if args.verb != "signal" and getattr(args, "ttl", None):  # a signal's ttl: the engine's
                print(f"p4seg {args.verb}: error: --ttl needs --server: a one-shot quarantine "
                      "has no process to end it", file=sys.stderr)  # fmt: skip
                return 2
        if args.verb in ("apply", "watch", *REMOTE_VERBS):
            from p4seg.remote import serving

            url = serving(Path(args.state))
            if url is not None:  # it applies in turn with its own loop: never race it
                print(f"p4seg {args.verb}: error: a p4seg serve runs on {args.state} ({url}): "
                      "ask it instead (--server URL or P4SEG_SERVER; POST /v1/apply to "
                      "apply)", file=sys.stderr)  # fmt: skip
                return EXIT_ERROR
        if args.verb == "serve":
            from p4seg.serve import cmd_serve

            logging.getLogger("finsy").setLevel(logging.ERROR)
            return cmd_serve(args, _front)
        if args.verb in CONTROLLER_VERBS:
            from p4seg.verbs import HANDLERS  # finsy and grpc: only these verbs pay for them

            # finsy narrates every session (and that the switch has no gNMI): p4seg reports
            # what matters itself, so only finsy's errors get through.
            logging.getLogger("finsy").setLevel(logging.ERROR)
            return HANDLERS[args.verb](args, _front)
        return _cmd_fmt(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
