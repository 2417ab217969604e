"""The live map's document: what `/v1/map` gives the page (p4seg/webmap.py)."""

from __future__ import annotations

from typing import Any

from compiler.inventory import Inventory
from compiler.model import Policy
from p4seg.webmap import MAX_MATRIX_HOSTS, MapLive, map_document, page


def _node(doc: dict[str, object], name: str) -> dict[str, Any]:
    nodes = doc["nodes"]
    assert isinstance(nodes, list)
    return next(n for n in nodes if n["name"] == name)


def test_every_rule_is_an_edge_between_sized_nodes(floor: Inventory, floor_policy: Policy) -> None:
    doc = map_document(floor_policy, floor, MapLive(rule_rates={floor_policy.rules[1].id: 12.5}))
    edges = doc["edges"]
    assert isinstance(edges, list)
    assert [(e["src"], e["dst"]) for e in edges] == [
        (r.src_text, r.dst_text) for r in floor_policy.rules
    ]
    assert edges[1]["pps"] == 12.5 and edges[0]["pps"] == 0.0
    assert edges[1]["what"] == "tcp 9876"  # algo -> order_router tcp 9876
    assert _node(doc, "algo")["hosts"] == 3
    assert _node(doc, "prod")["hosts"] > _node(doc, "algo")["hosts"]
    for n in doc["nodes"]:  # type: ignore[attr-defined]
        assert 0.0 <= n["x"] <= 1.0 and 0.0 <= n["y"] <= 1.0
    # the same policy, the same layout: nodes do not jump between refreshes
    again = map_document(floor_policy, floor, MapLive())
    assert [(n["x"], n["y"]) for n in again["nodes"]] == [  # type: ignore[attr-defined]
        (n["x"], n["y"])
        for n in doc["nodes"]  # type: ignore[attr-defined]
    ]


def test_a_quarantined_host_marks_every_node_that_holds_it(
    floor: Inventory, floor_policy: Policy
) -> None:
    doc = map_document(
        floor_policy, floor, MapLive(quarantined=("algo1", "oms2"), contained=("oms2",))
    )
    assert _node(doc, "algo")["quarantined"] == ["algo1"]
    assert _node(doc, "prod")["quarantined"] == ["algo1", "oms2"]
    assert _node(doc, "prod")["contained"] == ["oms2"]
    assert _node(doc, "risk")["quarantined"] == []
    assert doc["quarantined"] == ["algo1", "oms2"] and doc["contained"] == ["oms2"]


def test_denied_attempts_are_drawn_between_the_most_specific_nodes(
    floor: Inventory, floor_policy: Policy
) -> None:
    algo1 = floor.hosts_by_name["algo1"].ip_text
    risk1 = floor.hosts_by_name["risk1"].ip_text
    alerts = [{"src": algo1, "dst": risk1, "rule": "default"}] * 3 + [
        {"src": "192.0.2.1", "dst": risk1, "rule": "default"}  # not a host: no node holds it
    ]
    doc = map_document(floor_policy, floor, MapLive(alerts=alerts))
    assert doc["denied"] == [{"src": "algo", "dst": "risk", "count": 3}]
    assert len(doc["alerts"]) == 4  # type: ignore[arg-type]


def test_the_matrix_grid_is_kept_for_small_floors_only(
    floor: Inventory, floor_policy: Policy
) -> None:
    small = {"hosts": ["a", "b"], "grid": [[None, 2], [0, None]], "cells": 4, "allowed": 1}
    doc = map_document(floor_policy, floor, MapLive(matrix=small))
    assert doc["matrix"] == {**small, "hosts": ["a", "b"]}
    hosts = [f"h{i}" for i in range(MAX_MATRIX_HOSTS + 1)]
    big = {"hosts": hosts, "grid": [[1] * len(hosts)] * len(hosts), "cells": 1, "allowed": 1}
    trimmed = map_document(floor_policy, floor, MapLive(matrix=big))["matrix"]
    assert trimmed == {"cells": 1, "allowed": 1, "hosts": None}


def test_the_page_draws_from_the_map_document() -> None:
    html = page().decode()
    assert 'fetch("/v1/map"' in html and 'id="map"' in html
