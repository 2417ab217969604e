"""Automatic containment on the trading floor in Mininet, with real packets end to end:
`p4seg serve` follows the switches' PacketIns; algo1 scans the risk hosts; after N logged
denies the policy engine quarantines it through the overlay; its remediation flow works and
nothing else it had does; no other host is affected; an operator's release gives it back
what it had. Needs root and Mininet (marker `mininet`)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from p4rt import wait_for
from test_floor_mininet import (
    DEADLINE,
    INVENTORY,
    POLICY,
    Lab,
    check_cells,
    matrix_around,
    one_floor_per_machine,
)
from test_serve import _Loop

from compiler.inventory import load_inventory
from p4seg.api_auth import load_access
from p4seg.cli import _front, _parser
from p4seg.operations import Operations
from p4seg.serve import Service, api_options
from runtime.live import LiveState
from topologies.matrix import Flow
from topologies.network import Floor

pytestmark = pytest.mark.mininet

SCANNER, TARGET, REMEDIATION_HOST = "algo1", "risk1", "jump1"
DENIES = 5  # the contain rule's threshold
# The example policy, with a remediation service algo engines may still reach, and the
# contain rule: the scanner, after DENIES logged denies within 10 s, is quarantined for
# 10 min. Only the scanner: the probes that check the floor are denied and logged too.
ADDED = f"""\
service remediation = {REMEDIATION_HOST}
allow algo -> remediation tcp 4443
contain {SCANNER} after {DENIES} denies within 10s for 10m
protect fixgw
"""
TOKEN = "containment-test-token-0001"


@pytest.fixture(scope="module")
def served_floor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Service]]:
    work = tmp_path_factory.mktemp("contain")
    text = POLICY.read_text().replace("default deny log", ADDED + "default deny log", 1)
    (work / "trading_floor.zt").write_text(text)
    (work / "access.yaml").write_text(
        f"tokens:\n  - {{principal: soar, token: {TOKEN}, scopes: [operate]}}\n"
    )
    inventory, _ = load_inventory(str(INVENTORY))
    floor = Floor(inventory, "ref", progress=lambda t: print(f"floor: {t}"))
    lab = Lab(floor, inventory, work / "trading_floor.zt", work / "state", work / "build")
    argv = lab.argv("watch")
    argv[0] = "serve"
    argv += ["--api", "127.0.0.1:0", "--api-plain", "--api-tokens", str(work / "access.yaml"),
             "--check", "0.5", "--interval", "0.05", "--hits-interval", "0"]  # fmt: skip
    with one_floor_per_machine(), pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        with floor:
            args = _parser().parse_args(argv)
            options = api_options(args)
            assert not isinstance(options, str), options
            assert options.tokens is not None
            service = Service(Operations(args, _front), options, load_access(options.tokens))
            loop = _Loop()
            loop.run(service.start())
            try:
                assert service.ops.watched.wait(60), "serve's first apply"
                follower = service.follower
                assert follower is not None
                tor = inventory.hosts_by_name[SCANNER].switch
                assert wait_for(lambda: follower.is_following(tor), DEADLINE)
                yield lab, service
            finally:
                loop.run(service.stop())
                loop.close()
        assert floor.leftovers() == []


def _quarantined(lab: Lab) -> dict[str, float]:
    return LiveState.load(lab.state).quarantined


def test_a_scanning_engine_is_contained_and_released(
    served_floor: tuple[Lab, Service],
) -> None:
    lab, service = served_floor
    assert _quarantined(lab) == {}
    # The scan: TCP connects to closed doors of risk1, each denied and logged by the ToR.
    start = time.monotonic()
    target = lab.ip(TARGET)
    host = lab.floor.hosts[SCANNER]
    for port in range(20000, 20000 + DENIES + 2):
        host.cmd(f"timeout 0.3 bash -c 'echo > /dev/tcp/{target}/{port}' 2>/dev/null")
    assert wait_for(lambda: SCANNER in _quarantined(lab), DEADLINE), "never contained"
    print(f"contain: {DENIES}+ denied connects -> {SCANNER} quarantined "
          f"in {time.monotonic() - start:.2f} s (the scan's own timeouts included)")  # fmt: skip
    record = LiveState.load(lab.state)
    assert SCANNER in record.automatic and SCANNER in record.quarantine_until
    # Real packets: algo1 reaches remediation and nothing else; algo2 keeps what it had.
    after = matrix_around(lab, {SCANNER, "algo2"})
    assert after.mismatches == [], after.render()
    policy = lab.effective()
    assert any(
        s == SCANNER and d == REMEDIATION_HOST and ok for (s, d, _f), ok in after.expected.items()
    ), "the remediation flow is among the probed cells and allowed"
    assert not any(
        s == SCANNER and d != REMEDIATION_HOST and ok for (s, d, _f), ok in after.expected.items()
    )
    assert policy.quarantine is not None
    # An operator releases it: what it had comes back.
    code = lab.cli("release", SCANNER, "--server", service_url(service), "--server-token", TOKEN)
    assert code == 0
    assert wait_for(lambda: SCANNER not in _quarantined(lab), DEADLINE)
    # What it had is back, and what it never had stays denied (a few probes: more denies
    # from algo1 would be a scan again).
    cells = [(SCANNER, "oms1", Flow("tcp", 9876)), (SCANNER, TARGET, Flow("tcp", 8443))]
    again = check_cells(lab, cells)
    assert again.mismatches == [], again.render()
    assert again.expected[cells[0]] and not again.expected[cells[1]]


def service_url(service: Service) -> str:
    host, port = service.addresses[0]
    return f"http://{host}:{port}"
