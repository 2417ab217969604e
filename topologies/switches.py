"""Mininet switch nodes that run a P4Runtime switch process on the switch's interfaces.

    net = Mininet(topo=None, controller=None, switch=RefSwitch)
    tor = net.addSwitch("tor1", device_id=1, grpc_port=50101)
    ...
    net.start()            # each switch: launched, then waited for until it is ready
    net.stop()             # each switch: SIGTERM (SIGKILL after a bound), reaped, links deleted

`RefSwitch` runs the reference switch (`p4seg-switch`), `Bmv2Switch` runs BMv2's
`simple_switch_grpc`; both take the same arguments, listen for P4Runtime on
127.0.0.1:`grpc_port`, start without a pipeline (forwarding nothing until a controller
sets one), and `switch_class(target)` picks one by target name. Port numbers are
Mininet's (`addLink(host, switch, port2=N)` makes interface N switch port N).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mininet.node import Switch

STARTUP_TIMEOUT = 30.0  # seconds: an upper bound on start-up, never a pause
STOP_TIMEOUT = 5.0  # seconds SIGTERM gets before SIGKILL
POLL = 0.02
TAIL_LINES = 20


class SwitchStartError(RuntimeError):
    """A switch process exited, or was not ready in time, while starting."""


class SwitchNotInstalled(RuntimeError):
    """The program a target needs is not on PATH."""


def _listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port(avoid: set[int] | frozenset[int] = frozenset()) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick), not in `avoid`."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in avoid:
            return port


class P4RuntimeSwitch(Switch):  # type: ignore[misc]  # mininet is untyped
    """A Mininet switch whose data plane is one process speaking P4Runtime on loopback.

    Subclasses say which command to run (`command`) and when it is ready (`is_ready`).
    The process's stdout and stderr go to a log file in a private directory, whose tail
    is quoted when the process fails to start; `stop` removes it.
    """

    # ethtool -K arguments for the switch side of every link ("" for none).
    offloads_off = ""

    def __init__(
        self,
        name: str,
        device_id: int,
        grpc_port: int,
        cpu_port: int = 255,
        startup_timeout: float = STARTUP_TIMEOUT,
        title: str | None = None,
        **params: Any,
    ) -> None:
        """`device_id`: P4Runtime device id; `grpc_port`: P4Runtime on 127.0.0.1:`grpc_port`;
        `cpu_port`: the port PacketIn/PacketOut use; `title`: the name messages use (the
        inventory's, when Mininet knows the switch by a short one); `params`: Mininet's."""
        if device_id <= 0:
            raise ValueError(f"{title or name}: device_id must be > 0, got {device_id}")
        super().__init__(name, **params)
        self.title = title or name
        self.device_id = device_id
        self.grpc_port = grpc_port
        self.cpu_port = cpu_port
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_dir: Path | None = None

    # -- what subclasses say ------------------------------------------------------------------

    @property
    def grpc_addr(self) -> str:
        """Where the switch serves P4Runtime."""
        return f"127.0.0.1:{self.grpc_port}"

    def port_map(self) -> dict[int, str]:
        """Switch port -> interface name, from Mininet's links (the loopback excluded)."""
        ports = {
            port: intf.name
            for port, intf in self.intfs.items()
            if intf.name != "lo" and intf is not getattr(self, "controlIntf", None)
        }
        if self.cpu_port in ports:
            raise ValueError(f"{self.title}: port {self.cpu_port} is the CPU port")
        return dict(sorted(ports.items()))

    def port_args(self) -> list[str]:
        """`-i PORT@IFACE` for every port: both switches take their ports this way."""
        return [arg for port, intf in self.port_map().items() for arg in ("-i", f"{port}@{intf}")]

    def command(self) -> list[str]:
        """The switch process's command line."""
        raise NotImplementedError

    def is_ready(self) -> bool:
        """Whether the running process serves P4Runtime with its ports bound."""
        raise NotImplementedError

    def ports_in_use(self) -> list[int]:
        """TCP ports this switch will listen on, to check they are free before starting."""
        return [self.grpc_port]

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        assert self.log_dir is not None, "not started"
        return self.log_dir / "switch.log"

    def log_tail(self, lines: int = TAIL_LINES) -> str:
        """The last lines the process wrote (stdout and stderr)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def running(self) -> bool:
        """Whether the switch process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, controllers: list[Any]) -> None:
        """Launch the switch process on this switch's interfaces and wait until it is ready.

        `controllers` are Mininet's (OpenFlow) controllers and are ignored: a P4Runtime
        controller connects to `grpc_addr`. Raises SwitchStartError, with the process's
        last output, if it exits or is not ready within `startup_timeout` seconds.
        """
        if self.proc is not None and self.proc.poll() is None:
            raise SwitchStartError(f"{self.title}: already running (pid {self.proc.pid})")
        busy = [port for port in self.ports_in_use() if _listening(port)]
        if busy:
            raise SwitchStartError(
                f"{self.title}: port(s) {', '.join(map(str, busy))} on 127.0.0.1 already in use"
            )
        if self.offloads_off:
            for intf in self.port_map().values():
                self.cmd(f"ethtool -K {intf} {self.offloads_off}")
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix=f"p4seg-{self.name}-"))
        cmd = self.command()
        with self.log_path.open("wb") as log:
            # mnexec -da: the switch's namespace, and its own session (no tty signals).
            self.proc = self.popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self._wait_ready(cmd)

    def _wait_ready(self, cmd: list[str]) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while not self.is_ready():
            code = self.proc.poll()
            if code is not None:
                raise SwitchStartError(
                    f"{self.title}: {cmd[0]} exited with status {code} while starting\n"
                    f"command: {' '.join(cmd)}\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self._terminate()
                raise SwitchStartError(
                    f"{self.title}: {cmd[0]} not ready after {self.startup_timeout:g} s\n"
                    f"command: {' '.join(cmd)}\n{self.log_tail()}"
                )
            time.sleep(POLL)

    def _terminate(self) -> None:
        """SIGTERM, SIGKILL if it outlives STOP_TIMEOUT, and reap."""
        proc, self.proc = self.proc, None
        if proc is not None:
            terminate(proc, STOP_TIMEOUT)

    def stop(self, deleteIntfs: bool = True) -> None:  # Mininet's parameter name
        """Stop the switch process (a dead one is reaped too); then, by default, delete
        the switch's interfaces. `stop(deleteIntfs=False)` then `start([])` restarts it."""
        self._terminate()
        if self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.log_dir = None
        super().stop(deleteIntfs)


class RefSwitch(P4RuntimeSwitch):
    """The p4seg reference switch (`p4seg-switch`).

    It completes the partial TCP/UDP checksums of frames a host sent with TX checksum
    offload, so the switch side of its links needs no ethtool changes.
    """

    def __init__(
        self,
        name: str,
        device_id: int,
        grpc_port: int,
        cpu_port: int = 255,
        program: str | None = None,
        **params: Any,
    ) -> None:
        """`program`: the p4seg-switch executable (default: beside this Python, else PATH)."""
        super().__init__(name, device_id, grpc_port, cpu_port, **params)
        self.program = program or reference_switch_program()

    def command(self) -> list[str]:
        ports = self.port_args()
        return [
            self.program,
            "--device-id",
            str(self.device_id),
            *ports,
            "--grpc-addr",
            self.grpc_addr,
            "--cpu-port",
            str(self.cpu_port),
        ]

    def is_ready(self) -> bool:
        # p4seg-switch prints "ready ..." once its sockets are bound and gRPC listens.
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return False
        return any(line.startswith("ready") for line in text.splitlines())


class Bmv2Switch(P4RuntimeSwitch):
    """BMv2's `simple_switch_grpc`, started without a P4 program (`--no-p4`).

    BMv2 opens Thrift on 0.0.0.0 whatever else it is told, so every switch in the root
    namespace needs its own `thrift_port` (default 9090 + device id, or a free port). Its notification
    socket goes to the switch's private directory for the same reason. The switch side of
    each link gets checksum and scatter-gather offloads turned off, as BMv2 expects.
    """

    offloads_off = "rx off tx off sg off"

    def __init__(
        self,
        name: str,
        device_id: int,
        grpc_port: int,
        cpu_port: int = 255,
        thrift_port: int | None = None,
        program: str | None = None,
        **params: Any,
    ) -> None:
        """`thrift_port`: BMv2's Thrift server (on 0.0.0.0); `program`: default from PATH."""
        super().__init__(name, device_id, grpc_port, cpu_port, **params)
        if thrift_port is None:  # 9090 + device id while that is a port, else a free one
            thrift_port = 9090 + device_id if device_id < 65536 - 9090 else free_port()
        self.thrift_port = thrift_port
        self.program = program or _which("simple_switch_grpc")

    def command(self) -> list[str]:
        assert self.log_dir is not None
        ports = self.port_args()
        return [
            self.program,
            "--device-id",
            str(self.device_id),
            *ports,
            "--thrift-port",
            str(self.thrift_port),
            "--notifications-addr",
            f"ipc://{self.log_dir}/notifications.ipc",
            "--no-p4",
            "--",
            "--grpc-server-addr",
            self.grpc_addr,
            "--cpu-port",
            str(self.cpu_port),
        ]

    def ports_in_use(self) -> list[int]:
        return [self.grpc_port, self.thrift_port]

    def is_ready(self) -> bool:
        # simple_switch_grpc binds its interfaces before it starts the gRPC server.
        return _listening(self.grpc_port)


def _which(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise SwitchNotInstalled(
            f"{program} is not on PATH (BMv2 with P4Runtime support; e.g. PATH=/opt/p4/bin:$PATH)"
        )
    return path


def reference_switch_program() -> str:
    """The p4seg-switch console script of this Python's environment, else the one on PATH."""
    beside = Path(sys.executable).parent / "p4seg-switch"
    if os.access(beside, os.X_OK):
        return str(beside)
    return _which("p4seg-switch")


SWITCH_CLASSES: dict[str, type[P4RuntimeSwitch]] = {"ref": RefSwitch, "bmv2": Bmv2Switch}


def switch_class(target: str) -> type[P4RuntimeSwitch]:
    """The Mininet switch class for a target ("ref" or "bmv2").

    Raises SwitchNotInstalled when the target's program is not on PATH, so that callers
    learn it before building a network, and ValueError for an unknown target.
    """
    try:
        cls = SWITCH_CLASSES[target]
    except KeyError:
        raise ValueError(
            f"no Mininet switch for target '{target}' (known: {', '.join(SWITCH_CLASSES)})"
        ) from None
    if cls is Bmv2Switch:
        _which("simple_switch_grpc")
    else:
        reference_switch_program()
    return cls


def terminate(proc: subprocess.Popen[Any], timeout: float) -> None:
    """Stop a child process: SIGTERM, SIGKILL if it outlives `timeout` seconds, and reap
    it (a process that already ended is only reaped)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    else:
        proc.wait()
