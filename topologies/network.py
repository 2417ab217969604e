"""Any inventory -> a Mininet network: hosts, one switch process per switch node, links.

- Mininet knows every node by a short name (topologies/names.py) so that its interface
  names fit Linux's 15 characters whatever the inventory calls it; `hosts`, `switches` and
  everything a user reads are keyed by inventory names, `node_names` maps one to the other.
- Hosts get their inventory address (/32, everything else on-link through their one
  interface) and MAC, and a static ARP entry for every other host: no switch has to trust
  ARP, and the P4 pipeline only ever sees IPv4.
- Every switch node is a `RefSwitch` (the reference switch) or a `Bmv2Switch`, serving
  P4Runtime on the loopback port of the inventory's `p4rt` address; host and fabric links
  land on the inventory's port numbers.
- Hosts send with TX checksum offload off (DESIGN.md: a user-space switch re-injecting a
  frame with a partial checksum breaks TCP otherwise; the reference switch also repairs
  such frames, BMv2 does not).
- `Floor` is a context manager: whatever happens, everything it made is removed on exit —
  switch processes, host namespaces, veths — and `leftovers()` says if anything remains.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from mininet.log import setLogLevel
from mininet.net import Mininet

from compiler.inventory import Inventory
from topologies import ports
from topologies.names import node_names
from topologies.switches import P4RuntimeSwitch, switch_class

REPO = Path(__file__).resolve().parent.parent


def _mac(index: int) -> str:
    return f"02:00:00:{(index >> 16) & 0xFF:02x}:{(index >> 8) & 0xFF:02x}:{index & 0xFF:02x}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _grpc_port(address: str) -> int:
    host, _, port = address.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        raise ValueError(f"switch address {address}: a Mininet floor serves P4Runtime on loopback")
    return int(port)


@dataclass
class Floor:
    """A running Mininet network for an inventory (use `with Floor(inventory) as floor`)."""

    inventory: Inventory
    target: str = "ref"
    progress: Callable[[str], None] = lambda _text: None
    net: Any = None
    hosts: dict[str, Any] = field(default_factory=dict)
    switches: dict[str, P4RuntimeSwitch] = field(default_factory=dict)
    workdir: Path | None = None
    node_names: dict[str, str] = field(default_factory=dict)  # inventory name -> Mininet's
    _pids: dict[str, int] = field(default_factory=dict)
    _held: ExitStack = field(default_factory=ExitStack)

    def __enter__(self) -> Floor:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        if os.geteuid() != 0:
            raise PermissionError("Mininet needs root")
        setLogLevel("error")
        cls = switch_class(self.target)
        self.workdir = Path(tempfile.mkdtemp(prefix="p4seg-floor-"))
        inv = self.inventory
        # The switches' fixed P4Runtime ports lie in the ephemeral range: keep outgoing
        # connections off them while the floor runs (topologies/ports.py).
        self._held.enter_context(ports.reserved(_grpc_port(sw.p4rt) for sw in inv.switches))
        self.node_names = node_names(
            [*(s.name for s in inv.switches), *(h.name for h in inv.hosts)]
        )
        self.net = Mininet(topo=None, controller=None, build=False, autoSetMacs=False)
        for sw in inv.switches:
            self.switches[sw.name] = self.net.addSwitch(
                self.node_names[sw.name],
                cls=cls,
                title=sw.name,
                device_id=sw.device_id,
                grpc_port=_grpc_port(sw.p4rt),
                cpu_port=sw.cpu_port,
                dpid=f"{sw.device_id:016x}",
            )
        for i, h in enumerate(inv.hosts, start=1):
            host = self.net.addHost(self.node_names[h.name], ip=None, mac=h.mac or _mac(i))
            self.hosts[h.name] = host
            self.net.addLink(host, self.switches[h.switch], port2=h.port)
        for link in inv.links:
            self.net.addLink(
                self.switches[link.a], self.switches[link.b], port1=link.a_port, port2=link.b_port
            )
        self.progress(
            f"starting {len(self.switches)} {self.target} switches, {len(self.hosts)} hosts"
        )
        try:
            self.net.build()
        except Exception as err:  # Mininet raises bare Exceptions (an interface it cannot make)
            raise RuntimeError(f"Mininet could not build the floor: {err}") from err
        self._configure_hosts()
        self.net.start()  # starts every switch and waits until each serves P4Runtime
        self._pids = {f"host {n}": h.pid for n, h in self.hosts.items()}
        self._pids.update(
            {f"switch {n}": sw.proc.pid for n, sw in self.switches.items() if sw.proc is not None}
        )

    def _configure_hosts(self) -> None:
        assert self.workdir is not None
        inv = self.inventory
        macs = {h.name: self.hosts[h.name].MAC() for h in inv.hosts}
        for h in inv.hosts:
            host = self.hosts[h.name]
            intf = host.defaultIntf().name
            lines = [f"addr add {h.ip_text}/32 dev {intf}", f"route add default dev {intf}"]
            lines += [
                f"neigh replace {o.ip_text} lladdr {macs[o.name]} dev {intf} nud permanent"
                for o in inv.hosts
                if o.name != h.name
            ]
            batch = self.workdir / f"{host.name}.ip"
            batch.write_text("\n".join(lines) + "\n")
            host.cmd(f"ip link set {intf} up; ip -batch {batch}")
            host.cmd(f"ethtool -K {intf} tx off rx off >/dev/null 2>&1")
            host.cmd("sysctl -qw net.ipv6.conf.all.disable_ipv6=1")

    def stop(self) -> None:
        if self.net is not None:
            net, self.net = self.net, None
            try:
                net.stop()
            finally:
                for sw in self.switches.values():
                    sw.stop()
        self._held.close()
        if self.workdir is not None:
            for path in self.workdir.iterdir():
                path.unlink()
            self.workdir.rmdir()
            self.workdir = None

    def leftovers(self) -> list[str]:
        """What the floor left behind on this machine (empty after a clean stop): its
        switch-side interfaces, its host shells and its switch processes."""
        out = []
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        mine = {f"{sw.name}-eth" for sw in self.switches.values()}
        for line in links.splitlines():
            ifname = line.split(":")[1].strip().split("@")[0]
            if any(ifname.startswith(prefix) for prefix in mine):
                out.append(f"interface {ifname}")
        for what, pid in self._pids.items():
            if _alive(pid):
                out.append(f"process {pid} ({what})")
        return out

    def python(self, host: str, module: str, *args: str) -> subprocess.Popen[str]:
        """Run `python -m module args` in a host's namespace, with p4seg importable."""
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc: subprocess.Popen[str] = self.hosts[host].popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        return proc
