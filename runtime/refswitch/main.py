"""`p4seg-switch`: run a reference switch on real interfaces (simple_switch_grpc's CLI shape)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from runtime.refswitch.server import Limits, TlsConfig
from runtime.refswitch.switch import ReferenceSwitch

EXAMPLES = """\
examples:
  p4seg-switch --device-id 1 -i 1@s1-eth1 -i 2@s1-eth2 --grpc-addr 127.0.0.1:50001
  p4seg-switch --device-id 1 -i 1@veth0 --tls-cert sw.pem --tls-key sw.key --tls-client-ca ca.pem

The switch forwards nothing until a controller sets the pipeline (P4Runtime
SetForwardingPipelineConfig with p4info.txtpb and p4/ref/p4seg.json from
`p4seg compile --target ref`). It prints "ready" once its ports are bound and
gRPC listens; SIGTERM or SIGINT stop it.
"""


def _port(text: str) -> tuple[int, str]:
    number, sep, ifname = text.partition("@")
    if not sep or not number.isdigit() or not ifname:
        raise argparse.ArgumentTypeError(f"expected PORT@INTERFACE (e.g. 1@s1-eth1), got {text!r}")
    if not 0 <= int(number) < 511:
        raise argparse.ArgumentTypeError(f"port {number} outside 0..510")
    return int(number), ifname


def _file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {err.strerror}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="p4seg-switch",
        description="The p4seg reference switch: a P4Runtime server that forwards real frames "
        "between interfaces with the p4seg pipeline.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device-id", type=int, required=True, help="P4Runtime device id (> 0)")
    p.add_argument(
        "-i",
        "--interface",
        type=_port,
        action="append",
        default=[],
        metavar="PORT@IFACE",
        help="bind switch port PORT to interface IFACE (repeatable)",
    )
    p.add_argument(
        "--grpc-addr",
        default="127.0.0.1:9559",
        help="P4Runtime listen address (default %(default)s)",
    )
    p.add_argument("--cpu-port", type=int, default=255, help="CPU port (default %(default)s)")
    p.add_argument("--tls-cert", type=_file, help="server certificate (PEM): serve TLS")
    p.add_argument("--tls-key", type=_file, help="server private key (PEM)")
    p.add_argument(
        "--tls-client-ca", type=_file, help="require client certificates signed by this CA (mTLS)"
    )
    _limit_arguments(p.add_argument_group("limits (docs/refswitch.md)"))
    p.add_argument("-v", "--verbose", action="store_true", help="log every pipeline change")
    return p


LIMIT_FLAGS = {  # Limits field -> flag
    "max_streams": "--max-streams",
    "max_streams_per_peer": "--max-streams-per-peer",
    "reserved_streams": "--reserved-streams",
    "arbitration_timeout": "--arbitration-timeout",
    "unary_workers": "--grpc-workers",
    "error_details_bytes": "--max-error-details",
    "read_response_bytes": "--read-response-bytes",
    "max_entry_metadata": "--max-entry-metadata",
}
LIMIT_HELP = {
    "max_streams": "StreamChannels open at once",
    "max_streams_per_peer": "StreamChannels from one client address",
    "reserved_streams": "streams past both limits, for a controller that arbitrates as the "
    "new primary",
    "arbitration_timeout": "seconds a new stream has to send its MasterArbitrationUpdate",
    "unary_workers": "threads for Write, Read and the pipeline RPCs, apart from the streams'",
    "error_details_bytes": "bytes of a failed Write's per-update errors (a gRPC trailer; "
    "clients accept 8 KiB unless they raise grpc.max_metadata_size)",
    "read_response_bytes": "bytes per ReadResponse",
    "max_entry_metadata": "bytes of a table entry's opaque metadata",
}


def _limit_arguments(group: argparse._ArgumentGroup) -> None:
    defaults = Limits()
    for name, flag in LIMIT_FLAGS.items():
        default = getattr(defaults, name)
        group.add_argument(
            flag,
            dest=name,
            type=type(default),
            default=default,
            metavar="N",
            help=f"{LIMIT_HELP[name]} (default %(default)s)",
        )


def limits_of(args: argparse.Namespace) -> Limits:
    """The Limits the command line asks for; ValueError names the flag out of range."""
    try:
        return Limits(**{name: getattr(args, name) for name in LIMIT_FLAGS})
    except ValueError as err:
        name, _, rest = str(err).partition(" ")
        raise ValueError(f"{LIMIT_FLAGS.get(name, name)} {rest}") from None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"p4seg-switch[{args.device_id}] %(levelname)s %(message)s",
    )
    if args.device_id <= 0:
        print("p4seg-switch: error: --device-id must be > 0", file=sys.stderr)
        return 2
    ports = dict(args.interface)
    if len(ports) != len(args.interface):
        print("p4seg-switch: error: a port number is given twice", file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        print("p4seg-switch: error: TLS needs --tls-cert and --tls-key", file=sys.stderr)
        return 2
    tls = TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    try:
        limits = limits_of(args)
    except ValueError as err:
        print(f"p4seg-switch: error: {err}", file=sys.stderr)
        return 2
    try:
        switch = ReferenceSwitch(args.device_id, ports, args.cpu_port, limits)
        port = switch.start(args.grpc_addr, tls)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"p4seg-switch: error: {err}", file=sys.stderr)
        return 1
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    host = args.grpc_addr.rpartition(":")[0]
    print(f"ready device {args.device_id} grpc {host}:{port} ports {len(ports)}", flush=True)
    done.wait()
    switch.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
