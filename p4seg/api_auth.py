"""Who may call `p4seg serve`'s API, and with which scopes.

Callers prove who they are with a client certificate (mTLS: signed by `--api-client-ca`;
the principal is the certificate subject's common name) or a bearer token from the access
file (`--api-tokens FILE`). Each principal holds scopes, ordered `read` < `operate` <
`admin`: a scope includes those below it.

The access file is YAML:

    tokens:                        # bearer tokens: Authorization: Bearer <token>
      - principal: soar
        token_sha256: 5e88...      # SHA-256 (hex) of the token: the secret stays out of the file
        scopes: [operate]
      - principal: grafana
        token: "at least 16 characters of secret"
        scopes: [read]
    clients:                       # client certificates: subject CN -> scopes
      ops-admin: [admin]
      noc-viewer: [read]

Without an access file, every client certificate the CA signed has every scope (the CA is
then the only authority). With one, a certificate whose CN it does not list has none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SCOPES = ("read", "operate", "admin")  # each includes the ones before it
MIN_TOKEN = 16


class AccessError(ValueError):
    """A bad access file or TLS material: the message names the file and the place."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    name: str
    scopes: frozenset[str]
    method: str  # "certificate" | "token" | "cookie" (a browser's token: read only)

    def may(self, scope: str) -> bool:
        """Whether the principal holds `scope` or a scope above it."""
        need = SCOPES.index(scope)
        return any(SCOPES.index(s) >= need for s in self.scopes)

    def reading(self) -> Principal:
        """The same caller with `read` at most (a browser's cookie never changes anything)."""
        scopes = frozenset({"read"}) if self.may("read") else frozenset()
        return dataclasses.replace(self, scopes=scopes, method="cookie")

    @property
    def audit_name(self) -> str:
        """The name audit records carry: which kind of credential, and whose."""
        kind = {"certificate": "cert", "cookie": "cookie"}.get(self.method, "token")
        return f"{kind}:{self.name}"


@dataclass(frozen=True, slots=True)
class Access:
    """The access file, loaded: token digests and certificate subjects -> scopes."""

    tokens: tuple[tuple[bytes, str, frozenset[str]], ...] = ()  # (sha256, principal, scopes)
    clients: Mapping[str, frozenset[str]] | None = None  # None: any certificate, every scope

    def by_token(self, token: str) -> Principal | None:
        """The token's principal, or None. Every entry is compared, in constant time."""
        digest = hashlib.sha256(token.encode()).digest()
        found: Principal | None = None
        for known, name, scopes in self.tokens:
            if hmac.compare_digest(known, digest):
                found = Principal(name, scopes, "token")
        return found

    def by_certificate(self, common_name: str) -> Principal:
        """The certificate's principal (its scopes may be empty)."""
        if self.clients is None:
            return Principal(common_name, frozenset(SCOPES), "certificate")
        return Principal(common_name, self.clients.get(common_name, frozenset()), "certificate")


def _scopes(value: object, where: str) -> frozenset[str]:
    if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
        raise AccessError(f"{where}: scopes must be a non-empty list of {', '.join(SCOPES)}")
    unknown = [s for s in value if s not in SCOPES]
    if unknown:
        raise AccessError(f"{where}: unknown scope {unknown[0]!r} (scopes: {', '.join(SCOPES)})")
    return frozenset(value)


def load_access(path: Path) -> Access:
    """Read and check an access file (see the module docstring); AccessError if bad."""
    try:
        doc: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise AccessError(f"{path}: cannot read: {err.strerror}") from None
    except UnicodeDecodeError:
        raise AccessError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise AccessError(f"{path}{at}: not YAML: {getattr(err, 'problem', err)}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict) or set(doc) - {"tokens", "clients"}:
        raise AccessError(f"{path}: expected a mapping with `tokens` and/or `clients`")
    tokens: list[tuple[bytes, str, frozenset[str]]] = []
    for n, item in enumerate(doc.get("tokens") or [], start=1):
        where = f"{path}: tokens[{n}]"
        if not isinstance(item, dict) or not isinstance(item.get("principal"), str):
            raise AccessError(f"{where}: needs `principal`, `scopes` and `token` or `token_sha256`")
        extra = set(item) - {"principal", "scopes", "token", "token_sha256"}
        if extra:
            raise AccessError(f"{where}: unknown key {sorted(extra)[0]!r}")
        secret, hashed = item.get("token"), item.get("token_sha256")
        if (secret is None) == (hashed is None):
            raise AccessError(f"{where}: give exactly one of `token` and `token_sha256`")
        if secret is not None:
            if not isinstance(secret, str) or len(secret) < MIN_TOKEN:
                raise AccessError(f"{where}: a token needs at least {MIN_TOKEN} characters")
            digest = hashlib.sha256(secret.encode()).digest()
        else:
            try:
                digest = bytes.fromhex(str(hashed))
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise AccessError(f"{where}: token_sha256 must be 64 hex digits")
        if any(digest == d for d, _, _ in tokens):
            raise AccessError(f"{where}: the same token as an earlier entry")
        tokens.append((digest, item["principal"], _scopes(item.get("scopes"), where)))
    clients = doc.get("clients")
    if clients is not None:
        if not isinstance(clients, dict) or not all(isinstance(k, str) for k in clients):
            raise AccessError(f"{path}: clients: expected certificate CN: [scopes]")
        clients = {cn: _scopes(s, f"{path}: clients[{cn}]") for cn, s in clients.items()}
    return Access(tuple(tokens), clients)


def common_name(peercert: Mapping[str, Any] | None) -> str | None:
    """The subject CN of a verified peer certificate (`ssl.SSLSocket.getpeercert()`)."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def server_context(cert: Path, key: Path, client_ca: Path | None, optional: bool) -> ssl.SSLContext:
    """The API's TLS context: TLS 1.2+, and with `client_ca` client certificates verified
    against it — required, or `optional` when tokens may stand in for them (a certificate
    that is presented is still verified: a wrong CA or an expired one fails the handshake)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise AccessError(f"--api-cert {cert} / --api-key {key}: {err}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as err:
            raise AccessError(f"--api-client-ca {client_ca}: {err}") from None
        context.verify_mode = ssl.CERT_OPTIONAL if optional else ssl.CERT_REQUIRED
    return context


def is_loopback(host: str) -> bool:
    """Whether HOST is a loopback address (or `localhost`)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
