"""Nested services with `except`: a difference never flattens into a parent's union.

Services are resolved lazily by flattening nested unions (linear in the nesting); a service
with `except` is evaluated on its own and memoised, so `b = a, x` where `a = p except q`
is (p minus q) plus x, never p plus x minus q.
"""

from __future__ import annotations

from compiler.addresses import AddressSet, parse_prefix
from compiler.check import check_policy
from compiler.model import Service


def _services(text: str) -> dict[str, Service]:
    """By name; a service's addresses are computed when read (reading every one of a deep
    chain would cost the square of its depth)."""
    result = check_policy(text, "nesting.zt", None)
    assert result.policy is not None, [d.message for d in result.diagnostics]
    return {s.name: s for s in result.policy.services}


def _set(*prefixes: str) -> AddressSet:
    return AddressSet.of([parse_prefix(p) for p in prefixes])


def test_a_difference_nested_in_a_union_keeps_its_exclusion() -> None:
    services = _services(
        "policy nesting\n"
        "service a = 10.0.0.0/30 except 10.0.0.1\n"
        "service b = a, 10.0.0.1/32 except 10.0.0.2\n"
        "service c = b, 10.0.9.9\n"
        "allow c -> any tcp 22\n"
    )
    # a = {.0, .2, .3}; b = (a + {.1}) - {.2} = {.0, .1, .3}; c = b + 10.0.9.9
    assert services["a"].addresses == _set("10.0.0.0", "10.0.0.2/31")
    assert services["b"].addresses == _set("10.0.0.0/31", "10.0.0.3")
    assert services["c"].addresses == _set("10.0.0.0/31", "10.0.0.3", "10.0.9.9")


def test_a_deep_chain_over_a_difference_resolves_without_recursion() -> None:
    depth = 3000
    lines = ["policy chain", "service s0 = 10.1.0.0/24 except 10.1.0.0/25"]
    lines += [f"service s{i} = s{i - 1}, 10.2.{i // 256}.{i % 256}" for i in range(1, depth)]
    lines.append(f"allow s{depth - 1} -> any tcp 22")
    services = _services("\n".join(lines) + "\n")
    top = services[f"s{depth - 1}"].addresses
    assert 0x0A010080 in top and 0x0A010000 not in top  # 10.1.0.128 kept, 10.1.0.0 excluded
    assert 0x0A020000 + depth - 1 in top
