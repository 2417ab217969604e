"""Mininet node names for any inventory (topologies/names.py) and the CLI that takes
inventory names (topologies/console.py): no root needed."""

from __future__ import annotations

import cmd
import random
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from compiler.check import check_policy
from compiler.inventory import MAX_DATA_PORT, load_inventory
from p4seg.up import keep_hint, on_loopback
from topologies.console import mininet_arguments, node_command
from topologies.matrix import Matrix, expected_matrix, representative_flows
from topologies.names import IFNAMSIZ, NODE_NAME_MAX, _derived, is_safe, node_names
from topologies.network import Floor

# What compiler/inventory.py accepts as a host or switch name, of any length.
INVENTORY_NAME = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,30}(-[A-Za-z0-9_]{1,12}){0,5}\Z")


def cli_first_word(line: str) -> str | None:
    """The node name Mininet's CLI (Python's cmd) reads from a line."""
    first, _, _ = cmd.Cmd().parseline(line)
    return first


def check_names(names: list[str]) -> dict[str, str]:
    out = node_names(names)
    assert set(out) == set(names)
    assert len(set(out.values())) == len(out), out  # unique
    for short in out.values():
        assert len(short) <= NODE_NAME_MAX
        assert len(f"{short}-eth{MAX_DATA_PORT}") <= IFNAMSIZ
        assert short.isidentifier() and is_safe(short)
        assert cli_first_word(f"{short} ping -c1 10.0.0.1") == short
    return out


@given(st.lists(INVENTORY_NAME, min_size=1, max_size=40, unique=True), st.randoms())
def test_node_names_fit_are_unique_and_deterministic(names: list[str], rng: random.Random) -> None:
    out = check_names(names)
    shuffled = list(names)
    rng.shuffle(shuffled)
    assert node_names(shuffled) == out  # the set of names decides, not their order


def test_names_that_collide_when_truncated_stay_apart() -> None:
    names = [
        "tor-algo-east-1",
        "tor-algo-east-2",
        "hdb-replica-primary-01",
        "hdb-replica-primary-02",
    ]
    out = check_names(names)
    assert [n[:NODE_NAME_MAX] for n in names[:2]] == ["tor-algo", "tor-algo"]  # the trap
    assert out["tor-algo-east-1"] != out["tor-algo-east-2"]


def test_short_safe_names_keep_themselves() -> None:
    out = check_names(["tor1", "algo1", "h_2", "md1", "hdb-replica"])
    assert {n: out[n] for n in ("tor1", "algo1", "h_2", "md1")} == {
        "tor1": "tor1", "algo1": "algo1", "h_2": "h_2", "md1": "md1"
    }  # fmt: skip
    assert out["hdb-replica"] != "hdb-replica"


def test_names_the_cli_or_python_would_misread_are_replaced() -> None:
    # Too long, with '-', a leading '_', a Python keyword, the CLI's `net` and `node`.
    names = ["abcdefghi", "a-b", "_x", "class", "net", "node", "None"]
    out = check_names(names)
    assert all(out[n] != n for n in names)


def test_a_derived_name_never_takes_an_inventory_name() -> None:
    # An inventory that already holds the name `hdb-replica` would derive first.
    taken = _derived("hdb-replica", 0)
    out = check_names(["hdb-replica", taken])
    assert out[taken] == taken
    assert out["hdb-replica"] == _derived("hdb-replica", 1)


def test_every_example_inventory_fits() -> None:
    for path in ("topologies/trading_floor.yaml", "topologies/small.yaml"):
        inventory, diags = load_inventory(path)
        assert inventory is not None, diags
        names = [*(s.name for s in inventory.switches), *(h.name for h in inventory.hosts)]
        out = check_names(names)
        # Safe names (every host here) keep themselves; `tor-md` & co. get short stand-ins.
        assert {n: out[n] for n in names if is_safe(n)} == {n: n for n in names if is_safe(n)}
        assert all(out[h.name] == h.name for h in inventory.hosts)


# -- the CLI -----------------------------------------------------------------------------------

NODES = {
    "hdb-replica-primary-01": "hdbr1111",
    "tor-east": "tore2222",
    "ops1": "ops1",
    "net": "net3333",
}
ADDRESSES = {"hdb-replica-primary-01": "10.20.1.11", "ops1": "10.20.2.50"}


def test_a_line_for_an_inventory_node_gets_mininet_names_and_addresses() -> None:
    line = "hdb-replica-primary-01 ping -c1 ops1\n"
    assert node_command(line, NODES, ADDRESSES) == "hdbr1111 ping -c1 10.20.2.50"
    assert node_command("ops1 ping -c1 hdb-replica-primary-01", NODES, ADDRESSES) == (
        "ops1 ping -c1 10.20.1.11"
    )
    # Mininet's CLI would have read `hdb` as the command: the rewritten line names the node.
    assert cli_first_word("hdb-replica-primary-01 ping") == "hdb"
    assert cli_first_word(node_command("hdb-replica-primary-01 ping", NODES, ADDRESSES) or "") == (
        "hdbr1111"
    )


def test_the_command_keeps_its_own_spacing() -> None:
    line = "tor-east echo 'a  b'"
    assert node_command(line, NODES, ADDRESSES) == "tore2222 echo 'a  b'"


def test_lines_that_are_not_for_an_inventory_node_are_left_to_mininet() -> None:
    for line in (
        "nodes",
        "hdb-replica-primary-01",
        "hdb-replica-primary-01   ",
        "h9 ping ops1",
        "",
    ):
        assert node_command(line, NODES, ADDRESSES) is None, line
    # An inventory node named like a CLI command, with a command after it, is the node.
    assert node_command("net ip -br link", NODES, ADDRESSES) == "net3333 ip -br link"


def test_node_arguments_of_mininet_commands_take_inventory_names() -> None:
    assert mininet_arguments("link tor-east hdb-replica-primary-01 down", NODES) == (
        "link tore2222 hdbr1111 down"
    )
    assert mininet_arguments("iperf ops1 hdb-replica-primary-01", NODES) == "iperf ops1 hdbr1111"
    assert mininet_arguments("py node['tor-east']", NODES) == "py node['tor-east']"


# -- P4Runtime on loopback ---------------------------------------------------------------------

REAL_SWITCHES = """\
name: real
switches:
  tor-a: {role: tor, device_id: 1, p4rt: "10.0.0.1:9559"}
  tor-b: {role: tor, device_id: 2, p4rt: "10.0.0.2:9559"}
  tor-c: {role: tor, device_id: 3, p4rt: "127.0.0.1:50411"}
  tor-d: {role: tor, device_id: 4, p4rt: "localhost:50411"}
  tor-e: {role: tor, device_id: 5, p4rt: "127.0.0.1:70000"}
hosts:
  h1: {ip: 10.1.0.1, switch: tor-a, port: 1}
"""


def test_a_floor_serves_every_switch_on_its_own_loopback_port(tmp_path: Path) -> None:
    (tmp_path / "real.yaml").write_text(REAL_SWITCHES)
    inventory, _ = load_inventory(str(tmp_path / "real.yaml"))
    ports: dict[str, int] = {}
    here = on_loopback(inventory, ports)
    addresses = {s.name: s.p4rt for s in here.switches}
    assert all(a.startswith("127.0.0.1:") for a in addresses.values()), addresses
    assert len(set(addresses.values())) == len(addresses)  # one port each
    assert all(0 < int(a.rpartition(":")[2]) < 65536 for a in addresses.values())
    assert addresses["tor-c"] == "127.0.0.1:50411"  # a loopback address of its own is kept
    assert here.hosts == inventory.hosts and here.links == inventory.links
    assert on_loopback(inventory, ports) == here  # --keep's later compiles: the same ports


# -- the hint of --keep --------------------------------------------------------------------------

HINT_FLOOR = """\
name: hint
switches:
  tor-research-compute-east: {role: tor, device_id: 1, p4rt: "127.0.0.1:50421"}
hosts:
  web-frontend-01: {ip: 10.3.0.1, switch: tor-research-compute-east, port: 1}
  db1: {ip: 10.3.0.2, switch: tor-research-compute-east, port: 2}
  cache1: {ip: 10.3.0.3, switch: tor-research-compute-east, port: 3}
"""


def hint_for(tmp_path: Path, policy_text: str) -> str:
    (tmp_path / "hint.yaml").write_text(HINT_FLOOR)
    inventory, _ = load_inventory(str(tmp_path / "hint.yaml"))
    result = check_policy(policy_text, "hint.zt", inventory)
    assert result.policy is not None, result.diagnostics
    floor = Floor(inventory)  # never started: the hint needs names, not a network
    floor.node_names = node_names([*inventory.switches_by_name, *inventory.hosts_by_name])
    flows = representative_flows(result.policy)
    matrix = Matrix(
        [h.name for h in inventory.hosts], flows, expected_matrix(result.policy, floor, flows)
    )
    return keep_hint(floor, matrix)


def test_the_hint_pings_a_pair_of_this_floor_the_policy_lets_ping(tmp_path: Path) -> None:
    hint = hint_for(tmp_path, "policy p\nallow cache1 -> web-frontend-01 icmp\n")
    assert "Try: cache1 ping -c1 web-frontend-01   |   py node['cache1']" in hint, hint
    assert "web-frontend-01 = " in hint and "tor-research-compute-east = " in hint
    assert "db1 =" not in hint  # a name Mininet takes as it is is not listed


def test_without_an_allowed_ping_the_hint_still_names_this_floors_hosts(tmp_path: Path) -> None:
    hint = hint_for(tmp_path, "policy p\nallow db1 -> cache1 tcp 6379\n")
    assert "Try: cache1 ping -c1 db1" in hint, hint  # denied, and shows it
    assert "algo1" not in hint and "oms1" not in hint
