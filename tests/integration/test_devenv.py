"""storage.devenv against real servers: the machine's own, and embedded ones it starts.

The machine's PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) are only read from, never
stopped. The embedded path is forced by probing addresses where nothing listens.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis

from storage.devenv import PG_ENV, REDIS_ENV, DevServices, Services

REPO_ROOT = Path(__file__).resolve().parents[2]
MACHINE_PG = ("127.0.0.1", 5432)
MACHINE_REDIS = ("127.0.0.1", 6379)
NOTHING_THERE = ("127.0.0.1", 1)  # privileged port nobody serves: forces the embedded path


def _listening(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=0.5):
            return True
    except OSError:
        return False


def _pg_fetch(dsn: str, sql: str) -> object:
    async def run() -> object:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


def _alive(pid: int) -> bool:
    """Running and not a zombie (PID 1 here may reap late)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] != "Z"


def _machine_services_answer() -> None:
    assert _pg_fetch("postgresql://postgres@127.0.0.1:5432/postgres", "SELECT 1") == 1
    client = _redis("redis://127.0.0.1:6379/0")
    try:
        assert client.ping()
    finally:
        client.close()


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PG_ENV, raising=False)
    monkeypatch.delenv(REDIS_ENV, raising=False)


@pytest.fixture
def machine_services() -> None:
    if not (_listening(MACHINE_PG) and _listening(MACHINE_REDIS)):
        pytest.skip("needs the machine's PostgreSQL on 5432 and Redis on 6379")


@pytest.fixture
def embedded(tmp_path: Path, no_env: None) -> Iterator[DevServices]:
    assert not _listening(NOTHING_THERE)
    devenv = DevServices(tmp_path / "data", pg_probe=NOTHING_THERE, redis_probe=NOTHING_THERE)
    try:
        yield devenv
    finally:
        devenv.stop()


@pytest.mark.usefixtures("no_env", "machine_services")
def test_found_running_returns_default_dsns_that_answer(tmp_path: Path) -> None:
    """With services at the default probes, they are used as is: no embedded server, no files."""
    devenv = DevServices(tmp_path / "data")
    with devenv as services:
        assert services == Services(
            pg_dsn="postgresql://postgres@127.0.0.1:5432/postgres",
            redis_url="redis://127.0.0.1:6379/0",
            pg_embedded=False,
            redis_embedded=False,
        )
        assert _pg_fetch(services.pg_dsn, "SELECT 1") == 1
        client = _redis(services.redis_url)
        try:
            assert client.ping()
        finally:
            client.close()
    assert not (tmp_path / "data").exists()
    _machine_services_answer()  # stop() left the machine's own servers alone


def test_embedded_servers_answer_and_stop_leaves_nothing_running(embedded: DevServices, tmp_path: Path) -> None:
    """Nothing at the probes: real embedded servers start, answer queries, and stop() ends them."""
    services = embedded.start()
    assert services.pg_embedded and services.redis_embedded
    assert embedded.start() is services  # idempotent while started

    version = _pg_fetch(services.pg_dsn, "SELECT version()")
    assert isinstance(version, str) and version.startswith("PostgreSQL ")
    client = _redis(services.redis_url)
    try:
        client.set("devenv:probe", "ok")
        assert client.get("devenv:probe") == b"ok"
        redis_pid = int(client.info("server")["process_id"])
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
    finally:
        client.close()
    pgdata = Path(str(_pg_fetch(services.pg_dsn, "SHOW data_directory")))
    assert pgdata == (tmp_path / "data" / "pg").resolve()
    postmaster = pgdata / "postmaster.pid"
    pg_pid = int(postmaster.read_text().split()[0])
    redis_socket = tmp_path / "data" / "redis" / "redis.sock"
    assert services.redis_url == f"unix://{redis_socket.resolve()}?db=0"

    embedded.stop()
    embedded.stop()  # idempotent

    assert not _alive(redis_pid)
    assert not redis_socket.exists()
    assert not _alive(pg_pid)
    assert not postmaster.exists()


def test_embedded_addresses_are_stable_across_restarts(embedded: DevServices, tmp_path: Path) -> None:
    """Issue 10, item 10: the embedded servers answer at the same addresses after a restart (a
    unix socket under the data directory each, no TCP port), so what a run recorded, or a
    newcomer exported, does not go stale."""
    first = embedded.start()
    embedded.stop()
    second = embedded.start()
    assert (second.pg_dsn, second.redis_url) == (first.pg_dsn, first.redis_url)
    data = str((tmp_path / "data").resolve())
    assert second.redis_url.startswith(f"unix://{data}/redis/") and f"host={data}/pg" in second.pg_dsn
    client = _redis(second.redis_url)
    try:
        assert client.ping()
        assert client.config_get("port") == {"port": "0"}  # no TCP listener to collide with
    finally:
        client.close()


def test_embedded_data_survives_restart(embedded: DevServices) -> None:
    """A restart on the same data_dir keeps PostgreSQL rows and Redis keys (AOF)."""
    services = embedded.start()
    _pg_fetch(services.pg_dsn, "CREATE TABLE kept AS SELECT 42 AS answer")
    client = _redis(services.redis_url)
    client.set("devenv:kept", "yes")
    client.close()
    embedded.stop()

    services = embedded.start()
    assert _pg_fetch(services.pg_dsn, "SELECT answer FROM kept") == 42
    client = _redis(services.redis_url)
    try:
        assert client.get("devenv:kept") == b"yes"
    finally:
        client.close()


def test_second_user_of_a_data_dir_fails_clearly_and_keeps_the_first(embedded: DevServices, tmp_path: Path) -> None:
    """A second DevServices on a busy data_dir is refused on Redis; its cleanup spares the first."""
    first = embedded.start()
    second = DevServices(tmp_path / "data", pg_probe=NOTHING_THERE, redis_probe=NOTHING_THERE)
    with pytest.raises(RuntimeError, match="in use by another embedded redis-server"):
        second.start()
    assert _pg_fetch(first.pg_dsn, "SELECT 1") == 1  # shared PostgreSQL not stopped by second
    client = _redis(first.redis_url)
    try:
        assert client.ping()
    finally:
        client.close()


@pytest.mark.usefixtures("machine_services")
def test_env_vars_are_used_as_is_and_dead_targets_fail_masked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Set variables win over probes; a dead target raises naming the variable, password masked."""
    pg_dsn = "postgresql://postgres@127.0.0.1:5432/postgres?application_name=devenv"
    monkeypatch.setenv(PG_ENV, pg_dsn)
    monkeypatch.setenv(REDIS_ENV, "redis://127.0.0.1:6379/1")
    devenv = DevServices(tmp_path, pg_probe=NOTHING_THERE, redis_probe=NOTHING_THERE)
    with devenv as services:
        assert services == Services(pg_dsn, "redis://127.0.0.1:6379/1", False, False)

    monkeypatch.setenv(PG_ENV, "postgresql://bob:topsecret@127.0.0.1:1/db")
    with pytest.raises(RuntimeError, match=PG_ENV) as pg_failure:
        DevServices(tmp_path).start()
    assert "topsecret" not in str(pg_failure.value) and "bob:***@" in str(pg_failure.value)

    monkeypatch.setenv(PG_ENV, pg_dsn)
    monkeypatch.setenv(REDIS_ENV, "redis://:topsecret@127.0.0.1:1/0")
    with pytest.raises(RuntimeError, match=REDIS_ENV) as redis_failure:
        DevServices(tmp_path).start()
    assert "topsecret" not in str(redis_failure.value)


@pytest.mark.usefixtures("machine_services")
def test_cli_prints_variables_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    """`python -m storage.devenv` prints both variables, then blocks until SIGTERM and exits 0."""
    env = {k: v for k, v in os.environ.items() if k not in (PG_ENV, REDIS_ENV)}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "storage.devenv"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip(), proc.stdout.readline().strip()]
        assert lines == [
            f"{PG_ENV}=postgresql://postgres@127.0.0.1:5432/postgres",
            f"{REDIS_ENV}=redis://127.0.0.1:6379/0",
        ]
        assert proc.poll() is None  # blocks until told to stop
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=5)
