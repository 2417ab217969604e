"""`p4seg up`: compile, bring the floor up in Mininet, apply, prove it with real packets.

compile the (effective) policy  ->  start one switch process per switch node and the
hosts  ->  apply with the controller  ->  the segmentation matrix  ->  tear down
(or, with --keep, the Mininet CLI with `p4seg watch` running until you exit)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime import grpc_loops
from runtime.files import write_atomic

if TYPE_CHECKING:  # the verb's code pulls in finsy, grpc and Mininet: only `up` pays for it
    from compiler.inventory import Inventory
    from p4seg.control import Compiled
    from topologies.matrix import Matrix
    from topologies.network import Floor

EXIT_OK, EXIT_ERROR = 0, 1
MATRIX_FILE = "matrix.json"  # the last `up`'s segmentation matrix, in the state directory

UP_HELP = """\
The whole story on one machine: compile the policy, bring the inventory's floor up in
Mininet (one reference switch process per switch, or BMv2 with --target bmv2), apply the
policy with the controller, then send real traffic — a TCP connect to a real listener, a UDP
datagram to a real receiver, an ICMP echo — for every ordered pair of hosts and every
representative flow (each allowed service's ports, the ports just outside them, ICMP, a
random sample of others), and compare with what the policy semantics say. Prints the grid
(rows: sources, columns: destinations; a number is how many allowed flows passed, `.` means
nothing is allowed and nothing passed, X a mismatch, listed below), then tears everything
down. Needs root. Any inventory `check` accepts comes up: Mininet gets short node names
where the inventory's would not fit Linux's 15-character interface names; everything you
read and type uses the inventory's. With --keep, the Mininet CLI takes inventory names:
`hdb-replica-01 ping -c1 web-1` (later host names become addresses), `py node['web-1']`.

exit status: 0 every probe as the policy says, 1 a mismatch or an error

examples:
    p4seg up policies/trading_floor.zt -i topologies/trading_floor.yaml
    p4seg up policy.zt -i topologies/small.yaml --output json
    p4seg up policy.zt -i floor.yaml --target bmv2       # simple_switch_grpc on PATH
    p4seg up policy.zt -i floor.yaml --keep              # then the Mininet CLI, watch live
"""


def register(sub: Any, policy_arguments: Callable[[argparse.ArgumentParser, bool], None]) -> None:
    from p4seg.commands import add_controller_arguments

    p = sub.add_parser(
        "up",
        help="bring the floor up in Mininet, apply, and check it with real packets",
        description=UP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    policy_arguments(p, True)
    add_controller_arguments(p)
    p.add_argument("--keep", action="store_true", help="keep the floor up (Mininet CLI) after")
    p.add_argument("--samples", type=int, default=3, help="random extra ports per protocol")
    p.add_argument("--probe-timeout", type=float, default=1.5, help="seconds per probe")
    p.add_argument(
        "--state",
        default=".p4seg",
        help=f"state directory: the matrix is saved there ({MATRIX_FILE}), and --keep's watch "
        "keeps its state there",
    )


def on_loopback(inventory: Inventory, ports: dict[str, int]) -> Inventory:
    """`inventory` with every switch serving P4Runtime where a floor on this machine can:
    a switch keeps a 127.0.0.1 address of its own; any other (a real switch's management
    address, `localhost`, a port another switch has) gets a free loopback port, kept in
    `ports` (switch -> port) so that every later compile (--keep's watch) finds the same."""
    from compiler.inventory import Inventory
    from topologies.switches import free_port

    for sw in inventory.switches:  # first the switches that keep their own port
        host, _, text = sw.p4rt.rpartition(":")
        port = int(text)
        own = host == "127.0.0.1" and 0 < port < 65536 and port not in ports.values()
        if sw.name not in ports and own:
            ports[sw.name] = port
    for sw in inventory.switches:
        if sw.name not in ports:
            ports[sw.name] = free_port(set(ports.values()))
    switches = tuple(
        dataclasses.replace(sw, p4rt=f"127.0.0.1:{ports[sw.name]}") for sw in inventory.switches
    )
    return Inventory.build(
        inventory.name, inventory.file, switches, inventory.hosts, inventory.links, inventory.down
    )


def run_up(args: argparse.Namespace, inventory_front: Callable[..., Compiled | None]) -> int:
    from p4seg.control import session_of
    from runtime.controller import apply_all
    from runtime.live import LiveState, effective_policy
    from topologies.matrix import representative_flows, run_matrix
    from topologies.network import Floor

    def say(text: str) -> None:
        if args.output == "human":
            print(f"p4seg up: {text}", file=sys.stderr, flush=True)

    ports: dict[str, int] = {}
    moved: list[str] = []

    def front(*args: Any, **kwargs: Any) -> Compiled | None:
        """The CLI's front end, with the switches on this machine's loopback."""
        compiled = inventory_front(*args, **kwargs)
        if compiled is None:
            return None
        here = on_loopback(compiled.inventory, ports)
        pairs = zip(compiled.inventory.switches, here.switches, strict=True)
        moved[:] = [f"{a.name} {a.p4rt} -> {b.p4rt}" for a, b in pairs if a.p4rt != b.p4rt]
        return dataclasses.replace(compiled, inventory=here)

    start = time.monotonic()
    say("compiling")
    compiled = front(
        args,
        lambda text: text,
        lambda policy, inv: effective_policy(
            policy, LiveState(), time.time(), {h.name: h.ip for h in inv.hosts}
        ),
    )
    if compiled is None:
        return EXIT_ERROR
    if moved:
        say(f"P4Runtime on this machine's loopback instead: {', '.join(moved)}")
    session = session_of("up", args, compiled)
    if session is None:
        return EXIT_ERROR
    try:
        with Floor(compiled.inventory, args.target, progress=say) as floor:
            say(f"floor up in {time.monotonic() - start:.1f} s; applying the policy")
            reports = grpc_loops.run(
                apply_all(session.switches, session.tables, session.files, session.options)
            )
            failed = [r for r in reports if not r.ok]
            for r in failed:
                print(f"p4seg up: {r.switch}: {r.error}", file=sys.stderr)
            if failed:
                return EXIT_ERROR
            say(f"applied: {sum(r.written for r in reports)} writes on {len(reports)} switches")
            flows = representative_flows(compiled.policy, args.samples)
            hosts = len(floor.hosts)
            say(f"probing {hosts * (hosts - 1) * len(flows)} flows ({len(flows)} per host pair)")
            matrix = run_matrix(floor, compiled.policy, flows, args.probe_timeout)
            # the last matrix, for `serve`'s map and for whoever looks later
            write_atomic(Path(args.state) / MATRIX_FILE, json.dumps(matrix.to_json()) + "\n")
            if args.output == "json":
                print(json.dumps(matrix.to_json(), indent=2, sort_keys=True))
            else:
                print(matrix.render(color=sys.stdout.isatty()))
            if args.keep:
                _keep(floor, matrix, args, front)
            status = EXIT_OK if not matrix.mismatches else EXIT_ERROR
    except (PermissionError, OSError, RuntimeError, ValueError) as err:
        print(f"p4seg up: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    left = floor.leftovers()
    if left:
        print(f"p4seg up: warning: left behind: {', '.join(left)}", file=sys.stderr)
    say(f"torn down; {time.monotonic() - start:.1f} s in all")
    return status


def keep_hint(floor: Floor, matrix: Matrix) -> str:
    """What `--keep` prints before the CLI: commands to try on this floor's own hosts (a pair
    the policy lets ping, if there is one), and Mininet's short names where they differ."""
    from topologies.matrix import Flow

    icmp = Flow("icmp")
    pairs = [(s, d) for s, d, f in sorted(matrix.expected) if f == icmp]
    allowed = [p for p in pairs if matrix.expected[(*p, icmp)]]
    tries = ["nodes", "exit to tear down"]
    if pairs:
        src, dst = (allowed or pairs)[0]
        tries[:1] = [f"{src} ping -c1 {dst}", f"py node['{src}'].cmd('ip -br addr')"]
    lines = ["  Try: " + "   |   ".join(tries)]
    renamed = [f"{n} = {short}" for n, short in sorted(floor.node_names.items()) if n != short]
    if renamed:
        shown = ", ".join(renamed[:6]) + (
            f", ... and {len(renamed) - 6} more" if len(renamed) > 6 else ""
        )
        lines.append(f"  Type inventory names; Mininet's own listings use short ones: {shown}")
    return "\n".join(lines)


def _keep(
    floor: Floor, matrix: Matrix, args: argparse.Namespace, front: Callable[..., Compiled | None]
) -> None:
    """The Mininet CLI, with `p4seg watch` keeping the switches on the policy meanwhile."""
    from mininet.log import setLogLevel

    from p4seg.verbs import watch_loop
    from topologies.console import FloorCLI

    watch = argparse.Namespace(**{**vars(args), "interval": 0.5, "check": 2.0, "once": False,
                                  "switch": []})  # fmt: skip
    stop = threading.Event()
    watcher = threading.Thread(target=watch_loop, args=(watch, front, stop), daemon=True)
    watcher.start()
    print(
        f"p4seg up: the floor stays up; `p4seg watch` re-applies {args.policy} on every edit.\n"
        + keep_hint(floor, matrix),
        flush=True,
    )
    setLogLevel("output")  # what commands typed at the prompt print (the floor runs quiet)
    try:
        FloorCLI(floor)
    finally:
        setLogLevel("error")
        stop.set()
        watcher.join(timeout=10)
