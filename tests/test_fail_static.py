"""Fail-static: with no controller running, a switch keeps enforcing the last policy it was
given, through minutes of traffic; a grant that expires meanwhile stays on the switch (nothing
is there to remove it) until the first controller that comes back removes it.

The traffic runs for FAIL_STATIC_SECONDS (default 120; the environment variable
P4SEG_FAIL_STATIC_SECONDS shortens it for a quick local run). On the reference switch here;
docs/controller.md says what stops without a controller."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from test_cli_controller import _passes, site  # noqa: F401  (site: the fixture)

from p4seg.cli import main
from runtime.refswitch.switch import ReferenceSwitch

FAIL_STATIC_SECONDS = float(os.environ.get("P4SEG_FAIL_STATIC_SECONDS", "120"))
PACING = 0.005  # seconds between rounds of packets: traffic at a rate, not a wait


def test_switches_enforce_the_last_policy_with_no_controller(
    site: tuple[ReferenceSwitch, list[str]],  # noqa: F811
) -> None:
    sw, inv = site
    assert main(["apply", "small.zt", *inv]) == 0
    assert main(["grant", "h2", "h4", "tcp", "443", "--for", "3s", "-p", "small.zt", *inv]) == 0
    granted_at = time.time()
    assert _passes(sw, "h2", "h4", 443)
    # Every controller gone: no process of ours runs from here on (main() has returned).
    rounds = 0
    deadline = time.monotonic() + FAIL_STATIC_SECONDS
    while time.monotonic() < deadline:
        assert _passes(sw, "h1", "h3", 8080), f"an allowed flow stopped after {rounds} rounds"
        assert not _passes(sw, "h3", "h1", 8080), f"a denied flow passed after {rounds} rounds"
        assert not _passes(sw, "h1", "h2", 22), f"a denied flow passed after {rounds} rounds"
        # the grant, expired after 3 s: still on the switch, nothing is there to remove it
        assert _passes(sw, "h2", "h4", 443), f"the grant vanished after {rounds} rounds"
        rounds += 1
        time.sleep(PACING)
    assert time.time() - granted_at > 3  # it did expire while no controller ran
    print(f"fail-static: {rounds} rounds of 4 flows over {FAIL_STATIC_SECONDS:g} s, all as "
          "the last policy says")  # fmt: skip
    # The first controller back applies what is due: the expired grant goes.
    assert main(["watch", "small.zt", *inv, "--once"]) == 0
    assert not _passes(sw, "h2", "h4", 443)
    assert _passes(sw, "h1", "h3", 8080) and not _passes(sw, "h3", "h1", 8080)
    records = [json.loads(line) for line in Path(".p4seg/audit.jsonl").read_text().splitlines()]
    assert any(r.get("expired_grants") for r in records if r["event"] == "watch")
