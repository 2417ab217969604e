"""`p4seg verify`, `diff`, `trace` and `test` (registered by compiler/cli.py).

Tables come from a build directory (`--from-build DIR`), from the live switches
(`--from-switches`: read through P4Runtime, no arbitration needed), or by default from
compiling the policy in memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from compiler.entries import SwitchTables
from compiler.inventory import Host, Inventory
from compiler.model import Policy

EXIT_OK, EXIT_ERROR, EXIT_DIFFERENT = 0, 1, 2

# (args) -> (policy, inventory, text) or None, diagnostics already reported
Checked = Callable[[argparse.Namespace], "tuple[Policy, Inventory, str] | None"]

VERIFY_HELP = """\
Prove that the tables implement the policy: for every sending host, destination address
class, protocol, port class and TCP-flag class — cut wherever the policy or any entry can
tell two packets apart, so one packet per class stands for all of them — walk a packet
through every hop's tables and compare its fate with the policy; check the source and the
destination ToR each enforce the policy alone (defence in depth) and that every host port
refuses every other source address. A difference is printed as a concrete packet, the hop,
table and entry that decided, and the policy rule and line that should have.

tables: compiled now (default), --from-build DIR, or --from-switches (read live)
exit status: 0 proven, 1 a counterexample or an error

examples:
    p4seg verify policies/trading_floor.zt -i topologies/trading_floor.yaml
    p4seg verify policy.zt -i floor.yaml --from-build build/floor
    p4seg verify policy.zt -i floor.yaml --from-switches --output json
"""

DIFF_HELP = """\
Which flows change between two policies — newly allowed (+) and newly denied (-), per
source, destination, protocol and ports — judged by the semantics, not the text: renaming a
service or reordering rules gives an empty diff. The evidence a change review files.

exit status: 0 the same, 2 different, 1 error

examples:
    p4seg diff old.zt new.zt -i topologies/trading_floor.yaml
    p4seg diff old.zt new.zt -i floor.yaml --output json
"""

TRACE_HELP = """\
The verdict for one flow (a TCP connect with its SYN-ACK, a UDP datagram, an ICMP echo with
its reply, or an `ip` packet), hop by hop: every table, the entry hit and its action, and
the policy rule and line behind it — from the compiled policy (--policy) or the entries on
the live switches (--from-switches; with --policy too, the policy's verdict is shown beside).

examples:
    p4seg trace algo1 oms1 tcp 9876 -i topologies/trading_floor.yaml --policy policies/trading_floor.zt
    p4seg trace oms1 algo1 tcp 9876 -i floor.yaml --from-switches
"""

TEST_HELP = """\
Run the policy's `expect` lines like a test suite: each against the policy semantics (over
all addresses) and, with an inventory, against the compiled tables (every host pair the
line covers, real table walks) or, with --live, against the entries on the running
switches.

exit status: 0 all pass, 1 a failure or an error

examples:
    p4seg test policies/trading_floor.zt -i topologies/trading_floor.yaml
    p4seg test policy.zt -i floor.yaml --live --output json
"""


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
    v.add_argument("-t", "--target", choices=("ref", "bmv2", "tofino"), default="ref")
    v.add_argument("--show", type=int, default=10, help="counterexamples printed (default: 10)")
    _switch_options(v)

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

    t = sub.add_parser(
        "trace",
        help="one flow hop by hop, table by table",
        description=TRACE_HELP,
        formatter_class=raw,
    )
    t.add_argument("src", metavar="SRC", help="a host of the inventory (name or address)")
    t.add_argument("dst", metavar="DST")
    t.add_argument("proto", metavar="PROTO", choices=("tcp", "udp", "icmp", "ip"))
    t.add_argument("port", metavar="PORT", type=int, nargs="?", default=0)
    t.add_argument("-i", "--inventory", required=True, metavar="INVENTORY")
    t.add_argument("--policy", metavar="POLICY", help="compile this policy (and judge by it)")
    t.add_argument("--from-switches", action="store_true", help="the entries on the switches")
    t.add_argument("--error-format", choices=("human", "json"), default="human")
    _switch_options(t)

    x = sub.add_parser(
        "test", help="run the policy's expect lines", description=TEST_HELP, formatter_class=raw
    )
    policy_arguments(x, False)
    x.add_argument("--live", action="store_true", help="against the entries on the switches")
    _switch_options(x)


# -- tables ---------------------------------------------------------------------------------


def _live_tables(args: argparse.Namespace, inventory: Inventory) -> dict[str, SwitchTables] | None:
    import asyncio
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
    ]
    read = asyncio.run(
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


# -- verbs ------------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace, checked: Checked) -> int:
    from compiler.verify import verify

    loaded = checked(args)
    if loaded is None:
        return EXIT_ERROR
    policy, inventory, text = loaded
    if args.from_switches:
        tables = _live_tables(args, inventory)
    elif args.from_build:
        tables = _build_tables(args.from_build)
    else:
        tables = _compiled_tables(policy, inventory, text, args.target)
    if tables is None:
        return EXIT_ERROR
    missing = [s.name for s in inventory.switches if s.name not in tables]
    if missing:
        print(f"p4seg verify: error: no entries for {', '.join(missing)}", file=sys.stderr)
        return EXIT_ERROR
    result = verify(policy, inventory, tables)
    if args.output == "json":
        print(json.dumps({
            "proven": result.proven, "classes": result.classes,
            "spoof_classes": result.spoof_classes, "seconds": round(result.seconds, 3),
            "counterexamples": [c.to_json() for c in result.counterexamples],
            "metered": [m.to_json() for m in result.metered],
            "metered_classes": result.metered_classes,
        }, indent=2, sort_keys=True))  # fmt: skip
    else:
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
        print(
            f"{verdict} ({result.classes} packet classes end to end and per ToR, "
            f"{result.spoof_classes} spoofing classes, {result.seconds:.2f} s)"
        )
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
    changes = semantic_diff(old, new, inventory)
    if args.output == "json":
        print(
            json.dumps({"same": not changes, "changes": [c.to_json() for c in changes]}, indent=2)
        )
    else:
        for c in changes:
            print(c.describe())
        added = sum(c.allowed for c in changes)
        print(
            "no flow changes" if not changes
            else f"{added} flow group(s) newly allowed, {len(changes) - added} newly denied"
        )  # fmt: skip
    return EXIT_DIFFERENT if changes else EXIT_OK


def _host(inventory: Inventory, text: str) -> Host | None:
    host = inventory.hosts_by_name.get(text)
    if host is None:
        host = next((h for h in inventory.hosts if h.ip_text == text), None)
    if host is None:
        print(
            f"p4seg trace: error: {text!r} is not a host of the inventory "
            f"(hosts: {', '.join(h.name for h in inventory.hosts)})",
            file=sys.stderr,
        )
    return host


def cmd_trace(args: argparse.Namespace, checked: Checked) -> int:
    from compiler.evaluate import Fabric
    from compiler.inventory import load_inventory
    from compiler.semantics import PolicySemantics
    from compiler.trace import trace_flow

    if not args.policy and not args.from_switches:
        print("p4seg trace: error: give --policy POLICY, --from-switches, or both", file=sys.stderr)
        return EXIT_ERROR
    policy = text = None
    if args.policy:
        loaded = checked(args)
        if loaded is None:
            return EXIT_ERROR
        policy, inventory, text = loaded
    else:
        try:
            inventory, _ = load_inventory(args.inventory)
        except Exception as err:
            print(f"p4seg trace: error: {err}", file=sys.stderr)
            return EXIT_ERROR
    src, dst = _host(inventory, args.src), _host(inventory, args.dst)
    if src is None or dst is None:
        return EXIT_ERROR
    if args.from_switches:
        tables = _live_tables(args, inventory)
    else:
        assert policy is not None and text is not None
        tables = _compiled_tables(policy, inventory, text, "ref")
    if tables is None:
        return EXIT_ERROR
    rules = {r.id: f"line {r.span.line}: {r.describe()}" for r in policy.rules} if policy else {}
    sem = PolicySemantics(policy) if policy else None
    result = trace_flow(Fabric(tables, inventory), sem, src, dst, args.proto, args.port)
    if args.output == "json":
        print(json.dumps(_trace_json(result, rules), indent=2, sort_keys=True))
    else:
        print(_trace_text(result, rules))
    return EXIT_OK


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
        "legs": _trace_legs(result, rules),
    }  # fmt: skip


def _trace_text(result: object, rules: dict[int, str]) -> str:
    from compiler.trace import Trace

    assert isinstance(result, Trace)
    flow = f"{result.src.name} ({result.src.ip_text}) -> {result.dst.name} ({result.dst.ip_text}) {result.proto}"
    if result.proto in ("tcp", "udp"):
        flow += f" {result.port}"
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
    tables: dict[str, SwitchTables] = {}
    if args.inventory:
        found = (
            _live_tables(args, inventory)
            if args.live
            else _compiled_tables(policy, inventory, text, "ref")
        )
        if found is None:
            return EXIT_ERROR
        tables = found
    elif args.live:
        print("p4seg test: error: --live needs -i INVENTORY", file=sys.stderr)
        return EXIT_ERROR
    results = run_expects(policy, inventory, tables)
    failed = [r for r in results if not r.ok]
    where = "switches" if args.live else "tables"
    if args.output == "json":
        print(json.dumps({
            "passed": len(results) - len(failed), "failed": len(failed),
            "expects": [{
                "line": r.expect.span.line, "expect": r.expect.describe(), "ok": r.ok,
                "semantics": r.semantics_ok, "semantics_note": r.semantics_note,
                where: r.tables_ok, "host_pairs": r.pairs, f"{where}_note": r.tables_note,
            } for r in results],
        }, indent=2))  # fmt: skip
    else:
        for r in results:
            mark = "PASS" if r.ok else "FAIL"
            checked_on = (
                f"semantics + {where} ({r.pairs} host pairs)" if args.inventory else "semantics"
            )
            print(f"{mark}  line {r.expect.span.line:<4} {r.expect.describe():<48} {checked_on}")
            if not r.semantics_ok:
                print(f"      semantics: {r.semantics_note}")
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
