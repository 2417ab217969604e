"""The inventory: the physical facts of a floor (hosts, switches, links), loaded from YAML.

The format follows containerlab topology files: `switches` and `hosts` are mappings keyed
by name, `links` a list of `endpoints: ["switch:port", "switch:port"]`. Every value keeps
its YAML location, so a duplicate MAC or a port used twice is reported at the line that
says it, and all problems of a file are reported together.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol, TypeVar

import yaml

from compiler.addresses import AddressSyntaxError, format_ipv4, parse_ipv4
from compiler.diagnostics import (
    Diagnostic,
    InventoryError,
    Note,
    SourceError,
    Span,
    error,
    quote,
    read_source,
)
from compiler.parse import KEYWORDS

ROLES = ("tor", "spine")
# libyaml's loader is ~8x faster and keeps the same node marks (line, column).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_DATA_PORT = 254
DEFAULT_CPU_PORT = 255
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(-[A-Za-z0-9_]+)*$")
_ENDPOINT = re.compile(r"^(?P<switch>[^:\s]+):(?P<port>[0-9]{1,9})$")
_NUMBER = re.compile(r"[0-9]{1,20}")  # ASCII digits only, and short enough for int()

_TOP_FIELDS = ("name", "switches", "hosts", "links", "down")
_SWITCH_FIELDS = ("role", "device_id", "p4rt", "rack", "cpu_port")
_HOST_FIELDS = ("ip", "mac", "switch", "port")
_LINK_FIELDS = ("endpoints",)


@dataclass(frozen=True, slots=True)
class Switch:
    name: str
    role: str  # tor | spine
    device_id: int
    p4rt: str  # P4Runtime gRPC address, host:port
    rack: str | None
    cpu_port: int
    span: Span


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    ip: int
    mac: str
    switch: str
    port: int
    span: Span

    @property
    def ip_text(self) -> str:
        return format_ipv4(self.ip)


@dataclass(frozen=True, slots=True)
class Link:
    a: str
    a_port: int
    b: str
    b_port: int
    span: Span


@dataclass(frozen=True, slots=True)
class Inventory:
    name: str
    file: str
    switches: tuple[Switch, ...]
    hosts: tuple[Host, ...]
    links: tuple[Link, ...]
    hosts_by_name: Mapping[str, Host]
    switches_by_name: Mapping[str, Switch]
    # Spines out of service (dead, or taken out for maintenance): routing avoids them.
    down: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls,
        name: str,
        file: str,
        switches: tuple[Switch, ...],
        hosts: tuple[Host, ...],
        links: tuple[Link, ...],
        down: frozenset[str] = frozenset(),
    ) -> Inventory:
        return cls(
            name,
            file,
            switches,
            hosts,
            links,
            MappingProxyType({h.name: h for h in hosts}),
            MappingProxyType({s.name: s for s in switches}),
            down,
        )

    def with_down(self, names: Iterable[str], source: str = "--down") -> Inventory:
        """This inventory with the spines `names` (and those already down) out of service;
        a name that is not a spine of the inventory is an InventoryError naming `source`."""
        diags = []
        for name in sorted(set(names)):
            switch = self.switches_by_name.get(name)
            if switch is None:
                close = difflib.get_close_matches(name, list(self.switches_by_name), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                diags.append(error("E305", f"{source}: unknown switch '{name}'{hint}", None))
            elif switch.role != "spine":
                diags.append(
                    error(
                        "E307",
                        f"{source}: '{name}' is a {switch.role}: only spines can be out of "
                        "service (a ToR's hosts have no other way in)",
                        None,
                    )
                )
        if diags:
            raise InventoryError(diags)
        down = self.down | frozenset(names)
        return self if down == self.down else dataclasses.replace(self, down=down)

    @classmethod
    def empty(cls) -> Inventory:
        return cls.build("empty", "<none>", (), (), ())


def default_mac(ip: int) -> str:
    """Locally administered MAC derived from the IP: 02:00:a.b.c.d."""
    return "02:00:" + ":".join(f"{(ip >> s) & 0xFF:02x}" for s in (24, 16, 8, 0))


def load_inventory(path: str) -> tuple[Inventory, str]:
    """Read and validate an inventory file; returns it with its text (for diagnostics)."""
    try:
        text = read_source(path, "E301", "inventory")
    except SourceError as exc:
        raise InventoryError(exc.diagnostics) from None
    return parse_inventory(text, path), text


def parse_inventory(text: str, file: str = "<inventory>") -> Inventory:
    return _InventoryReader(file).read(text)


T = TypeVar("T")


class _Mark(Protocol):
    """A position in YAML text (the pure-Python and the libyaml loaders have one each)."""

    index: int  # characters from the start of the text


class _InventoryReader:
    def __init__(self, file: str) -> None:
        self.file = file
        self.diags: list[Diagnostic] = []
        self.declared: set[str] = set()  # switch names, valid or not (no cascading errors)
        self.line_starts = [0]

    # -- YAML nodes ------------------------------------------------------------------------

    def position(self, mark: _Mark) -> tuple[int, int]:
        """1-based line and column of a YAML mark, counting lines at "\n" only as every
        diagnostic does (YAML also ends lines at U+0085, U+2028, U+2029 and a lone CR)."""
        line = bisect.bisect_right(self.line_starts, mark.index)
        return line, mark.index - self.line_starts[line - 1] + 1

    def span(self, node: yaml.Node | _Mark) -> Span:
        if not isinstance(node, yaml.Node):
            line, column = self.position(node)
            return Span.point(self.file, line, column)
        (line, column), end = self.position(node.start_mark), self.position(node.end_mark)
        if end[0] > line:  # a block node ends on the next line: point at its start
            return Span.point(self.file, line, column, 1)
        return Span(self.file, line, column, end[0], end[1])

    def fail(self, code: str, message: str, node: yaml.Node | _Mark | None, *notes: Note) -> None:
        self.diags.append(error(code, message, self.span(node) if node else None, *notes))

    def mapping(self, node: yaml.Node, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """A YAML mapping as {key: (key node, value node)}; duplicate keys are reported."""
        if not isinstance(node, yaml.MappingNode):
            self.fail("E302", f"{what} must be a mapping", node)
            return {}
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                kind = "mapping" if isinstance(key, yaml.MappingNode) else "list"
                self.fail("E302", f"{what} has a {kind} as a key: keys are single values", key)
                continue
            name = str(key.value)
            if name in out:
                first = self.span(out[name][0])
                self.fail("E308", f"{what} has '{name}' twice", key, Note("first here", first))
                continue
            out[name] = (key, value)
        return out

    def fields(
        self,
        node: yaml.Node,
        what: str,
        allowed: tuple[str, ...],
        required: tuple[str, ...],
    ) -> dict[str, yaml.Node]:
        entries = self.mapping(node, what)
        found = {k: v for k, (_, v) in entries.items()}
        for key, (key_node, _) in entries.items():
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                self.fail(
                    "E302",
                    f"unknown field '{key}' in {what}{hint}; fields are: {', '.join(allowed)}",
                    key_node,
                )
        if isinstance(node, yaml.MappingNode):
            for key in required:
                if key not in found:
                    self.fail("E302", f"{what} has no '{key}'", node)
        return {k: v for k, v in found.items() if k in allowed}

    def scalar(self, node: yaml.Node, what: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode):
            self.fail("E302", f"{what} must be a single value", node)
            return None
        return str(node.value)

    def integer(self, node: yaml.Node, what: str, lo: int, hi: int) -> int | None:
        text = self.scalar(node, what)
        if text is None:
            return None
        if not _NUMBER.fullmatch(text) or not lo <= int(text) <= hi:
            self.fail(
                "E307", f"{what} must be a whole number from {lo} to {hi}, got '{text}'", node
            )
            return None
        return int(text)

    def name(self, node: yaml.Node, what: str) -> str | None:
        text = self.scalar(node, what)
        if text is not None and (text in KEYWORDS or text == "any"):
            self.fail(
                "E307",
                f"{what} {quote(text)} is a word of the policy language; a policy could not name it",
                node,
            )
            return None
        if text is not None and not _NAME.match(text):
            self.fail(
                "E307",
                f"{what} {quote(text)} is not a valid name (letters, digits, '_' and inner '-')",
                node,
            )
            return None
        return text

    # -- the document ----------------------------------------------------------------------

    def read(self, text: str) -> Inventory:
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        try:
            self.check_aliases(text)
            if self.diags:
                raise InventoryError(self.diags)
            root = yaml.compose(text, Loader=_LOADER)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            span = self.span(mark) if mark else None
            problem = getattr(exc, "problem", None) or str(exc)
            context, where = getattr(exc, "context", None), getattr(exc, "context_mark", None)
            notes = (Note(context, self.span(where) if where else None),) if context else ()
            raise InventoryError(
                [error("E301", f"invalid YAML: {problem}", span, *notes)]
            ) from None
        except RecursionError:  # the pure-Python loader, on a deeply nested document
            raise InventoryError(
                [error("E301", "invalid YAML: nested too deeply", Span.point(self.file, 1, 1))]
            ) from None
        if root is None:
            raise InventoryError([error("E301", f"inventory '{self.file}' is empty", None)])
        top = self.fields(root, "the inventory", _TOP_FIELDS, ("switches", "hosts"))
        name = self.name(top["name"], "inventory name") if "name" in top else None
        switches = self.read_each(top.get("switches"), "switches", self.read_switch)
        if isinstance(top.get("switches"), yaml.MappingNode):
            self.declared = {str(k.value) for k, _ in top["switches"].value}
        by_name = {s.name: s for s in switches}
        hosts = self.read_each(
            top.get("hosts"), "hosts", lambda n, v: self.read_host(n, v, by_name)
        )
        links = self.read_links(top.get("links"), by_name)
        down = self.read_down(top.get("down"), by_name)
        self.check_unique(switches, hosts)
        self.check_ports(hosts, links)
        if self.diags:
            raise InventoryError(self.diags)
        return Inventory.build(name or "inventory", self.file, switches, hosts, links, down)

    def check_aliases(self, text: str) -> None:
        """Refuse aliases of mappings and lists, before anything expands them: a few hundred
        bytes of nested aliases stand for billions of values (an alias bomb), and no field
        of an inventory needs a repeated mapping or list. Aliases of single values are kept."""
        collection: dict[str, bool] = {}  # anchor -> names a mapping or list
        reported: set[str] = set()
        for event in yaml.parse(text, Loader=_LOADER):
            if isinstance(event, yaml.AliasEvent):
                anchor = str(event.anchor)
                if collection.get(anchor) and anchor not in reported:
                    reported.add(anchor)  # once per anchor: a bomb repeats each many times
                    self.fail(
                        "E302",
                        f"alias *{anchor[:24]} repeats a mapping or list: an inventory may "
                        "repeat single values only (write it out)",
                        event.start_mark,
                    )
            elif isinstance(event, yaml.NodeEvent) and event.anchor is not None:
                collection[str(event.anchor)] = isinstance(
                    event, yaml.SequenceStartEvent | yaml.MappingStartEvent
                )

    def read_each(
        self,
        node: yaml.Node | None,
        what: str,
        read_one: Callable[[yaml.Node, yaml.Node], T | None],
    ) -> tuple[T, ...]:
        if node is None:
            return ()
        out = []
        for key_node, value in self.mapping(node, what).values():
            item = read_one(key_node, value)
            if item is not None:
                out.append(item)
        return tuple(out)

    def read_switch(self, key: yaml.Node, node: yaml.Node) -> Switch | None:
        name = self.name(key, "switch name")
        what = f"switch '{key.value}'"
        f = self.fields(node, what, _SWITCH_FIELDS, ("role", "device_id", "p4rt"))
        role = self.scalar(f["role"], f"{what} role") if "role" in f else None
        if role is not None and role not in ROLES:
            self.fail(
                "E307", f"{what} role must be one of {', '.join(ROLES)}, got '{role}'", f["role"]
            )
            role = None
        device_id = (
            self.integer(f["device_id"], f"{what} device_id", 0, (1 << 64) - 1)
            if "device_id" in f
            else None
        )
        p4rt = self.scalar(f["p4rt"], f"{what} p4rt") if "p4rt" in f else None
        if p4rt is not None and not re.match(r"^[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}$", p4rt):
            self.fail("E307", f"{what} p4rt must be host:port, got '{p4rt}'", f["p4rt"])
            p4rt = None
        rack = self.scalar(f["rack"], f"{what} rack") if "rack" in f else None
        cpu_port = (
            self.integer(f["cpu_port"], f"{what} cpu_port", 1, 511)
            if "cpu_port" in f
            else DEFAULT_CPU_PORT
        )
        if None in (name, role, device_id, p4rt, cpu_port):
            return None
        assert name and role and p4rt and device_id is not None and cpu_port is not None
        return Switch(name, role, device_id, p4rt, rack, cpu_port, self.span(key))

    def read_host(
        self, key: yaml.Node, node: yaml.Node, switches: dict[str, Switch]
    ) -> Host | None:
        name = self.name(key, "host name")
        what = f"host '{key.value}'"
        f = self.fields(node, what, _HOST_FIELDS, ("ip", "switch", "port"))
        ip = None
        if "ip" in f and (ip_text := self.scalar(f["ip"], f"{what} ip")) is not None:
            try:
                ip = parse_ipv4(ip_text)
            except AddressSyntaxError as exc:
                self.fail("E307", f"{what} ip: {exc}", f["ip"])
        mac: str | None = None
        if "mac" in f:
            mac = self.scalar(f["mac"], f"{what} mac")
            if mac is not None:
                mac = mac.lower()
                if not _MAC.match(mac):
                    self.fail(
                        "E307",
                        f"{what} mac '{mac}' is not a MAC address like 02:00:0a:00:01:0b",
                        f["mac"],
                    )
                    mac = None
                elif int(mac[:2], 16) & 1:
                    self.fail("E307", f"{what} mac '{mac}' is a multicast address", f["mac"])
                    mac = None
        elif ip is not None:
            mac = default_mac(ip)
        switch = self.scalar(f["switch"], f"{what} switch") if "switch" in f else None
        if switch is not None and switch not in switches and switch in self.declared:
            switch = None
        elif switch is not None and switch not in switches:
            close = difflib.get_close_matches(switch, list(switches), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            self.fail("E305", f"{what} is on unknown switch '{switch}'{hint}", f["switch"])
            switch = None
        elif switch is not None and switches[switch].role != "tor":
            self.fail(
                "E307",
                f"{what} is on '{switch}', a {switches[switch].role}: hosts attach to ToRs",
                f["switch"],
            )
            switch = None
        port = self.integer(f["port"], f"{what} port", 1, MAX_DATA_PORT) if "port" in f else None
        if name is None or ip is None or mac is None or switch is None or port is None:
            return None
        return Host(name, ip, mac, switch, port, self.span(key))

    def read_links(self, node: yaml.Node | None, switches: dict[str, Switch]) -> tuple[Link, ...]:
        if node is None:
            return ()
        if not isinstance(node, yaml.SequenceNode):
            self.fail("E302", "links must be a list of {endpoints: [a:port, b:port]}", node)
            return ()
        links = []
        for item in node.value:
            f = self.fields(item, "link", _LINK_FIELDS, _LINK_FIELDS)
            ends = f.get("endpoints")
            if ends is None:
                continue
            if not isinstance(ends, yaml.SequenceNode) or len(ends.value) != 2:
                self.fail("E302", "link endpoints must be a list of two 'switch:port'", ends)
                continue
            parsed = [self.link_end(e, switches) for e in ends.value]
            if parsed[0] is None or parsed[1] is None:
                continue
            (a, a_port), (b, b_port) = parsed[0], parsed[1]
            if a == b:
                self.fail("E307", f"link connects switch '{a}' to itself", ends)
                continue
            links.append(Link(a, a_port, b, b_port, self.span(ends)))
        return tuple(links)

    def read_down(self, node: yaml.Node | None, switches: dict[str, Switch]) -> frozenset[str]:
        """`down`: the spines out of service, a list of names."""
        if node is None:
            return frozenset()
        if not isinstance(node, yaml.SequenceNode):
            self.fail("E302", "down must be a list of spine names", node)
            return frozenset()
        out = set()
        for item in node.value:
            name = self.scalar(item, "a switch in down")
            if name is None or (name not in switches and name in self.declared):
                continue
            if name not in switches:
                close = difflib.get_close_matches(name, list(switches), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                self.fail("E305", f"down names unknown switch '{name}'{hint}", item)
            elif switches[name].role != "spine":
                self.fail(
                    "E307",
                    f"down names '{name}', a {switches[name].role}: only spines can be out "
                    "of service (a ToR's hosts have no other way in)",
                    item,
                )
            else:
                out.add(name)
        return frozenset(out)

    def link_end(self, node: yaml.Node, switches: dict[str, Switch]) -> tuple[str, int] | None:
        text = self.scalar(node, "link endpoint")
        if text is None:
            return None
        m = _ENDPOINT.match(text)
        if not m:
            self.fail("E307", f"link endpoint '{text}' must be 'switch:port'", node)
            return None
        switch, port = m["switch"], int(m["port"])
        if switch not in switches and switch in self.declared:
            return None
        if switch not in switches:
            close = difflib.get_close_matches(switch, list(switches), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            self.fail("E305", f"link endpoint '{text}' names unknown switch '{switch}'{hint}", node)
            return None
        if not 1 <= port <= MAX_DATA_PORT:
            self.fail("E307", f"link endpoint '{text}': port must be 1 to {MAX_DATA_PORT}", node)
            return None
        return switch, port

    # -- cross checks ----------------------------------------------------------------------

    def first_seen(self, code: str, what: str, items: Sequence[tuple[object, str, Span]]) -> None:
        """Report every item whose key was already seen, pointing at the first."""
        seen: dict[object, Span] = {}
        for key, label, span in items:
            if key in seen:
                self.diags.append(
                    error(
                        code,
                        f"{what} {label} is used twice",
                        span,
                        Note("first used here", seen[key]),
                    )
                )
            else:
                seen[key] = span

    def check_unique(self, switches: tuple[Switch, ...], hosts: tuple[Host, ...]) -> None:
        self.first_seen("E303", "IP address", [(h.ip, h.ip_text, h.span) for h in hosts])
        self.first_seen("E304", "MAC address", [(h.mac, h.mac, h.span) for h in hosts])
        self.first_seen(
            "E308", "device_id", [(s.device_id, str(s.device_id), s.span) for s in switches]
        )
        self.first_seen("E308", "P4Runtime address", [(s.p4rt, s.p4rt, s.span) for s in switches])
        names = [(s.name, f"'{s.name}'", s.span) for s in switches] + [
            (h.name, f"'{h.name}'", h.span) for h in hosts
        ]
        self.first_seen("E308", "name", names)

    def check_ports(self, hosts: tuple[Host, ...], links: tuple[Link, ...]) -> None:
        uses: list[tuple[object, str, Span]] = [
            ((h.switch, h.port), f"{h.switch}:{h.port}", h.span) for h in hosts
        ]
        for link in links:
            uses.append(((link.a, link.a_port), f"{link.a}:{link.a_port}", link.span))
            uses.append(((link.b, link.b_port), f"{link.b}:{link.b_port}", link.span))
        self.first_seen("E306", "switch port", uses)
