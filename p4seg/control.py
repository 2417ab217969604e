"""`p4seg plan` and `p4seg apply`: the controller's verbs (registered by p4seg/cli.py).

    plan    compile, read back every switch, print the difference per switch and table
    apply   the same, then execute it with the epoch protocol; --dry-run stops at the plan

Exit status: 0 nothing to change (plan) / applied (apply), 2 changes pending (plan and
apply --dry-run), 1 error (policy, inventory, a switch that could not be read or written).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from finsy.grpcutil import GRPCCredentialsTLS
from finsy.proto import p4r

from compiler.allocation import Allocation
from compiler.differential import Monotone
from compiler.emit import MANIFEST, Build, OutputDirError, write_build
from compiler.inventory import Inventory
from compiler.memo import also_forget
from compiler.model import Policy
from compiler.targets import P4INFO_FILE, TARGETS, device_config_file
from p4seg.allocations import save_state_allocation
from runtime import grpc_loops
from runtime.controller import (
    ControllerError,
    ControllerOptions,
    PipelineFiles,
    SwitchReport,
    SwitchTarget,
    apply_all,
    plan_all,
    targets,
)
from runtime.defaults import DEFAULT_BATCH
from runtime.entities import describe_entry
from runtime.files import Parsed
from runtime.overlay import monotone_plan
from runtime.plan import Desired, Tables, plan_switch

EXIT_OK, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Compiled:
    """What the CLI hands over: a written build, the inventory and the rule lines."""

    build: Build
    build_dir: Path
    inventory: Inventory
    policy: Policy  # the effective policy that was compiled
    policy_text: str = ""  # the policy file's text as read for this compile
    allocation: Allocation = field(default_factory=Allocation)  # its rule ids
    _written: list[bool] = field(default_factory=list, repr=False, compare=False)

    def write(self) -> bool:
        """Write the build into `build_dir` (once; later calls return the first result).
        False, and why on stderr, when it could not be written."""
        if not self._written:
            try:
                write_build(self.build, str(self.build_dir))
                self._written.append(True)
            except (OutputDirError, OSError) as err:
                print(f"p4seg: error: {err}", file=sys.stderr)
                self._written.append(False)
        return self._written[0]

    def holds_pipeline(self, target: str) -> bool:
        """Whether `build_dir` is a p4seg build whose pipeline files (the P4Info and
        `target`'s device config, which the switches are set from) are this build's: then
        the rest of the build can be written after the switches, off the path to
        enforcement."""
        if not (self.build_dir / MANIFEST).is_file():
            return False
        for rel in (P4INFO_FILE, device_config_file(target)):
            try:
                if (self.build_dir / rel).read_text(encoding="utf-8") != self.build.files[rel]:
                    return False
            except (OSError, KeyError, UnicodeDecodeError):
                return False
        return True


def options_of(args: argparse.Namespace) -> ControllerOptions | str:
    """The controller options, or an error message."""
    tls = None
    if args.tls_cert or args.tls_key or args.tls_ca:
        if bool(args.tls_cert) != bool(args.tls_key):
            return "--tls-cert and --tls-key go together"
        if not args.tls_ca:
            return "TLS needs --tls-ca to verify the switches"
        for path in (args.tls_ca, args.tls_cert, args.tls_key):
            if path and not Path(path).is_file():
                return f"cannot read {path}"
        tls = GRPCCredentialsTLS(
            cacert=Path(args.tls_ca),
            cert=Path(args.tls_cert) if args.tls_cert else None,
            private_key=Path(args.tls_key) if args.tls_key else None,
        )
    if args.election_id <= 0:
        return "--election-id must be > 0"
    batch = getattr(args, "batch_size", DEFAULT_BATCH)
    if batch <= 0:
        return "--batch-size must be > 0"
    kind = TARGETS.get(getattr(args, "target", "ref"))
    return ControllerOptions(
        election_id=args.election_id,
        batch_size=batch,
        timeout=args.timeout,
        tls=tls,
        reset_direct_meters=kind is not None and kind.stale_direct_meters,
        full_read=getattr(args, "full_read", False),
        fenced=bool(getattr(args, "etcd", None)),  # serve --etcd: a newer leader outranks us
        fence=getattr(args, "write_fence", None),  # serve --etcd: p4seg/replication.py
    )


def _selected(
    compiled: Compiled, names: Sequence[str], tables: Tables, only: str | None = None
) -> list[SwitchTarget] | str:
    files = compiled.build.files

    def entries_file(switch: str) -> str:
        return files[f"entries/{switch}.json"]

    # The entries files name each switch's tables exactly: encoded only when planned.
    named = (
        entries_file
        if all(f"entries/{s.switch}.json" in files for s in compiled.build.switches)
        else None
    )
    if only is not None:
        [sw] = [s for s in compiled.build.switches if s.switch == only]
        return targets(compiled.inventory, [sw], tables, named)
    every = targets(compiled.inventory, compiled.build.switches, tables, named)
    if not names:  # a spine out of service is not written to, unless named (p4seg/spines.py)
        return [t for t in every if t.name not in compiled.inventory.down]
    known = {t.name for t in every}
    unknown = [n for n in names if n not in known]
    if unknown:
        return f"unknown switch {', '.join(unknown)} (inventory has: {', '.join(sorted(known))})"
    return [t for t in every if t.name in names]


def _rule_lines(build: Build) -> dict[int, str]:
    rules = build.report.get("rules", [])
    assert isinstance(rules, list)
    return {r["id"]: f"line {r['line']}: {r['text']}" for r in rules}


APPLIED_RULES = "applied-rules.json"  # in the state directory: the rules each switch holds
UNRECORDED = "(the rule of a policy applied before; its text was not recorded)"


def applied_rules(state_dir: Path | None) -> dict[str, dict[int, str]]:
    """Per switch, the rule lines of the build last applied to it (for labelling entries
    that a plan removes: they come from that policy, not from the new one). Read again
    only when the file changed (a long-running controller asks before every operation);
    the per-switch dicts are shared: read only."""
    if state_dir is None:
        return {}
    try:
        return dict(_RULES_READ.get(state_dir / APPLIED_RULES, _parse_applied))
    except (OSError, ValueError, AttributeError, TypeError):
        return {}  # no record (or a damaged one): removed entries are labelled as unknown


def _parse_applied(text: str) -> dict[str, dict[int, str]]:
    doc = json.loads(text)
    if doc.get("format") != _APPLIED_FORMAT:  # one copy of the lines per switch (before 2)
        return {sw: {int(k): str(v) for k, v in rules.items()} for sw, rules in doc.items()}
    lines = {
        name: {int(k): str(v) for k, v in rules.items()} for name, rules in doc["lines"].items()
    }
    return {sw: lines[name] for sw, name in doc["switches"].items()}


def _applied_json(record: dict[str, dict[int, str]]) -> str:
    """The record with each distinct set of rule lines once (the switches of one apply
    share theirs): two or three sets, not 50 copies of a 1,000-rule policy's lines."""
    names: dict[int, str] = {}
    lines: dict[str, dict[int, str]] = {}
    switches = {}
    for sw, rules in record.items():
        name = names.setdefault(id(rules), f"r{len(names)}")
        lines[name] = rules
        switches[sw] = name
    # Compact: only json's C encoder is fast enough for 1,000s of lines (`indent` switches
    # to its Python one).
    return json.dumps({"format": _APPLIED_FORMAT, "lines": lines, "switches": switches},
                      sort_keys=True)  # fmt: skip


_APPLIED_FORMAT = 2


_RULES_READ: Parsed[dict[str, dict[int, str]]] = Parsed()  # applied-rules.json, as last read
also_forget(_RULES_READ.clear)


def record_applied(state_dir: Path, reports: Sequence[SwitchReport], rules: dict[int, str]) -> None:
    """Remember the rule lines of the switches that now hold this build."""
    record = applied_rules(state_dir)
    fresh = {r.switch: rules for r in reports if r.ok and record.get(r.switch) != rules}
    if not fresh:
        return
    record.update(fresh)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{APPLIED_RULES}.tmp"
    tmp.write_text(_applied_json(record))
    path = state_dir / APPLIED_RULES
    tmp.replace(path)
    _RULES_READ.remember(path, record)


def _record_allocation(
    state_dir: Path, compiled: Compiled, reports: Sequence[SwitchReport]
) -> None:
    """Keep the allocation this apply wrote with. Its retired ids stay retired while any
    switch may still hold the version that used them (a failed or partial apply); once
    every switch of the inventory holds this build, they are free again."""
    everywhere = {r.switch for r in reports if r.ok} >= {
        s.name for s in compiled.inventory.switches
    }
    allocation = compiled.allocation.settled() if everywhere else compiled.allocation
    save_state_allocation(state_dir, allocation)


def _entry_json(tables: Tables, entry: p4r.TableEntry, rules: dict[int, str]) -> dict[str, object]:
    text, rule_id = describe_entry(tables.pipeline, entry)
    out: dict[str, object] = {"entry": text}
    if rule_id is not None:
        out["rule_id"] = rule_id
        out["rule"] = rules.get(rule_id, UNRECORDED)
    return out


def report_json(
    reports: Sequence[SwitchReport],
    tables: Tables,
    rules: dict[int, str],
    applied: bool,
    before: dict[str, dict[int, str]] | None = None,
) -> dict[str, object]:
    """`before`: per switch, the rule lines removed entries came from (applied_rules)."""
    switches = []
    for r in reports:
        old = (before or {}).get(r.switch, {})
        item: dict[str, object] = {
            "switch": r.switch,
            "address": r.address,
            "ok": r.ok,
            "pipeline": r.pipeline,
            "seconds": round(r.seconds, 3),
            "planned_in_full": r.in_full,  # False: its digest mark said it holds the build
            "long_lived_session": r.shared,  # written through serve's session (docs/controller.md)
        }
        if r.error:
            item["error"] = r.error
            item["failed_updates"] = [
                {"op": c.op, "table": c.table, "error": e} for c, e in r.failed_updates
            ]
        if r.plan is not None:
            item["changes"] = not r.plan.empty
            item["writes"] = {
                "prepare": len(r.plan.prepare),
                "flip": int(r.plan.flip is not None),
                "finish": len(r.plan.finish),
            }
            item["tables"] = {
                name: {
                    "added": [_entry_json(tables, e, rules) for e in d.added],
                    "changed": [
                        {"from": _entry_json(tables, a, old), "to": _entry_json(tables, b, rules)}
                        for a, b in d.changed
                    ],
                    "removed": [_entry_json(tables, e, old) for e in d.removed],
                }
                for name, d in r.plan.diff.items()
            }
        if applied:
            item["written"] = r.written
            item["digest_marks"] = r.marks  # writes of the switch's digest mark, apart
        switches.append(item)
    return {"switches": switches}


def _line(tables: Tables, sign: str, entry: p4r.TableEntry, rules: dict[int, str]) -> str:
    text, rule_id = describe_entry(tables.pipeline, entry)
    why = ""
    if rule_id is not None:
        why = f"   # rule {rule_id}, {rules.get(rule_id, UNRECORDED)}"
    return f"      {sign} {text}{why}"


def print_reports(
    reports: Sequence[SwitchReport],
    tables: Tables,
    rules: dict[int, str],
    applied: bool,
    limit: int = 20,
    before: dict[str, dict[int, str]] | None = None,
) -> None:
    """Added and changed entries are labelled with `rules` (the new build's); removed ones
    with `before` (per switch, the rules of the build applied before)."""
    width = max((len(r.switch) for r in reports), default=0)
    for r in reports:
        old = (before or {}).get(r.switch, {})
        head = f"{r.switch:<{width}}  {r.address}"
        if r.error:
            print(f"{head}  ERROR: {r.error}")
            for change, error in r.failed_updates[:5]:
                print(f"      {change.op} {change.table}: {error}")
            continue
        assert r.plan is not None
        pipeline = "" if r.pipeline == "same" else f"  pipeline {r.pipeline}"
        if r.plan.empty and not pipeline:
            print(f"{head}  up to date")
            continue
        counts = ", ".join(
            f"{name} +{len(d.added)} ~{len(d.changed)} -{len(d.removed)}"
            for name, d in r.plan.diff.items()
        )
        done = f"  {r.written} writes in {r.seconds:.2f} s" if applied else ""
        print(f"{head}{pipeline}  {counts}{done}")
        shown = 0
        for d in r.plan.diff.values():
            lines = [_line(tables, "+", e, rules) for e in d.added]
            lines += [_line(tables, "~", b, rules) for _, b in d.changed]
            lines += [_line(tables, "-", e, old) for e in d.removed]
            for text in lines:
                if shown == limit:
                    break
                print(text)
                shown += 1
        total = sum(len(d.added) + len(d.changed) + len(d.removed) for d in r.plan.diff.values())
        if total > shown:
            print(f"      ... and {total - shown} more (--output json lists them all)")


def _fail(verb: str, message: str) -> int:
    print(f"p4seg {verb}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


@dataclass(frozen=True, slots=True)
class Session:
    """What every verb that talks to switches needs from its command line and build."""

    options: ControllerOptions
    tables: Tables
    switches: list[SwitchTarget]
    files: PipelineFiles


def session_of(
    verb: str, args: argparse.Namespace, compiled: Compiled, only: str | None = None
) -> Session | None:
    """The session for a command line, or None (the problem is reported); `only`: that
    switch alone, whatever the command line selects."""
    options = options_of(args)
    if isinstance(options, str):
        _fail(verb, options)
        return None
    tables = Tables(compiled.build.target.pipeline)
    selected = _selected(compiled, getattr(args, "switch", []), tables, only)
    if isinstance(selected, str):
        _fail(verb, selected)
        return None
    try:
        files = PipelineFiles.of(compiled.build_dir, args.target)
    except ControllerError as err:
        _fail(verb, str(err))
        return None
    return Session(options, tables, selected, files)


# Per build directory, per switch: what this process last brought the switch to (a
# long-running `watch` or service plans a marked switch from it instead of reading it).
_APPLIED: dict[str, dict[str, Desired]] = {}


def applied_here(compiled: Compiled) -> dict[str, Desired]:
    """Per switch, what this process last brought it to with `compiled`'s build directory
    (runtime.controller.apply_one's `known`); callers update it with what they apply."""
    return _APPLIED.setdefault(str(compiled.build_dir.resolve()), {})


def remember_applied(held: dict[str, Desired], target: SwitchTarget) -> None:
    """`target` applied: its switch holds `target.desired`. What was remembered stays when it
    names the same tables (the same digest): it is encoded already, and the next change of
    the switch is encoded and planned by difference from it (runtime/plan.py)."""
    before = held.get(target.name)
    if before is None or not before.digest or before.digest != target.desired.digest:
        held[target.name] = target.desired


def run(
    verb: str,
    args: argparse.Namespace,
    compiled: Compiled,
    extra: dict[str, object] | None = None,
    change: Monotone | None = None,
    only: Collection[str] | None = None,
    before_writing: Callable[[], object] | None = None,
) -> tuple[int, list[SwitchReport]]:
    """Plan or apply; prints the result (`extra` joins the JSON document); the exit status
    and the per-switch reports. `change`: the build is the one a proven build's switches
    hold with a change that only widens or narrows (or widens, then narrows, in two
    writes: compiler/differential.py `monotone_change`): written without an epoch flip where a
    switch holds exactly that build (runtime/overlay.py `monotone_plan`). `only`: these
    switches of the selection alone (the others are known to hold the build).
    `before_writing`: called once the session is set up, before the first write."""
    session = session_of(verb, args, compiled)
    if session is None:
        return EXIT_ERROR, []
    options, tables, files = session.options, session.tables, session.files
    selected = [t for t in session.switches if only is None or t.name in only]
    start = time.monotonic()
    apply = verb != "plan" and not getattr(args, "dry_run", False)

    def progress(switch: str, text: str) -> None:
        if args.output == "human":
            print(f"  {switch}: {text}", file=sys.stderr, flush=True)

    if apply:
        if before_writing is not None:
            before_writing()
        held = applied_here(compiled)
        planner = functools.partial(monotone_plan, change=change) if change else plan_switch
        reports = grpc_loops.run(
            apply_all(selected, tables, files, options, progress, held, planner)
        )
        for target, report in zip(selected, reports, strict=True):
            if report.ok:
                remember_applied(held, target)
            else:
                held.pop(target.name, None)
    else:
        reports = grpc_loops.run(plan_all(selected, tables, files, options))
    pending = [
        r for r in reports if r.ok and (r.pipeline != "same" or (r.plan and not r.plan.empty))
    ]
    failed = [r for r in reports if not r.ok]
    rules = _rule_lines(compiled.build)  # for the reports: made once the switches are written
    state = getattr(args, "state", None)
    state_dir = Path(state) if state else None
    before = applied_rules(state_dir)
    if apply and state_dir is not None:
        record_applied(state_dir, reports, rules)
        _record_allocation(state_dir, compiled, reports)
    if args.output == "json":
        doc = report_json(reports, tables, rules, apply, before)
        doc["seconds"] = round(time.monotonic() - start, 3)
        doc.update(extra or {})
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print_reports(reports, tables, rules, apply, before=before)
        took = time.monotonic() - start
        trouble = f"; {len(failed)} failed" if failed else ""
        if apply:
            written = sum(r.written for r in reports)
            print(
                f"Applied: {len(pending)} of {len(reports)} switches changed, {written} writes in {took:.2f} s{trouble}"
            )
        else:
            print(f"Plan: {len(pending)} of {len(reports)} switches would change{trouble}")
    if failed:
        return EXIT_ERROR, reports
    return (EXIT_CHANGES if pending and not apply else EXIT_OK), reports
