"""`p4seg serve`: what the API costs on top of the verb it runs. Figures, never asserted.

    python -m bench.bench_serve                  # the small generated floor, 5 runs
    python -m bench.bench_serve --repeat 9 --floor medium
    python -m bench.bench_serve --repeat 3 --floor tor48

The floor is bench/gen_policy.py's (20 ToRs, 2 spines; tor48: 48 ToRs), its switches in-process
ReferenceSwitches on loopback (bench/bench_controller.py `site`). A host with flows both
ways across ToRs is quarantined and released, timed until every probe flow is dropped
(then delivered again), injected hop by hop through the switches' data planes:

- baseline: `p4seg quarantine HOST` / `release` run in-process (p4seg.cli.main);
- the API: `PUT` / `DELETE /v1/quarantine/HOST` over HTTPS with a bearer token (certificates
  made by `openssl` here) to a running serve on the same state directory, which runs the
  same verb in its worker thread under its lock.

Printed: medians, and the API's time as a multiple of the verb's (the same run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.bench_controller import (
    MEDIUM,
    SMALL,
    TIMEOUT,
    TOR48,
    compile_floor,
    median_ms,
    quarantine_flows,
    quiet,
    run_verb,
    site,
    verb_args,
)
from p4seg.api_auth import load_access
from p4seg.cli import _front, _parser
from p4seg.operations import Operations
from p4seg.serve import Service, api_options

TOKEN = "bench-token-0123456789abcdef"


def _certificates(d: Path) -> None:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for argv in (
        ["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=ca"],
        ["req", *ec, "-keyout", "api.key", "-out", "api.csr", "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", "api.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-days", "1", "-extfile", "san.ext", "-out", "api.pem"],
    ):  # fmt: skip
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        subprocess.run(["openssl", *argv], cwd=d, check=True, capture_output=True)
    (d / "access.yaml").write_text(
        f"tokens:\n  - {{principal: bench, token: {TOKEN}, scopes: [operate]}}\n"
    )


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.perf_counter() + TIMEOUT
    while not condition():
        if time.perf_counter() > deadline:
            raise RuntimeError("the probes never settled")


@contextlib.contextmanager
def _serving(argv: list[str], access: Path) -> Iterator[Service]:
    args = _parser().parse_args(argv)
    options = api_options(args)
    assert not isinstance(options, str), options
    service = Service(Operations(args, _front), options, load_access(access))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine: object) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, loop).result(TIMEOUT)  # type: ignore[arg-type]

    with quiet():  # the watch loop's report of its first apply too
        run(service.start())
        try:
            yield service
        finally:
            run(service.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)


def bench(floor_name: str, repeat: int) -> None:
    size = {"small": SMALL, "medium": MEDIUM, "tor48": TOR48}[floor_name]
    c = compile_floor(size)
    with tempfile.TemporaryDirectory() as tmp, site(c, Path(tmp)) as s:
        d = Path(tmp)
        policy = d / "policy.zt"
        policy.write_text(c.floor.policy)
        run_verb(["apply", str(policy), *verb_args(s)])
        host, flows = quarantine_flows(c, s)
        print(f"== quarantine {host.name} on a {c.floor.rules}-rule floor of {len(s.refs)} "
              f"switches; {len(flows)} probe flows")  # fmt: skip
        live = ["-p", str(policy), *verb_args(s)]

        def dropped() -> bool:
            return not any(s.passes(f) for f in flows)

        def restored() -> bool:
            return all(s.passes(f) for f in flows)

        _certificates(d)
        argv = ["serve", str(policy), *verb_args(s), "--api", "127.0.0.1:0", "--api-cert",
                str(d / "api.pem"), "--api-key", str(d / "api.key"), "--api-tokens",
                str(d / "access.yaml"), "--check", "3600", "--interval", "1"]  # fmt: skip
        context = ssl.create_default_context(cafile=d / "ca.pem")
        verb_q, verb_r, api_q, api_r = Runs(), Runs(), Runs(), Runs()
        lent: list[int] = []  # per serve: switches its applies wrote on the follower's sessions
        # Rounds alternate (the verb, then a serve started afresh) so that both meet the same
        # load; the verb cannot run while a serve holds the state directory.
        for _ in range(repeat):
            _timed(verb_q, verb_r, lambda: run_verb(["quarantine", host.name, *live]),
                   lambda: run_verb(["release", host.name, *live]), dropped, restored)  # fmt: skip
            with _serving(argv, d / "access.yaml") as service:
                service.ops.watched.wait(TIMEOUT)  # its first apply (nothing to write) is done
                url = f"https://127.0.0.1:{service.addresses[0][1]}/v1/quarantine/{host.name}"
                _timed(api_q, api_r, _call(url, "PUT", context), _call(url, "DELETE", context),
                       dropped, restored)  # fmt: skip
                lent.append(service.follower.lent if service.follower is not None else 0)
    rows = (
        ("`p4seg quarantine` in-process (baseline)", verb_q, verb_q),
        ("PUT /v1/quarantine (HTTPS, token)", api_q, verb_q),
        ("`p4seg release` in-process (baseline)", verb_r, verb_r),
        ("DELETE /v1/quarantine (HTTPS, token)", api_r, verb_r),
    )
    print(f"   {'':<44}{'returns':>11}{'':>8}{'probes settled':>17}")
    for label, runs, base in rows:
        ratio = statistics.median(runs.returned) / statistics.median(base.returned)
        print(f"   {label:<44}{median_ms(runs.returned)} {ratio:6.2f}x"
              f"{median_ms(runs.settled)}")  # fmt: skip
    print(f"   serve's applies written on its follower's long-lived sessions: {lent} per serve "
          "(its first apply, the quarantine, the release; one per switch each)")  # fmt: skip


def _call(url: str, method: str, context: ssl.SSLContext) -> Callable[[], None]:
    def go() -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        request = urllib.request.Request(url, b"{}", headers, method=method)
        with urllib.request.urlopen(request, context=context, timeout=TIMEOUT) as reply:
            assert json.loads(reply.read())["ok"]

    return go


@dataclass(slots=True)
class Runs:
    """Seconds per run: until the call returned, and until every probe settled."""

    returned: list[float] = field(default_factory=list)
    settled: list[float] = field(default_factory=list)


def _timed(
    quarantines: Runs,
    releases: Runs,
    quarantine: Callable[[], object],
    release: Callable[[], object],
    dropped: Callable[[], bool],
    restored: Callable[[], bool],
) -> None:
    """One quarantine and one release, each timed until it returns and until the probes
    settle."""
    for action, settled, runs in (
        (quarantine, dropped, quarantines),
        (release, restored, releases),
    ):
        start = time.perf_counter()
        action()
        runs.returned.append(time.perf_counter() - start)
        _until(settled)
        runs.settled.append(time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--floor", choices=("small", "medium", "tor48"), default="small")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    bench(args.floor, args.repeat)


if __name__ == "__main__":
    main()
