"""Parser, resolver and inventory loader: spans, collected errors, the shapes they build."""

from __future__ import annotations

import pytest

from compiler import ast
from compiler.addresses import parse_ipv4
from compiler.diagnostics import InventoryError, PolicyError, PolicySyntaxError
from compiler.inventory import Inventory, default_mac, parse_inventory
from compiler.model import ALL_PORTS
from compiler.parse import parse
from compiler.resolve import resolve


def test_rule_spans_and_fields() -> None:
    tree = parse("policy p\nallow a, 10.0.0.0/8 -> b tcp 22, 80-90 rate 5kpps for 15m\n", "x.zt")
    rule = tree.statements[1]
    assert isinstance(rule, ast.Rule)
    assert (rule.span.line, rule.span.column) == (2, 1)
    assert [ep.text for ep in rule.src] == ["a", "10.0.0.0/8"]
    assert isinstance(rule.src[1], ast.Address) and rule.src[1].span.column == 10
    assert rule.proto is not None
    ranges = [p for p in rule.proto.ports if isinstance(p, ast.PortRange)]
    assert ranges == list(rule.proto.ports)
    assert [(p.lo, p.hi) for p in ranges] == [(22, None), (80, 90)]
    assert [type(o) for o in rule.options] == [ast.RateOption, ast.ForOption]


def test_statements_may_span_lines_and_names_may_have_dashes() -> None:
    tree = parse("policy p\nservice s = md-feed-1,\n   md-feed-2   # two feeds\nallow s->s icmp\n")
    svc = tree.statements[1]
    assert isinstance(svc, ast.ServiceDef)
    assert [e.text for e in svc.endpoints] == ["md-feed-1", "md-feed-2"]
    assert [c.text for c in tree.comments] == ["# two feeds"]
    rule = tree.statements[2]
    assert isinstance(rule, ast.Rule) and rule.src[0].text == "s" and rule.dst[0].text == "s"


def test_every_broken_statement_is_reported() -> None:
    text = (
        "policy p\nallow a b\nservice x = 1.2.3.4\nallow a -> b tcp 1-\nallow a -> b tcp 1 bogus\n"
    )
    with pytest.raises(PolicySyntaxError) as exc:
        parse(text, "x.zt")
    found = [(d.code, d.span.line) for d in exc.value.diagnostics if d.span]
    assert found == [("E002", 2), ("E003", 4), ("E005", 5)]


def test_keywords_are_reserved() -> None:
    with pytest.raises(PolicySyntaxError) as exc:
        parse("policy p\nservice x = a,\nallow b -> c\n")
    [diag] = exc.value.diagnostics  # `allow` is not a host called allow: the list is incomplete
    assert diag.code == "E004" and diag.span is not None and diag.span.line == 2
    assert "before the next statement (line 3)" in diag.message
    with pytest.raises(PolicySyntaxError) as exc:
        parse("policy p\nservice log = 10.0.0.1\n")
    [diag] = exc.value.diagnostics
    assert diag.code == "E104" and diag.span is not None and diag.span.column == 9


def test_misspelt_statement_suggests_the_keyword() -> None:
    with pytest.raises(PolicySyntaxError) as exc:
        parse("policy p\nalow a -> b\n")
    assert "did you mean `allow`" in exc.value.diagnostics[0].message


INVENTORY = """
switches:
  tor1: {role: tor, device_id: 1, p4rt: "127.0.0.1:50001"}
hosts:
  algo1: {ip: 10.0.2.11, switch: tor1, port: 1}
  oms1: {ip: 10.0.3.10, mac: "02:AA:00:00:00:01", switch: tor1, port: 2}
"""


def test_inventory_defaults_and_normalisation() -> None:
    inv = parse_inventory(INVENTORY, "inv.yaml")
    algo1 = inv.hosts_by_name["algo1"]
    assert algo1.mac == default_mac(parse_ipv4("10.0.2.11")) == "02:00:0a:00:02:0b"
    assert inv.hosts_by_name["oms1"].mac == "02:aa:00:00:00:01"
    assert inv.switches_by_name["tor1"].cpu_port == 255
    assert algo1.span.line == 5


def test_inventory_reports_all_problems_with_locations() -> None:
    bad = (
        INVENTORY
        + "  oms2: {ip: 10.0.3.10, switch: tor1, port: 2}\n  x: {ip: 1.2.3.4, switch: tor9, port: 1}\n"
    )
    with pytest.raises(InventoryError) as exc:
        parse_inventory(bad, "inv.yaml")
    found = sorted((d.code, d.span.line if d.span else 0) for d in exc.value.diagnostics)
    assert found == [("E303", 7), ("E305", 8), ("E306", 7)]


def test_inventory_yaml_syntax_error_has_a_location() -> None:
    with pytest.raises(InventoryError) as exc:
        parse_inventory("switches: {a: [\n", "inv.yaml")
    [diag] = exc.value.diagnostics
    assert diag.code == "E301" and diag.span is not None


def test_resolve_names_hosts_and_any() -> None:
    inv = parse_inventory(INVENTORY, "inv.yaml")
    text = "policy p\nservice a = algo1\nservice b = a, 10.0.9.0/24\nallow b -> any tcp\n"
    policy = resolve(parse(text), inv).policy
    rule = policy.rules[0]
    assert str(rule.src) == "10.0.2.11, 10.0.9.0/24"
    assert rule.dst.size() == 1 << 32
    assert rule.ports == ALL_PORTS and rule.proto == "tcp"


def test_cycle_and_unknown_names_are_collected() -> None:
    text = "policy p\nservice a = b\nservice b = a\nallow a -> algo2 icmp\n"
    with pytest.raises(PolicyError) as exc:
        resolve(parse(text), parse_inventory(INVENTORY))
    codes = sorted(d.code for d in exc.value.diagnostics)
    assert codes == ["E101", "E103"]
    unknown = next(d for d in exc.value.diagnostics if d.code == "E101")
    assert "did you mean host 'algo1'" in unknown.message


def test_without_inventory_host_names_say_so() -> None:
    with pytest.raises(PolicyError) as exc:
        resolve(parse("policy p\nallow zzz -> qqq icmp\n"), Inventory.empty())
    assert "-i INVENTORY" in exc.value.diagnostics[0].message
