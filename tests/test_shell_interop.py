"""p4runtime-shell (its own virtualenv, .venv-shell) against the reference switch on loopback,
and `p4seg shell`, which opens it on a switch of the inventory.

A small script drives p4runtime-shell's scripting API in .venv-shell's Python and prints
what it saw as JSON; `p4seg shell` gets its commands on stdin. Each test then checks the
switch itself, through its Device and through our own P4Runtime client, so a bug on either
side of the wire shows.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from finsy.proto import p4i, p4r, rpc_code
from google.protobuf import text_format
from p4rt import Session, config_from_build, update

from compiler.entries import FieldMatch, TableEntry
from p4seg.cli import main
from p4src.spec import PIPELINE
from runtime.entities import table_entry_proto
from runtime.refswitch.switch import ReferenceSwitch
from runtime.shell import SHELL_PYTHON_ENV

ROOT = Path(__file__).resolve().parent.parent
POLICY = str(ROOT / "policies" / "trading_floor.zt")
FLOOR = str(ROOT / "topologies" / "trading_floor.yaml")
SHELL_PYTHON = ROOT / ".venv-shell" / "bin" / "python"
ROUTING = PIPELINE.table("routing")
DEVICE_ID = 2  # tor-alg's device_id on the trading floor
CONTROLLER_ELECTION_ID = 10
TIMEOUT = 60.0  # seconds: a bound for a hung client, never a pause

# Runs in .venv-shell. Prints one JSON document on its last line. Entries travel as
# serialized TableEntry messages (hex) so the test compares exactly what went on the wire.
SCRIPT = r"""
import json
import sys

import grpc
import p4runtime_sh.shell as sh
from google.rpc import code_pb2
from p4runtime_sh.p4runtime import P4RuntimeWriteException

args = json.loads(sys.argv[1])
config = sh.FwdPipeConfig(*args["config"]) if args["config"] else None
sh.setup(
    device_id=args["device_id"],
    grpc_addr=args["addr"],
    election_id=tuple(args["election_id"]),
    config=config,
)
if args["padded"]:
    # Byte strings padded to the field's width, as older clients send them. (Not through
    # setup(verbose=False): in p4runtime-shell 0.0.6 Options.verbose is an alias of
    # Options.canonical_bytestrings, both being `bool`, so that turns padding on as well.)
    from p4runtime_sh.global_options import Options, global_options

    global_options.set_option(Options.canonical_bytestrings, False)


def route(prefix, port):
    te = sh.TableEntry("P4segIngress.routing")(action="P4segIngress.forward")
    te.match["dst_addr"] = prefix
    te.action["port"] = port
    return te


def attempt(write):
    try:
        write()
    except P4RuntimeWriteException as err:  # per-update p4.Error details (gRPC UNKNOWN)
        return [[i, code_pb2.Code.Name(e.canonical_code), e.message] for i, e in err.errors]
    except grpc.RpcError as err:  # the whole RPC failed
        return [["rpc", err.code().name, err.details()]]
    return "ok"


def routes():
    return [te.msg().SerializeToString().hex() for te in sh.TableEntry("P4segIngress.routing").read()]


out = {}
try:
    if args["mode"] == "primary":
        a, b = route("10.0.0.0/8", "1"), route("10.1.0.0/16", "2")
        out["insert_msg"] = a.msg().SerializeToString().hex()
        out["insert"] = [attempt(a.insert), attempt(b.insert)]
        out["delete"] = attempt(b.delete)
        out["routes"] = routes()
        probe = sh.TableEntry("P4segIngress.routing")
        probe.match["dst_addr"] = "10.0.0.0/8"
        out["read_by_match"] = [te.action["port"].value.hex() for te in probe.read()]
        out["duplicate"] = attempt(a.insert)
        out["delete_missing"] = attempt(b.delete)
        out["port_out_of_range"] = attempt(route("10.2.0.0/16", "600").insert)
    else:
        out["routes"] = routes()
        out["insert"] = attempt(route("10.9.0.0/16", "4").insert)
finally:
    sh.teardown()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def shell_python() -> Path:
    """.venv-shell's Python, once it has shown it can import p4runtime-shell."""
    if not SHELL_PYTHON.exists():
        pytest.skip(f"no {SHELL_PYTHON}: `make venv-shell` installs p4runtime-shell there")
    probe = subprocess.run(
        [str(SHELL_PYTHON), "-c", "import p4runtime_sh.shell"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"{SHELL_PYTHON} cannot import p4runtime_sh: {reason}")
    return SHELL_PYTHON


@pytest.fixture(scope="module")
def ref_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "build"
    assert main(["compile", POLICY, "-i", FLOOR, "--target", "ref", "-o", str(out)]) == 0
    return out


@pytest.fixture
def switch() -> Iterator[tuple[ReferenceSwitch, str]]:
    sw = ReferenceSwitch(device_id=DEVICE_ID)
    port = sw.start("127.0.0.1:0")
    try:
        yield sw, f"127.0.0.1:{port}"
    finally:
        sw.stop()


def _route(prefix: int, plen: int, port: int) -> TableEntry:
    entry = (FieldMatch("dst_addr", "lpm", prefix, plen),)
    return TableEntry(ROUTING.name, entry, "forward", (("port", port),))


CONTROLLER_ROUTE = _route(0x0A020000, 16, 3)  # 10.2.0.0/16 -> port 3


@pytest.fixture
def controlled(
    switch: tuple[ReferenceSwitch, str], ref_build: Path
) -> Iterator[tuple[ReferenceSwitch, str]]:
    """The switch with a primary controller (election id 10) that set the pipeline and wrote
    CONTROLLER_ROUTE; the controller stays connected for the whole test."""
    sw, addr = switch
    controller = Session(addr, device_id=DEVICE_ID, election_id=CONTROLLER_ELECTION_ID)
    try:
        assert controller.arbitration_status() == rpc_code.OK
        controller.set_pipeline(config_from_build(ref_build))
        entry = table_entry_proto(PIPELINE, CONTROLLER_ROUTE)
        assert controller.write([update(p4r.Update.INSERT, entry)]).code == grpc.StatusCode.OK
        yield sw, addr
    finally:
        controller.close()


def _routes(sw: ReferenceSwitch) -> list[TableEntry]:
    """The routing entries the switch holds, as the data plane executes them."""
    return [s.entry for s in sw.device.tables[ROUTING.id].values()]


def _messages(hexes: list[str]) -> list[p4r.TableEntry]:
    return [p4r.TableEntry.FromString(bytes.fromhex(h)) for h in hexes]


@pytest.fixture
def fake_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A stand-in for .venv-shell's Python: commands that are only printed never run it."""
    python = tmp_path / "shell-python"
    python.write_text("#!/bin/sh\nexit 99\n")
    python.chmod(0o755)
    monkeypatch.setenv(SHELL_PYTHON_ENV, str(python))
    return str(python)


# -- p4runtime-shell's scripting API --------------------------------------------------------


def run_script(
    python: Path,
    tmp_path: Path,
    addr: str,
    mode: str,
    config: Path | None = None,
    padded: bool = False,
) -> tuple[dict[str, Any], str]:
    """Run SCRIPT (election id 0,1); its JSON result and everything it printed before."""
    script = tmp_path / "drive_shell.py"
    script.write_text(SCRIPT)
    pipeline = [str(config / "p4info.txtpb"), str(config / "p4/ref/p4seg.json")] if config else None
    args = {
        "addr": addr,
        "device_id": DEVICE_ID,
        "election_id": [0, 1],
        "config": pipeline,
        "mode": mode,
        "padded": padded,
    }
    done = subprocess.run(
        [str(python), str(script), json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    *before, last = done.stdout.strip().splitlines()
    return json.loads(last), "\n".join(before)


@pytest.mark.parametrize("padded", [False, True], ids=["canonical", "padded"])
def test_script_pushes_the_build_inserts_reads_and_gets_errors(
    shell_python: Path,
    ref_build: Path,
    switch: tuple[ReferenceSwitch, str],
    tmp_path: Path,
    padded: bool,
) -> None:
    sw, addr = switch
    result, _ = run_script(shell_python, tmp_path, addr, "primary", config=ref_build, padded=padded)

    # The pipeline it pushed is our build's, byte for byte.
    assert sw.device.config is not None
    built_info = text_format.Parse((ref_build / "p4info.txtpb").read_text(), p4i.P4Info())
    assert sw.device.config.p4info == built_info
    assert sw.device.config.p4_device_config == (ref_build / "p4/ref/p4seg.json").read_bytes()

    # Canonical: what p4runtime-shell sends is exactly what our encoder writes. Padded (port
    # 1 as 00 01, the width of 9 bits): accepted, and read back in canonical form.
    expected = table_entry_proto(PIPELINE, _route(0x0A000000, 8, 1))
    [sent] = _messages([result["insert_msg"]])
    if padded:
        assert sent.action.action.params[0].value == b"\x00\x01"
        sent.action.action.params[0].value = b"\x01"
    assert sent == expected
    assert result["insert"] == ["ok", "ok"] and result["delete"] == "ok"
    assert _messages(result["routes"]) == [expected]
    assert result["read_by_match"] == ["01"]

    # Errors come back per update, as p4runtime-shell's P4RuntimeWriteException.
    assert result["duplicate"] == [[0, "ALREADY_EXISTS", "the entry already exists in routing"]]
    assert result["delete_missing"] == [[0, "NOT_FOUND", "no such entry in routing"]]
    # 600 fits p4runtime-shell's 2-byte encoding of the 9-bit port; the switch refuses it.
    [[index, code, message]] = result["port_out_of_range"]
    assert (index, code) == (0, "OUT_OF_RANGE") and "9 bits" in message

    # The switch, independently: its device state and a read by our own client.
    assert _routes(sw) == [_route(0x0A000000, 8, 1)]
    reader = Session(addr, device_id=DEVICE_ID, arbitrate=False)
    try:
        assert reader.read_table(ROUTING.id) == [expected]
    finally:
        reader.close()


def test_script_as_backup_reads_the_switch_pipeline_and_cannot_write(
    shell_python: Path, controlled: tuple[ReferenceSwitch, str], tmp_path: Path
) -> None:
    sw, addr = controlled
    # No config: the shell fetches the P4Info from the switch, whose entries stay.
    result, printed = run_script(shell_python, tmp_path, addr, "backup")
    assert "You are not the primary client" in printed
    assert _messages(result["routes"]) == [table_entry_proto(PIPELINE, CONTROLLER_ROUTE)]
    [[where, code, _]] = result["insert"]
    assert (where, code) == ("rpc", "PERMISSION_DENIED")
    assert _routes(sw) == [CONTROLLER_ROUTE]


# -- p4seg shell: the command line it builds (--dry-run) and its errors --------------------


def _shell_cmd(python: str, addr: str, device: int, election: str, *extra: str) -> str:
    """The line --dry-run prints."""
    argv = [python, "-m", "p4runtime_sh", "--grpc-addr", addr, "--device-id", str(device)]
    return shlex.join([*argv, "--election-id", election, *extra]) + "\n"


def test_dry_run_takes_address_and_device_from_the_inventory(
    fake_python: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["shell", "tor-alg", "-i", FLOOR, "--dry-run"]) == 0
    out = capsys.readouterr().out
    # A backup election id and no --config: the switch keeps its pipeline and its entries.
    assert out == _shell_cmd(fake_python, "127.0.0.1:50002", 2, "0,1")


def test_dry_run_maps_overrides_and_pushes_only_when_asked(
    fake_python: str, ref_build: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["shell", "spine2", "-i", FLOOR, "--dry-run", "--build", str(ref_build)]
    assert main([*base, "--election-id", "3,4", "--grpc-addr", "127.0.0.1:9559"]) == 0
    assert capsys.readouterr().out == _shell_cmd(fake_python, "127.0.0.1:9559", 8, "3,4")
    assert main([*base, "--push-config"]) == 0
    config = f"{ref_build}/p4info.txtpb,{ref_build}/p4/ref/p4seg.json"
    assert capsys.readouterr().out == _shell_cmd(
        fake_python, "127.0.0.1:50008", 8, "0,1", "--config", config
    )


def test_dry_run_with_a_policy_to_push(
    fake_python: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["shell", "tor-alg", "-i", FLOOR, "--policy", POLICY, "--push-config", "--dry-run"])
        == 0
    )
    captured = capsys.readouterr()
    argv = shlex.split(captured.out)
    assert argv[:-2] == shlex.split(_shell_cmd(fake_python, "127.0.0.1:50002", 2, "0,1"))
    assert argv[-2] == "--config"
    p4info, device_config = argv[-1].split(",")
    assert p4info.endswith("/p4info.txtpb") and device_config.endswith("/p4/ref/p4seg.json")
    assert "removed when the shell exits" in captured.err


def test_unknown_switch_lists_the_known_ones(
    fake_python: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["shell", "tor-alx", "-i", FLOOR, "--dry-run"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line == (
        "p4seg: error: unknown switch 'tor-alx' (did you mean 'tor-alg'?); "
        f"{FLOOR} has: spine1, spine2, tor-alg, tor-dev, tor-md, tor-oms, tor-rsk, tor-stl"
    )


def test_missing_inventory(fake_python: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shell", "tor-alg", "-i", "/nonexistent.yaml", "--dry-run"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "E301" in captured.err and "cannot read inventory '/nonexistent.yaml'" in captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--push-config"], "--push-config needs the pipeline to push"),
        (["--build", "/nonexistent"], "--build /nonexistent: no p4info.txtpb"),
        (["--grpc-addr", "nowhere"], "--grpc-addr: expected HOST:PORT"),
    ],
)
def test_bad_options_are_one_line_errors(
    fake_python: str, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["shell", "tor-alg", "-i", FLOOR, "--dry-run", *args]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"p4seg: error: {message}")


def test_bad_election_id_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["shell", "tor-alg", "-i", FLOOR, "--election-id", "7"])
    assert exc.value.code == 2
    assert "expected HIGH,LOW" in capsys.readouterr().err


def test_missing_shell_venv_says_how_to_make_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(SHELL_PYTHON_ENV, str(tmp_path / "no-such-python"))
    assert main(["shell", "tor-alg", "-i", FLOOR, "--dry-run"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert "p4runtime-shell is not installed" in line and "make venv-shell" in line


def test_help_explains_the_backup_role(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["shell", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "You are not the primary client" in out and "PERMISSION_DENIED" in out
    assert "examples:" in out and "p4seg shell tor-alg -i topologies/trading_floor.yaml" in out


# -- before handing over: the switch must be there and run a pipeline -------------------


def test_a_switch_without_pipeline_is_refused(
    fake_python: str, switch: tuple[ReferenceSwitch, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["shell", "tor-alg", "-i", FLOOR, "--grpc-addr", switch[1]]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"p4seg: error: tor-alg ({switch[1]}, device 2) runs no pipeline")


def test_an_unreachable_switch_or_wrong_device_is_refused(
    fake_python: str, switch: tuple[ReferenceSwitch, str], capsys: pytest.CaptureFixture[str]
) -> None:
    sw, addr = switch
    assert main(["shell", "tor-md", "-i", FLOOR, "--grpc-addr", addr]) == 1  # device 1, not 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"p4seg: error: {addr} has no device 1 (the device_id of tor-md)")
    sw.stop()
    assert main(["shell", "tor-alg", "-i", FLOOR, "--grpc-addr", addr]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"p4seg: error: cannot reach tor-alg at {addr}: UNAVAILABLE")


# -- p4seg shell: real runs, commands on stdin -------------------------------------------

COMMANDS = """\
import json
print("ROUTES", json.dumps([e.msg().SerializeToString().hex() for e in table_entry["P4segIngress.routing"].read()]))
te = table_entry["P4segIngress.routing"](action="P4segIngress.forward")
te.match["dst_addr"] = "10.9.0.0/16"
te.action["port"] = "4"
exec("try:\\n    te.insert()\\n    print('WRITE OK')\\nexcept Exception as err:\\n    print('WRITE', err.code().name)")
"""


def run_verb(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`p4seg shell ARGS` in a child process (it execs p4runtime-shell), COMMANDS on stdin."""
    env = {k: v for k, v in os.environ.items() if k != SHELL_PYTHON_ENV}
    env["IPYTHONDIR"] = str(tmp_path / "ipython")  # history and profile stay in tmp_path
    return subprocess.run(
        [sys.executable, "-m", "p4seg.cli", "shell", *args],
        input=COMMANDS,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        env=env,
    )


def _marker(name: str, out: str) -> str:
    found = re.findall(rf"\b{name} (.*)", out)
    assert len(found) == 1, out
    return str(found[0]).strip()


def test_verb_on_a_live_switch_reads_as_backup_and_cannot_write(
    shell_python: Path, controlled: tuple[ReferenceSwitch, str], tmp_path: Path
) -> None:
    sw, addr = controlled
    done = run_verb(["tor-alg", "-i", FLOOR, "--grpc-addr", addr], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "You are not the primary client" in done.stdout
    routes = json.loads(_marker("ROUTES", done.stdout))
    assert _messages(routes) == [table_entry_proto(PIPELINE, CONTROLLER_ROUTE)]
    assert _marker("WRITE", done.stdout) == "PERMISSION_DENIED"
    assert _routes(sw) == [CONTROLLER_ROUTE]


@pytest.mark.parametrize("source", ["--build", "--policy"])
def test_verb_push_config_resets_the_switch_and_writes_as_primary(
    shell_python: Path,
    ref_build: Path,
    controlled: tuple[ReferenceSwitch, str],
    tmp_path: Path,
    source: str,
) -> None:
    sw, addr = controlled
    # --build execs the shell; --policy compiles into a temporary directory and waits for it.
    # 0,11 is above the controller's 10: the shell takes the primary role, as it must to push.
    pipeline = [source, str(ref_build) if source == "--build" else POLICY]
    args = ["tor-alg", "-i", FLOOR, "--grpc-addr", addr, *pipeline, "--push-config"]
    done = run_verb([*args, "--election-id", "0,11"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "deletes every table entry" in done.stderr
    assert "You are not the primary client" not in done.stdout
    assert json.loads(_marker("ROUTES", done.stdout)) == []  # the controller's route is gone
    assert _marker("WRITE", done.stdout) == "OK"
    assert _routes(sw) == [_route(0x0A090000, 16, 4)]
