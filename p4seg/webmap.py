"""The live map `p4seg serve` shows at `/`: the policy's services as a graph, for people.

Nodes are the endpoints the rules name (services, hosts, address literals, `any`), sized by
the inventory hosts they hold; edges are the rules (allows solid, denies grey), drawn wider
as their live packet rate grows; denied-and-logged attempts seen by the switches are drawn
apart (dashed, red) between the nodes that hold their source and destination. Quarantined
and contained hosts are marked on every node that holds them. The page itself is static:
its script asks `/v1/map` for this document every few seconds and redraws, so what it
shows is what the service knows, never older than one refresh.

The layout is networkx's spring layout with a fixed seed over the rules' graph, computed
once per policy version so nodes do not move between refreshes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import networkx as nx

from compiler.addresses import AddressSet, format_ipv4
from compiler.inventory import Host, Inventory
from compiler.model import Action, Policy, PolicyRule

MAX_ALERTS = 50  # the last alerts listed under the map
MAX_MATRIX_HOSTS = 64  # past this, the matrix is summarised (a 1k-host grid helps no one)


def page() -> bytes:
    """The page (static: its script draws what `/v1/map` answers)."""
    return resources.files("p4seg").joinpath("map.html").read_bytes()


@dataclass(frozen=True)
class MapLive:
    """What the service knows now, beyond the policy: quarantines (and which of them were
    automatic containments), packets/s per rule from the direct counters, the last alerts
    (`Alert.to_json()`), and the segmentation matrix of the last `up` (`Matrix.to_json()`)."""

    quarantined: tuple[str, ...] = ()
    contained: tuple[str, ...] = ()
    rule_rates: Mapping[int, float] = field(default_factory=dict)
    alerts: Sequence[Mapping[str, object]] = ()
    matrix: Mapping[str, object] | None = None
    generation: int = 0  # bumped by the service on every change it makes


@dataclass(frozen=True)
class _Node:
    name: str
    hosts: tuple[str, ...]


def _endpoint_hosts(addresses: AddressSet, hosts: Iterable[Host]) -> tuple[str, ...]:
    return tuple(sorted(h.name for h in hosts if h.ip in addresses))


def _nodes(policy: Policy, inventory: Inventory) -> dict[str, _Node]:
    nodes: dict[str, _Node] = {}
    for r in policy.rules:
        for text, addresses in ((r.src_text, r.src), (r.dst_text, r.dst)):
            if text not in nodes:
                nodes[text] = _Node(text, _endpoint_hosts(addresses, inventory.hosts))
    return nodes


@lru_cache(maxsize=8)
def _layout(edges: tuple[tuple[str, str], ...], names: tuple[str, ...]) -> dict[str, list[float]]:
    """Positions in [0.05, 0.95]², the same for the same graph (seeded spring layout)."""
    graph = nx.Graph()
    graph.add_nodes_from(names)
    graph.add_edges_from((a, b) for a, b in edges if a != b)
    if len(names) == 1:
        return {names[0]: [0.5, 0.5]}
    k = 1.5 / math.sqrt(len(names))
    pos = nx.spring_layout(graph, seed=1, k=k, method="force")  # numpy only, no scipy
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    return {
        n: [
            round(0.05 + 0.9 * (float(pos[n][0]) - min(xs)) / span_x, 4),
            round(0.05 + 0.9 * (float(pos[n][1]) - min(ys)) / span_y, 4),
        ]
        for n in names
    }


def _what(rule: PolicyRule) -> str:
    """`tcp 9876`, `udp 30001-30010`, `icmp`, `ip`: the rule's protocol and ports."""
    text = rule.describe()
    src_dst = f"{rule.action.value} {rule.src_text} -> {rule.dst_text}"
    return text[len(src_dst) :].strip() if text.startswith(src_dst) else text


def _holder(address: str, nodes: Mapping[str, _Node], by_name: Mapping[str, Host]) -> str | None:
    """The most specific node holding a host's address (fewest hosts), if any."""
    host = next((h for h in by_name.values() if format_ipv4(h.ip) == address), None)
    if host is None:
        return None
    holding = [n for n in nodes.values() if host.name in n.hosts]
    return min(holding, key=lambda n: (len(n.hosts), n.name)).name if holding else None


def map_document(policy: Policy, inventory: Inventory, live: MapLive) -> dict[str, object]:
    """The JSON document the page draws (`/v1/map`)."""
    nodes = _nodes(policy, inventory)
    names = tuple(sorted(nodes))
    edges = tuple(sorted({(r.src_text, r.dst_text) for r in policy.rules}))
    layout = _layout(edges, names)
    quarantined, contained = set(live.quarantined), set(live.contained)
    by_name = inventory.hosts_by_name
    denied: Counter[tuple[str, str]] = Counter()
    for alert in live.alerts:
        src = _holder(str(alert.get("src", "")), nodes, by_name)
        dst = _holder(str(alert.get("dst", "")), nodes, by_name)
        if src is not None and dst is not None:
            denied[(src, dst)] += 1
    return {
        "policy": policy.name,
        "generation": live.generation,
        "nodes": [
            {
                "name": n.name,
                "hosts": len(n.hosts),
                "x": layout[n.name][0],
                "y": layout[n.name][1],
                "quarantined": sorted(h for h in n.hosts if h in quarantined),
                "contained": sorted(h for h in n.hosts if h in contained),
            }
            for n in (nodes[name] for name in names)
        ],
        "edges": [
            {
                "rule_id": r.id,
                "line": r.span.line,
                "src": r.src_text,
                "dst": r.dst_text,
                "action": r.action.value,
                "what": _what(r),
                "log": r.log,
                "pps": round(float(live.rule_rates.get(r.id, 0.0)), 2),
            }
            for r in policy.rules
        ],
        "denied": [{"src": s, "dst": d, "count": c} for (s, d), c in sorted(denied.items())],
        "quarantined": sorted(quarantined),
        "contained": sorted(contained),
        "alerts": list(live.alerts)[-MAX_ALERTS:],
        "matrix": _matrix(live.matrix),
        "allows": sum(r.action is Action.ALLOW for r in policy.rules),
    }


def _matrix(doc: Mapping[str, object] | None) -> dict[str, object] | None:
    """The last `up` matrix, trimmed to what a page can show."""
    if doc is None:
        return None
    hosts = doc.get("hosts")
    keep = ("cells", "allowed", "mismatches", "seconds", "flows", "grid")
    out = {k: doc[k] for k in keep if k in doc}
    if not isinstance(hosts, list) or len(hosts) > MAX_MATRIX_HOSTS:
        out.pop("grid", None)  # a 1k-host grid helps no one: the counts and mismatches stay
        hosts = None
    out["hosts"] = hosts
    return out
