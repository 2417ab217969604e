"""The controller's verbs on `p4seg`'s command line: arguments and help only.

Kept apart from the verbs' code (p4seg/verbs.py), which pulls in finsy and grpc, so that
`p4seg check` and `p4seg fmt` start without paying for them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from compiler.targets import LIVE_TARGETS
from runtime.defaults import DEFAULT_BATCH, DEFAULT_ELECTION_ID

DEFAULT_STATE = ".p4seg"
VERBS = (
    "plan",
    "apply",
    "grant",
    "revoke",
    "quarantine",
    "release",
    "signal",
    "watch",
    "alerts",
    "hits",
    "audit",
    "serve",
)
REMOTE_VERBS = ("grant", "revoke", "quarantine", "release", "signal")  # --server: ask serve

PolicyArguments = Callable[[argparse.ArgumentParser, bool], None]

PLAN_HELP = """\
Compile the policy, read back what every switch of the inventory holds, and show what
`apply` would change: per switch and table, the entries added (+), changed (~) and
removed (-), each with the policy rule behind it. Nothing on the switches changes; reading
needs no arbitration, so a plan never disturbs a running controller. A switch marked with
the digest of exactly this build (by the apply that wrote it) is confirmed by one small
read and not read in full; --full-read reads it all.

exit status: 0 nothing to change, 2 changes pending, 1 error

examples:
    p4seg plan policies/trading_floor.zt -i topologies/trading_floor.yaml
    p4seg plan new.zt -i floor.yaml --switch tor-alg --switch tor-oms
    p4seg plan new.zt -i floor.yaml --output json | jq '.switches[].tables'
"""

APPLY_HELP = """\
Compile the policy, then make every switch hold exactly it: win arbitration (election id),
set the pipeline where it is missing or different, and write the difference with the epoch
protocol — the new entries under the idle epoch, one write flips the epoch, then the old
epoch's entries go — so no packet is ever judged by a mix of the two policies. Switches are
updated concurrently; one that is slow or down is reported and never holds up the others.
Entries that are already right are never rewritten: a second apply writes nothing, and an
apply interrupted anywhere is finished by the next one. Each switch brought to the build is
marked with its digest (the epoch default entry's metadata); a switch already marked with
the new build's digest costs one small read (--full-read reads every table anyway).

Before anything is written, the compiled tables are proven to implement the policy (as
`p4seg verify` does); an unproven change is refused with its counterexamples and nothing
is written. --no-verify skips the proof (the grants, quarantines and `watch` verbs take
it too).

Rule ids are stable: the compile starts from the state directory's allocation.json (rule
key -> id), so unchanged rules keep their ids and priorities and a one-rule edit writes
that rule's entries only. After an apply the allocation is saved; ids of removed rules are
freed for reuse only once every switch of the inventory took the new build.

exit status: 0 applied (or nothing to do), 2 changes pending (--dry-run), 1 error

examples:
    p4seg apply policies/trading_floor.zt -i topologies/trading_floor.yaml
    p4seg apply new.zt -i floor.yaml --dry-run
    p4seg apply new.zt -i floor.yaml --election-id 20 --batch-size 200 --timeout 60
    p4seg apply new.zt -i floor.yaml --tls-ca ca.pem --tls-cert ctl.pem --tls-key ctl.key
"""


_GRANT_HELP = """\
Allow one flow for a while: SRC and DST are services, host names or addresses, as in the
policy. The grant is added to the live state (.p4seg/live.json) with its absolute expiry,
the effective policy is applied at once, and the change is audited. It lapses when it
expires: `p4seg watch` (or any later apply) removes it, also after a controller restart.

examples:
    p4seg grant algo1 riskdb tcp 5432 --for 15m -p policies/trading_floor.zt -i floor.yaml
    p4seg grant jump1 risk icmp --for 1h -p policy.zt -i floor.yaml
"""

_QUARANTINE_HELP = """\
Isolate a host now: it keeps only the flows with the policy's `remediation` service that
the policy allows (none if there is no such service); every other host keeps exactly what
it had. The host's own ToR, which judges every packet from and to it, gets an overlay: a
quarantine identity for the host and a handful of entries, proven (the host's packets)
and written onto that ToR alone, no other switch touched, in an order that judges every
packet wholly before or wholly after. When that ToR holds more changes than the overlay
(an edit not applied yet), the whole policy is applied instead. Audited with the entries
written; kept in the state directory, so any later `apply` or `watch` restores it on a
restarted switch. `p4seg release HOST` undoes it the same way.
"""

_SIGNAL_HELP = """\
Tell the controller what an EDR or identity provider says about a host. The policy's
`signal` statements say which signals exist, from which sources, and what they do: `->
remediation` quarantines the host (as `p4seg quarantine`, through its ToR's overlay),
`-> restrict PROFILE` keeps it only the flows the PROFILE service has (a full apply). A
signal lasts its --ttl, or until `healthy` from the same source clears it; `protect`ed
hosts are never held automatically (the decision says "alert only"). The engine's state
is kept in the state directory (engine.json); every signal is audited with its decisions.
`p4seg watch` (or any apply) ends holds whose TTL has passed.

exit status: 0 recorded (and applied), 1 refused (unknown host, signal or source) or not
applied

examples:
    p4seg signal algo1 unhealthy --source edr --ttl 1h --reason "EDR: credential dumping" \\
        -p policy.zt -i topologies/trading_floor.yaml
    p4seg signal algo1 healthy --source edr -p policy.zt -i floor.yaml
"""

_WATCH_HELP = """\
Keep the switches on the policy: apply now, then again whenever the policy file changes
and whenever the effective policy changes by itself (a grant expires, a `during` window
opens or closes, a `for` rule lapses). An edit with errors is reported and nothing
changes; the last good policy stays. Every --check period it also restores a switch that
lost its pipeline, routes around a spine that stopped answering (down.json in the state
directory), and restores a spine that answers again. Stop with Ctrl-C.
"""

_SERVE_HELP = """\
Run the controller as a service: everything `watch` does (apply now, re-apply on edits, on
schedule and to restarted switches), plus an HTTPS API for SOAR playbooks, EDR webhooks
and operators: GET /v1/status, PUT/DELETE /v1/quarantine/HOST, GET/POST /v1/grants,
DELETE /v1/grants/ID, POST /v1/apply, GET /v1/alerts (and /v1/alerts/stream), /metrics
and /openapi.json. Callers authenticate with a client certificate (--api-client-ca) or a
bearer token (--api-tokens), each with scopes read < operate < admin; every change is
audited with the caller. API calls and the watch loop take turns: never two applies at
once. The live verbs (quarantine, release, grant, revoke) ask a running serve with
--server URL (or $P4SEG_SERVER). docs/serve.md has the details.

examples:
    p4seg serve policies/trading_floor.zt -i topologies/trading_floor.yaml --api 0.0.0.0:8443 \\
        --api-cert api.pem --api-key api.key --api-client-ca clients-ca.pem --api-tokens access.yaml
    p4seg serve policy.zt -i floor.yaml --api 127.0.0.1:8080 --api-plain --api-tokens access.yaml
"""

_ALERTS_HELP = """\
Logged denies as JSON lines (time, switch, port, 5-tuple, rule id, the policy line that
decided). Without --follow: print what .p4seg/alerts.jsonl holds. With --follow: connect to
every switch as the primary controller (only the primary receives PacketIns), print and
record alerts until Ctrl-C; a source that floods is rate-limited, and its next alert says
how many were suppressed.
"""

_HITS_HELP = """\
Per-rule packet and byte counts from every switch's `policy` counters, including allow
rules nothing has used: the unused permissions an access review should remove.

exit status: 0, or 1 if a switch cannot be read
"""


def no_verify_argument(p: argparse.ArgumentParser) -> None:
    """--no-verify, for the verbs that write to switches."""
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="write without first proving the tables implement the policy (default: prove)",
    )


def add_controller_arguments(p: argparse.ArgumentParser) -> None:
    """The options every verb that talks to switches shares."""
    p.add_argument(
        "-t",
        "--target",
        choices=LIVE_TARGETS,
        default="ref",
        help="switch target (default: ref)",
    )
    p.add_argument(
        "--build",
        metavar="DIR",
        help="where to write the compiled build (default: build/<inventory name>)",
    )
    p.add_argument(
        "--switch",
        metavar="NAME",
        action="append",
        default=[],
        help="only this switch (repeatable; default: every switch of the inventory)",
    )
    p.add_argument(
        "--election-id",
        type=int,
        default=DEFAULT_ELECTION_ID,
        help=f"arbitration election id (default: {DEFAULT_ELECTION_ID})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds allowed per switch (default: 30)",
    )
    p.add_argument("--tls-ca", metavar="PEM", help="verify switches against this CA (TLS)")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate (mTLS)")
    p.add_argument("--tls-key", metavar="PEM", help="client private key (mTLS)")
    p.add_argument("--output", choices=("human", "json"), default="human", help="stdout format")


def state_argument(p: argparse.ArgumentParser) -> None:
    """--state DIR: the same on every verb that reads or keeps live state."""
    p.add_argument(
        "--state",
        metavar="DIR",
        default=DEFAULT_STATE,
        help=f"live state (grants, quarantines, `for` clocks), the rule-id allocation "
        f"(allocation.json: rules keep their ids from one apply to the next), audit log, alerts "
        f"(default: {DEFAULT_STATE})",
    )


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    policy_arguments: PolicyArguments,
) -> None:
    raw = argparse.RawDescriptionHelpFormatter

    def verb(
        name: str, help: str, description: str, with_policy: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description, formatter_class=raw)
        if with_policy:
            policy_arguments(p, True)
            add_controller_arguments(p)
        state_argument(p)
        return p

    pl = verb("plan", "show what apply would change on the switches", PLAN_HELP)
    at_argument(pl)
    a = verb("apply", "make the switches hold the policy (consistent updates)", APPLY_HELP)
    for p in (pl, a):
        p.add_argument(
            "--full-read",
            action="store_true",
            help="read every table of every switch, even one whose digest says it holds the "
            "build (finds entries written behind the controller's back)",
        )
    a.add_argument("--dry-run", action="store_true", help="plan only; change nothing")
    no_verify_argument(a)
    a.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help=f"updates per Write (default: {DEFAULT_BATCH})",
    )

    g = verb("grant", "allow one flow for a while (time-bound, audited)", _GRANT_HELP, False)
    g.add_argument("src", metavar="SRC")
    g.add_argument("dst", metavar="DST")
    g.add_argument("proto", metavar="PROTO", choices=("tcp", "udp", "icmp", "ip"))
    g.add_argument("ports", metavar="PORTS", nargs="?", default="", help="e.g. 5432 or 8000-8080")
    g.add_argument("--for", dest="duration", required=True, metavar="DURATION", help="e.g. 15m, 8h")
    _live_policy(g, policy_arguments)

    r = verb(
        "revoke",
        "end a grant now",
        "End a grant before it expires (by its id, see `grant`).",
        False,
    )
    r.add_argument("grant_id", metavar="GRANT")
    _live_policy(r, policy_arguments)

    q = verb("quarantine", "isolate a host now (an overlay on its ToR)", _QUARANTINE_HELP, False)
    q.add_argument("host", metavar="HOST")
    _live_policy(q, policy_arguments)
    q.add_argument("--reason", default="", help="why (in the audit record)")
    q.add_argument(
        "--ttl",
        metavar="DURATION",
        help="release after this long (e.g. 30m); only with --server: serve releases it",
    )
    rel = verb(
        "release", "end a host's quarantine", "Give a quarantined host its access back.", False
    )
    rel.add_argument("host", metavar="HOST")
    _live_policy(rel, policy_arguments)

    sg = verb(
        "signal",
        "a posture signal about a host (EDR, IdP), as the policy says",
        _SIGNAL_HELP,
        False,
    )
    sg.add_argument("host", metavar="HOST")
    sg.add_argument("name", metavar="NAME", help="a signal the policy declares, or `healthy`")
    sg.add_argument("--source", required=True, help="who says so (edr, idp, ...: as declared)")
    sg.add_argument("--ttl", metavar="DURATION", help="e.g. 1h (default: until `healthy`)")
    sg.add_argument("--reason", default="", help="why, for the audit log and alerts")
    sg.add_argument("--dry-run", action="store_true", help="say what would change; record nothing")
    _live_policy(sg, policy_arguments)

    w = verb("watch", "re-apply on policy edits and on schedule", _WATCH_HELP)
    _watch_arguments(w)
    w.add_argument("--once", action="store_true", help="apply what is due, then exit (for cron)")
    _serve_arguments(verb("serve", "watch, plus an authenticated HTTPS API", _SERVE_HELP))

    al = verb("alerts", "logged denies as JSON lines", _ALERTS_HELP)
    al.add_argument("--follow", action="store_true", help="receive alerts live until Ctrl-C")
    al.add_argument("--rate", type=float, default=5.0, help="alerts/s per source (default: 5)")
    al.add_argument("--burst", type=int, default=20, help="burst per source (default: 20)")

    at_argument(verb("hits", "per-rule hit counts, unused allow rules", _HITS_HELP))

    au = verb("audit", "check or show the audit log", _AUDIT_HELP, False)
    au.add_argument("action", choices=("verify", "show"))
    etcd_arguments(au, floor=True)


_AUDIT_HELP = """\
The hash-chained audit log: `verify` walks the chain and names the first record that does
not follow (edited, removed, inserted, reordered) and prints the head hash; `show` prints
every record. The log is --state's audit.jsonl, or with --etcd the chain the controllers
of --floor keep in etcd (docs/controller.md, "Replicated controllers").

examples:
    p4seg audit verify
    p4seg audit verify --etcd https://etcd1:2379,https://etcd2:2379 --floor trading_floor \\
        --etcd-ca ca.pem --etcd-cert ctl.pem --etcd-key ctl.key
"""


def etcd_arguments(p: argparse.ArgumentParser, *, floor: bool) -> None:
    """--etcd URL[,URL...] and its TLS files: the state in etcd instead of --state."""
    p.add_argument(
        "--etcd",
        metavar="URL[,URL...]",
        help="the controllers' etcd cluster (http://HOST:PORT or https://...): state there, "
        "not in --state",
    )
    if floor:
        p.add_argument(
            "--floor", metavar="NAME", help="the floor's keys in etcd (/p4seg/NAME/; with --etcd)"
        )
    p.add_argument("--etcd-ca", metavar="PEM", help="verify etcd against this CA (TLS)")
    p.add_argument("--etcd-cert", metavar="PEM", help="client certificate for etcd (mTLS)")
    p.add_argument("--etcd-key", metavar="PEM", help="client private key for etcd (mTLS)")


def _watch_arguments(p: argparse.ArgumentParser) -> None:
    """What `watch` and `serve` share: how they apply, how often they look."""
    no_verify_argument(p)
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help=f"updates per Write (default: {DEFAULT_BATCH})",
    )
    p.add_argument("--interval", type=float, default=0.5, help="seconds between file checks")
    p.add_argument(
        "--check",
        type=float,
        default=2.0,
        help="seconds between checks that every switch still runs the pipeline (default: 2)",
    )


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    _watch_arguments(p)
    p.set_defaults(once=False)
    api = p.add_argument_group("API")
    api.add_argument("--api", required=True, metavar="HOST:PORT", help="the API's address")
    api.add_argument("--api-cert", metavar="PEM", help="the API's server certificate (TLS)")
    api.add_argument("--api-key", metavar="PEM", help="its private key")
    api.add_argument(
        "--api-client-ca",
        metavar="PEM",
        help="accept client certificates signed by this CA (mTLS; principal: the subject CN)",
    )
    api.add_argument(
        "--api-tokens",
        metavar="FILE",
        help="access file (YAML): bearer tokens -> principal and scopes, certificate CNs -> "
        "scopes (docs/serve.md)",
    )
    api.add_argument(
        "--api-plain",
        action="store_true",
        help="no TLS: only on a loopback address (tokens still required)",
    )
    api.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="a separate, unauthenticated listener for /metrics (default: /metrics on the API, "
        "read scope)",
    )
    api.add_argument(
        "--api-max-body",
        type=int,
        default=64 * 1024,
        metavar="BYTES",
        help="the largest request body (default: 65536; larger: 413)",
    )
    api.add_argument(
        "--hits-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="read the per-rule counters this often, for /metrics and the live map's packet "
        "rates (default: 30; 0: never)",
    )
    siem = p.add_argument_group("SIEM (docs/observability.md)")
    siem.add_argument(
        "--syslog",
        action="append",
        default=[],
        metavar="URL",
        help="send every audit record and alert to this collector: udp://HOST:PORT, "
        "tcp://HOST:PORT or tls://HOST:PORT, with ?format=cef for CEF (repeatable)",
    )
    siem.add_argument("--syslog-ca", metavar="PEM", help="tls://: the collector's CA")
    siem.add_argument("--syslog-cert", metavar="PEM", help="tls://: our client certificate")
    siem.add_argument("--syslog-key", metavar="PEM", help="tls://: its private key")
    etcd_arguments(p, floor=True)  # several controllers of one floor (docs/serve.md)
    p.add_argument(
        "--etcd-name",
        metavar="NAME",
        default="",
        help="this controller, as the floor's other controllers name it (default: USER@HOST:PID)",
    )
    p.add_argument(
        "--etcd-ttl",
        type=int,
        default=3,
        metavar="SECONDS",
        help="the leader's lease: a standby takes over this long after the leader died "
        "(default: 3)",
    )
    p.add_argument(
        "--contain-dry-run",
        action="store_true",
        help="automatic containment only reports (audits) what it would have done",
    )


def server_arguments(p: argparse.ArgumentParser) -> None:
    """--server and its credentials: the live verbs ask a running `p4seg serve`."""
    s = p.add_argument_group("a running p4seg serve (instead of the switches directly)")
    s.add_argument(
        "--server",
        metavar="URL",
        help="ask this p4seg serve (e.g. https://ctl:8443; default: $P4SEG_SERVER)",
    )
    s.add_argument(
        "--server-token",
        metavar="TOKEN",
        help="bearer token (default: $P4SEG_SERVER_TOKEN, which keeps it out of `ps`)",
    )
    s.add_argument("--server-cert", metavar="PEM", help="client certificate (mTLS)")
    s.add_argument("--server-key", metavar="PEM", help="its private key")
    s.add_argument("--server-ca", metavar="PEM", help="verify the server against this CA")


def at_argument(p: argparse.ArgumentParser) -> None:
    """--at TIME: judge or plan the effective policy of another moment."""
    p.add_argument(
        "--at",
        metavar="TIME",
        help="the effective policy at TIME (ISO 8601 with a zone, or `now`; default: now)",
    )


def _live_policy(p: argparse.ArgumentParser, policy_arguments: PolicyArguments) -> None:
    """Live verbs name the policy with -p, since their positionals say what to change."""
    # Required unless a server is configured (checked by p4seg/cli.py): it has its own.
    p.add_argument("-p", "--policy", metavar="POLICY", help="policy file (.zt)")
    p.add_argument("-i", "--inventory", metavar="INVENTORY", help="inventory YAML")
    p.add_argument("--error-format", choices=("human", "json"), default="human")
    add_controller_arguments(p)
    no_verify_argument(p)
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help=f"updates per Write (default: {DEFAULT_BATCH})",
    )
    server_arguments(p)
