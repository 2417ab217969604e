"""`p4seg check`: parse, resolve and analyse a policy; every finding as a diagnostic.

Analysis on top of resolve: dead rules (W001 covered by denies, W002 decided by other
allows), allows of any to any (W005), denies that drop an allowed flow's replies (W006),
and `expect` lines, each evaluated exactly over every concrete flow it names
(E401 when one contradicts it, with the first counterexample and the rule that decided).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from compiler.addresses import AddressSet, format_ipv4
from compiler.diagnostics import Diagnostic, Note, P4segError, error, warning
from compiler.inventory import Inventory
from compiler.memo import collection_paused
from compiler.model import ALL_PORTS, Action, ExpectCase, Policy, PolicyRule, format_ports
from compiler.parse import parse
from compiler.resolve import Resolved, resolve
from compiler.semantics import PolicySemantics, semantics_of


@dataclass(frozen=True, slots=True)
class CheckResult:
    policy: Policy | None  # None when the policy has errors
    diagnostics: tuple[Diagnostic, ...]
    # The resolution, for rules appended later (check_appended)
    resolved: Resolved | None = field(default=None, repr=False, compare=False)

    @property
    def errors(self) -> int:
        return sum(d.is_error for d in self.diagnostics)

    @property
    def warnings(self) -> int:
        return len(self.diagnostics) - self.errors


def analyze(
    policy: Policy, inventory: Inventory, expectations: bool = True, warnings: bool = True
) -> list[Diagnostic]:
    """Dead rules and the other warnings (unless `warnings` is False) and expectations
    (unless `expectations` is False) of a resolved policy."""
    # Kept (semantics_of): the proof of the build asks for the same, the rules renumbered.
    semantics = semantics_of(policy, tuple(h.ip for h in inventory.hosts))
    names = {h.ip: h.name for h in inventory.hosts}
    if not warnings:
        return expectation_errors(policy, semantics, names) if expectations else []
    diags: list[Diagnostic] = [_any_to_any(r) for r in policy.rules if _is_any_to_any(r)]
    never_allow: set[int] = set()
    for dead in semantics.dead_rules():
        notes = tuple(Note(f"covered by `{r.describe()}`", r.span) for r in dead.covering)
        if dead.by_deny:
            never_allow.add(dead.rule.id)
            message = "rule never allows anything: every packet it matches is denied"
            diags.append(warning("W001", message, dead.rule.span, *notes))
        else:
            message = "redundant rule: every packet it matches is decided by other rules"
            diags.append(warning("W002", message, dead.rule.span, *notes))
    for deny, allows in semantics.denied_replies():
        hurt = [a for a in allows if a.id not in never_allow]  # W001 says more about those
        if hurt:
            diags.append(_denied_replies(deny, hurt))
    if expectations:
        diags += expectation_errors(policy, semantics, names)
    return diags


def expectation_errors(
    policy: Policy, semantics: PolicySemantics, names: dict[int, str]
) -> list[Diagnostic]:
    """E401 for every `expect` line of `policy` its semantics do not bear out.

    Each line is judged first on the rules that can match its packets, forward or back
    (`rules_meeting`): they alone decide its flows, so the line holds there exactly when it
    holds on the whole policy, and their few port and address classes are far fewer than
    the whole policy's (50 lines of a 10k-rule policy: 0.9 s -> 20 ms). A line that fails
    is judged again on the whole policy, for the example flow `p4seg check` has always
    reported (the first of the whole policy's classes)."""
    diags: list[Diagnostic] = []
    for expect in policy.expects:
        near = dataclasses.replace(
            policy, rules=semantics.rules_meeting(expect.src, expect.dst), expects=(expect,)
        )
        if PolicySemantics(near).expectation_failure(expect) is None:
            continue
        failure = semantics.expectation_failure(expect)
        if failure is None:
            continue
        src, dst, proto, port, result = failure
        flow = f"{_host(src, names)} -> {_host(dst, names)} {proto}" + (
            f" {port}" if port is not None else ""
        )
        deciding = result.deciding
        where = " on the way back" if deciding is result.back else ""
        notes = (Note("decided here", deciding.rule.span),) if deciding.rule else ()
        verdict = deciding.describe().split(" at ")[0]
        message = f"expectation failed: {flow} is {verdict}{where}"
        diags.append(error("E401", message, expect.span, *notes))
    return diags


def _is_any_to_any(rule: PolicyRule) -> bool:
    everything = AddressSet.everything()
    return rule.action is Action.ALLOW and rule.src == everything and rule.dst == everything


def _any_to_any(rule: PolicyRule) -> Diagnostic:
    scope = f" over {rule.proto}" if rule.proto != "ip" else ""
    if rule.ports != ALL_PORTS:
        scope += f" {format_ports(rule.ports)}"
    return warning(
        "W005",
        f"rule lets every address reach every address{scope}: that is not segmentation; "
        "name the sources and destinations that need the flow",
        rule.span,
    )


def _denied_replies(deny: PolicyRule, allows: list[PolicyRule]) -> Diagnostic:
    flows = "an allowed flow" if len(allows) == 1 else f"{len(allows)} allowed flows"
    notes = [
        Note(
            f"replies to `{a.describe()}` go {a.dst_text} -> {a.src_text}: this deny drops them",
            a.span,
        )
        for a in allows
    ]
    return warning(
        "W006",
        f"deny drops the replies of {flows}: its packets get through, the answers never come back",
        deny.span,
        *notes,
    )


def _host(address: int, names: dict[int, str]) -> str:
    name = names.get(address)
    return f"{name} ({format_ipv4(address)})" if name else format_ipv4(address)


def check_policy(
    text: str,
    file: str,
    inventory: Inventory | None = None,
    expectations: bool = True,
    warnings: bool = True,
) -> CheckResult:
    """Everything `p4seg check` reports about a policy; never raises for policy problems.

    `expectations=False` leaves `expect` lines to the caller (`p4seg test` runs them);
    `warnings=False` leaves out the analyses that can only warn — dead rules (W001,
    W002), allows of any to any (W005), denied replies (W006) — for the verbs that report
    errors alone (apply, watch, serve: the dead rules of 10,000 rules take 0.15 s)."""
    inv = inventory or Inventory.empty()
    try:
        with collection_paused():  # the AST and the atom masks
            resolved = resolve(parse(text, file), inv)
            found = analyze(resolved.policy, inv, expectations, warnings)
            diags = list(resolved.warnings) + found
    except P4segError as exc:
        return CheckResult(None, exc.diagnostics)
    policy = None if any(d.is_error for d in diags) else resolved.policy
    return CheckResult(policy, tuple(sorted(diags, key=Diagnostic.sort_key)), resolved)


def check_appended(
    checked: CheckResult, text: str, appended: str, file: str, inventory: Inventory
) -> CheckResult:
    """check_policy(appended) when `appended` is `text` followed by named rules (live
    grants, runtime/live.py) and `text` was checked already (`checked`: check_policy's,
    `expect` lines judged, without errors):
    the added rules are resolved against the checked policy's services, and its
    `expect` lines judged again with them; nothing of `text` is parsed or resolved again.
    The diagnostics are the errors of the whole (the file's warnings are `checked`'s)."""
    assert checked.policy is not None and checked.resolved is not None
    head = len(text.rstrip("\n"))
    assert appended.startswith(text[:head])
    lines = "\n" * appended.count("\n", 0, head) + appended[head:]  # the same line numbers
    try:
        policy = checked.resolved.appended(parse(lines, file))
    except P4segError as exc:
        return CheckResult(None, exc.diagnostics)
    if policy is None:  # not named rules alone: as the whole text says
        whole = check_policy(appended, file, inventory, warnings=False)
        return CheckResult(whole.policy, tuple(d for d in whole.diagnostics if d.is_error))
    names = {h.ip: h.name for h in inventory.hosts}
    errors = _appended_expectation_errors(policy, policy.rules[len(checked.policy.rules) :], names)
    return CheckResult(None if errors else policy, tuple(sorted(errors, key=Diagnostic.sort_key)))


def _appended_expectation_errors(
    policy: Policy, added: Sequence[PolicyRule], names: dict[int, str]
) -> list[Diagnostic]:
    """expectation_errors(policy) when only `added` (its last rules) are new and every
    `expect` line held without them. Only the lines whose packets an added rule can match,
    forward or on the way back, can change; each is judged by the rules that can match
    its packets (the same verdict). A failure is reported from the whole policy's
    semantics, as check_policy would word it (its example packet comes from them)."""

    def meets(e: ExpectCase, r: PolicyRule) -> bool:
        return (r.src.meets(e.src) and r.dst.meets(e.dst)) or (
            r.src.meets(e.dst) and r.dst.meets(e.src)
        )

    touched = tuple(e for e in policy.expects if any(meets(e, r) for r in added))
    if not touched:
        return []
    rules = tuple(r for r in policy.rules if any(meets(e, r) for e in touched))
    near = dataclasses.replace(policy, rules=rules, expects=touched)
    if not expectation_errors(near, PolicySemantics(near, pinned=names), names):
        return []
    return expectation_errors(policy, PolicySemantics(policy, pinned=names), names)
