"""Deterministic generator of large, realistic p4seg policies and their inventories.

A trading floor of racks, each behind a top-of-rack switch (`t01`..`t48`) with hosts
`h0001`.. on the subnet 10.<rack>.0.0/16, all ToRs linked to two or more spines. A few
racks are development, the rest production. Services are built from host names, subnets
and other services (nested, overlapping); rules are mostly service -> service allows over
tcp/udp (single ports, ranges, lists), with some icmp, `rate`, `during`, `for`, udp
`reply`, a few denies (`deny dev -> prod log`, ...), `default deny log` and `expect` lines
that hold (each one is checked here, against the generated rules, before it is written).

As a module::

    from bench.gen_policy import generate
    floor = generate(rules=10_000, services=1_000, hosts=1_000, tors=48, seed=1)
    floor.policy, floor.inventory          # the texts

As a script::

    python -m bench.gen_policy --rules 10000 --services 1000 --hosts 1000 --tors 48 -o DIR

writes DIR/policy.zt and DIR/inventory.yaml, valid for
`p4seg check DIR/policy.zt -i DIR/inventory.yaml`. The same arguments and seed always
give byte-identical files.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from dataclasses import dataclass

EPHEMERAL_PORT = 49152  # the client port p4seg judges flows with
RESERVED_PORTS = range(6000, 6100)  # never allowed by any rule: used by `denied` expectations
TELNET, TFTP = 23, 69  # denied towards the management network

PROD_ROLES = ("md", "algo", "oms", "risk", "settle", "books", "fix", "quant", "infra", "ops")
ROLE_NOUNS = {
    "md": ("feed", "handler", "normaliser", "snapshot", "ticker"),
    "algo": ("engine", "strat", "signal", "pricer", "hedger"),
    "oms": ("router", "gateway", "dropcopy", "allocator"),
    "risk": ("pretrade", "limits", "riskdb", "margin", "exposure"),
    "settle": ("settlement", "clearing", "confirm", "netting"),
    "books": ("ledger", "recon", "pnl", "positions"),
    "fix": ("fixgw", "session", "acceptor", "initiator"),
    "quant": ("research", "backtest", "tickdb", "notebook"),
    "infra": ("dns", "ntp", "kafka", "cache", "vault", "registry"),
    "ops": ("tools", "logs", "metrics", "alerts"),
    "dev": ("devbox", "ci", "testrig", "sandbox", "staging"),
}
GROUP_NOUNS = ("cluster", "pool", "tier", "farm", "fleet")
# Well-known ports, weighted towards what a trading floor actually runs.
WELL_KNOWN_TCP = (
    22, 53, 80, 443, 1433, 1521, 2181, 3306, 4222, 5432, 5672, 6379, 7001, 8080, 8443,
    8888, 9042, 9092, 9093, 9200, 9300, 9876, 9878, 11211, 27017,
)  # fmt: skip
WELL_KNOWN_UDP = (53, 123, 514, 4789, 5353)
RATES = ("1000pps", "5000pps", "10000pps", "20000pps", "50kpps", "100kpps", "1mpps")
WINDOWS = (
    "07:00-18:00 UTC",
    "06:30-17:30 Europe/London",
    "09:30-16:00 America/New_York",
    "21:00-05:00 UTC",
)
DURATIONS = ("30m", "4h", "1d", "7d")


@dataclass(frozen=True, slots=True)
class Host:
    index: int
    name: str
    rack: int
    ip: tuple[int, int, int, int]
    port: int

    @property
    def ip_text(self) -> str:
        return ".".join(map(str, self.ip))


@dataclass(slots=True)
class Service:
    name: str
    env: str  # prod | dev
    role: str
    members: list[str]
    hosts: frozenset[int]  # inventory hosts (indices) inside the service
    leaf_hosts_only: bool = False  # members are all host names (small, cheap to expect on)
    special: bool = False  # built for a dedicated rule; never picked at random


@dataclass(frozen=True, slots=True)
class Rule:
    action: str
    src: frozenset[int]
    dst: frozenset[int]
    proto: str  # tcp | udp | icmp | ip
    ports: tuple[tuple[int, int], ...]  # () for icmp/ip (all ports)
    text: str


@dataclass(frozen=True, slots=True)
class Floor:
    """A generated policy and inventory (texts), with a few counts for reports."""

    policy: str
    inventory: str
    rules: int
    services: int
    hosts: int
    tors: int
    spines: int
    expects: int


def _width(n: int, least: int) -> int:
    return max(least, len(str(n)))


def _subnet_hosts(hosts: list[Host], a: int, b: int, c: int, d: int, length: int) -> set[int]:
    """Indices of the hosts inside a.b.c.d/length."""
    base = (a << 24) | (b << 16) | (c << 8) | d
    size = 1 << (32 - length)
    out = set()
    for h in hosts:
        ip = (h.ip[0] << 24) | (h.ip[1] << 16) | (h.ip[2] << 8) | h.ip[3]
        if base <= ip < base + size:
            out.add(h.index)
    return out


class _Generator:
    def __init__(
        self, rules: int, services: int, hosts: int, tors: int, spines: int, seed: int
    ) -> None:
        if tors < 2 or tors > 200:
            raise ValueError("--tors must be from 2 to 200 (subnets are 10.<rack>.0.0/16)")
        if hosts < 8 * tors:
            raise ValueError("need at least 8 hosts per ToR")
        if -(-hosts // tors) > 240:
            raise ValueError("at most 240 hosts per ToR (ports 241.. are the spine uplinks)")
        if spines < 2 or spines > 13:
            raise ValueError("--spines must be from 2 to 13")
        if services < 20:
            raise ValueError("need at least 20 services")
        if rules < services // 2 + 20:
            raise ValueError("need at least services/2 + 20 rules")
        self.n_rules, self.n_services, self.n_hosts = rules, services, hosts
        self.n_tors, self.n_spines = tors, spines
        self.rng = random.Random(seed)
        self.seed = seed
        self.tor_w = _width(tors, 2)
        self.host_w = _width(hosts, 4)
        n_dev = max(1, tors // 12)
        self.rack_env = {r: ("dev" if r > tors - n_dev else "prod") for r in range(1, tors + 1)}
        self.rack_role = {}
        prod_racks = [r for r in range(1, tors + 1) if self.rack_env[r] == "prod"]
        for i, r in enumerate(prod_racks):
            self.rack_role[r] = PROD_ROLES[i % len(PROD_ROLES)]
        for r in range(1, tors + 1):
            self.rack_role.setdefault(r, "dev")
        self.hosts: list[Host] = []
        self.rack_hosts: dict[int, list[int]] = {r: [] for r in range(1, tors + 1)}
        for k in range(hosts):
            rack = k * tors // hosts + 1
            j = len(self.rack_hosts[rack])
            ip = (10, rack, j // 100, 10 + j % 100)
            host = Host(k, f"h{k + 1:0{self.host_w}d}", rack, ip, j + 1)
            self.hosts.append(host)
            self.rack_hosts[rack].append(k)
        self.services: list[Service] = []
        self.by_name: dict[str, Service] = {}
        self.rules: list[Rule] = []
        self.rule_keys: set[tuple[object, ...]] = set()
        self.expects: list[str] = []
        # Dedicated hosts: the last production hosts (an operations corner of the floor).
        prod_hosts = [h.index for h in self.hosts if self.rack_env[h.rack] == "prod"]
        self.special_hosts = {
            "jump": prod_hosts[-1],
            "mon1": prod_hosts[-2],
            "mon2": prod_hosts[-3],
            "mgmt": prod_hosts[-4],
            "backup": prod_hosts[-5],
            "storage": prod_hosts[-6],
        }
        self.special_set = set(self.special_hosts.values())

    # -- inventory ---------------------------------------------------------------------------

    def tor(self, r: int) -> str:
        return f"t{r:0{self.tor_w}d}"

    def inventory_text(self) -> str:
        out = [
            f"# Generated by bench/gen_policy.py (seed {self.seed}): {self.n_tors} racks, one ToR",
            f"# each ({self.tor(1)}..{self.tor(self.n_tors)}), {self.n_hosts} hosts on "
            "10.<rack>.0.0/16, "
            f"{self.n_spines} spines. Every ToR's ports 241.. go to the spines.",
            "name: bench_floor",
            "",
            "switches:",
        ]
        for r in range(1, self.n_tors + 1):
            out.append(
                f"  {self.tor(r)}: {{role: tor, device_id: {r}, "
                f'p4rt: "127.0.0.1:{50000 + r}", rack: {self.rack_role[r]}_{r:02d}}}'
            )
        for s in range(1, self.n_spines + 1):
            dev_id = self.n_tors + s
            out.append(
                f"  spine{s}: {{role: spine, device_id: {dev_id}, "
                f'p4rt: "127.0.0.1:{50000 + dev_id}"}}'
            )
        out += ["", "hosts:"]
        for h in self.hosts:
            out.append(
                f"  {h.name}: {{ip: {h.ip_text}, switch: {self.tor(h.rack)}, port: {h.port}}}"
            )
        out += ["", "links:"]
        for r in range(1, self.n_tors + 1):
            for s in range(1, self.n_spines + 1):
                out.append(f'  - endpoints: ["{self.tor(r)}:{240 + s}", "spine{s}:{r}"]')
        return "\n".join(out) + "\n"

    # -- services ----------------------------------------------------------------------------

    def add_service(self, svc: Service) -> None:
        assert svc.name not in self.by_name
        self.services.append(svc)
        self.by_name[svc.name] = svc

    def special_services(self) -> None:
        sh, hn = self.special_hosts, self.hosts
        for env in ("prod", "dev"):
            racks = [r for r in range(1, self.n_tors + 1) if self.rack_env[r] == env]
            members = [f"10.{r}.0.0/16" for r in racks]
            hosts = frozenset(h for r in racks for h in self.rack_hosts[r])
            self.add_service(Service(env, env, env, members, hosts, special=True))
        for name, keys in (
            ("ops_jump", ("jump",)),
            ("monitoring", ("mon1", "mon2")),
            ("oob_mgmt", ("mgmt",)),
            ("backup_agents", ("backup",)),
            ("backup_store", ("storage",)),
        ):
            members = [hn[sh[k]].name for k in keys]
            self.add_service(
                Service(
                    name,
                    "prod",
                    "ops",
                    members,
                    frozenset(sh[k] for k in keys),
                    leaf_hosts_only=True,
                    special=True,
                )
            )

    def random_services(self) -> None:
        rng = self.rng
        count = self.n_services - len(self.services)
        width = _width(count, 3)
        dev_racks = [r for r in self.rack_env if self.rack_env[r] == "dev"]
        prod_racks = [r for r in self.rack_env if self.rack_env[r] == "prod"]
        by_env: dict[str, list[Service]] = {"prod": [], "dev": []}
        for i in range(1, count + 1):
            env = "dev" if rng.random() < len(dev_racks) / self.n_tors else "prod"
            racks = dev_racks if env == "dev" else prod_racks
            rack = rng.choice(racks)
            role = self.rack_role[rack]
            pool = by_env[env]
            if len(pool) >= 4 and rng.random() < 0.22:
                svc = self.group_service(i, width, env, role, pool)
            else:
                svc = self.leaf_service(i, width, env, rack, racks)
            by_env[env].append(svc)
            self.add_service(svc)

    def _rack_pick(self, rack: int, k: int) -> list[int]:
        candidates = [h for h in self.rack_hosts[rack] if h not in self.special_set]
        return sorted(self.rng.sample(candidates, min(k, len(candidates))))

    def leaf_service(self, i: int, width: int, env: str, rack: int, racks: list[int]) -> Service:
        rng = self.rng
        role = self.rack_role[rack]
        name = f"{role}_{rng.choice(ROLE_NOUNS[role])}_{i:0{width}d}"
        kind = rng.random()
        if kind < 0.62:  # a few hosts of one rack
            picked = self._rack_pick(rack, rng.randint(1, 4))
            members = [self.hosts[h].name for h in picked]
            return Service(name, env, role, members, frozenset(picked), leaf_hosts_only=True)
        if kind < 0.75:  # hosts of the same role across racks
            same = [r for r in racks if self.rack_role[r] == role] or racks
            picked = []
            for r in rng.sample(same, min(len(same), rng.randint(2, 3))):
                picked += self._rack_pick(r, rng.randint(1, 2))
            members = [self.hosts[h].name for h in picked]
            return Service(name, env, role, members, frozenset(picked), leaf_hosts_only=True)
        # A subnet slice of the rack (a /27, /28 or /29 of its first /24), sometimes with
        # an address of another rack of the same environment.
        length = rng.choice((27, 28, 28, 29))
        step = 1 << (32 - length)
        d = rng.randrange(0, 128, step)
        members = [f"10.{rack}.0.{d}/{length}"]
        hosts = _subnet_hosts(self.hosts, 10, rack, 0, d, length)
        if rng.random() < 0.3:
            other = self.hosts[rng.choice(self._rack_pick(rng.choice(racks), 1))]
            members.append(other.ip_text)
            hosts.add(other.index)
        return Service(name, env, role, members, frozenset(hosts))

    def group_service(
        self, i: int, width: int, env: str, role: str, pool: list[Service]
    ) -> Service:
        rng = self.rng
        children = rng.sample(pool, rng.randint(2, 4))
        members = [c.name for c in children]
        hosts = set().union(*(c.hosts for c in children))
        if rng.random() < 0.25:
            rack = rng.choice([r for r in self.rack_env if self.rack_env[r] == env])
            extra = self._rack_pick(rack, 1)
            members += [self.hosts[h].name for h in extra]
            hosts.update(extra)
        name = f"{role}_{rng.choice(GROUP_NOUNS)}_{i:0{width}d}"
        return Service(name, env, role, members, frozenset(hosts))

    # -- rules -------------------------------------------------------------------------------

    def add_rule(
        self,
        action: str,
        src: list[Service] | str,
        dst: list[Service] | str,
        proto: str,
        ports: list[tuple[int, int]],
        options: str = "",
    ) -> bool:
        everyone = frozenset(h.index for h in self.hosts)
        src_names = src if isinstance(src, str) else ", ".join(s.name for s in src)
        dst_names = dst if isinstance(dst, str) else ", ".join(s.name for s in dst)
        src_hosts = everyone if isinstance(src, str) else frozenset().union(*(s.hosts for s in src))
        dst_hosts = everyone if isinstance(dst, str) else frozenset().union(*(s.hosts for s in dst))
        port_text = ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)
        key = (action, src_names, dst_names, proto, port_text)
        if key in self.rule_keys:
            return False
        self.rule_keys.add(key)
        text = f"{action:<5} {src_names:<22} -> {dst_names:<22} {proto}"
        if port_text:
            text += f" {port_text}"
        if options:
            text += f"  {options}"
        merged = tuple(sorted(ports))
        self.rules.append(Rule(action, src_hosts, dst_hosts, proto, merged, text.rstrip()))
        return True

    def random_ports(self, proto: str) -> list[tuple[int, int]]:
        rng = self.rng

        def app_port() -> int:
            while True:
                p = rng.choice((rng.randint(7000, 9999), rng.randint(10000, 32000)))
                if p not in RESERVED_PORTS:
                    return p

        if proto == "udp":
            if rng.random() < 0.3:
                return [(p, p) for p in [rng.choice(WELL_KNOWN_UDP)]]
            if rng.random() < 0.35:  # a multicast-style feed range
                lo = rng.randrange(30000, 32000, 10)
                return [(lo + 1, lo + rng.choice((4, 8, 10)))]
            return [(p, p) for p in [app_port()]]
        shape = rng.random()
        if shape < 0.72:
            p = rng.choice(WELL_KNOWN_TCP) if rng.random() < 0.35 else app_port()
            return [(p, p)]
        if shape < 0.9:  # a list, sometimes with a range in it
            chosen = {rng.choice(WELL_KNOWN_TCP) if rng.random() < 0.4 else app_port()}
            while len(chosen) < rng.randint(2, 4):
                chosen.add(app_port())
            ports = [(p, p) for p in sorted(chosen)]
            if rng.random() < 0.3:
                lo = app_port()
                ports.append((lo, lo + rng.randint(2, 20)))
            return _disjoint(ports)
        lo = app_port()
        return [(lo, min(lo + rng.choice((3, 9, 15, 49, 99)), 32767))]

    def special_rules(self) -> None:
        s = self.by_name
        jump, mon, prod = [s["ops_jump"]], [s["monitoring"]], [s["prod"]]
        self.add_rule("allow", jump, prod, "tcp", [(22, 22)], f"during {WINDOWS[0]}")
        self.add_rule("allow", jump, prod, "icmp", [])
        self.add_rule("allow", mon, prod, "tcp", [(9100, 9100)], "rate 5000pps")
        self.add_rule("allow", mon, prod, "udp", [(161, 161)])
        self.add_rule("allow", [s["backup_agents"]], [s["backup_store"]], "ip", [])

    def denies(self) -> None:
        s = self.by_name
        self.add_rule("deny", [s["dev"]], [s["prod"]], "ip", [], "log")
        self.add_rule("deny", [s["prod"]], [s["dev"]], "ip", [], "log")
        self.add_rule("deny", "any", [s["oob_mgmt"]], "tcp", [(TELNET, TELNET)], "log")
        self.add_rule("deny", "any", [s["oob_mgmt"]], "udp", [(TFTP, TFTP)], "log")

    def random_rules(self, count: int) -> None:
        rng = self.rng
        pool = [svc for svc in self.services if not svc.special]
        by_env = {env: [svc for svc in pool if svc.env == env] for env in ("prod", "dev")}
        firsts = pool[:]
        rng.shuffle(firsts)  # every service is a source at least once (no unused services)
        made = 0
        while made < count:
            src = firsts[-1] if firsts else rng.choice(pool)
            peers = by_env[src.env]
            dst = rng.choice(peers)
            if dst is src and len(peers) > 1 and rng.random() < 0.9:
                continue
            srcs = [src]
            if rng.random() < 0.04:
                other = rng.choice(peers)
                if other is not src and other is not dst:
                    srcs.append(other)
            kind = rng.random()
            options = ""
            if kind < 0.03:
                proto, ports = "icmp", []
            elif kind < 0.15:
                proto = "udp"
                ports = self.random_ports("udp")
                if rng.random() < 0.4:
                    options = "reply"
            else:
                proto = "tcp"
                ports = self.random_ports("tcp")
            if proto != "icmp":
                extra = rng.random()
                if extra < 0.05:
                    options = f"{options} rate {rng.choice(RATES)}".strip()
                elif extra < 0.07 and proto == "tcp":
                    options = f"during {rng.choice(WINDOWS)}"
                elif extra < 0.075 and proto == "tcp":
                    options = f"for {rng.choice(DURATIONS)}"
            if self.add_rule("allow", srcs, [dst], proto, ports, options):
                made += 1
                if firsts and firsts[-1] is src:
                    firsts.pop()

    # -- expectations (each verified against the generated rules) --------------------------

    def _matches(self, r: Rule, a: int, b: int, proto: str, port: int | None) -> bool:
        if a not in r.src or b not in r.dst:
            return False
        if r.proto not in ("ip", proto):
            return False
        if r.proto == "ip" or proto not in ("tcp", "udp") or port is None:
            return True
        return any(lo <= port <= hi for lo, hi in r.ports)

    def _verdict(self, a: int, b: int, proto: str, port: int | None) -> str:
        """Forward verdict of one packet: 'deny', 'allow' or 'default'."""
        allow = False
        for r in self.rules:
            if self._matches(r, a, b, proto, port):
                if r.action == "deny":
                    return "deny"
                allow = True
        return "allow" if allow else "default"

    def _holds_allowed(self, a: int, b: int, proto: str, port: int | None) -> bool:
        if a == b or self._verdict(a, b, proto, port) != "allow":
            return False
        if proto in ("tcp", "icmp"):  # the answer must not meet a deny
            back_port = EPHEMERAL_PORT if proto == "tcp" else None
            return self._verdict(b, a, proto, back_port) != "deny"
        return True

    def _holds_denied(self, a: int, b: int, proto: str, port: int | None) -> bool:
        if proto == "ip":
            return all(self._verdict(a, b, p, None) == "deny" for p in ("tcp", "udp", "icmp"))
        return self._verdict(a, b, proto, port) != "allow"

    def _expect(self, src: str, dst: str, proto: str, port: int | None, verdict: str) -> None:
        port_text = f"{port}" if port is not None else ""
        line = f"expect {src:<14} -> {dst:<14} {proto:<4} {port_text:<5} {verdict}"
        self.expects.append(line.rstrip())

    def expectations(self, count: int) -> None:
        rng = self.rng
        name = {h.index: h.name for h in self.hosts}
        plain = [h.index for h in self.hosts if h.index not in self.special_set]
        env_hosts = {
            env: [h for h in plain if self.rack_env[self.hosts[h].rack] == env]
            for env in ("prod", "dev")
        }
        mgmt = self.special_hosts["mgmt"]
        allows = [r for r in self.rules if r.action == "allow" and r.proto != "ip"]
        allows = [r for r in allows if r.src and r.dst]
        tries = 0
        want_allowed = count * 5 // 10
        allowed = 0
        while allowed < want_allowed and tries < 50 * count:
            tries += 1
            r = rng.choice(allows)
            a, b = rng.choice(sorted(r.src)), rng.choice(sorted(r.dst))
            port = None
            if r.proto in ("tcp", "udp"):
                lo, hi = rng.choice(r.ports)
                port = rng.randint(lo, hi)
            if self._holds_allowed(a, b, r.proto, port):
                self._expect(name[a], name[b], r.proto, port, "allowed")
                allowed += 1
        # Service-level: a small all-hosts source service towards one host.
        small = [s for s in self.services if s.leaf_hosts_only and not s.special]
        for _ in range(max(2, count // 10)):
            for _ in range(200):
                r = rng.choice(allows)
                srcs = [s for s in small if s.hosts <= r.src and len(s.hosts) <= 4]
                if not srcs or r.proto == "icmp":
                    continue
                svc = rng.choice(srcs)
                b = rng.choice(sorted(r.dst))
                port = r.ports[0][0]
                if all(self._holds_allowed(a, b, r.proto, port) for a in svc.hosts):
                    self._expect(svc.name, name[b], r.proto, port, "allowed")
                    break
        sh = self.special_hosts
        b = rng.choice(env_hosts["prod"])
        if self._holds_allowed(sh["jump"], b, "tcp", 22):
            self._expect("ops_jump", name[b], "tcp", 22, "allowed")
        if self._holds_allowed(sh["jump"], b, "icmp", None):
            self._expect(name[sh["jump"]], name[b], "icmp", None, "allowed")
        if self._holds_allowed(sh["mon1"], b, "tcp", 9100):
            self._expect(name[sh["mon1"]], name[b], "tcp", 9100, "allowed")
        if self._holds_denied(b, sh["jump"], "tcp", 22):  # the jump host is never a target
            self._expect(name[b], name[sh["jump"]], "tcp", 22, "denied")
        remaining = max(4, count - len(self.expects))
        for k in range(remaining):
            shape = k % 4
            if shape == 0:  # environments never cross
                a, b = rng.choice(env_hosts["dev"]), rng.choice(env_hosts["prod"])
                proto, port = rng.choice((("tcp", 22), ("udp", 53), ("ip", None)))
            elif shape == 1:
                a, b = rng.choice(env_hosts["prod"]), rng.choice(env_hosts["dev"])
                proto, port = rng.choice((("tcp", 443), ("ip", None)))
            elif shape == 2:  # nothing allows the reserved ports
                env = rng.choice(("prod", "prod", "dev"))
                a, b = rng.sample(env_hosts[env], 2)
                proto, port = rng.choice(("tcp", "udp")), rng.choice(RESERVED_PORTS)
            else:  # no telnet to the management network
                a, b, proto, port = rng.choice(plain), mgmt, "tcp", TELNET
            if self._holds_denied(a, b, proto, port):
                self._expect(name[a], name[b], proto, port, "denied")

    # -- the policy --------------------------------------------------------------------------

    def policy_text(self) -> str:
        out = [
            f"# Generated by bench/gen_policy.py (seed {self.seed}): {len(self.services)} services, "
            f"{len(self.rules)} rules, {len(self.expects)} expectations",
            f"# over {self.n_hosts} hosts in {self.n_tors} racks (inventory.yaml next to this file).",
            "policy bench_floor",
            "",
            "# -- Environments and operations ----------------------------------------------------",
        ]
        width = max(len(s.name) for s in self.services)
        for i, svc in enumerate(self.services):
            if not svc.special and self.services[i - 1].special:
                out += [
                    "",
                    "# -- Application services ---------------------------------------------",
                ]
            members = list(svc.members)
            lines = [", ".join(members[i : i + 6]) for i in range(0, len(members), 6)]
            head = f"service {svc.name:<{width}} = "
            out.append(head + (",\n" + " " * len(head)).join(lines))
        out += [
            "",
            "# -- Flows -------------------------------------------------------------------",
        ]
        out += [r.text for r in self.rules if r.action == "allow"]
        out += ["", "# -- Environments never cross; no telnet or tftp to out-of-band management"]
        out += [r.text for r in self.rules if r.action == "deny"]
        out += ["", "default deny log", "", "# -- What must hold (checked by `p4seg check`) -----"]
        out += self.expects
        return "\n".join(out) + "\n"


def _disjoint(ports: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drop list items that overlap an earlier one (a port list reads best without overlaps)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ports):
        if out and lo <= out[-1][1] + 1:
            continue
        out.append((lo, hi))
    return out


def generate(
    rules: int = 10_000,
    services: int = 1_000,
    hosts: int = 1_000,
    tors: int = 48,
    spines: int = 2,
    seed: int = 1,
    expects: int | None = None,
) -> Floor:
    """A policy with `rules` rules over `services` services, and its inventory."""
    g = _Generator(rules, services, hosts, tors, spines, seed)
    g.special_services()
    g.random_services()
    g.special_rules()
    fixed = len(g.rules) + 4  # + the denies, written after the allows
    g.random_rules(rules - fixed)
    g.denies()
    n_expects = expects if expects is not None else min(60, max(12, rules // 200))
    g.expectations(n_expects)
    return Floor(
        policy=g.policy_text(),
        inventory=g.inventory_text(),
        rules=len(g.rules),
        services=len(g.services),
        hosts=hosts,
        tors=tors,
        spines=spines,
        expects=len(g.expects),
    )


def generate_policy(**kwargs: int) -> str:
    """The policy text alone (same keyword arguments as :func:`generate`)."""
    return generate(**kwargs).policy


def generate_inventory(**kwargs: int) -> str:
    """The inventory text alone (same keyword arguments as :func:`generate`)."""
    return generate(**kwargs).inventory


def write(floor: Floor, directory: str) -> tuple[str, str]:
    """Write DIR/policy.zt and DIR/inventory.yaml; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    policy = os.path.join(directory, "policy.zt")
    inventory = os.path.join(directory, "inventory.yaml")
    with open(policy, "w", encoding="utf-8") as f:
        f.write(floor.policy)
    with open(inventory, "w", encoding="utf-8") as f:
        f.write(floor.inventory)
    return policy, inventory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.gen_policy",
        description="Generate a large realistic p4seg policy and its inventory (deterministic).",
    )
    p.add_argument("--rules", type=int, default=10_000)
    p.add_argument("--services", type=int, default=1_000)
    p.add_argument("--hosts", type=int, default=1_000)
    p.add_argument("--tors", type=int, default=48)
    p.add_argument("--spines", type=int, default=2)
    p.add_argument("--expects", type=int, default=None, help="default: rules/200, 12 to 60")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("-o", "--output-dir", metavar="DIR", required=True)
    args = p.parse_args(argv)
    try:
        floor = generate(
            args.rules, args.services, args.hosts, args.tors, args.spines, args.seed, args.expects
        )
    except ValueError as exc:
        print(f"gen_policy: error: {exc}", file=sys.stderr)
        return 2
    policy, inventory = write(floor, args.output_dir)
    print(
        f"wrote {policy} ({floor.services} services, {floor.rules} rules, "
        f"{floor.expects} expectations) and {inventory} ({floor.hosts} hosts, "
        f"{floor.tors} ToRs, {floor.spines} spines)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
