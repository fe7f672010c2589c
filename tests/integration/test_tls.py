"""Transport security (server/rpc/tls.py): TLS and mutual TLS on the gateway's listener, with
certificates made here (server/commands/certs.py).

Every bad connection fails the handshake (UNAVAILABLE) or the call (UNAUTHENTICATED), executes
nothing, and leaves the gateway serving the next caller.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cryptography.hazmat.primitives import hashes
from redis.asyncio import Redis
from redis.exceptions import RedisError
from subsidy_client import AuthorizationClient, Line, QualificationClient, RetryPolicy, TlsConfig
from subsidy_client.errors import Unauthenticated, Unavailable
from subsidy_client.v1 import authorization_pb2 as pb

from server.commands.certs import Issued, issue, make_ca
from server.config import Config, ConfigError
from server.processes.app import Application, create_server
from server.rpc import tls
from storage.devenv import Services
from tests.conftest import (
    ROOT,
    Environment,
    consumer_key,
    isolated_environment,
    load_document,
    running_gateway,
    snapshot,
)
from tests.conftest import serial as new_serial

FRIDGE_G2 = "6970000000024"
# A merchant whose terminal must use mutual TLS (reference data's require_client_certificate).
MTLS_MERCHANT = {
    "merchants": [
        {
            "id": "m-mtls",
            "name": "A shop with certified tills",
            "licence_number": "91330109MA2TLS0001",
            "terminals": [{"id": "t-mtls-01", "require_client_certificate": True}],
        }
    ]
}


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: Issued
    other_ca: Issued

    def save(self, name: str, issued: Issued) -> tuple[str, str]:
        certificate, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        issued.write(certificate, key)
        return str(certificate), str(key)

    @property
    def ca_file(self) -> str:
        return str(self.folder / "ca.pem")

    def client(self, name: str, issued: Issued | None = None, caller: str | None = None) -> TlsConfig:
        """TLS settings presenting ``issued`` (default: a valid certificate for ``caller``)."""
        certificate, key = self.save(name, issued or issue(self.ca, caller or name))
        return TlsConfig(ca_file=self.ca_file, cert_file=certificate, key_file=key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_ca("Test CA"), make_ca("Someone else's CA")
    (folder / "ca.pem").write_bytes(ca.certificate_pem)
    made = Pki(folder, ca, other_ca)
    made.save("server", issue(ca, "localhost", server=True, dns=["localhost"], ips=["127.0.0.1"]))
    return made


@pytest.fixture(scope="module")
async def tls_env(services: Services) -> AsyncIterator[Environment]:
    """An environment of its own: it adds a terminal that requires mutual TLS."""
    async with isolated_environment(services) as env:
        extra = await load_document(env, MTLS_MERCHANT)
        yield Environment(env.pg_dsn, env.redis_url, env.prefix, {**env.credentials, **extra})


def server_settings(pki: Pki, **overrides: Any) -> dict[str, Any]:
    return {
        "tls_cert": str(pki.folder / "server.pem"),
        "tls_key": str(pki.folder / "server.key"),
        **overrides,
    }


@pytest.fixture(scope="module")
async def tls_gateway(tls_env: Environment, pki: Pki) -> AsyncIterator[Application]:
    async with running_gateway(tls_env.config(**server_settings(pki))) as application:
        yield application


@pytest.fixture(scope="module")
async def mtls_gateway(tls_env: Environment, pki: Pki) -> AsyncIterator[Application]:
    revoked = pki.folder / "revoked.txt"
    revoked.write_text("# none yet\n")
    settings = server_settings(pki, tls_client_ca=pki.ca_file, tls_revoked=str(revoked))
    async with running_gateway(tls_env.config(**settings)) as application:
        yield application


@pytest.fixture(scope="module")
async def mixed_gateway(tls_env: Environment, pki: Pki) -> AsyncIterator[Application]:
    """TLS on SUBSIDY_LISTEN, mutual TLS on SUBSIDY_MTLS_LISTEN."""
    settings = server_settings(pki, tls_client_ca=pki.ca_file, mtls_listen="127.0.0.1:0")
    async with running_gateway(tls_env.config(**settings)) as application:
        yield application


def till(env: Environment, port: int, terminal: str = "t-main-01", tls_config: TlsConfig | None = None) -> Any:
    return AuthorizationClient(
        f"127.0.0.1:{port}",
        terminal,
        env.credentials[terminal],
        deadline_s=5.0,
        retry=RetryPolicy(max_attempts=1),
        tls=tls_config,
    )


async def authorize(client: AuthorizationClient) -> pb.AuthorizeResponse:
    return await client.authorize(
        campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", FRIDGE_G2, 12_345, new_serial())]
    )


async def approved(
    env: Environment, port: int, terminal: str = "t-main-01", tls_config: TlsConfig | None = None
) -> None:
    async with till(env, port, terminal, tls_config) as client:
        assert (await authorize(client)).decision == pb.DECISION_APPROVED


async def refused_unchanged(
    env: Environment, redis: Redis, client: AuthorizationClient, error: type[Exception], match: str | None = None
) -> str:
    """The call fails with ``error`` and no key of the run changed (nothing executed, no nonce)."""
    before = await snapshot(redis, env.keys)
    async with client:
        with pytest.raises(error, match=match) as raised:
            await authorize(client)
    assert await snapshot(redis, env.keys) == before
    return str(raised.value)


@pytest.fixture(scope="module")
async def tls_redis(tls_env: Environment) -> AsyncIterator[Redis]:
    client = Redis.from_url(tls_env.redis_url)
    yield client
    await client.aclose()


# --- TLS --------------------------------------------------------------------------------------


async def test_tls_call_works(tls_env: Environment, tls_gateway: Application, pki: Pki) -> None:
    await approved(tls_env, tls_gateway.port, tls_config=TlsConfig(ca_file=pki.ca_file))
    # A partner app too, over the same listener.
    async with QualificationClient(
        f"127.0.0.1:{tls_gateway.port}",
        "p-wallet-01",
        tls_env.credentials["p-wallet-01"],
        tls=TlsConfig(ca_file=pki.ca_file),
        retry=RetryPolicy(max_attempts=1),
    ) as app:
        assert len(await app.echo(b"ping")) == 4


async def test_plaintext_client_on_the_tls_port_fails(
    tls_env: Environment, tls_gateway: Application, tls_redis: Redis, pki: Pki
) -> None:
    await refused_unchanged(tls_env, tls_redis, till(tls_env, tls_gateway.port), Unavailable)
    await approved(tls_env, tls_gateway.port, tls_config=TlsConfig(ca_file=pki.ca_file))


async def test_tls_client_on_a_plaintext_port_fails(
    environment: Environment, gateway: Application, redis: Redis, pki: Pki
) -> None:
    client = till(environment, gateway.port, tls_config=TlsConfig(ca_file=pki.ca_file))
    await refused_unchanged(environment, redis, client, Unavailable)
    await approved(environment, gateway.port)


async def test_a_server_certificate_from_another_ca_is_refused_by_the_client(
    tls_env: Environment, tls_gateway: Application, tls_redis: Redis, pki: Pki
) -> None:
    (pki.folder / "other-ca.pem").write_bytes(pki.other_ca.certificate_pem)
    client = till(tls_env, tls_gateway.port, tls_config=TlsConfig(ca_file=str(pki.folder / "other-ca.pem")))
    await refused_unchanged(tls_env, tls_redis, client, Unavailable)


def handshake(port: int, version: ssl.TLSVersion, ca_file: str) -> str:
    """Connects with exactly one TLS version; returns the version negotiated."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = context.maximum_version = version
    context.set_alpn_protocols(["h2"])
    if version < ssl.TLSVersion.TLSv1_2:
        context.set_ciphers("ALL:@SECLEVEL=0")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as wrapped,
    ):
        return str(wrapped.version())


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_only_tls_1_2_and_1_3_are_negotiated(tls_gateway: Application, pki: Pki) -> None:
    """gRPC's BoringSSL server accepts TLS 1.2 and 1.3 and nothing older."""
    port = tls_gateway.port
    assert await asyncio.to_thread(handshake, port, ssl.TLSVersion.TLSv1_3, pki.ca_file) == "TLSv1.3"
    assert await asyncio.to_thread(handshake, port, ssl.TLSVersion.TLSv1_2, pki.ca_file) == "TLSv1.2"
    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await asyncio.to_thread(handshake, port, old, pki.ca_file)


# --- mutual TLS -------------------------------------------------------------------------------


async def test_mtls_call_works_for_terminals_and_partner_apps(
    tls_env: Environment, mtls_gateway: Application, pki: Pki
) -> None:
    await approved(tls_env, mtls_gateway.port, tls_config=pki.client("t-main-01"))
    # The caller id in a DNS SAN is enough (the CN is a display name here).
    by_san = pki.client("till-2-by-san", issue(pki.ca, "Till 2, checkout east", dns=["t-main-02"]))
    await approved(tls_env, mtls_gateway.port, "t-main-02", by_san)
    async with QualificationClient(
        f"127.0.0.1:{mtls_gateway.port}",
        "p-wallet-01",
        tls_env.credentials["p-wallet-01"],
        tls=pki.client("p-wallet-01"),
        retry=RetryPolicy(max_attempts=1),
    ) as app:
        assert await app.echo(b"ping") == b"ping"


def dated(pki: Pki, caller: str, start_days: int, end_days: int) -> Issued:
    now = datetime.now(UTC)
    return issue(pki.ca, caller, not_before=now + timedelta(days=start_days), not_after=now + timedelta(days=end_days))


@pytest.mark.parametrize(
    "case",
    ["no certificate", "expired", "not yet valid", "another CA", "a server certificate"],
)
async def test_bad_client_certificates_fail_the_handshake(
    tls_env: Environment, mtls_gateway: Application, tls_redis: Redis, pki: Pki, case: str
) -> None:
    tls_config = {
        "no certificate": lambda: TlsConfig(ca_file=pki.ca_file),
        "expired": lambda: pki.client("expired", dated(pki, "t-main-01", -30, -1)),
        "not yet valid": lambda: pki.client("future", dated(pki, "t-main-01", 1, 30)),
        "another CA": lambda: pki.client("foreign", issue(pki.other_ca, "t-main-01")),
        # A certificate for serverAuth only is no client certificate.
        "a server certificate": lambda: pki.client("serverish", issue(pki.ca, "t-main-01", server=True)),
    }[case]()
    await refused_unchanged(tls_env, tls_redis, till(tls_env, mtls_gateway.port, tls_config=tls_config), Unavailable)
    await approved(tls_env, mtls_gateway.port, tls_config=pki.client("t-main-01"))


async def test_a_certificate_of_another_caller_is_unauthenticated(
    tls_env: Environment, mtls_gateway: Application, tls_redis: Redis, pki: Pki
) -> None:
    """Signed as t-main-01 over a connection certified for t-main-02: refused, nothing done."""
    client = till(tls_env, mtls_gateway.port, "t-main-01", pki.client("t-main-02"))
    message = await refused_unchanged(tls_env, tls_redis, client, Unauthenticated, "not t-main-01's")
    assert "t-main-02" in message
    await approved(tls_env, mtls_gateway.port, "t-main-02", pki.client("t-main-02"))


async def test_revoked_certificates_are_unauthenticated(
    tls_env: Environment, mtls_gateway: Application, tls_redis: Redis, pki: Pki
) -> None:
    by_fingerprint, by_serial = issue(pki.ca, "t-main-01"), issue(pki.ca, "t-main-01")
    fingerprint = by_fingerprint.certificate.fingerprint(hashes.SHA256()).hex(":").upper()
    revoked = pki.folder / "revoked.txt"
    revoked.write_text(f"# revoked\n{fingerprint}\n{by_serial.certificate.serial_number:X}  # lost till\n")
    await asyncio.sleep(tls.CHECK_INTERVAL_S + 0.1)
    for name, issued in (("revoked-fp", by_fingerprint), ("revoked-serial", by_serial)):
        client = till(tls_env, mtls_gateway.port, tls_config=pki.client(name, issued))
        await refused_unchanged(tls_env, tls_redis, client, Unauthenticated, "revoked")
    await approved(tls_env, mtls_gateway.port, tls_config=pki.client("t-main-01"))


async def test_a_terminal_that_requires_mtls_is_refused_without_a_certificate(
    tls_env: Environment, mixed_gateway: Application, tls_redis: Redis, pki: Pki
) -> None:
    """SUBSIDY_LISTEN serves TLS without client certificates, SUBSIDY_MTLS_LISTEN with them: the
    terminal whose reference data requires a certificate is refused on the first and served on
    the second; other terminals are served on both."""
    assert mixed_gateway.mtls_port not in (0, mixed_gateway.port)
    server_only = TlsConfig(ca_file=pki.ca_file)
    client = till(tls_env, mixed_gateway.port, "t-mtls-01", server_only)
    await refused_unchanged(tls_env, tls_redis, client, Unauthenticated, "must call with a client certificate")
    await approved(tls_env, mixed_gateway.mtls_port, "t-mtls-01", pki.client("t-mtls-01"))
    await approved(tls_env, mixed_gateway.port, "t-main-01", server_only)
    await approved(tls_env, mixed_gateway.mtls_port, "t-main-01", pki.client("t-main-01"))


async def test_a_terminal_that_requires_mtls_is_refused_by_a_plaintext_gateway(
    tls_env: Environment, tls_redis: Redis
) -> None:
    async with running_gateway(tls_env.config()) as application:
        client = till(tls_env, application.port, "t-mtls-01")
        await refused_unchanged(tls_env, tls_redis, client, Unauthenticated, "client certificate")
        await approved(tls_env, application.port)


# --- reload -----------------------------------------------------------------------------------


async def test_a_changed_certificate_is_picked_up_without_dropping_connections(
    tls_env: Environment, pki: Pki, tmp_path: Path
) -> None:
    """New files from a new CA: new connections get the new certificate, an open connection
    keeps working; a half-written rotation (key of another certificate) keeps the last good one."""
    old_ca_file, new_ca = pki.ca_file, make_ca("Next year's CA")
    new_ca_file = tmp_path / "new-ca.pem"
    new_ca_file.write_bytes(new_ca.certificate_pem)
    certificate, key = tmp_path / "server.pem", tmp_path / "server.key"
    issue(pki.ca, "localhost", server=True, ips=["127.0.0.1"]).write(certificate, key)
    settings = {"tls_cert": str(certificate), "tls_key": str(key)}
    async with running_gateway(tls_env.config(**settings)) as application:
        assert application.certificates is not None
        async with till(tls_env, application.port, tls_config=TlsConfig(ca_file=old_ca_file)) as open_client:
            assert (await authorize(open_client)).decision == pb.DECISION_APPROVED
            rotated = issue(new_ca, "localhost", server=True, ips=["127.0.0.1"])
            # Half-way: the new certificate beside the old key.
            certificate.write_bytes(rotated.certificate_pem)
            await asyncio.sleep(tls.CHECK_INTERVAL_S + 0.1)
            await approved(tls_env, application.port, tls_config=TlsConfig(ca_file=old_ca_file))
            assert application.certificates.generation == 1
            rotated.write(certificate, key)
            await asyncio.sleep(tls.CHECK_INTERVAL_S + 0.1)
            await approved(tls_env, application.port, tls_config=TlsConfig(ca_file=str(new_ca_file)))
            assert application.certificates.generation == 2
            with pytest.raises(Unavailable):
                async with till(tls_env, application.port, tls_config=TlsConfig(ca_file=old_ca_file)) as stale:
                    await authorize(stale)
            # The connection opened before the rotation still serves calls.
            assert (await authorize(open_client)).decision == pb.DECISION_APPROVED
            # SIGHUP's path: re-read now, whatever the files' stamps say.
            application.certificates.request_reload()
            assert application.certificates.generation == 3


# --- configuration ----------------------------------------------------------------------------


async def test_plaintext_off_loopback_is_refused_at_start(tls_env: Environment) -> None:
    for listen in ("0.0.0.0:0", "[::]:0", "192.0.2.10:50051", "gateway.internal:50051"):
        with pytest.raises(ConfigError, match="not a loopback address and TLS is off"):
            await create_server(tls_env.config(listen=listen))
    assert tls.is_loopback("127.0.0.1:1") and tls.is_loopback("[::1]:1") and tls.is_loopback("localhost:1")


async def test_plaintext_off_loopback_when_allowed_warns_at_start(
    tls_env: Environment, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="subsidy.tls"):
        async with running_gateway(tls_env.config(listen="0.0.0.0:0", allow_plaintext=True)) as application:
            await approved(tls_env, application.port)
    assert any("SUBSIDY_ALLOW_PLAINTEXT" in record.getMessage() for record in caplog.records)


def test_the_server_refuses_plaintext_off_loopback_with_one_line() -> None:
    environ = {**os.environ, "SUBSIDY_LISTEN": "0.0.0.0:50051"}
    environ.pop("SUBSIDY_TLS_CERT", None)
    environ.pop("SUBSIDY_ALLOW_PLAINTEXT", None)
    finished = subprocess.run(
        [sys.executable, "-m", "server"], env=environ, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 2
    assert finished.stderr.count("\n") == 1
    assert finished.stderr.startswith("configuration error: SUBSIDY_LISTEN=0.0.0.0:50051 is not a loopback address")


def test_bad_certificate_files_are_refused_naming_the_variable(pki: Pki, tmp_path: Path) -> None:
    certificate, key = pki.folder / "server.pem", pki.folder / "server.key"
    other_key = tmp_path / "other.key"
    issue(pki.ca, "x").write(tmp_path / "other.pem", other_key)
    cases = [
        (Config(tls_cert=str(tmp_path / "missing.pem"), tls_key=str(key)), "SUBSIDY_TLS_CERT: cannot read"),
        (Config(tls_cert=str(key), tls_key=str(key)), "SUBSIDY_TLS_CERT: .* holds no PEM certificate"),
        (Config(tls_cert=str(certificate), tls_key=str(other_key)), "SUBSIDY_TLS_KEY: .* is not the key"),
        (Config(tls_cert=str(certificate), tls_key=str(key), tls_client_ca=str(key)), "SUBSIDY_TLS_CLIENT_CA"),
    ]
    for config, message in cases:
        with pytest.raises(ConfigError, match=message):
            tls.check_listeners(config)
    for settings, message in [
        ({"tls_cert": str(certificate)}, "go together"),
        ({"tls_client_ca": pki.ca_file}, "need SUBSIDY_TLS_CERT"),
        ({"tls_cert": str(certificate), "tls_key": str(key), "mtls_listen": "127.0.0.1:0"}, "SUBSIDY_MTLS_LISTEN"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Config(**settings)
    assert Config.from_env({"SUBSIDY_ALLOW_PLAINTEXT": "1", "SUBSIDY_TLS_CERT": "a", "SUBSIDY_TLS_KEY": "b"}).tls_cert


# --- the HTTP metrics listener ----------------------------------------------------------------


async def test_the_metrics_listener_serves_https_and_follows_the_certificate(pki: Pki, tmp_path: Path) -> None:
    certificate, key = tmp_path / "server.pem", tmp_path / "server.key"
    issue(pki.ca, "localhost", server=True, ips=["127.0.0.1"]).write(certificate, key)
    context = tls.metrics_tls(Config(tls_cert=str(certificate), tls_key=str(key), writer_metrics_listen="0.0.0.0:1"))
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2

    async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]

    async def get(ca: bytes) -> bytes:
        client_context = ssl.create_default_context(cadata=ca.decode())
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        body = await reader.read()
        writer.close()
        return body

    try:
        assert (await get(pki.ca.certificate_pem)).endswith(b"ok")
        new_ca = make_ca("Rotated CA")
        issue(new_ca, "localhost", server=True, ips=["127.0.0.1"]).write(certificate, key)
        await asyncio.sleep(tls.CHECK_INTERVAL_S + 0.1)
        assert (await get(new_ca.certificate_pem)).endswith(b"ok")
        with pytest.raises(ssl.SSLCertVerificationError):
            await get(pki.ca.certificate_pem)
    finally:
        server.close()
        await server.wait_closed()
    with pytest.raises(ConfigError, match="SUBSIDY_WRITER_METRICS_LISTEN"):
        tls.metrics_tls(Config(writer_metrics_listen="0.0.0.0:9464"))
    assert tls.metrics_tls(Config(writer_metrics_listen="127.0.0.1:9464")) is None


# --- PostgreSQL and Redis ---------------------------------------------------------------------


async def test_tls_settings_of_postgres_and_redis_reach_the_drivers(tls_env: Environment, pki: Pki) -> None:
    """sslmode=verify-full in the DSN and rediss:// in the URL are the drivers' own settings,
    passed through untouched: against the plaintext test servers both must fail to connect
    (where a setting that was dropped would connect in plaintext)."""
    separator = "&" if "?" in tls_env.pg_dsn else "?"
    with pytest.raises((ConnectionError, OSError, asyncpg.PostgresError)):
        verify_full = f"{separator}sslmode=verify-full&sslrootcert={pki.ca_file}"
        connection = await asyncpg.connect(tls_env.pg_dsn + verify_full, timeout=10)
        await connection.close()
    rediss = tls_env.redis_url.replace("redis://", "rediss://", 1) + f"?ssl_ca_certs={pki.ca_file}"
    # The TLS handshake gets no answer from a plaintext Redis: the gateway does not start.
    with pytest.raises((RedisError, OSError)):
        await create_server(tls_env.config(redis_url=rediss, redis_timeout_s=1.0))


@pytest.fixture(autouse=True)
def _no_proxy() -> Iterator[None]:
    """gRPC honours http(s)_proxy; the tests talk to 127.0.0.1 directly."""
    saved = {name: os.environ.pop(name) for name in ("http_proxy", "https_proxy", "grpc_proxy") if name in os.environ}
    yield
    os.environ.update(saved)


# --- the Node.js client -----------------------------------------------------------------------


async def node_demo(credentials: Path, environ: dict[str, str]) -> tuple[int, str, str]:
    from tests.integration.test_node_client import NODE_CLIENT, ensure_node_modules

    node = await ensure_node_modules()
    process = await asyncio.create_subprocess_exec(
        node,
        "demo.js",
        str(credentials),
        "c-main",
        FRIDGE_G2,
        "12345",
        cwd=NODE_CLIENT,
        env={**os.environ, **environ},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.mark.timeout(420)
async def test_the_node_client_calls_over_mutual_tls(
    tls_env: Environment, mtls_gateway: Application, pki: Pki, tmp_path: Path
) -> None:
    """clients/node with SUBSIDY_GATEWAY_CA and SUBSIDY_CLIENT_CERTS (a folder of <id>.pem/.key)."""
    folder = tmp_path / "clients"
    issue(pki.ca, "t-main-01").write(folder / "t-main-01.pem", folder / "t-main-01.key")
    credentials = tmp_path / "credentials.json"
    credentials.write_text(
        json.dumps(
            {"target": f"127.0.0.1:{mtls_gateway.port}", "terminals": {"t-main-01": tls_env.credentials["t-main-01"]}}
        )
    )
    code, stdout, stderr = await node_demo(
        credentials, {"SUBSIDY_GATEWAY_CA": pki.ca_file, "SUBSIDY_CLIENT_CERTS": str(folder)}
    )
    assert code == 0, f"demo.js failed:\n{stdout}\n{stderr}"
    steps = {line["step"]: line for line in map(json.loads, stdout.splitlines())}
    assert steps["authorize"]["decision"] == "DECISION_APPROVED"
    assert steps["capture"]["state"] == "AUTHORIZATION_STATE_CAPTURED"
    # Without its certificate the handshake fails and the demo stops at the first call.
    code, stdout, stderr = await node_demo(credentials, {"SUBSIDY_GATEWAY_CA": pki.ca_file})
    assert code != 0 and "authorize" not in stdout


# --- subsidyctl -------------------------------------------------------------------------------


async def test_subsidyctl_calls_over_mutual_tls(
    tls_env: Environment, mtls_gateway: Application, pki: Pki, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from server.ctl import main as subsidyctl

    credentials = tmp_path / "credentials.json"
    credentials.write_text(
        json.dumps(
            {"target": f"127.0.0.1:{mtls_gateway.port}", "operators": {"op-auditor": tls_env.credentials["op-auditor"]}}
        )
    )
    certificate, key = pki.save("op-auditor", issue(pki.ca, "op-auditor"))
    arguments = ["--credentials", str(credentials), "--json", "campaign", "show", "c-main"]
    mutual = {"SUBSIDYCTL_TLS_CA": pki.ca_file, "SUBSIDYCTL_TLS_CERT": certificate, "SUBSIDYCTL_TLS_KEY": key}
    shown = await asyncio.to_thread(CliRunner().invoke, subsidyctl, arguments, env=mutual)
    assert shown.exit_code == 0, shown.output
    assert '"campaign_id": "c-main"' in shown.output
    server_only = {"SUBSIDYCTL_TLS_CA": pki.ca_file}
    refused = await asyncio.to_thread(CliRunner().invoke, subsidyctl, arguments, env=server_only)
    assert refused.exit_code != 0 and "UNAVAILABLE" in refused.output, refused.output


# --- SIGHUP -----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_sighup_to_the_server_makes_every_worker_reload(tls_env: Environment, pki: Pki) -> None:
    """python -m server with 2 workers: SIGHUP to the parent reaches both, and each re-reads
    its certificate files (and keeps serving)."""
    environ = {
        **os.environ,
        "SUBSIDY_LISTEN": "127.0.0.1:0",
        "SUBSIDY_WORKERS": "2",
        "SUBSIDY_REDIS_URL": tls_env.redis_url,
        "SUBSIDY_REDIS_PREFIX": tls_env.prefix,
        "SUBSIDY_PG_DSN": tls_env.pg_dsn,
        "SUBSIDY_TLS_CERT": str(pki.folder / "server.pem"),
        "SUBSIDY_TLS_KEY": str(pki.folder / "server.key"),
        "SUBSIDY_LOG_LEVEL": "INFO",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", cwd=ROOT, env=environ, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    lines: list[str] = []

    async def until(count: int, text: str) -> None:
        while sum(text in line for line in lines) < count:
            line = (await asyncio.wait_for(process.stderr.readline(), 60)).decode()
            assert line, "the server exited:\n" + "".join(lines)
            lines.append(line)

    try:
        await until(2, '"msg":"serving"')
        process.send_signal(signal.SIGHUP)
        await until(2, "tls certificate reloaded")
        assert process.returncode is None
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 60)
