"""Transport security: TLS on the gRPC listener (and the HTTP metrics listener), mutual TLS,
hot reload of the certificate files, and the refusal of plaintext off loopback.

Settings (server/config.py): ``SUBSIDY_TLS_CERT`` (PEM chain, leaf first) and
``SUBSIDY_TLS_KEY`` (its PEM private key) turn TLS on for ``SUBSIDY_LISTEN``;
``SUBSIDY_TLS_CLIENT_CA`` (PEM bundle) turns on client certificates: the listener then requires
one issued by that CA (the handshake fails otherwise), unless ``SUBSIDY_MTLS_LISTEN`` names a
second listener for them, in which case ``SUBSIDY_LISTEN`` serves TLS without client
certificates and only the second one requires them. gRPC Python offers no "request but do not
require" mode, hence the second listener for a mixed population.

Protocol versions: gRPC's BoringSSL negotiates TLS 1.2 or 1.3 only (its server default minimum
is 1.2; TLS 1.0/1.1 handshakes fail, see tests/integration/test_tls.py); the HTTP listener's
``ssl.SSLContext`` is set to the same minimum explicitly.

Reload: the files are re-read when their modification time, size or inode changes (looked at
when a new connection's handshake starts, at most once a second) or on SIGHUP; connections
already open keep the certificate they were established with, so no call is dropped. New
files that do not load (unreadable, not PEM, key not matching the certificate: e.g. caught
half-way through a rotation) are logged and the previous ones kept; they are tried again at the
next look.

Per call (``ClientCertificatePolicy``, called by the authentication interceptor once the HMAC
credential is resolved): a client certificate, when the connection has one, must name the
caller that signed the request, in its subject CN or a DNS or URI SAN; a caller whose
reference data sets ``require_client_certificate`` must present one; a certificate listed in
``SUBSIDY_TLS_REVOKED`` (SHA-256 fingerprints or serial numbers, one a line) is refused.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import os
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from server.config import Config, ConfigError
from server.rpc.auth import unauthenticated

log = logging.getLogger("subsidy.tls")
CHECK_INTERVAL_S = 1.0
EXPIRY_WARNING = timedelta(days=14)


def is_loopback(listen: str) -> bool:
    """Whether host:port names a loopback address (127.0.0.0/8, ::1 or localhost); a wildcard
    (0.0.0.0, [::]) or any other name is not."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listeners(config: Config) -> None:
    """Refuses plaintext on a non-loopback SUBSIDY_LISTEN (raises ConfigError, one line) unless
    SUBSIDY_ALLOW_PLAINTEXT says so, and loads the certificate files (and the revoked list) once
    so that a bad one stops the server before it binds."""
    if config.tls_cert:
        CertificateFiles.from_config(config).load()
    if config.tls_revoked:
        ClientCertificatePolicy.from_config(config)
    if not config.tls_cert and not is_loopback(config.listen) and not config.allow_plaintext:
        raise ConfigError(
            f"SUBSIDY_LISTEN={config.listen} is not a loopback address and TLS is off: set SUBSIDY_TLS_CERT and"
            " SUBSIDY_TLS_KEY, or SUBSIDY_ALLOW_PLAINTEXT=1 if a TLS-terminating proxy is in front"
        )


def warn_plaintext(config: Config, listen: str) -> None:
    """The warning every start logs when plaintext off loopback was allowed explicitly."""
    if not config.tls_cert and listen and not is_loopback(listen):
        log.warning(
            "serving plaintext on a non-loopback address (SUBSIDY_ALLOW_PLAINTEXT): requests, consumer data and"
            " credentials' signatures cross the network unencrypted unless a TLS-terminating proxy is in front",
            extra={"listen": listen},
        )


def metrics_tls(
    config: Config, listen: str | None = None, variable: str = "SUBSIDY_WRITER_METRICS_LISTEN"
) -> ssl.SSLContext | None:
    """A metrics listener (the writer's, or with ``listen`` the gateway's): HTTPS with the
    gateway's certificate when TLS is configured (no client certificate asked: scrapers and
    load balancers rarely have one); plaintext off loopback refused as for SUBSIDY_LISTEN."""
    listen = config.writer_metrics_listen if listen is None else listen
    if not listen:
        return None
    if not config.tls_cert:
        if not is_loopback(listen) and not config.allow_plaintext:
            raise ConfigError(
                f"{variable}={listen} is not a loopback address and TLS is off: set"
                " SUBSIDY_TLS_CERT and SUBSIDY_TLS_KEY, or SUBSIDY_ALLOW_PLAINTEXT=1"
            )
        warn_plaintext(config, listen)
        return None
    return CertificateReloader(CertificateFiles.from_config(config)).ssl_context()


@dataclass(frozen=True)
class Material:
    """One successful read of the files."""

    chain: bytes
    key: bytes
    client_ca: bytes | None
    subject: str
    not_after: datetime


@dataclass(frozen=True)
class CertificateFiles:
    cert: Path
    key: Path
    client_ca: Path | None

    @classmethod
    def from_config(cls, config: Config) -> CertificateFiles:
        return cls(
            Path(config.tls_cert), Path(config.tls_key), Path(config.tls_client_ca) if config.tls_client_ca else None
        )

    def stamp(self) -> tuple[tuple[int, int, int], ...]:
        """What changes when a file is replaced or rewritten: (mtime ns, size, inode) each."""
        stamps = []
        for path in (self.cert, self.key, self.client_ca):
            if path is None:
                continue
            try:
                status = path.stat()
            except OSError:
                stamps.append((-1, -1, -1))
                continue
            stamps.append((status.st_mtime_ns, status.st_size, status.st_ino))
        return tuple(stamps)

    def load(self) -> Material:
        """Reads and checks the files; raises ConfigError naming the variable at fault."""
        chain = _read("SUBSIDY_TLS_CERT", self.cert)
        key = _read("SUBSIDY_TLS_KEY", self.key)
        client_ca = _read("SUBSIDY_TLS_CLIENT_CA", self.client_ca) if self.client_ca else None
        try:
            certificates = x509.load_pem_x509_certificates(chain)
        except ValueError as error:
            raise ConfigError(f"SUBSIDY_TLS_CERT: {self.cert} holds no PEM certificate ({error})") from error
        try:
            private_key = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"SUBSIDY_TLS_KEY: {self.key} holds no unencrypted PEM private key") from error
        leaf = certificates[0]
        if _public_der(private_key.public_key()) != _public_der(leaf.public_key()):
            raise ConfigError(f"SUBSIDY_TLS_KEY: {self.key} is not the key of the first certificate in {self.cert}")
        if client_ca is not None:
            try:
                x509.load_pem_x509_certificates(client_ca)
            except ValueError as error:
                raise ConfigError(f"SUBSIDY_TLS_CLIENT_CA: {self.client_ca} holds no PEM certificate") from error
        return Material(chain, key, client_ca, leaf.subject.rfc4514_string(), leaf.not_valid_after_utc)


def _read(variable: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{variable}: cannot read {path} ({error.strerror})") from error


def _public_der(public_key: Any) -> bytes:
    der: bytes = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


class CertificateReloader:
    """The current certificate material, re-read when the files change or on request."""

    def __init__(self, files: CertificateFiles, check_interval_s: float = CHECK_INTERVAL_S) -> None:
        self._files = files
        self._check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._material = files.load()
        self._stamp = files.stamp()
        self._checked = time.monotonic()
        self._forced = False
        self.generation = 1
        _log_loaded(self._material, "tls certificate loaded")

    @property
    def material(self) -> Material:
        return self._material

    def request_reload(self) -> None:
        """Re-reads the files now, whatever their stamps say (SIGHUP)."""
        self._forced = True
        self._checked = -self._check_interval_s
        self.refresh()

    def refresh(self) -> None:
        """Looks at the files (at most once per interval) and loads them if they changed."""
        now = time.monotonic()
        if now - self._checked < self._check_interval_s:
            return
        with self._lock:
            if now - self._checked < self._check_interval_s:
                return
            self._checked = now
            stamp = self._files.stamp()
            if stamp == self._stamp and not self._forced:
                return
            try:
                material = self._files.load()
            except ConfigError as error:
                log.error("tls certificate not reloaded, keeping the previous one: %s", error)
                return
            self._material, self._stamp, self._forced = material, stamp, False
            self.generation += 1
            _log_loaded(material, "tls certificate reloaded")

    def credentials(self, require_client_certificate: bool) -> grpc.ServerCredentials:
        """Server credentials whose fetcher hands gRPC each new generation once."""
        served = self.generation

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal served
            try:
                self.refresh()
                if self.generation == served:
                    return None
                served = self.generation
                return _configuration(self._material, require_client_certificate)
            except Exception:  # never raise into gRPC's handshake
                log.exception("tls certificate fetch failed")
                return None

        return grpc.dynamic_ssl_server_credentials(
            _configuration(self._material, require_client_certificate),
            fetch,
            require_client_authentication=require_client_certificate,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A server context for an HTTP listener (TLS 1.2+, no client certificate) whose
        certificate follows the files: each handshake looks at them (at most once a second) and
        switches the connection to a fresh context after a reload."""
        contexts: dict[int, ssl.SSLContext] = {}

        def current() -> ssl.SSLContext:
            generation = self.generation
            context = contexts.get(generation)
            if context is None:
                context = _http_context(self._material)
                context.sni_callback = on_hello
                contexts.clear()
                contexts[generation] = context
            return context

        def on_hello(connection: ssl.SSLObject, _server_name: str | None, _context: ssl.SSLContext) -> None:
            try:
                self.refresh()
                connection.context = current()
            except Exception:  # keep the handshake going on the context it has
                log.exception("tls certificate refresh failed")

        return current()


@dataclass(frozen=True)
class Listeners:
    port: int
    mtls_port: int
    reloader: CertificateReloader | None


def bind(server: grpc.aio.Server, config: Config) -> Listeners:
    """Binds SUBSIDY_LISTEN (plaintext, TLS, or mutual TLS when a client CA is set and there is
    no SUBSIDY_MTLS_LISTEN) and SUBSIDY_MTLS_LISTEN (mutual TLS)."""
    check_listeners(config)
    if not config.tls_cert:
        warn_plaintext(config, config.listen)
        return Listeners(_bound(config.listen, server.add_insecure_port(config.listen)), 0, None)
    reloader = CertificateReloader(CertificateFiles.from_config(config))
    mutual_on_main = bool(config.tls_client_ca) and not config.mtls_listen
    port = _bound(config.listen, server.add_secure_port(config.listen, reloader.credentials(mutual_on_main)))
    mtls_port = 0
    if config.mtls_listen:
        mtls_port = _bound(config.mtls_listen, server.add_secure_port(config.mtls_listen, reloader.credentials(True)))
    return Listeners(port, mtls_port, reloader)


def _bound(listen: str, port: int) -> int:
    if port == 0:
        raise RuntimeError(f"could not bind {listen}")
    return port


def _configuration(material: Material, require_client_certificate: bool) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.chain)], root_certificates=material.client_ca if require_client_certificate else None
    )


def _http_context(material: Material) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # ssl loads key material from files only: hand it the bytes that were checked, through a
    # private temporary directory (mode 0700), rather than the paths, which may have changed since.
    with tempfile.TemporaryDirectory() as folder:
        chain, key = Path(folder) / "chain.pem", Path(folder) / "key.pem"
        chain.write_bytes(material.chain)
        key.touch(mode=0o600)
        key.write_bytes(material.key)
        context.load_cert_chain(chain, key)
    return context


def _log_loaded(material: Material, message: str) -> None:
    remaining = material.not_after - datetime.now(UTC)
    extra = {"subject": material.subject, "not_after": material.not_after.isoformat(), "pid": os.getpid()}
    if remaining < EXPIRY_WARNING:
        log.warning(message + "; it expires soon", extra=extra)
    else:
        log.info(message, extra=extra)


@functools.lru_cache(maxsize=4096)
def _identities(pem: bytes) -> tuple[str, str]:
    """(SHA-256 fingerprint, serial number), lower-case hex, of a PEM certificate."""
    certificate = x509.load_pem_x509_certificate(pem)
    fingerprint = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
    return fingerprint, f"{certificate.serial_number:x}"


def parse_revoked(text: str) -> frozenset[str]:
    """One entry a line: a SHA-256 fingerprint (64 hex digits, colons allowed, as
    ``openssl x509 -fingerprint -sha256`` prints it) or a serial number in hex; '#' starts a
    comment."""
    entries = set()
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip().replace(":", "").lower()
        if not entry:
            continue
        if entry.startswith("0x"):
            entry = entry[2:]
        int(entry, 16)  # ValueError on anything else
        entries.add(entry if len(entry) == 64 else entry.lstrip("0") or "0")
    return frozenset(entries)


class ClientCertificatePolicy:
    """The per-call check of the connection's client certificate against the caller that signed
    the request (see the module docstring). ``accepts_certificates``: some listener of this
    server asks for client certificates (a client CA is configured)."""

    def __init__(self, accepts_certificates: bool, revoked_file: str = "") -> None:
        self._accepts = accepts_certificates
        self._revoked_path = Path(revoked_file) if revoked_file else None
        self._revoked: frozenset[str] = frozenset()
        self._revoked_stamp: tuple[int, int, int] | None = None
        self._revoked_checked = -CHECK_INTERVAL_S
        if self._revoked_path is not None:
            self._load_revoked(strict=True)

    @classmethod
    def from_config(cls, config: Config) -> ClientCertificatePolicy:
        return cls(bool(config.tls_cert and config.tls_client_ca), config.tls_revoked)

    def _load_revoked(self, strict: bool) -> None:
        assert self._revoked_path is not None
        self._revoked_checked = time.monotonic()
        try:
            status = self._revoked_path.stat()
            stamp = (status.st_mtime_ns, status.st_size, status.st_ino)
            if stamp == self._revoked_stamp:
                return
            self._revoked = parse_revoked(self._revoked_path.read_text())
            self._revoked_stamp = stamp
            log.info("revoked client certificates loaded", extra={"count": len(self._revoked)})
        except (OSError, ValueError) as error:
            if strict:
                raise ConfigError(f"SUBSIDY_TLS_REVOKED: cannot read {self._revoked_path} ({error})") from error
            log.error("revoked client certificates not reloaded, keeping the previous list: %s", error)

    def __call__(self, context: grpc.aio.ServicerContext, caller_id: str, required: bool) -> None:
        """Raises UNAUTHENTICATED when the connection's certificate does not fit the caller."""
        if not self._accepts:
            if required:
                raise unauthenticated(f"{caller_id} must call with a client certificate (mutual TLS)")
            return
        auth = context.auth_context()
        pems = auth.get("x509_pem_cert")
        if not pems:
            if required:
                raise unauthenticated(f"{caller_id} must call with a client certificate (mutual TLS)")
            return
        wanted = caller_id.encode()
        names = (*auth.get("x509_common_name", ()), *auth.get("peer_dns", ()), *auth.get("peer_uri", ()))
        if wanted not in names:
            shown = ", ".join(name.decode(errors="replace") for name in names[:4]) or "none"
            raise unauthenticated(f"the client certificate (names: {shown}) is not {caller_id}'s, who signed the call")
        if self._revoked_path is not None:
            if time.monotonic() - self._revoked_checked >= CHECK_INTERVAL_S:
                self._load_revoked(strict=False)
            if self._revoked:
                fingerprint, serial = _identities(pems[0])
                if fingerprint in self._revoked or serial in self._revoked:
                    raise unauthenticated("the client certificate is revoked")
