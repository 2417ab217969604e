"""Fixed listening ports kept out of the kernel's ephemeral range.

A floor's switches serve P4Runtime on the fixed loopback ports of the inventory
(127.0.0.1:50001...), and on Linux those lie inside the ephemeral range (32768-60999 by
default): any outgoing connection made on the machine before a switch starts — a gRPC
client, an etcd watch, a test's HTTP call — may be given 127.0.0.1:50008 as its local
address, and the switch then cannot bind. `net.ipv4.ip_local_reserved_ports` is the
kernel's answer for services on fixed ports in that range: a reserved port is never
handed out to a `connect()` or a bind to port 0, and can still be bound explicitly.

`reserved(ports)` adds ports to that list for the duration of a block and takes back only
what it added, so blocks nest (a test session's reservation around a floor's). Without
root, or without the sysctl (not Linux), it reserves nothing and says so through
`Reservation.active`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

SYSCTL = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")


def parse(text: str) -> set[int]:
    """The sysctl's text ("50001-50008,50101") as a set of ports."""
    ports: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        ports.update(range(int(low), int(high or low) + 1))
    return ports


def render(ports: Iterable[int]) -> str:
    """A set of ports as the sysctl's text, consecutive ports as ranges."""
    runs: list[list[int]] = []
    for port in sorted(set(ports)):
        if runs and port == runs[-1][1] + 1:
            runs[-1][1] = port
        else:
            runs.append([port, port])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(frozen=True, slots=True)
class Reservation:
    added: frozenset[int]  # the ports this block reserved (those already reserved excluded)
    active: bool  # False: the sysctl could not be written, nothing is reserved


@contextmanager
def reserved(ports: Iterable[int], sysctl: Path = SYSCTL) -> Iterator[Reservation]:
    wanted = set(ports)
    try:
        before = parse(sysctl.read_text())
        added = wanted - before
        if added:
            sysctl.write_text(render(before | added) + "\n")
    except (OSError, ValueError):
        yield Reservation(frozenset(), active=False)
        return
    try:
        yield Reservation(frozenset(added), active=True)
    finally:
        if added:
            # If this fails the reservation outlives us; it only narrows the ephemeral range.
            with suppress(OSError, ValueError):
                sysctl.write_text(render(parse(sysctl.read_text()) - added) + "\n")
