"""`p4seg serve` end to end: a real HTTPS server on 127.0.0.1 (certificates made by
`openssl`), real HTTPS clients (urllib with ssl contexts), and a reference switch judged by
packets through its data plane."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import socket
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from p4rt import wait_for
from test_cli_controller import _passes, site  # noqa: F401  (site: the fixture)

from p4seg.api import ROUTES
from p4seg.api_auth import Access, Principal, load_access
from p4seg.cli import _front, _parser, main
from p4seg.operations import Operations
from p4seg.serve import Service, api_options
from runtime.refswitch.switch import ReferenceSwitch

OPERATOR = "operator-token-0123456789"
READER = "reader-token-0123456789ab"
MAX_BODY = 2048


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _key_and_csr(cwd: Path, name: str, cn: str) -> None:
    _openssl(cwd, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")  # fmt: skip


def _ca(cwd: Path, name: str) -> None:
    _openssl(cwd, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}")  # fmt: skip


def _sign(cwd: Path, name: str, ca: str, ext: str | None = None) -> None:
    extra = ["-extfile", ext] if ext else []
    _openssl(cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
             f"{ca}.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1, and client certificates: ops-admin and
    noc-viewer (good), rogue (another CA), stale (the CA's, but expired)."""
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _key_and_csr(d, "server", "127.0.0.1")
    _sign(d, "server", "ca", "server.ext")
    for name, ca in (("ops-admin", "ca"), ("noc-viewer", "ca"), ("rogue", "other-ca")):
        _key_and_csr(d, name, name)
        _sign(d, name, ca)
    # Expired: `openssl ca` takes explicit start and end dates (x509 -days cannot go back).
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    (d / "ca.cnf").write_text(
        "[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\nnew_certs_dir = .\n"
        "certificate = ca.pem\nprivate_key = ca.key\nserial = serial\ndefault_md = sha256\n"
        "policy = any\n[any]\ncommonName = supplied\n"
    )
    _key_and_csr(d, "stale", "ops-admin")  # the admin's name: only its dates are wrong
    _openssl(d, "ca", "-batch", "-config", "ca.cnf", "-in", "stale.csr", "-out", "stale.pem",
             "-startdate", "20200101000000Z", "-enddate", "20200102000000Z", "-notext")  # fmt: skip
    verdict = subprocess.run(["openssl", "verify", "-CAfile", "ca.pem", "stale.pem"], cwd=d,
                             capture_output=True, text=True)  # fmt: skip
    assert verdict.returncode != 0 and "certificate has expired" in verdict.stdout + verdict.stderr
    digest = hashlib.sha256(OPERATOR.encode()).hexdigest()
    (d / "access.yaml").write_text(
        f"tokens:\n"
        f"  - {{principal: soar, token_sha256: {digest}, scopes: [operate]}}\n"
        f"  - {{principal: grafana, token: {READER}, scopes: [read]}}\n"
        f"clients:\n  ops-admin: [admin]\n  noc-viewer: [read]\n"
    )
    return d


@dataclass
class Served:
    """A running serve, and how to call it."""

    switch: ReferenceSwitch
    pki: Path
    url: str
    metrics_url: str
    state: Path

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        token: str | None = None,
        cert: str | None = None,
        raw: bytes | None = None,
    ) -> tuple[int | None, Any]:
        """(HTTP status, JSON body); status None when TLS refused the connection."""
        context = ssl.create_default_context(cafile=self.pki / "ca.pem")
        if cert is not None:
            context.load_cert_chain(self.pki / f"{cert}.pem", self.pki / f"{cert}.key")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, context=context, timeout=30) as reply:
                status, text = reply.status, reply.read()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read()
        except (urllib.error.URLError, ssl.SSLError, ConnectionError, http.client.HTTPException):
            return None, None
        is_json = text.startswith((b"{", b"["))
        return status, json.loads(text) if is_json else text.decode()

    def status(self) -> dict[str, Any]:
        code, doc = self.call("GET", "/v1/status", token=READER)
        assert code == 200, doc
        return dict(doc)

    def audit(self) -> list[dict[str, Any]]:
        lines = (self.state / "audit.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def snapshot(self) -> dict[str, bytes]:
        return {str(p): p.read_bytes() for p in sorted(self.state.rglob("*")) if p.is_file()}


class _Loop:
    """An asyncio loop in a thread, for a Service under test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _serve_args(inv: list[str], pki: Path, *extra: str) -> list[str]:
    return ["serve", "small.zt", *inv, "--api", "127.0.0.1:0",
            "--api-cert", str(pki / "server.pem"), "--api-key", str(pki / "server.key"),
            "--api-client-ca", str(pki / "ca.pem"), "--api-tokens", str(pki / "access.yaml"),
            "--check", "0.2", "--interval", "0.05", *extra]  # fmt: skip


@contextlib.contextmanager
def _running(argv: list[str]) -> Iterator[Service]:
    """A Service of `p4seg ARGV`, started on its own event loop (in a thread)."""
    args = _parser().parse_args(argv)
    options = api_options(args)
    assert not isinstance(options, str), options
    access = load_access(options.tokens) if options.tokens is not None else Access()
    service = Service(Operations(args, _front), options, access)
    loop = _Loop()
    loop.run(service.start())
    try:
        yield service
    finally:
        loop.run(service.stop())
        loop.close()


@pytest.fixture
def served(
    site: tuple[ReferenceSwitch, list[str]],  # noqa: F811
    pki: Path,
) -> Iterator[Served]:
    sw, inv = site
    argv = _serve_args(inv, pki, "--metrics", "127.0.0.1:0", "--api-max-body", str(MAX_BODY))
    with _running(argv) as service:
        (_, port), (_, metrics) = service.addresses
        s = Served(sw, pki, f"https://127.0.0.1:{port}", f"http://127.0.0.1:{metrics}",
                   Path(".p4seg").resolve())  # fmt: skip
        assert service.ops.watched.wait(30)  # the watch loop's first apply is done
        assert _passes(sw, "h1", "h3", 8080)
        yield s


def test_serve_refuses_plain_http_off_loopback_and_missing_credentials(
    site: tuple[ReferenceSwitch, list[str]],  # noqa: F811
    pki: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, inv = site
    tokens = ["--api-tokens", str(pki / "access.yaml")]
    base = ["serve", "small.zt", *inv]
    assert main([*base, "--api", "0.0.0.0:8080", "--api-plain", *tokens]) == 1
    assert "only on a loopback address (127.0.0.1, ::1), not 0.0.0.0" in capsys.readouterr().err
    assert main([*base, "--api", "127.0.0.1:8080", *tokens]) == 1
    assert "needs --api-cert and --api-key" in capsys.readouterr().err
    assert main([*base, "--api", "127.0.0.1:8080", "--api-plain"]) == 1
    assert "no way to authenticate callers" in capsys.readouterr().err
    bad = pki / "bad-access.yaml"
    bad.write_text("tokens:\n  - {principal: x, token: short, scopes: [read]}\n")
    assert main([*base, "--api", "127.0.0.1:8080", "--api-plain", "--api-tokens", str(bad)]) == 1
    assert "tokens[1]: a token needs at least 16 characters" in capsys.readouterr().err
    with socket.socket() as taken:  # the API's port is in use: a clear error, not a traceback
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main([*base, "--api", f"127.0.0.1:{port}", "--api-plain", *tokens]) == 1
    err = capsys.readouterr().err
    assert err.startswith("p4seg serve: error: ") and "address already in use" in err, err
    assert not Path(".p4seg").exists()  # nothing started, nothing written


def test_tls_and_scopes_refuse_who_they_must(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    assert served.call("GET", "/v1/status", cert="ops-admin")[0] == 200
    assert served.call("GET", "/v1/status", cert="noc-viewer")[0] == 200
    assert served.call("GET", "/v1/status", cert="rogue") == (None, None)  # another CA
    assert served.call("GET", "/v1/status", cert="stale") == (None, None)  # expired
    code, doc = served.call("GET", "/v1/status")
    assert code == 401 and doc["error"]["code"] == "unauthenticated"
    code, doc = served.call("GET", "/v1/status", token="not-a-token-at-all-no")
    assert code == 401 and doc["error"]["message"] == "unknown token"
    code, doc = served.call("PUT", "/v1/quarantine/h1", {}, cert="noc-viewer")
    assert code == 403 and "cert:noc-viewer lacks the 'operate' scope" in doc["error"]["message"]
    code, doc = served.call("POST", "/v1/grants", {}, token=READER)
    assert code == 403 and doc["error"]["code"] == "forbidden"
    assert _passes(served.switch, "h1", "h3", 8080)  # nothing refused changed anything
    log = capsys.readouterr().err  # refused callers are logged, with who they were
    assert "127.0.0.1 cert:noc-viewer PUT /v1/quarantine/h1 403" in log
    assert "127.0.0.1 - GET /v1/status 401" in log


def test_quarantine_through_the_api_is_on_the_switch_and_audited(served: Served) -> None:
    sw = served.switch
    code, doc = served.call("PUT", "/v1/quarantine/h1", {"reason": "EDR: beaconing"},
                            cert="ops-admin")  # fmt: skip
    assert code == 200, doc
    assert doc["quarantined"] and doc["result"]["overlay"]  # the fast path, one ToR
    assert not _passes(sw, "h1", "h3", 8080) and _passes(sw, "h1", "h4", 443)
    assert _passes(sw, "h2", "h3", 8080)
    status = served.status()
    assert status["quarantined"] == ["h1"] and status["role"] == "leader"
    [q] = status["quarantines"]
    assert (q["reason"], q["by"], q["expires"]) == ("EDR: beaconing", "cert:ops-admin", None)
    [switch] = status["switches"]
    assert (switch["name"], switch["connection"], switch["pipeline"]) == ("tor1", "up", "same")
    assert switch["epoch"] in (0, 1) and switch["tables_sha256"]
    assert status["last_apply"]["event"] == "quarantine"
    record = served.audit()[-1]
    assert (record["event"], record["actor"], record["via"], record["reason"]) == (
        "quarantine", "cert:ops-admin", "api", "EDR: beaconing"
    )  # fmt: skip
    code, doc = served.call("DELETE", "/v1/quarantine/h1", token=OPERATOR)
    assert code == 200 and not doc["quarantined"]
    assert _passes(sw, "h1", "h3", 8080)
    assert served.status()["quarantined"] == []
    assert served.audit()[-1]["actor"] == "token:soar"


def test_grants_through_the_api(served: Served) -> None:
    sw = served.switch
    assert not _passes(sw, "h2", "h4", 443)
    body = {"src": "h2", "dst": "h4", "proto": "tcp", "ports": "443", "for": "15m"}
    code, doc = served.call("POST", "/v1/grants", body, token=OPERATOR)
    assert code == 200, doc
    grant = doc["grant"]
    assert grant["rule"] == "allow h2 -> h4 tcp 443" and grant["by"] == "token:soar"
    assert _passes(sw, "h2", "h4", 443)
    code, doc = served.call("GET", "/v1/grants", token=READER)
    assert code == 200 and [g["id"] for g in doc["grants"]] == [grant["id"]]
    code, doc = served.call("POST", "/v1/grants", {**body, "ports": "8080", "src": "h1",
                                                   "dst": "h3"}, token=OPERATOR)  # fmt: skip
    assert code == 200 and doc["grant"] is None  # already allowed: nothing written
    code, doc = served.call("DELETE", f"/v1/grants/{grant['id']}", token=OPERATOR)
    assert code == 200 and doc["revoked"]
    assert not _passes(sw, "h2", "h4", 443)
    assert [r["event"] for r in served.audit()[-2:]] == ["grant", "revoke"]


def test_every_bad_input_is_a_4xx_and_changes_nothing(served: Served) -> None:
    before = served.snapshot()
    op = {"token": OPERATOR}
    cases: list[tuple[tuple[str, str, object], dict[str, Any], int, str]] = [
        (("PUT", "/v1/quarantine/h11", {}), op, 404, "unknown_host: did you mean 'h1'"),
        (("DELETE", "/v1/quarantine/h11", None), op, 404, "unknown_host"),
        (("DELETE", "/v1/quarantine/h2", None), op, 404, "not_quarantined"),
        (("PUT", "/v1/quarantine/h1", {"reason": 5}), op, 400, "wrong_type"),
        (("PUT", "/v1/quarantine/h1", {"ttl": True}), op, 400, "wrong_type"),
        (("PUT", "/v1/quarantine/h1", {"ttl": "soon"}), op, 400, "bad_value"),
        (("PUT", "/v1/quarantine/h1", {"ttl": -3}), op, 400, "bad_value"),
        (("PUT", "/v1/quarantine/h1", {"why": "x"}), op, 400, "unknown_field"),
        (("PUT", "/v1/quarantine/h1", [1]), op, 400, "wrong_type"),
        (("PUT", "/v1/quarantine/h4", {}), op, 422, "refused: `remediation` service"),
        (("POST", "/v1/grants", {"src": "h2"}), op, 400, "missing_field"),
        (("POST", "/v1/grants", {"src": "h2", "dst": "h4", "proto": "sctp", "for": "1m"}),
         op, 400, "bad_value"),
        (("POST", "/v1/grants", {"src": "h2", "dst": "h4", "proto": "tcp", "ports": "1-2-3",
                                 "for": "1m"}), op, 400, "bad_value"),
        (("POST", "/v1/grants", {"src": "h2", "dst": "h4", "proto": "tcp", "for": "forever"}),
         op, 400, "bad_value"),
        (("POST", "/v1/grants", {"src": "nobody", "dst": "h4", "proto": "tcp", "for": "1m"}),
         op, 422, "refused: unknown name 'nobody'"),
        (("POST", "/v1/grants", {"src": "h2", "dst": "h4", "proto": "tcp", "for": 60,
                                 "ports": 443}), op, 400, "wrong_type"),
        (("POST", "/v1/grants", {"src": "h2 -> any ip\nallow any", "dst": "h4",
                                 "proto": "tcp", "for": "1m"}), op, 400, "bad_value: one service"),
        (("DELETE", "/v1/grants/nope", None), op, 404, "unknown_grant"),
        (("DELETE", "/v1/quarantine/h1", {"reason": []}), op, 400, "wrong_type: string"),
        (("POST", "/v1/apply", {"force": True}), op, 400, "unknown_field: 'force'"),
        (("POST", "/v1/apply", {"dry_run": "yes"}), op, 400, "wrong_type: boolean"),
        (("GET", "/v1/alerts?since=yesterday", None), op, 400, "bad_value"),
        (("GET", "/v1/alerts?since=2026-01-01T00:00:00", None), op, 400, "bad_value"),
        (("GET", "/v1/alerts?limit=0", None), op, 400, "bad_value"),
        (("POST", "/v1/signals", {"host": "h1", "signal": "unhealthy"}), op, 400,
         "unknown_field"),
        (("POST", "/v1/signals", {"host": "h1", "name": "unhealthy", "source": "edr"}), op,
         422, "refused_signal: declares no signal 'unhealthy'"),
        (("GET", "/v1/nothing", None), op, 404, "not_found"),
        (("PATCH", "/v1/grants", None), op, 405, "method_not_allowed"),
    ]  # fmt: skip
    for (method, path, body), who, status, expected in cases:
        got, doc = served.call(method, path, body, **who)
        error, _, message = expected.partition(": ")  # the code, and part of the message
        assert (got, doc["error"]["code"]) == (status, error), (method, path, body, doc)
        assert message in doc["error"]["message"] and doc["error"]["message"]
    for raw in (b"{not json", b'{"reason": "x"', "\u00e9".encode("latin-1"), b"[]"):
        got, doc = served.call("PUT", "/v1/quarantine/h1", raw=raw, token=OPERATOR)
        assert got == 400 and doc["error"]["code"] in ("malformed_json", "wrong_type"), doc
    got, doc = served.call("PUT", "/v1/quarantine/h1", raw=b'{"reason": "' + b"x" * MAX_BODY
                           + b'"}', token=OPERATOR)  # fmt: skip
    assert (got, doc["error"]["code"]) == (413, "too_large")
    assert served.snapshot() == before
    assert _passes(served.switch, "h1", "h3", 8080) and not _passes(served.switch, "h2", "h4", 443)


def test_apply_rereads_the_policy_and_a_bad_edit_is_refused(served: Served) -> None:
    policy = Path("small.zt")
    text = policy.read_text()
    policy.write_text(text.replace("tcp 8080", "tcp 8081"))
    code, doc = served.call("POST", "/v1/apply", {"reason": "change 42"}, token=OPERATOR)
    assert code == 200, doc
    [switch] = doc["result"]["switches"]  # written by this call, or by watch just before it
    assert switch["ok"] and switch["switch"] == "tor1" and "written" in switch
    assert _passes(served.switch, "h1", "h3", 8081)
    assert not _passes(served.switch, "h1", "h3", 8080)
    code, doc = served.call("POST", "/v1/apply", {"dry_run": True}, token=OPERATOR)
    assert code == 200 and doc["dry_run"] and doc["result"]["switches"][0]["changes"] is False
    policy.write_text(text.replace("back        tcp", "bakc tcp"))
    code, doc = served.call("POST", "/v1/apply", token=OPERATOR)
    assert code == 422 and "unknown name 'bakc'" in doc["error"]["message"]
    assert _passes(served.switch, "h1", "h3", 8081)  # the last good policy stays
    # Fail closed: the broken edit does not stop a quarantine (the last good text is used).
    code, doc = served.call("PUT", "/v1/quarantine/h2", {"reason": "EDR"}, token=OPERATOR)
    assert code == 200 and "against the last text that did" in doc["warnings"], doc
    assert not _passes(served.switch, "h2", "h3", 8081)
    assert _passes(served.switch, "h1", "h3", 8081)


def test_a_switch_down_is_a_502_and_watch_brings_the_quarantine_when_it_is_back(
    served: Served,
) -> None:
    address = served.switch.server_address
    served.switch.stop()
    code, doc = served.call("PUT", "/v1/quarantine/h1", {"reason": "x"}, token=OPERATOR)
    assert code == 502 and doc["error"]["code"] == "apply_failed", doc
    status = served.status()
    assert status["quarantined"] == ["h1"]  # kept (fail closed): applied when tor1 is back
    assert status["switches"][0]["connection"] == "unreachable"
    fresh = ReferenceSwitch(device_id=1)
    fresh.start(address)
    try:
        assert wait_for(lambda: _passes(fresh, "h2", "h3", 8080))  # watch restored tor1
        assert not _passes(fresh, "h1", "h3", 8080) and _passes(fresh, "h1", "h4", 443)
    finally:
        fresh.stop()


def test_openapi_metrics_and_alerts(served: Served) -> None:
    code, doc = served.call("GET", "/openapi.json", token=READER)
    assert code == 200 and doc["openapi"].startswith("3.")
    for route in ROUTES:
        op = doc["paths"][route.path][route.method.lower()]
        assert op["x-p4seg-scope"] == route.scope
    body = doc["paths"]["/v1/grants"]["post"]["requestBody"]["content"]["application/json"]
    assert set(body["schema"]["required"]) == {"src", "dst", "proto", "for"}
    code, text = served.call("GET", "/metrics", token=READER)
    assert code == 200 and "p4seg_quarantined_hosts 0" in text
    assert served.call("GET", "/metrics")[0] == 401  # on the API listener: authenticated
    with urllib.request.urlopen(served.metrics_url + "/metrics", timeout=10) as reply:
        assert "p4seg_grants 0" in reply.read().decode()
    alerts = served.state / "alerts.jsonl"
    old = {"time": "2026-01-01T00:00:00.000+00:00", "src": "10.0.0.9", "rule_id": 0}
    new = {"time": "2026-06-01T00:00:00.000+00:00", "src": "10.0.0.1", "rule_id": 0}
    alerts.write_text(json.dumps(old) + "\n" + json.dumps(new) + "\n")
    code, doc = served.call("GET", "/v1/alerts?since=2026-03-01T00:00:00Z", token=READER)
    assert code == 200 and doc["alerts"] == [new]
    context = ssl.create_default_context(cafile=served.pki / "ca.pem")
    request = urllib.request.Request(
        served.url + "/v1/alerts/stream?since=2026-03-01T00:00:00Z",
        headers={"Authorization": f"Bearer {READER}"},
    )
    with urllib.request.urlopen(request, context=context, timeout=10) as stream:
        assert stream.headers["Content-Type"] == "application/x-ndjson"
        assert json.loads(stream.readline()) == new
        later = {**new, "src": "10.0.0.2"}
        with alerts.open("a") as f:
            f.write(json.dumps(later) + "\n")
        assert json.loads(stream.readline()) == later


def test_cli_verbs_ask_the_server(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    remote = ["--server", served.url, "--server-ca", str(served.pki / "ca.pem")]
    creds = ["--server-cert", str(served.pki / "ops-admin.pem"),
             "--server-key", str(served.pki / "ops-admin.key")]  # fmt: skip
    assert main(["quarantine", "h2", "--reason", "ticket 7", *remote, *creds]) == 0
    assert "Quarantined h2 (via https://" in capsys.readouterr().out
    assert not _passes(served.switch, "h2", "h3", 8080)
    assert served.audit()[-1]["actor"] == "cert:ops-admin"
    assert main(["quarantine", "h9", *remote, *creds]) == 1
    assert "answered 404: no host 'h9' in the inventory" in capsys.readouterr().err
    assert main(["release", "h2", *remote, "--server-token", READER]) == 1  # read scope only
    assert "lacks the 'operate' scope" in capsys.readouterr().err
    assert main(["release", "h2", *remote, "--server-token", OPERATOR]) == 0
    assert _passes(served.switch, "h2", "h3", 8080)
    assert main(["grant", "h2", "h4", "tcp", "443", "--for", "5m", *remote, *creds]) == 0
    grant_id = capsys.readouterr().out.split("grant ", 1)[1].split(":")[0]
    assert _passes(served.switch, "h2", "h4", 443)
    assert main(["revoke", grant_id, *remote, *creds]) == 0
    assert not _passes(served.switch, "h2", "h4", 443)
    # Without a server the live verbs need the policy and inventory, as before; and while a
    # serve runs on the state directory, nothing else writes from it.
    assert main(["quarantine", "h2"]) == 2
    assert "-p/--policy and -i/--inventory are required" in capsys.readouterr().err
    assert main(["quarantine", "h2", "-p", "small.zt", "-i", "small.yaml", "--ttl", "5m"]) == 2
    assert "--ttl needs --server" in capsys.readouterr().err
    for argv in (["quarantine", "h2", "-p", "small.zt"], ["apply", "small.zt"]):
        assert main([*argv, "-i", "small.yaml"]) == 1
        assert f"a p4seg serve runs on .p4seg ({served.url})" in capsys.readouterr().err
    assert main(_serve_args(["-i", "small.yaml"], served.pki)) == 1
    assert "another p4seg serve runs on .p4seg" in capsys.readouterr().err
    assert _passes(served.switch, "h2", "h3", 8080)


def test_a_quarantine_ttl_releases_the_host(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    import p4seg.operations
    from p4seg.verbs import clock

    code, doc = served.call("PUT", "/v1/quarantine/h1", {"reason": "scan", "ttl": "10m"},
                            token=OPERATOR)  # fmt: skip
    assert code == 200, doc
    assert served.status()["quarantines"][0]["expires"] is not None
    assert not _passes(served.switch, "h1", "h3", 8080)
    later = clock() + 601
    monkeypatch.setattr(p4seg.operations, "clock", lambda: later)
    assert wait_for(lambda: _passes(served.switch, "h1", "h3", 8080))
    assert wait_for(lambda: served.status()["quarantined"] == [])
    record = next(r for r in reversed(served.audit()) if r["event"] == "release")
    assert record["actor"] == "p4seg-serve" and "TTL expired (scan)" in record["reason"]


def test_access_file_errors_name_the_place(tmp_path: Path) -> None:
    from p4seg.api_auth import AccessError

    cases = {
        "tokens: [\n": ":2:1: not YAML",
        "tokens:\n  - {principal: a, token: 0123456789abcdefg, scopes: [root]}\n": "unknown scope 'root'",
        "tokens:\n  - {principal: a, token_sha256: abc, scopes: [read]}\n": "64 hex digits",
        "clients:\n  a: []\n": "clients[a]: scopes must be a non-empty list",
        "users: {}\n": "expected a mapping with `tokens` and/or `clients`",
    }  # fmt: skip
    for text, message in cases.items():
        path = tmp_path / "access.yaml"
        path.write_text(text)
        with pytest.raises(AccessError, match=message.replace("[", r"\[")):
            load_access(path)
    assert Access().by_certificate("anyone").may("admin")  # no file: the CA decides


def test_plain_http_on_loopback_still_needs_a_token(
    site: tuple[ReferenceSwitch, list[str]],  # noqa: F811
    pki: Path,
) -> None:
    _, inv = site
    argv = ["serve", "small.zt", *inv, "--api", "127.0.0.1:0", "--api-plain",
            "--api-tokens", str(pki / "access.yaml")]  # fmt: skip
    with _running(argv) as service:
        url = f"http://127.0.0.1:{service.addresses[0][1]}/v1/status"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
        assert refused.value.headers["WWW-Authenticate"] == 'Bearer realm="p4seg"'
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {READER}"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert json.loads(reply.read())["switches"][0]["name"] == "tor1"
    assert main(["apply", "small.zt", *inv]) == 0  # serve.lock went with the service


def test_mtls_alone_requires_a_certificate(
    site: tuple[ReferenceSwitch, list[str]],  # noqa: F811
    pki: Path,
) -> None:
    """Without an access file the CA decides: a certificate is required, and any it
    signed (and no other) has every scope."""
    _, inv = site
    argv = [a for a in _serve_args(inv, pki) if "access.yaml" not in a and a != "--api-tokens"]
    with _running(argv) as service:
        served = Served(site[0], pki, f"https://127.0.0.1:{service.addresses[0][1]}", "",
                        Path(".p4seg").resolve())  # fmt: skip
        assert served.call("GET", "/v1/status") == (None, None)  # no certificate: no handshake
        assert served.call("GET", "/v1/status", token=READER) == (None, None)
        assert served.call("GET", "/v1/status", cert="rogue") == (None, None)
        assert served.call("GET", "/v1/status", cert="noc-viewer")[0] == 200


def test_the_serve_command_runs_until_sigterm(
    site: tuple[ReferenceSwitch, list[str]],  # noqa: F811
    pki: Path,
) -> None:
    """`p4seg serve` as a process: its banner names the address; SIGTERM stops it (exit 0)
    and frees the state directory."""
    import os
    import signal
    import sys

    sw, inv = site
    argv = ["serve", "small.zt", *inv, "--api", "127.0.0.1:0", "--api-plain",
            "--api-tokens", str(pki / "access.yaml")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "p4seg", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert banner.startswith("p4seg serve: API on http://127.0.0.1:"), banner
        url = banner.split(" on ", 1)[1].split()[0].rstrip(",")
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {READER}"})
        assert wait_for(lambda: _passes(sw, "h1", "h3", 8080))
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert json.loads(reply.read())["switches"][0]["connection"] == "up"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert main(["apply", "small.zt", *inv]) == 0  # nothing holds .p4seg any more


def test_concurrent_operations_take_turns(served: Served) -> None:
    """Calls that arrive together are applied one after the other: each answers 200 and
    the switch ends up holding all of them."""
    sw = served.switch
    grant = {"src": "h3", "dst": "h4", "proto": "tcp", "ports": "443", "for": "10m"}
    calls = [
        ("PUT", "/v1/quarantine/h1", {"reason": "a"}),
        ("PUT", "/v1/quarantine/h2", {"reason": "b"}),
        ("POST", "/v1/grants", grant),
        ("POST", "/v1/apply", {}),
    ]
    answers: list[tuple[int | None, Any]] = [(None, None)] * len(calls)

    def call(i: int) -> None:
        answers[i] = served.call(*calls[i], token=OPERATOR)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [a[0] for a in answers] == [200] * len(calls), answers
    assert not _passes(sw, "h1", "h3", 8080) and not _passes(sw, "h2", "h3", 8080)
    assert _passes(sw, "h3", "h4", 443) and _passes(sw, "h1", "h4", 443)
    status = served.status()
    assert status["quarantined"] == ["h1", "h2"]
    assert [g["id"] for g in status["grants"]] == [answers[2][1]["grant"]["id"]]
    assert main(["audit", "verify"]) == 0  # one chain, records never interleaved


def test_the_documented_access_file_loads(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "serve.md").read_text()
    [block] = [b.split("```", 1)[0] for b in doc.split("```yaml\n")[1:]]
    path = tmp_path / "access.yaml"
    path.write_text(block)
    access = load_access(path)
    assert access.by_token("at least 16 characters of secret") == Principal(
        "grafana", frozenset({"read"}), "token"
    )
    assert access.by_token("example-token-do-not-use-0001") is not None  # its token_sha256
    assert access.by_certificate("noc-viewer").may("read")
    assert not access.by_certificate("noc-viewer").may("operate")
    assert not access.by_certificate("stranger").scopes


def test_a_grant_made_through_the_api_expires_on_schedule(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watch loop learns of a grant the API made (WatchHooks.changed) and removes it
    when it expires, with no other event to wake it."""
    import p4seg.verbs

    body = {"src": "h2", "dst": "h4", "proto": "tcp", "ports": "443", "for": 60}
    code, doc = served.call("POST", "/v1/grants", body, token=OPERATOR)
    assert code == 200, doc
    assert _passes(served.switch, "h2", "h4", 443)
    later = p4seg.verbs.clock() + 61
    monkeypatch.setattr(p4seg.verbs, "clock", lambda: later)
    assert wait_for(lambda: not _passes(served.switch, "h2", "h4", 443))
    assert wait_for(lambda: served.status()["grants"] == [])
    record = next(r for r in reversed(served.audit()) if r.get("expired_grants"))
    assert record["expired_grants"] == [doc["grant"]["id"]]
