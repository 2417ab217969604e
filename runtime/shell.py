"""`p4seg shell`: p4runtime-shell on one switch of an inventory.

p4runtime-shell pins protobuf < 3.21, which p4seg's own dependencies cannot share, so it
lives in its own virtualenv (.venv-shell, `make venv-shell`) and p4seg only builds its
command line: the switch's P4Runtime address and device id from the inventory, a backup
election id unless asked otherwise, and `--config` only on request, because pushing a
pipeline (SetForwardingPipelineConfig) deletes every entry on the switch.

Before handing over, p4seg asks the switch for its P4Info (a plain read, no arbitration):
a switch that runs no pipeline would give p4runtime-shell an empty P4Info, and the shell
would open without a single table instead of saying why.

p4seg execs the shell, except to push a policy compiled on the fly: p4runtime-shell reads
the files named by --config, so they live in a temporary directory and the shell runs as
a child until it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from compiler.diagnostics import InventoryError, P4segError, SourceFiles, render_all
from compiler.inventory import Inventory, Switch, load_inventory
from compiler.targets import P4INFO_FILE, device_config_file

if TYPE_CHECKING:
    from finsy.proto import p4i

REPO_ROOT = Path(__file__).resolve().parent.parent
SHELL_VENV = ".venv-shell"
SHELL_PYTHON_ENV = "P4SEG_SHELL_PYTHON"  # another interpreter with p4runtime-shell installed
BACKUP_ELECTION_ID = (0, 1)  # below any controller's: the shell joins as a read-only backup
DEVICE_CONFIG_FILE = device_config_file("ref")
PREFLIGHT_TIMEOUT = 5.0  # seconds for the switch to answer GetForwardingPipelineConfig
EXIT_ERROR = 1
_U64 = (1 << 64) - 1


class ShellError(Exception):
    """Why the shell cannot be started, in one line."""


@dataclass(frozen=True, slots=True)
class ShellOptions:
    switch: str
    inventory: str
    build_dir: str | None = None
    policy: str | None = None
    election_id: tuple[int, int] = BACKUP_ELECTION_ID
    grpc_addr: str | None = None
    push_config: bool = False
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class PipelineFiles:
    """A ref build's P4Info (text) and device config: p4runtime-shell's `--config`."""

    p4info: Path
    device_config: Path


def election_id_arg(text: str) -> tuple[int, int]:
    """argparse type for HIGH,LOW (P4Runtime's 128-bit election id, as p4runtime-shell takes it)."""
    high, sep, low = text.partition(",")
    if sep and high.strip().isdigit() and low.strip().isdigit():
        value = (int(high), int(low))
        if max(value) <= _U64:
            return value
    raise argparse.ArgumentTypeError(
        f"expected HIGH,LOW with each from 0 to {_U64} (e.g. 0,1), got {text!r}"
    )


def shell_python() -> Path:
    """The interpreter that has p4runtime-shell: .venv-shell's, or $P4SEG_SHELL_PYTHON."""
    override = os.environ.get(SHELL_PYTHON_ENV)
    python = Path(override) if override else REPO_ROOT / SHELL_VENV / "bin" / "python"
    if not (python.is_file() and os.access(python, os.X_OK)):
        where = f"${SHELL_PYTHON_ENV}={override}" if override else str(python)
        raise ShellError(
            f"p4runtime-shell is not installed: no Python at {where} "
            f"(run `make venv-shell` in {REPO_ROOT})"
        )
    return python


def find_switch(inventory: Inventory, name: str) -> Switch:
    switch = inventory.switches_by_name.get(name)
    if switch is not None:
        return switch
    known = sorted(inventory.switches_by_name)
    if not known:
        raise ShellError(f"unknown switch '{name}': {inventory.file} has no switches")
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ShellError(f"unknown switch '{name}'{hint}; {inventory.file} has: {', '.join(known)}")


def check_address(addr: str) -> str:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ShellError(f"--grpc-addr: expected HOST:PORT (e.g. 127.0.0.1:50002), got '{addr}'")
    return addr


def build_files(build_dir: str) -> PipelineFiles:
    """The pipeline files of a `p4seg compile --target ref` build directory."""
    root = Path(build_dir)
    files = PipelineFiles(root / P4INFO_FILE, root / DEVICE_CONFIG_FILE)
    for path in (files.p4info, files.device_config):
        if not path.is_file():
            raise ShellError(
                f"--build {build_dir}: no {path.relative_to(root)} "
                "(build it with `p4seg compile POLICY -i INVENTORY --target ref -o DIR`)"
            )
        # p4runtime-shell splits --config on ',': a comma in a path cannot be passed.
        if "," in str(path):
            raise ShellError(f"--build {build_dir}: p4runtime-shell cannot take a path with ','")
    return files


def shell_argv(
    python: Path,
    addr: str,
    device_id: int,
    election_id: tuple[int, int],
    config: PipelineFiles | None = None,
) -> list[str]:
    """The p4runtime-shell command line."""
    argv = [str(python), "-m", "p4runtime_sh", "--grpc-addr", addr, "--device-id", str(device_id)]
    argv += ["--election-id", f"{election_id[0]},{election_id[1]}"]
    if config is not None:
        argv += ["--config", f"{config.p4info},{config.device_config}"]
    return argv


def running_p4info(addr: str, device_id: int, switch: str) -> p4i.P4Info | None:
    """The P4Info `switch` runs, or None if it runs no pipeline."""
    # gRPC and the protobufs load only here: --dry-run and the errors above do not pay for them.
    import grpc
    from finsy.proto import p4r, p4r_grpc

    channel = grpc.insecure_channel(addr)
    try:
        request = p4r.GetForwardingPipelineConfigRequest(
            device_id=device_id,
            response_type=p4r.GetForwardingPipelineConfigRequest.P4INFO_AND_COOKIE,
        )
        stub = p4r_grpc.P4RuntimeStub(channel)
        response = stub.GetForwardingPipelineConfig(request, timeout=PREFLIGHT_TIMEOUT)
    except grpc.RpcError as err:
        code, details = err.code(), err.details()
        if code == grpc.StatusCode.NOT_FOUND:
            raise ShellError(
                f"{addr} has no device {device_id} (the device_id of {switch}): {details}"
            ) from None
        raise ShellError(f"cannot reach {switch} at {addr}: {code.name}: {details}") from None
    finally:
        channel.close()
    info = response.config.p4info
    return info if info.tables else None


@dataclass(frozen=True, slots=True)
class PipelineSource:
    """The pipeline named by --build or --policy: its files' text, and where they are."""

    origin: str  # "--build DIR" or "--policy POLICY", for messages
    texts: dict[str, str]  # P4INFO_FILE and DEVICE_CONFIG_FILE -> content
    on_disk: PipelineFiles | None  # None: compiled in memory (written out only to be pushed)


def _from_build(build_dir: str) -> PipelineSource:
    files = build_files(build_dir)
    try:
        texts = {
            P4INFO_FILE: files.p4info.read_text(encoding="utf-8"),
            DEVICE_CONFIG_FILE: files.device_config.read_text(encoding="utf-8"),
        }
    except (OSError, UnicodeDecodeError) as err:
        raise ShellError(f"--build {build_dir}: cannot read the pipeline files: {err}") from None
    return PipelineSource(f"--build {build_dir}", texts, files)


def _from_policy(
    policy_path: str, inventory: Inventory, sources: SourceFiles
) -> PipelineSource | None:
    """POLICY compiled for the ref target, or None (its diagnostics are printed)."""
    from compiler.check import check_policy
    from compiler.emit import build

    try:
        text = Path(policy_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ShellError(f"cannot read '{policy_path}': {reason}") from None
    sources.add(policy_path, text)
    result = check_policy(text, policy_path, inventory)
    if result.diagnostics:
        print(render_all(result.diagnostics, sources), file=sys.stderr)
    if result.policy is None:
        return None
    try:
        built = build(result.policy, inventory, text, "ref")
    except P4segError as err:
        print(render_all(err.diagnostics, sources), file=sys.stderr)
        return None
    texts = {name: built.files[name] for name in (P4INFO_FILE, DEVICE_CONFIG_FILE)}
    return PipelineSource(f"--policy {policy_path}", texts, None)


@contextlib.contextmanager
def _written(source: PipelineSource) -> Iterator[PipelineFiles]:
    """A compiled policy's pipeline files, in a directory removed when the context ends."""
    with tempfile.TemporaryDirectory(prefix="p4seg-shell-") as tmp:
        for name, content in source.texts.items():
            path = Path(tmp, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
        yield build_files(tmp)


def _placeholder_files() -> PipelineFiles:
    """Where --dry-run says a compiled policy would go (a real run picks a fresh directory)."""
    tmp = Path(tempfile.gettempdir(), "p4seg-shell-XXXXXXXX")
    return PipelineFiles(tmp / P4INFO_FILE, tmp / DEVICE_CONFIG_FILE)


def _load(path: str, sources: SourceFiles) -> Inventory | None:
    """The inventory, or None (its diagnostics are printed)."""
    try:
        inventory, text = load_inventory(path)
    except InventoryError as err:
        with contextlib.suppress(OSError, UnicodeDecodeError):  # E301 says why not
            sources.add(path, Path(path).read_text(encoding="utf-8"))
        print(render_all(err.diagnostics, sources), file=sys.stderr)
        return None
    sources.add(path, text)
    return inventory


def _preflight(switch: Switch, addr: str, source: PipelineSource | None) -> None:
    """Refuse a switch that runs no pipeline; warn when it runs another than the given one."""
    from finsy.proto import p4i
    from google.protobuf import text_format

    running = running_p4info(addr, switch.device_id, switch.name)
    if running is None:
        raise ShellError(
            f"{switch.name} ({addr}, device {switch.device_id}) runs no pipeline, so "
            "p4runtime-shell would show no tables: start its controller, or push one with "
            "--build DIR --push-config"
        )
    if source is not None:
        expected = text_format.Parse(source.texts[P4INFO_FILE], p4i.P4Info())
        if expected != running:
            _warn(
                f"{switch.name} runs another P4Info than {source.origin}; the shell uses the "
                "switch's (--push-config would replace it and delete the switch's entries)"
            )


def _warn(message: str) -> None:
    print(f"p4seg: warning: {message}", file=sys.stderr)


def _exec(argv: list[str]) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(argv[0], argv)
    except OSError as err:
        raise ShellError(f"cannot run {argv[0]}: {err.strerror}") from None


def _run_child(argv: list[str]) -> int:
    """Run the shell as a child (its files must outlive it); Ctrl-C belongs to the shell."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        status = subprocess.call(argv)
    except OSError as err:
        raise ShellError(f"cannot run {argv[0]}: {err.strerror}") from None
    finally:
        signal.signal(signal.SIGINT, previous)
    return status if status >= 0 else 128 - status


def run_shell(options: ShellOptions) -> int:
    """`p4seg shell`: exec p4runtime-shell on the switch (returns on --dry-run and errors)."""
    try:
        return _run(options)
    except ShellError as err:
        print(f"p4seg: error: {err}", file=sys.stderr)
        return EXIT_ERROR


def _run(options: ShellOptions) -> int:
    python = shell_python()
    sources = SourceFiles()
    inventory = _load(options.inventory, sources)
    if inventory is None:
        return EXIT_ERROR
    switch = find_switch(inventory, options.switch)
    addr = check_address(options.grpc_addr or switch.p4rt)
    if options.push_config and not (options.build_dir or options.policy):
        raise ShellError("--push-config needs the pipeline to push: --build DIR or --policy POLICY")
    source = None
    if options.build_dir:
        source = _from_build(options.build_dir)
    elif options.policy:
        source = _from_policy(options.policy, inventory, sources)
        if source is None:
            return EXIT_ERROR
    pushed = source if options.push_config else None

    def argv(config: PipelineFiles | None) -> list[str]:
        return shell_argv(python, addr, switch.device_id, options.election_id, config)

    if options.dry_run:
        if pushed is None:
            print(shlex.join(argv(None)))
        else:
            config = pushed.on_disk or _placeholder_files()
            print(shlex.join(argv(config)))
            if pushed.on_disk is None:
                print(
                    f"p4seg: note: a real run writes the build of {pushed.origin} to a fresh "
                    f"{config.p4info.parent}, removed when the shell exits",
                    file=sys.stderr,
                )
        return 0
    if pushed is None:
        _preflight(switch, addr, source)
        _exec(argv(None))
    _warn(
        f"--push-config: p4runtime-shell first sets {switch.name}'s pipeline "
        "(SetForwardingPipelineConfig), which deletes every table entry, default action "
        "and clone session on it; this needs the primary role (see --election-id)"
    )
    if pushed.on_disk is not None:
        _exec(argv(pushed.on_disk))
    with _written(pushed) as config:
        return _run_child(argv(config))
