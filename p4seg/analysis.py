"""`p4seg verify`, `diff`, `trace` and `test` (registered by p4seg/cli.py).

Tables come from a build directory (`--from-build DIR`), from the live switches
(`--from-switches`: read through P4Runtime, no arbitration needed), or by default from
compiling the policy in memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compiler.diagnostics import Diagnostic, Span, error
from compiler.diff import FlowChange
from compiler.entries import SwitchTables
from compiler.inventory import Host, Inventory
from compiler.model import Policy
from compiler.protocols import ICMP_ECHO_REQUEST, MAX_ICMP, MAX_PORT
from compiler.resolve import protocol_problem
from compiler.targets import TARGET_NAMES
from runtime import grpc_loops

EXIT_OK, EXIT_ERROR, EXIT_DIFFERENT = 0, 1, 2

# (args) -> (policy, inventory, text) or None, diagnostics already reported
Checked = Callable[[argparse.Namespace], "tuple[Policy, Inventory, str] | None"]

VERIFY_HELP = """\
Prove that the tables implement the policy, for every packet: the source and the
destination ToR each enforce the policy alone (defence in depth), routing delivers every
packet to its host through the spines, and every host port refuses every other source
address. A difference is printed as a concrete packet, the hop, table and entry that
decided, and the policy rule and line that should have.

The proof goes rule by rule first: per ToR, the identity tables give each host one tag
vector, and each rule's entries must match exactly the rule's packets among those the ToR
judges, give its outcome and keep the semantics' order (docs/pipeline.md). Whatever that
does not settle — a corrupted table, an odd route, a quarantined host — is proven pair by
pair: for every sending host, destination address class, protocol, port class and TCP-flag
class (cut wherever the policy or an entry can tell two packets apart, so one packet per
class stands for all of them), a packet is walked through every hop's tables and its fate
compared with the policy's. --by-pairs walks every pair (slower; the same verdict).

tables: compiled now (default), --from-build DIR, or --from-switches (read live)
Live tables are judged by the effective policy (the policy with the state directory's
grants, quarantines and time-bound rules at that moment, as `apply` made it): --state DIR
(default .p4seg), --at TIME for another moment (ISO 8601 with a zone, or `now`). The
output says which grants, quarantines and time-bound rules were in force.

exit status: 0 proven, 1 a counterexample or an error

examples:
    p4seg verify policies/trading_floor.zt -i topologies/trading_floor.yaml
    p4seg verify policy.zt -i floor.yaml --from-build build/floor
    p4seg verify policy.zt -i floor.yaml --from-switches --output json
    p4seg verify policy.zt -i floor.yaml --from-switches --at 2026-03-02T21:30:00Z
"""

DIFF_HELP = """\
Every change in what the switches would do between two policies, judged by the semantics,
not the text (renaming a service or reordering rules gives an empty diff): flows newly
allowed (+) or denied (-), and flows whose treatment changes (~): a rate, a `during`
window or `for` duration (when the flow passes, with whether the window is in force now or
at --at TIME), UDP replies, logging of refused packets; then single packets of host pairs
that change where no flow shows it. Changes with no inventory host at one end are marked:
the switches never see them. The evidence a change review files.

exit status: 0 the same, 2 different, 1 error

examples:
    p4seg diff old.zt new.zt -i topologies/trading_floor.yaml
    p4seg diff old.zt new.zt -i floor.yaml --output json
"""

TRACE_HELP = """\
The verdict for one flow (a TCP connect with its SYN-ACK, a UDP datagram, an ICMP message
— an echo request with its reply, any other type alone —, one packet of IP protocol N, or
an `ip` packet of a protocol no rule names), hop by hop: every table, the entry hit and its
action, and the policy rule and line behind it — from the compiled policy (--policy) or the
entries on the live switches (--from-switches; with --policy too, the verdict of the
effective policy at --at TIME, default now, with the grants and quarantines of --state, is
shown beside).

PROTO [ARG]:  tcp PORT | udp PORT | proto N (0-255, not 6, 17, 1) | ip
              icmp [TYPE [CODE]]: TYPE a number or a name (echo-request, frag-needed, ...;
              `type 3 code 4` as in a rule works too); default an echo request (type 8)

exit status: 0 the flow passes, 3 it is blocked, 4 the tables and the policy disagree,
1 error (bad input, unreadable switches)

examples:
    p4seg trace algo1 oms1 tcp 9876 -i topologies/trading_floor.yaml --policy policies/trading_floor.zt
    p4seg trace oms1 risk1 proto 132 -i floor.yaml --policy policy.zt
    p4seg trace risk1 oms1 icmp frag-needed -i floor.yaml --policy policy.zt
    p4seg trace oms1 algo1 tcp 9876 -i floor.yaml --from-switches
"""

TEST_HELP = """\
Run the policy's `expect` lines like a test suite: each against the policy semantics (over
all addresses) and, with an inventory, against the compiled tables (every host pair the
line covers, real table walks) or, with --live, against the entries on the running
switches, which must do what the effective policy does at that moment (--state, --at):
a line whose flow a time-bound rule, grant or quarantine changes is reported as such, not
as a failure of the switches.

exit status: 0 all pass, 1 a failure or an error

examples:
    p4seg test policies/trading_floor.zt -i topologies/trading_floor.yaml
    p4seg test policy.zt -i floor.yaml --live --output json
"""


def _moment_options(p: argparse.ArgumentParser) -> None:
    from p4seg.commands import at_argument, state_argument

    state_argument(p)
    at_argument(p)


def _switch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per switch (live reads)")
    p.add_argument("--tls-ca", metavar="PEM", help="verify switches against this CA (TLS)")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate (mTLS)")
    p.add_argument("--tls-key", metavar="PEM", help="client private key (mTLS)")
    p.add_argument("--output", choices=("human", "json"), default="human", help="stdout format")


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    policy_arguments: Callable[[argparse.ArgumentParser, bool], None],
) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    v = sub.add_parser(
        "verify",
        help="prove the tables implement the policy",
        description=VERIFY_HELP,
        formatter_class=raw,
    )
    policy_arguments(v, True)
    source = v.add_mutually_exclusive_group()
    source.add_argument("--from-build", metavar="DIR", help="the entries of a build directory")
    source.add_argument("--from-switches", action="store_true", help="the entries on the switches")
    v.add_argument("-t", "--target", choices=TARGET_NAMES, default="ref")
    v.add_argument("--show", type=int, default=10, help="counterexamples printed (default: 10)")
    v.add_argument(
        "--by-pairs",
        action="store_true",
        help="walk every (sender, destination class) pair instead of proving rule by rule",
    )
    _switch_options(v)
    _moment_options(v)

    d = sub.add_parser(
        "diff",
        help="which flows two policies treat differently",
        description=DIFF_HELP,
        formatter_class=raw,
    )
    d.add_argument("old", metavar="OLD")
    d.add_argument("new", metavar="NEW")
    d.add_argument("-i", "--inventory", required=True, metavar="INVENTORY")
    d.add_argument("--error-format", choices=("human", "json"), default="human")
    d.add_argument("--output", choices=("human", "json"), default="human")
    d.add_argument(
        "--at", metavar="TIME", help="say which windows are in force at TIME (default: now)"
    )

    t = sub.add_parser(
        "trace",
        help="one flow hop by hop, table by table",
        description=TRACE_HELP,
        formatter_class=raw,
    )
    t.add_argument("src", metavar="SRC", help="a host of the inventory (name or address)")
    t.add_argument("dst", metavar="DST")
    t.add_argument("proto", metavar="PROTO", help="tcp, udp, icmp, ip or proto (then N)")
    t.add_argument(
        "port",
        metavar="ARG",
        nargs="*",
        help="tcp/udp: the port; icmp: [TYPE [CODE]] (number or name); proto: N",
    )
    t.add_argument("-i", "--inventory", required=True, metavar="INVENTORY")
    t.add_argument("--policy", metavar="POLICY", help="compile this policy (and judge by it)")
    t.add_argument("--from-switches", action="store_true", help="the entries on the switches")
    t.add_argument("--error-format", choices=("human", "json"), default="human")
    _switch_options(t)
    _moment_options(t)

    x = sub.add_parser(
        "test", help="run the policy's expect lines", description=TEST_HELP, formatter_class=raw
    )
    policy_arguments(x, False)
    x.add_argument("--live", action="store_true", help="against the entries on the switches")
    _switch_options(x)
    _moment_options(x)


# -- tables ---------------------------------------------------------------------------------


def _live_tables(args: argparse.Namespace, inventory: Inventory) -> dict[str, SwitchTables] | None:
    from pathlib import Path as P

    from finsy.grpcutil import GRPCCredentialsTLS

    from p4src.spec import PIPELINE
    from runtime.controller import ControllerOptions, SwitchTarget, read_tables
    from runtime.plan import Desired, Tables, clone_session

    tls = None
    if args.tls_ca:
        tls = GRPCCredentialsTLS(
            cacert=P(args.tls_ca),
            cert=P(args.tls_cert) if args.tls_cert else None,
            private_key=P(args.tls_key) if args.tls_key else None,
        )
    tables = Tables(PIPELINE)
    targets = [  # reading needs no desired state
        SwitchTarget(s.name, s.p4rt, s.device_id, Desired(s.name, {}, clone_session(s.cpu_port)))
        for s in inventory.switches
        if s.name not in inventory.down  # out of service: nothing to read, nothing routed to it
    ]
    read = grpc_loops.run(
        read_tables(targets, tables, ControllerOptions(timeout=args.timeout, tls=tls))
    )
    failed = {n: r for n, r in read.items() if isinstance(r, str)}
    for name, reason in failed.items():
        print(f"p4seg: error: cannot read {name}: {reason}", file=sys.stderr)
    if failed:
        return None
    return {n: r for n, r in read.items() if not isinstance(r, str)}


def _build_tables(directory: str) -> dict[str, SwitchTables] | None:
    from compiler.emit import load_entries

    out = {}
    paths = sorted(
        p for p in Path(directory, "entries").glob("*.json") if not p.name.endswith("-runtime.json")
    )
    if not paths:
        print(
            f"p4seg: error: no entries in {directory}/entries (a `p4seg compile` output?)",
            file=sys.stderr,
        )
        return None
    for path in paths:
        try:
            sw = load_entries(path.read_text())
        except (OSError, ValueError) as err:
            print(f"p4seg: error: {path}: {err}", file=sys.stderr)
            return None
        out[sw.switch] = sw
    return out


def _compiled_tables(
    policy: Policy, inventory: Inventory, text: str, target: str
) -> dict[str, SwitchTables] | None:
    from compiler.diagnostics import P4segError
    from compiler.emit import build

    try:
        built = build(policy, inventory, text, target)
    except P4segError as err:
        print("\n".join(d.message for d in err.diagnostics), file=sys.stderr)
        return None
    return {s.switch: s for s in built.switches}


# -- the effective policy -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Judged:
    """The policy a verb judges by: the file's, or the effective one at a moment."""

    policy: Policy
    text: str
    report: list[str]  # what was in force (human lines; empty: the file as written)
    doc: dict[str, object] | None  # the same for --output json


def _moment(args: argparse.Namespace, verb: str) -> float | None:
    from runtime.live import parse_moment

    moment = parse_moment(args.at or "now")
    if isinstance(moment, str):
        print(f"p4seg {verb}: error: {moment}", file=sys.stderr)
        return None
    return moment


def _judged(
    args: argparse.Namespace, policy: Policy, inventory: Inventory, text: str, live: bool
) -> Judged | None:
    """The effective policy (grants, quarantines, time-bound rules of --state at --at) when
    the tables are the switches' or a moment was asked for; else the policy as written."""
    if not live and not getattr(args, "at", None):
        return Judged(policy, text, [], None)
    from compiler.allocation import AllocationError, assign_rule_ids
    from compiler.check import check_policy
    from compiler.diagnostics import P4segError, SourceFiles, render_all
    from p4seg.allocations import state_allocation
    from runtime.live import (
        LiveState,
        effective_policy,
        in_force_report,
        policy_text_with_grants,
    )

    moment = _moment(args, args.verb)
    if moment is None:
        return None
    try:
        state = LiveState.load(Path(args.state))
    except ValueError as err:
        print(f"p4seg {args.verb}: error: {err}", file=sys.stderr)
        return None
    granted = policy_text_with_grants(text, state, moment)
    if granted != text:
        result = check_policy(granted, args.policy, inventory, expectations=False)
        if result.policy is None:
            sources = SourceFiles()
            sources.add(args.policy, granted)
            errors = [d for d in result.diagnostics if d.is_error]
            print(render_all(errors, sources), file=sys.stderr)
            return None
        policy = result.policy
    hosts = {h.name: h.ip for h in inventory.hosts}
    effective = effective_policy(policy, state, moment, hosts)
    try:  # the rule ids the controller gave: the ones the switches' entries carry
        effective, _ = assign_rule_ids(effective, state_allocation(Path(args.state)))
    except (AllocationError, P4segError) as err:
        print(f"p4seg {args.verb}: error: {err}", file=sys.stderr)
        return None
    report = in_force_report(policy, state, moment)
    return Judged(effective, granted, report.lines(), report.to_json())


# -- verbs ------------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace, checked: Checked) -> int:
    from compiler.verify import verify

    loaded = checked(args)
    if loaded is None:
        return EXIT_ERROR
    judged = _judged(args, *loaded, live=args.from_switches)
    if judged is None:
        return EXIT_ERROR
    policy, inventory = judged.policy, loaded[1]
    if args.from_switches:
        tables = _live_tables(args, inventory)
    elif args.from_build:
        tables = _build_tables(args.from_build)
    else:
        tables = _compiled_tables(policy, inventory, judged.text, args.target)
    if tables is None:
        return EXIT_ERROR
    missing = [
        s.name for s in inventory.switches if s.name not in tables and s.name not in inventory.down
    ]
    if missing:
        print(f"p4seg verify: error: no entries for {', '.join(missing)}", file=sys.stderr)
        return EXIT_ERROR
    result = verify(policy, inventory, tables, exact=args.by_pairs)
    by_rules = result.by_rules
    if args.output == "json":
        print(json.dumps({
            "proven": result.proven, "classes": result.classes,
            "spoof_classes": result.spoof_classes, "seconds": round(result.seconds, 3),
            "by_rules": None if by_rules is None else by_rules.to_json(),
            "counterexamples": [c.to_json() for c in result.counterexamples],
            "metered": [m.to_json() for m in result.metered],
            "metered_classes": result.metered_classes,
            **({"effective": judged.doc} if judged.doc else {}),
        }, indent=2, sort_keys=True))  # fmt: skip
    else:
        for line in judged.report:
            print(line)
        for c in result.counterexamples[: args.show]:
            print(c.describe())
        if len(result.counterexamples) > args.show:
            print(
                f"... and {len(result.counterexamples) - args.show} more (--show N, --output json)"
            )
        for line in result.metered_note():
            print(line)
        verdict = (
            "PROVEN: the tables implement the policy"
            if result.proven
            else f"NOT PROVEN: {len(result.counterexamples)} counterexamples"
        )
        if by_rules is not None:
            how = f"{by_rules.tors} ToRs rule by rule ({by_rules.checks} rule checks)"
            if by_rules.left is not None:
                how += (
                    f", {by_rules.left_pairs()} (sender, destination) pairs left to walk: "
                    f"{result.classes} packet classes"
                )
        else:
            how = f"{result.classes} packet classes end to end and per ToR"
        print(f"{verdict} ({how}, {result.spoof_classes} spoofing classes, {result.seconds:.2f} s)")
        for reason in by_rules.reasons if by_rules is not None else ():
            print(f"  by pairs: {reason}")
    return EXIT_OK if result.proven else EXIT_ERROR


def cmd_diff(args: argparse.Namespace, checked: Checked) -> int:
    from compiler.diff import semantic_diff

    policies = []
    for path in (args.old, args.new):
        ns = argparse.Namespace(**{**vars(args), "policy": path})
        loaded = checked(ns)
        if loaded is None:
            return EXIT_ERROR
        policies.append(loaded)
    (old, inventory, _), (new, _, _) = policies
    moment = _moment(args, "diff")
    if moment is None:
        return EXIT_ERROR

    changes = semantic_diff(old, new, inventory, moment)
    if args.output == "json":
        print(
            json.dumps({"same": not changes, "changes": [c.to_json() for c in changes]}, indent=2)
        )
    else:
        for c in changes:
            print(c.describe())
        print(_diff_summary(changes))
    return EXIT_DIFFERENT if changes else EXIT_OK


def _diff_summary(changes: list[FlowChange]) -> str:
    if not changes:
        return "no changes: the switches would do exactly the same"
    verdicts = [c for c in changes if c.kind == "verdict"]
    added = sum(c.allowed for c in verdicts)
    parts = [
        f"{added} flow group(s) newly allowed",
        f"{len(verdicts) - added} newly denied",
        f"{len(changes) - len(verdicts)} treated differently",
    ]
    hidden = sum(not c.on_switches for c in changes)
    tail = f" ({hidden} not on the switches: no pair of inventory hosts)" if hidden else ""
    return ", ".join(parts) + tail


COMMAND_LINE = "command line"
TRACE_PROTOS = ("tcp", "udp", "icmp", "ip", "proto")


@dataclass(frozen=True, slots=True)
class FlowInput:
    src: Host
    dst: Host
    proto: str  # tcp | udp | icmp | ip | "proto N"
    port: int  # tcp/udp: the destination port; icmp: the ICMP type; otherwise 0
    icmp_code: int = 0


def _flow_input(args: argparse.Namespace, inventory: Inventory) -> FlowInput | None:
    """SRC DST PROTO [ARG...] of `trace`, checked like policy text: located, coded errors with
    suggestions, all reported at once (None: reported)."""
    import difflib

    from compiler.diagnostics import SourceFiles, render_all

    words = [args.src, args.dst, args.proto, *args.port]
    line = " ".join(words)
    columns = [sum(len(w) + 1 for w in words[:i]) + 1 for i in range(len(words))]

    def at(i: int) -> Span:
        return Span.point(COMMAND_LINE, 1, columns[i], len(words[i]))

    diags: list[Diagnostic] = []
    hosts: list[Host] = []
    for i, text in enumerate(words[:2]):
        host = inventory.hosts_by_name.get(text) or next(
            (h for h in inventory.hosts if h.ip_text == text), None
        )
        if host is None:
            close = difflib.get_close_matches(text, list(inventory.hosts_by_name), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            diags.append(error("E101", f"unknown host '{text}'{hint}", at(i)))
        else:
            hosts.append(host)
    proto, rest = args.proto, words[3:]
    spec: tuple[str, int, int] | None = None
    if proto not in TRACE_PROTOS:
        close = difflib.get_close_matches(proto, TRACE_PROTOS, n=1, cutoff=0.5)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        diags.append(error("E001", f"unknown protocol `{proto}`: expected tcp, udp, icmp, ip or proto N{hint}", at(2)))  # fmt: skip
    elif proto in ("tcp", "udp"):
        if not rest:
            diags.append(error("E208", f"a flow over {proto} needs a port, e.g. `{proto} 443`", at(2)))  # fmt: skip
        elif (port := _number_word(rest[0], "port", MAX_PORT, "E202", at(3), diags)) is not None:
            spec = (proto, port, 0)
        if len(rest) > 1:
            diags.append(error("E001", f"unexpected `{rest[1]}`: a flow has one port", at(4)))
    elif proto == "ip":
        if rest:
            diags.append(error("E208", "ports apply to tcp and udp only, not ip", at(3)))
        spec = ("ip", 0, 0)
    elif proto == "proto":
        if not rest:
            diags.append(error("E001", "expected an IP protocol number after `proto` (`proto 132`)", at(2)))  # fmt: skip
        else:
            number = _number_word(rest[0], "IP protocol", 255, "E210", at(3), diags)
            problem = None if number is None else protocol_problem(number)
            if problem is not None:
                diags.append(error("E210", problem, at(3)))
            elif number is not None:
                spec = (f"proto {number}", 0, 0)
        if len(rest) > 1:
            diags.append(error("E208", f"ports apply to tcp and udp only, not proto {rest[0]}", at(4)))  # fmt: skip
    else:
        spec = _icmp_words(rest, at, diags)
    if diags or spec is None:
        sources = SourceFiles()
        sources.add(COMMAND_LINE, line)
        if args.error_format == "json":
            print(json.dumps({"errors": len(diags), "diagnostics": [d.to_json() for d in diags]}, indent=2))  # fmt: skip
        else:
            print(render_all(diags, sources), file=sys.stderr)
        return None
    return FlowInput(hosts[0], hosts[1], *spec)


def _number_word(
    text: str, what: str, top: int, code: str, span: Span, diags: list[Diagnostic]
) -> int | None:
    """A whole number from 0 to `top` on the command line, or None (and an error)."""
    if not (text.isascii() and text.isdigit()):
        diags.append(error(code, f"{what} {text!r} is not a number from 0 to {top}", span))
        return None
    if int(text) > top:
        shown = text if len(text) <= 12 else "number"
        diags.append(error(code, f"{what} {shown} is out of range 0-{top}", span))
        return None
    return int(text)


def _icmp_words(
    words: list[str], at: Callable[[int], Span], diags: list[Diagnostic]
) -> tuple[str, int, int] | None:
    """`icmp [TYPE [CODE]]`: TYPE a number or a name of the language's table (`echo-request`,
    `frag-needed`), optionally written `type N code M` as in a rule; default an echo request."""
    import difflib

    from compiler.model import ICMP_NAMES

    i = 3  # index of the word being read, as `at` counts them
    rest = list(words)
    if rest and rest[0] == "type":
        rest, i = rest[1:], i + 1
    if not rest:
        if words:  # `icmp type` and nothing after it
            diags.append(error("E001", "expected an ICMP type after `type` (`icmp type 8`)", at(3)))  # fmt: skip
            return None
        return ("icmp", ICMP_ECHO_REQUEST, 0)
    type_word = rest[0]
    name = ICMP_NAMES.get(type_word)
    fixed_code: int | None = None
    if name is not None:
        icmp_type, fixed_code = name
    elif rest[0].isascii() and rest[0].isdigit():
        icmp_type = _number_word(rest[0], "ICMP type", MAX_ICMP, "E211", at(i), diags) or 0
    else:
        close = difflib.get_close_matches(rest[0], list(ICMP_NAMES), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else " (or give its number)"
        diags.append(error("E211", f"unknown ICMP type '{rest[0]}'{hint}", at(i)))
        return None
    rest, i = rest[1:], i + 1
    if rest and rest[0] == "code":
        rest, i = rest[1:], i + 1
        if not rest:
            diags.append(error("E001", "expected an ICMP code after `code` (`icmp type 3 code 4`)", at(i - 1)))  # fmt: skip
            return None
    code = fixed_code or 0
    if rest:
        if fixed_code is not None:
            diags.append(error("E211", f"'{type_word}' is type {icmp_type} code {fixed_code}: it takes no other code", at(i)))  # fmt: skip
        else:
            code = _number_word(rest[0], "ICMP code", MAX_ICMP, "E211", at(i), diags) or 0
        if len(rest) > 1:
            diags.append(error("E001", f"unexpected `{rest[1]}`: an ICMP flow has one type and code", at(i + 1)))  # fmt: skip
    return ("icmp", icmp_type, code)


EXIT_BLOCKED, EXIT_DISAGREE = 3, 4


def cmd_trace(args: argparse.Namespace, checked: Checked) -> int:
    from compiler.evaluate import Fabric
    from compiler.inventory import load_inventory
    from compiler.semantics import PolicySemantics
    from compiler.trace import trace_flow

    if not args.policy and not args.from_switches:
        print("p4seg trace: error: give --policy POLICY, --from-switches, or both", file=sys.stderr)
        return EXIT_ERROR
    policy: Policy | None = None
    judged: Judged | None = None
    if args.policy:
        loaded = checked(args)
        if loaded is None:
            return EXIT_ERROR
        inventory = loaded[1]
        judged = _judged(args, *loaded, live=args.from_switches)
        if judged is None:
            return EXIT_ERROR
        policy = judged.policy
    else:
        try:
            inventory, _ = load_inventory(args.inventory)
        except Exception as err:
            print(f"p4seg trace: error: {err}", file=sys.stderr)
            return EXIT_ERROR
    flow = _flow_input(args, inventory)
    if flow is None:
        return EXIT_ERROR
    if args.from_switches:
        tables = _live_tables(args, inventory)
    else:
        assert policy is not None and judged is not None
        tables = _compiled_tables(policy, inventory, judged.text, "ref")
    if tables is None:
        return EXIT_ERROR
    rules = {r.id: f"line {r.span.line}: {r.describe()}" for r in policy.rules} if policy else {}
    sem = PolicySemantics(policy) if policy else None
    result = trace_flow(
        Fabric(tables, inventory), sem, flow.src, flow.dst, flow.proto, flow.port, flow.icmp_code
    )
    report = judged.report if judged else []
    if args.output == "json":
        doc = _trace_json(result, rules)
        if judged and judged.doc:
            doc["effective"] = judged.doc
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        for line in report:
            print(line)
        print(_trace_text(result, rules))
    if result.policy_allows is not None and result.policy_allows != result.passed:
        return EXIT_DISAGREE
    return EXIT_OK if result.passed else EXIT_BLOCKED


def _trace_legs(result: object, rules: dict[int, str]) -> list[dict[str, object]]:
    from compiler.trace import Trace

    assert isinstance(result, Trace)
    legs: list[dict[str, object]] = []
    for leg in result.legs:
        hops: list[dict[str, object]] = []
        for hop in leg.path.hops:
            hops.append({
                "switch": hop.switch,
                "tables": [
                    {"table": h.table, "action": h.action, "params": dict(h.params),
                     "entry": _entry_text(h.entry) if h.entry else "default action"}
                    for h in hop.hits
                ],
                "egress_port": hop.egress_port,
                "rule": rules.get(hop.rule_id, "default deny" if hop.rule_id == 0 else None) if hop.rule_id is not None else None,
            })  # fmt: skip
        legs.append({
            "packet": leg.what, "from": leg.sender, "delivered_to": leg.path.delivered_to,
            "policy": leg.policy.describe() if leg.policy else None, "hops": hops,
        })  # fmt: skip
    return legs


def _entry_text(entry: object) -> str:
    from compiler.verify import _entry

    return _entry(entry)  # type: ignore[arg-type]


def _trace_json(result: object, rules: dict[int, str]) -> dict[str, object]:
    from compiler.trace import Trace

    assert isinstance(result, Trace)
    return {
        "src": result.src.name, "dst": result.dst.name, "proto": result.proto,
        "port": result.port, "passed": result.passed, "policy_allows": result.policy_allows,
        "protocol": result.legs[0].packet.protocol,
        **({"icmp_type": result.port, "icmp_code": result.icmp_code} if result.proto == "icmp" else {}),
        "legs": _trace_legs(result, rules),
    }  # fmt: skip


def _trace_text(result: object, rules: dict[int, str]) -> str:
    from compiler.trace import Trace, icmp_packet_text

    assert isinstance(result, Trace)
    flow = f"{result.src.name} ({result.src.ip_text}) -> {result.dst.name} ({result.dst.ip_text}) {result.proto}"
    if result.proto in ("tcp", "udp"):
        flow += f" {result.port}"
    elif result.proto == "icmp":
        flow += f" {icmp_packet_text(result.port, result.icmp_code)}"
    elif result.proto == "ip":
        flow += f" (protocol {result.legs[0].packet.protocol})"
    verdict = "PASSES" if result.passed else "BLOCKED"
    lines = [f"{flow}: {verdict}"]
    if result.policy_allows is not None:
        agree = result.policy_allows == result.passed
        lines.append(
            f"  policy: {'allowed' if result.policy_allows else 'denied'}"
            + ("" if agree else "  <-- the tables disagree (p4seg verify)")
        )
    for leg in _trace_legs(result, rules):
        where = f"delivered to {leg['delivered_to']}" if leg["delivered_to"] else "dropped"
        lines.append(f"  {leg['packet']} from {leg['from']}: {where}")
        if leg["policy"]:
            lines.append(f"    policy: {leg['policy']}")
        for hop in leg["hops"]:  # type: ignore[attr-defined]
            out = (
                f" -> port {hop['egress_port']}"
                if hop["egress_port"] is not None
                else " -> dropped"
            )
            lines.append(f"    {hop['switch']}{out}")
            for t in hop["tables"]:
                lines.append(f"      {t['table']:<13} {t['entry']}")
            if hop["rule"]:
                lines.append(f"      {'decided by':<13} {hop['rule']}")
    return "\n".join(lines)


def cmd_test(args: argparse.Namespace, checked: Checked) -> int:
    from compiler.trace import run_expects

    loaded = checked(args)
    if loaded is None:
        return EXIT_ERROR
    policy, inventory, text = loaded
    if args.live and not args.inventory:
        print("p4seg test: error: --live needs -i INVENTORY", file=sys.stderr)
        return EXIT_ERROR
    judged = _judged(args, policy, inventory, text, live=args.live)
    if judged is None:
        return EXIT_ERROR
    effective = judged.policy if judged.report else None
    tables: dict[str, SwitchTables] = {}
    if args.inventory:
        found = (
            _live_tables(args, inventory)
            if args.live
            else _compiled_tables(judged.policy, inventory, judged.text, "ref")
        )
        if found is None:
            return EXIT_ERROR
        tables = found
    results = run_expects(policy, inventory, tables, effective)
    failed = [r for r in results if not r.ok]
    where = "switches" if args.live else "tables"
    if args.output == "json":
        print(json.dumps({
            "passed": len(results) - len(failed), "failed": len(failed),
            **({"effective": judged.doc} if judged.doc else {}),
            "expects": [{
                "line": r.expect.span.line, "expect": r.expect.describe(), "ok": r.ok,
                "semantics": r.semantics_ok, "semantics_note": r.semantics_note,
                where: r.tables_ok, "host_pairs": r.pairs, f"{where}_note": r.tables_note,
                "effective_note": r.effective_note,
            } for r in results],
        }, indent=2))  # fmt: skip
    else:
        for line in judged.report:
            print(line)
        judge = f"{where} (effective policy)" if effective else where
        for r in results:
            mark = "PASS" if r.ok else "FAIL"
            checked_on = (
                f"semantics + {judge} ({r.pairs} host pairs)" if args.inventory else "semantics"
            )
            print(f"{mark}  line {r.expect.span.line:<4} {r.expect.describe():<48} {checked_on}")
            if not r.semantics_ok:
                print(f"      semantics: {r.semantics_note}")
            if r.effective_note:
                print(f"      not in effect now: {r.effective_note}")
            if not r.tables_ok:
                print(f"      {where}: {r.tables_note}")
        print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return EXIT_ERROR if failed else EXIT_OK


HANDLERS: dict[str, Callable[[argparse.Namespace, Checked], int]] = {
    "verify": cmd_verify,
    "diff": cmd_diff,
    "trace": cmd_trace,
    "test": cmd_test,
}
