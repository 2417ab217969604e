"""topologies/ports.py: fixed ports kept out of the ephemeral range, on a scratch file that
stands for the sysctl and on the machine's own sysctl when root."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from topologies import ports


def test_parse_and_render_round_trip() -> None:
    assert ports.parse("") == set()
    assert ports.parse("50001-50003,50101\n") == {50001, 50002, 50003, 50101}
    assert ports.render({50003, 50001, 50002, 50101, 9}) == "9,50001-50003,50101"
    assert ports.render(set()) == ""


def test_nested_reservations_take_back_only_what_they_added(tmp_path: Path) -> None:
    sysctl = tmp_path / "reserved"
    sysctl.write_text("8080\n")
    with ports.reserved([50001, 50002], sysctl) as outer:
        assert outer.active and outer.added == {50001, 50002}
        with ports.reserved([50002, 50003], sysctl) as inner:
            assert inner.added == {50003}
            assert ports.parse(sysctl.read_text()) == {8080, 50001, 50002, 50003}
        assert ports.parse(sysctl.read_text()) == {8080, 50001, 50002}
    assert ports.parse(sysctl.read_text()) == {8080}


def test_without_the_sysctl_nothing_is_reserved(tmp_path: Path) -> None:
    with ports.reserved([50001], tmp_path / "absent") as reservation:
        assert not reservation.active and not reservation.added


@pytest.mark.skipif(
    os.geteuid() != 0 or not ports.SYSCTL.exists(), reason="needs root and Linux's sysctl"
)
def test_a_reserved_port_is_never_handed_out_but_can_be_bound() -> None:
    # Find a free port, reserve it, then ask the kernel for ephemeral ports: it must never
    # give that one, and a listener can still bind it explicitly.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with ports.reserved([port]) as reservation:
        assert reservation.active and port in ports.parse(ports.SYSCTL.read_text())
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        given = set()
        sockets = []
        try:
            for _ in range(200):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", 0))
                given.add(s.getsockname()[1])
        finally:
            for s in sockets:
                s.close()
        assert port not in given and all(low <= p <= high for p in given)
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", port))
            listener.listen()
    assert port not in ports.parse(ports.SYSCTL.read_text())
