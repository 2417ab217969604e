"""Bad input to `p4seg check`/`compile`: clear diagnostics, never a traceback, a hang or a
blow-up; and the messages that misled people, now saying what is wrong.

Cost bounds are asserted on what grows with the input (memory, flows evaluated, values
expanded), never on wall time.
"""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from compiler.addresses import AddressSet
from compiler.check import check_policy
from compiler.diagnostics import Diagnostic, InventoryError, Span
from compiler.inventory import Inventory, load_inventory, parse_inventory
from compiler.model import ALL_PORTS, Action, ExpectCase, Policy, PolicyRule, format_icmp_types
from compiler.semantics import EPHEMERAL_PORT, PolicySemantics, bits
from p4seg.cli import main

ROOT = Path(__file__).resolve().parent.parent
FLOOR = str(ROOT / "topologies" / "trading_floor.yaml")
HEAD = "policy p\nservice algo = algo1, algo2, algo3\nservice router = oms1, oms2\n"


def diags(text: str, inventory: Inventory) -> list[Diagnostic]:
    return list(check_policy(text, "p.zt", inventory).diagnostics)


def one(text: str, inventory: Inventory, code: str) -> Diagnostic:
    found = [d for d in diags(text, inventory) if d.code == code]
    assert len(found) == 1, [(d.code, d.message) for d in diags(text, inventory)]
    return found[0]


# -- messages that misled ------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule",
    ["allow algo -> router tcp 9876,", "allow algo -> router tcp 80, 443,\ndefault deny"],
)
def test_a_port_list_ending_with_a_comma_says_so(floor: Inventory, rule: str) -> None:
    diag = one(HEAD + rule + "\n", floor, "E003")
    assert diag.message.startswith("port list ends with `,`")
    assert "malformed port range" not in diag.message


def test_a_comma_before_an_option_is_the_port_list_too(floor: Inventory) -> None:
    diag = one(HEAD + "allow algo -> router tcp 9876, rate 5kpps\n", floor, "E003")
    assert "ends with `,` before keyword `rate`" in diag.message


@pytest.mark.parametrize(
    ("arrow", "code"), [(">", "E001"), ("=>", "E002"), ("→", "E001"), ("-", "E002")]
)
def test_an_arrow_written_otherwise_hints_the_arrow(
    floor: Inventory, arrow: str, code: str
) -> None:
    diag = one(HEAD + f"allow algo {arrow} router tcp 9876\n", floor, code)
    assert diag.message.endswith("(did you mean `->`?)")


def test_a_reversed_arrow_says_which_side_comes_first(floor: Inventory) -> None:
    diag = one(HEAD + "allow router <- algo tcp 9876\n", floor, "E001")
    assert "put the source first and write `->`" in diag.message


def test_no_arrow_hint_outside_rules(floor: Inventory) -> None:
    diag = one("policy p\nservice a = algo1 > algo2\n", floor, "E001")
    assert "->" not in diag.message


@pytest.mark.parametrize(
    ("option", "glued"), [("rate 50 kpps", "50kpps"), ("rate 1.5 kpps", "1.5kpps")]
)
def test_a_unit_apart_from_its_value_hints_the_glued_form(
    floor: Inventory, option: str, glued: str
) -> None:
    diag = one(HEAD + f"allow algo -> router tcp 9876 {option}\n", floor, "E005")
    assert f"did you mean `{glued}`?" in diag.message


def test_a_duration_apart_from_its_unit_hints_too(floor: Inventory) -> None:
    diag = one(HEAD + "allow algo -> router tcp 22 for 15 m\n", floor, "E005")
    assert "did you mean `15m`?" in diag.message


@pytest.mark.parametrize("rate", ["50kbps", "10Mbps", "1Gbps", "10MBps", "100mbit"])
def test_bit_and_byte_rates_are_refused_with_the_units_that_exist(
    floor: Inventory, rate: str
) -> None:
    diag = one(HEAD + f"allow algo -> router tcp 9876 rate {rate}\n", floor, "E204")
    assert "byte rates are not supported yet" in diag.message
    assert "pps, kpps or mpps" in diag.message


@pytest.mark.parametrize(
    ("rate", "says"),
    [
        ("20Kpps", "units are lower case, `kpps`"),
        ("20k", "unknown unit 'k'"),
        ("20", "needs a unit"),
        ("0.5pps", "whole number of packets/s"),
    ],
)
def test_other_bad_rates_say_what_is_wrong(floor: Inventory, rate: str, says: str) -> None:
    diag = one(HEAD + f"allow algo -> router tcp 9876 rate {rate}\n", floor, "E204")
    assert says in diag.message


def test_a_name_missing_from_the_inventory_says_so_before_suggesting(floor: Inventory) -> None:
    text = "policy p\nservice strat = algo1\nallow strat, strat5 -> oms1 tcp 9876\n"
    diag = one(text, floor, "E101")
    assert "not a service, and not a host of the inventory" in diag.message
    assert diag.message.endswith("(did you mean service 'strat'?)")
    host = one("policy p\nallow algo9 -> oms1 tcp 9876\n", floor, "E101")
    assert "(did you mean host 'algo" in host.message


def test_without_an_inventory_the_hint_asks_for_one() -> None:
    diag = one("policy p\nallow algo1 -> 10.0.0.1 tcp 22\n", Inventory.empty(), "E101")
    assert "no inventory given: host names need -i INVENTORY" in diag.message


# -- time zones ----------------------------------------------------------------------------


def _window(zone: str) -> str:
    return f"policy p\nallow jump1 -> risk1 tcp 22 during 07:00-18:00 {zone}\n"


@pytest.mark.parametrize(
    ("zone", "says"),
    [
        ("America", "is a region, not a zone: name a city, e.g. America/New_York"),
        ("a" * 300, "unknown time zone"),
        ("/".join(["a"] * 400), "unknown time zone"),
        ("America/" + "/".join(["x"] * 400), "unknown time zone"),
        ("localtime", "differs from host to host"),
        ("posixrules", "differs from host to host"),
        ("right/UTC", "differs from host to host"),
        ("posix/Europe/London", "differs from host to host"),
        ("PST", "for PST write America/Los_Angeles"),
        ("Europe/Londres", "did you mean 'Europe/London'?"),
    ],
)
def test_zones_that_are_not_zones_are_e206(floor: Inventory, zone: str, says: str) -> None:
    diag = one(_window(zone), floor, "E206")
    assert says in diag.message
    assert len(diag.message) < 200  # a 400-part name is quoted cut, not echoed


@pytest.mark.parametrize(("zone", "offset"), [("EST", "UTC-05:00"), ("Etc/GMT-5", "UTC+05:00")])
def test_a_fixed_offset_zone_warns_that_it_ignores_daylight_saving(
    floor: Inventory, zone: str, offset: str
) -> None:
    result = check_policy(_window(zone), "p.zt", floor)
    [diag] = result.diagnostics
    assert diag.code == "W004" and f"is {offset} all year" in diag.message
    assert result.policy is not None  # a warning: the policy still checks


@pytest.mark.parametrize("zone", ["UTC", "Europe/London", "America/New_York", "Asia/Tokyo"])
def test_zones_of_places_and_utc_do_not_warn(floor: Inventory, zone: str) -> None:
    assert diags(_window(zone), floor) == []


# -- analysis warnings ---------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["allow any -> any", "allow 0.0.0.0/0 -> any tcp 443"])
def test_allow_any_to_any_is_w005(floor: Inventory, rule: str) -> None:
    diag = one(f"policy p\n{rule}\n", floor, "W005")
    assert "not segmentation" in diag.message


def test_any_on_one_side_only_is_not_w005(floor: Inventory) -> None:
    assert diags("policy p\nallow any -> oms1 tcp 9876\n", floor) == []


def test_w005_fails_strict(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    policy = tmp_path / "p.zt"
    policy.write_text("policy p\nallow any -> any\n")
    assert main(["check", str(policy), "-i", FLOOR]) == 0
    assert main(["check", str(policy), "-i", FLOOR, "--strict"]) == 1
    assert "warning[W005]" in capsys.readouterr().err


def test_a_deny_of_the_reverse_direction_warns_with_both_places(floor: Inventory) -> None:
    text = (
        HEAD + "allow algo -> router tcp 9876\nallow algo -> router icmp\ndeny router -> algo log\n"
    )
    diag = one(text, floor, "W006")
    assert diag.span is not None and diag.span.line == 6
    assert [n.span.line for n in diag.notes if n.span] == [4, 5]
    assert "2 allowed flows" in diag.message


@pytest.mark.parametrize(
    "rules",
    [
        "allow algo -> router udp 5000\ndeny router -> algo udp",  # udp answers need `reply`
        "allow algo -> router tcp 9876\ndeny router -> algo tcp 22",  # not the client's port
        "allow algo -> router tcp 9876\ndeny router -> algo udp",  # not the answers' protocol
        "allow algo -> router tcp 9876\ndeny router -> dev1",  # not towards the clients
    ],
)
def test_denies_that_leave_the_replies_alone_do_not_warn(floor: Inventory, rules: str) -> None:
    assert [d.code for d in diags(HEAD + rules + "\n", floor)] == []


def test_udp_with_reply_and_a_reverse_deny_warns(floor: Inventory) -> None:
    text = HEAD + "allow algo -> router udp 5000 reply\ndeny router -> algo udp\n"
    assert one(text, floor, "W006").notes[0].span is not None


def test_a_deny_matching_the_client_port_range_warns(floor: Inventory) -> None:
    text = HEAD + f"allow algo -> router tcp 9876\ndeny router -> algo tcp {EPHEMERAL_PORT}-65535\n"
    one(text, floor, "W006")


def test_an_allow_the_deny_already_kills_is_w001_not_w006(floor: Inventory) -> None:
    text = HEAD + "allow algo -> router ip\ndeny algo -> router tcp\ndeny router -> algo tcp\n"
    codes = [d.code for d in diags(text, floor)]
    assert "W006" in codes  # the allow's icmp still works and its replies are denied
    text = HEAD + "allow algo -> router tcp 9876\ndeny algo, router -> algo, router\n"
    assert [d.code for d in diags(text, floor)] == ["W001"]


def test_the_example_policy_stays_warning_free(floor: Inventory, floor_policy_text: str) -> None:
    assert check_policy(floor_policy_text, "policies/trading_floor.zt", floor).diagnostics == ()


# -- unreadable files and --error-format json ------------------------------------------------


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(argv) == 1
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert isinstance(doc, dict) and doc["ok"] is False and doc["errors"] == 1
    return doc


def test_json_for_a_missing_policy(capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(["check", "/nonexistent.zt", "--error-format", "json"], capsys)
    assert doc["diagnostics"] == [
        {
            "code": "E000",
            "severity": "error",
            "message": "cannot read policy '/nonexistent.zt': No such file or directory",
        }
    ]


def test_json_for_a_policy_that_is_a_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    doc = _json(["check", str(tmp_path), "-i", FLOOR, "--error-format", "json"], capsys)
    assert "Is a directory" in str(doc["diagnostics"])


def test_a_non_utf8_policy_is_e000_at_the_byte(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    policy = tmp_path / "p.zt"
    policy.write_bytes(b"policy p\n# caf\xe9\nallow algo1 -> oms1 tcp 9876\n")
    doc = _json(["check", str(policy), "-i", FLOOR, "--error-format", "json"], capsys)
    [diag] = doc["diagnostics"]
    assert (diag["code"], diag["line"], diag["column"]) == ("E000", 2, 6)
    assert main(["check", str(policy), "-i", FLOOR]) == 1
    err = capsys.readouterr().err
    assert "error[E000]" in err and "caf\ufffd" in err  # the line is quoted all the same


@pytest.mark.parametrize("verb", ["check", "compile"])
def test_json_for_an_unreadable_inventory(
    verb: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    inventory = tmp_path / "floor.yaml"
    inventory.write_bytes(b"name: caf\xe9\nswitches: {}\nhosts: {}\n")
    policy = ROOT / "policies" / "trading_floor.zt"
    argv = [verb, str(policy), "-i", str(inventory), "--error-format", "json"]
    if verb == "compile":
        argv += ["-o", str(tmp_path / "build")]
    doc = _json(argv, capsys)
    [diag] = doc["diagnostics"]
    assert (diag["code"], diag["line"], diag["column"]) == ("E301", 1, 10)
    assert not (tmp_path / "build").exists()


def test_compile_errors_in_json_say_ok_false(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    policy = tmp_path / "p.zt"
    policy.write_text("policy p\nallow algo1 -> oms1 tcp 99999\n")
    argv = [
        "compile",
        str(policy),
        "-i",
        FLOOR,
        "-o",
        str(tmp_path / "b"),
        "--error-format",
        "json",
    ]
    doc = _json(argv, capsys)
    assert [d["code"] for d in doc["diagnostics"]] == ["E202"]


def test_a_byte_order_mark_is_not_text(floor: Inventory, tmp_path: Path) -> None:
    inventory = tmp_path / "floor.yaml"
    inventory.write_bytes(b"\xef\xbb\xbf" + Path(FLOOR).read_bytes())
    loaded, _ = load_inventory(str(inventory))
    assert loaded.hosts == tuple(h for h in loaded.hosts)  # loads, same hosts as the floor
    assert [h.name for h in loaded.hosts] == [h.name for h in floor.hosts]


# -- inventories -----------------------------------------------------------------------------


def _inventory_errors(text: str) -> list[Diagnostic]:
    with pytest.raises(InventoryError) as exc:
        parse_inventory(text, "floor.yaml")
    return list(exc.value.diagnostics)


def _bomb(levels: int, width: int = 9) -> str:
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join([*lines, f"switches: {{? *a{levels - 1} : x}}", "hosts: {}", ""])


def test_an_alias_bomb_is_refused_before_it_expands() -> None:
    # 9^40 values if expanded: the loader must refuse it from its text alone.
    errors = _inventory_errors(_bomb(40))
    assert {d.code for d in errors} == {"E302"}
    assert len(errors) == 40  # once per anchor, not once per alias
    first = errors[0]
    assert first.message.startswith("alias *a0 repeats a mapping or list")
    assert first.span == Span("floor.yaml", 2, 10, 2, 11)


def test_aliases_of_single_values_still_work() -> None:
    text = (
        "switches:\n"
        "  tor1: {role: &tor tor, device_id: 1, p4rt: '127.0.0.1:50001'}\n"
        "  tor2: {role: *tor, device_id: 2, p4rt: '127.0.0.1:50002'}\n"
        "hosts:\n"
        "  h1: {ip: 10.0.0.1, switch: tor1, port: 1}\n"
    )
    assert [s.role for s in parse_inventory(text).switches] == ["tor", "tor"]


def test_an_anchor_defined_twice_is_e301_pointing_at_both() -> None:
    text = "x: &r [1, 2]\nswitches:\n  tor1: {role: &r tor}\nhosts: {}\n"
    [diag] = _inventory_errors(text)
    assert diag.code == "E301" and diag.span is not None and diag.span.line == 3
    [note] = diag.notes
    assert note.message.startswith("found duplicate anchor") and note.span is not None
    assert note.span.line == 1


def test_keys_that_are_not_single_values_are_e302_where_they_are() -> None:
    text = "switches:\n  [a, b]: {role: tor}\n  {c: d}: {role: tor}\nhosts: {}\n"
    errors = _inventory_errors(text)
    assert [(d.code, d.span.line if d.span else 0) for d in errors] == [("E302", 2), ("E302", 3)]
    assert "has a list as a key" in errors[0].message
    assert "has a mapping as a key" in errors[1].message


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_line_separators_inside_values_do_not_shift_lines(separator: str) -> None:
    text = (
        f'name: "floor{separator}one"\n'
        "switches:\n"
        "  tor1: {role: leaf, device_id: 1, p4rt: '127.0.0.1:50001'}\n"
        "hosts: {}\n"
    )
    errors = _inventory_errors(text)
    assert [(d.span.line, d.span.column) for d in errors if d.span] == [(1, 7), (3, 16)]
    assert separator not in errors[0].message  # quoted, escaped


def test_a_lone_carriage_return_counts_as_no_line() -> None:
    errors = _inventory_errors("switches: {}\nhosts: {}\nextra: 1 \r\n")
    assert [(d.span.line if d.span else 0) for d in errors] == [3]


# -- cost that grows with the input ----------------------------------------------------------


def test_nested_services_resolve_in_linear_memory() -> None:
    n = 5000
    lines = ["policy p", "service s0 = 11.0.0.0"]
    # Each service adds one address two apart from the last: nothing merges.
    lines += [f"service s{i} = s{i - 1}, 11.0.{(2 * i) >> 8}.{(2 * i) & 255}" for i in range(1, n)]
    lines.append(f"allow s{n - 1} -> 10.9.9.9 tcp 80")
    tracemalloc.start()
    try:
        result = check_policy("\n".join(lines) + "\n", "p.zt")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.policy is not None and len(result.policy.rules[0].src.intervals) == n
    # Every service's own set would be n²/2 = 12.5M intervals (~900 MB).
    assert peak < 150 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    services = {s.name: s for s in result.policy.services}
    assert len(services["s10"].addresses.intervals) == 11  # still there when asked for


def test_expectations_are_checked_per_class_not_per_atom(
    floor: Inventory, floor_policy_text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(7)
    expects = [
        f"expect 10.{rng.randrange(9, 200)}.{rng.randrange(256)}.{rng.randrange(256)} "
        f"-> any tcp {rng.randrange(1, 65535)} denied"
        for _ in range(1500)
    ]
    expects += ["expect dev -> prod ip denied"] * 500
    flows = 0
    real = PolicySemantics.flow_atoms

    def counted(self: PolicySemantics, *args: object) -> object:
        nonlocal flows
        flows += 1
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(PolicySemantics, "flow_atoms", counted)
    result = check_policy(floor_policy_text + "\n".join(expects) + "\n", "p.zt", floor)
    assert result.diagnostics == ()
    # Per atom this is ~1500 addresses x ~1500 destination atoms; per class, a few dozen each.
    assert flows < 200 * len(expects), flows


# -- the class shortcut finds the counterexample a scan of every atom finds ------------------

SPAN = Span("r.zt", 1, 1, 1, 2)
BLOCKS = [(10 << 24) + (k << 4) for k in range(6)]


def _set(rng: random.Random) -> AddressSet:
    picks = rng.sample(BLOCKS, rng.randint(1, 3))
    return AddressSet.of((b + rng.choice((0, 3)), b + rng.choice((3, 15))) for b in picks)


def _random_policy(rng: random.Random) -> Policy:
    rules = []
    for i in range(1, rng.randint(2, 6)):
        proto = rng.choice(["tcp", "udp", "icmp", "ip"])
        ports = ((rng.choice((22, 80, 443)), 443),) if proto in ("tcp", "udp") else ALL_PORTS
        action = rng.choice([Action.ALLOW, Action.ALLOW, Action.DENY])
        reply = action is Action.ALLOW and proto == "udp" and rng.random() < 0.5
        rules.append(
            PolicyRule(
                id=i,
                action=action,
                src=_set(rng),
                dst=_set(rng),
                src_text="s",
                dst_text="d",
                proto=proto,
                ports=ports,
                log=False,
                reply=reply,
                rate_pps=None,
                duration_s=None,
                window=None,
                span=SPAN,
            )
        )
    expects = []
    for proto in rng.choices(["tcp", "udp", "icmp", "ip"], k=4):
        port = rng.choice((22, 80, 443, 8080)) if proto in ("tcp", "udp") else None
        expects.append(
            ExpectCase(
                src=_set(rng),
                dst=_set(rng),
                src_text="s",
                dst_text="d",
                proto=proto,
                port=port,
                allowed=rng.random() < 0.5,
                span=SPAN,
            )
        )
    return Policy("r", "r.zt", (), tuple(rules), False, None, tuple(expects))


def _scan_every_atom(sem: PolicySemantics, expect: ExpectCase) -> tuple[int, int, str] | None:
    """The first failing flow, scanning every atom pair (hosts first): the definition."""

    def hosts_first(mask: int) -> list[int]:
        return sorted(bits(mask), key=lambda a: (a not in sem.pinned_atoms, a))

    cases: list[tuple[str, int, int | None]]
    if expect.proto == "ip":
        ports = sorted({sem.port_index[p]: p for p in reversed(range(sem.ports.count))}.values())
        cases = [(c, p, None) for c in ("tcp", "udp") for p in ports]
        # every ICMP message but echo replies (answers, not flows): type << 8 | code
        values = [sem.ports.representative[p] for p in range(sem.ports.count)]
        cases += [("icmp", 0, v) for v in values if v >> 8 != 0]
        cases += [("other", 0, None)]
    else:
        port = 0 if expect.port is None else sem.ports.atom_of(expect.port)
        cases = [(expect.proto, port, None)]
    for sa in hosts_first(sem.addresses.mask(expect.src.intervals)):
        for da in hosts_first(sem.addresses.mask(expect.dst.intervals)):
            for proto, port, icmp in cases:
                if sem.flow_atoms(sa, da, proto, port, icmp).allowed != expect.allowed:
                    rep = sem.addresses.representative
                    if icmp is not None:
                        proto = f"icmp {format_icmp_types(((icmp, icmp),))}"
                    return rep[sa], rep[da], proto
    return None


def test_class_representatives_find_the_same_counterexample() -> None:
    rng = random.Random(20261125)
    compared = failing = 0
    for _ in range(300):
        policy = _random_policy(rng)
        pinned = [b + 5 for b in BLOCKS[::2]]
        sem = PolicySemantics(policy, pinned=pinned)
        for expect in policy.expects:
            found = sem.expectation_failure(expect)
            want = _scan_every_atom(sem, expect)
            assert (found and found[:3]) == want, (policy, expect)
            compared += 1
            failing += want is not None
    assert failing > 100 and compared - failing > 100  # both outcomes were exercised
