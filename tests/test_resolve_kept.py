"""A policy checked again after an edit (compiler/resolve.py `_Resolution`): the rules of
unchanged statements are the objects the last check made, and the result is the one a
process that never saw the file gets — the policy, its rule keys and ids, every
diagnostic."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from line_edits import edit_lines

from compiler import parse as parse_module
from compiler import resolve as resolve_module
from compiler.check import CheckResult, check_policy
from compiler.inventory import load_inventory
from compiler.memo import ByFile

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "policies" / "trading_floor.zt").read_text()
INVENTORY = load_inventory(str(ROOT / "topologies" / "trading_floor.yaml"))[0]
LINES = TEXT.splitlines()
MORE = [  # lines an edit may bring
    "allow algo -> order_router tcp 9876, 9877 log",
    "allow dev -> dev tcp 22",
    "allow dev -> dev tcp 22",  # a copy: keys with #2
    "allow risk -> settlement tcp 7000 name settle_feed",
    "deny dev -> prod log",
    "service extra = algo1, settle2",
    "allow extra -> risk tcp 9000",
    "allow algo -> nowhere tcp 80",  # an unknown name
    "allow algo -> risk tcp 70000",  # a port out of range
    "ports feeds = 9000-9010",
    "allow md -> algo udp feeds",
]


def _outcome(result: CheckResult) -> object:
    return result.policy, [str(d) for d in result.diagnostics]


def _fresh(text: str) -> object:
    """What a process that never saw the file makes of it (this one's memos kept)."""
    chunks, resolutions = parse_module._CHUNKS, resolve_module._RESOLUTIONS
    parse_module._CHUNKS, resolve_module._RESOLUTIONS = ByFile(), ByFile()
    try:
        return _outcome(check_policy(text, "floor.zt", INVENTORY))
    finally:
        parse_module._CHUNKS, resolve_module._RESOLUTIONS = chunks, resolutions


edit = st.tuples(
    st.sampled_from(["replace", "insert", "delete"]),
    st.integers(min_value=0, max_value=len(LINES)),
    st.sampled_from(LINES + MORE),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(edit, min_size=1, max_size=6))
def test_a_check_after_edits_equals_a_check_of_the_whole(edits: list[tuple[str, int, str]]) -> None:
    lines = list(LINES)
    resolve_module._RESOLUTIONS.clear()
    check_policy(TEXT, "floor.zt", INVENTORY)  # the file as the process last checked it
    for kind, at, line in edits:
        edit_lines(lines, kind, at, line)
        text = "\n".join(lines) + "\n"
        assert _outcome(check_policy(text, "floor.zt", INVENTORY)) == _fresh(text)


def _rule_line(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines()) if needle in line)


def test_an_edited_rule_is_the_only_new_rule_object() -> None:
    resolve_module._RESOLUTIONS.clear()
    before = check_policy(TEXT, "floor.zt", INVENTORY).policy
    edited = TEXT.replace("deny dev  -> prod log", "deny dev  -> prod tcp log", 1)
    after = check_policy(edited, "floor.zt", INVENTORY).policy
    assert before is not None and after is not None
    kept = {id(r) for r in before.rules}
    new = [r for r in after.rules if id(r) not in kept]
    assert [r.describe() for r in new] == [
        r.describe() for r in after.rules if r.proto == "tcp" and r.action.value == "deny"
    ]
    assert len(new) == 1


def test_another_inventory_resolves_every_rule_again() -> None:
    resolve_module._RESOLUTIONS.clear()
    before = check_policy(TEXT, "floor.zt", INVENTORY).policy
    other = load_inventory(str(ROOT / "topologies" / "trading_floor.yaml"))[0]
    after = check_policy(TEXT, "floor.zt", other).policy
    assert before is not None and after == before
    assert not {id(r) for r in before.rules} & {id(r) for r in after.rules}


def test_a_changed_service_resolves_every_rule_again() -> None:
    resolve_module._RESOLUTIONS.clear()
    before = check_policy(TEXT, "floor.zt", INVENTORY).policy
    at = _rule_line(TEXT, "service ")
    lines = TEXT.splitlines()
    lines[at] = lines[at] + "  # the same service, another statement"
    after = check_policy("\n".join(lines) + "\n", "floor.zt", INVENTORY).policy
    assert before is not None and after is not None
    assert not {id(r) for r in before.rules} & {id(r) for r in after.rules}
