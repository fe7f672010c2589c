"""The README's commands in a new shell (issue 10, item 10): no exports, the services found
through what make run recorded in .data/services.json, and a dependency that does not answer
reported in one line with exit status 3, never a traceback; as subsidyctl commands, and as the
``python -m server.ledger|reference|exchange`` aliases that make, compose and CI call.

Each test runs the commands as a newcomer would, in a subprocess whose working directory holds
the record, against this run's own database and key prefix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.commands.common import EXIT_UNAVAILABLE, EXIT_USAGE, record_services
from storage.devenv import PG_ENV, REDIS_ENV, Services
from tests.conftest import ROOT, Environment, isolated_environment

DEAD_PG = "postgresql://postgres@127.0.0.1:1/postgres"
DEAD_REDIS = "redis://127.0.0.1:1/0"


@pytest.fixture(scope="module")
async def env(services: Services) -> AsyncIterator[Environment]:
    async with isolated_environment(services) as environment:
        yield environment


def command(cwd: Path, *arguments: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """``python -m ARGUMENTS`` in a new shell of a checkout at ``cwd``: no SUBSIDY_* exports
    except ``variables``."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith("SUBSIDY_")}
    environ["PYTHONPATH"] = str(ROOT)
    module, *rest = arguments
    # subsidyctl is a console script; run the same entry point with this interpreter.
    argv = ["-c", "from server.ctl import main; main()", *rest] if module == "server.ctl" else ["-m", *arguments]
    return subprocess.run(
        [sys.executable, *argv],
        cwd=cwd,
        env={**environ, **variables},
        capture_output=True,
        text=True,
        timeout=120,
    )


def subsidyctl(cwd: Path, *arguments: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """``subsidyctl ARGUMENTS`` in a new shell of a checkout at ``cwd``, like ``command``."""
    return command(cwd, "server.ctl", *arguments, **variables)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_ledger_and_reference_commands_find_make_run_services_without_exports(env: Environment, tmp_path: Path) -> None:
    """What make run recorded is enough: verify, reconcile, lag and publish run in a shell that
    exported nothing (they used to stop at "SUBSIDY_PG_DSN must be set", or use a stale port)."""
    (tmp_path / ".data").mkdir()
    record_services(tmp_path / ".data", {PG_ENV: env.pg_dsn, REDIS_ENV: env.redis_url})
    prefix = {"SUBSIDY_REDIS_PREFIX": env.prefix}
    for action in ("verify", "reconcile", "lag"):
        result = command(tmp_path, "server.ledger", action, **prefix)
        assert result.returncode == 0, result.stderr
        json.loads(result.stdout)
    published = command(tmp_path, "server.reference", "publish", **prefix)
    assert published.returncode == 0, published.stderr
    assert "published reference version" in published.stderr

    nothing = command(tmp_path / ".data", "server.ledger", "verify")  # no record here
    assert nothing.returncode == EXIT_USAGE
    assert "make run" in one_line(nothing)


def test_subsidyctl_runs_the_ledger_reference_and_exchange_tasks_without_exports(
    env: Environment, tmp_path: Path
) -> None:
    """The README's commands are subsidyctl's: tables by default, JSON with --json (before or
    after the command), the same services found, the same one-line failures."""
    (tmp_path / ".data").mkdir()
    record_services(tmp_path / ".data", {PG_ENV: env.pg_dsn, REDIS_ENV: env.redis_url})
    prefix = {"SUBSIDY_REDIS_PREFIX": env.prefix}
    verify = subsidyctl(tmp_path, "ledger", "verify", **prefix)
    assert verify.returncode == 0, verify.stderr
    assert "entries_checked" in verify.stdout and not verify.stdout.lstrip().startswith("{")
    reconcile = subsidyctl(tmp_path, "--json", "ledger", "reconcile", **prefix)
    assert reconcile.returncode == 0, reconcile.stderr
    assert json.loads(reconcile.stdout)["differences"] == []
    lag = subsidyctl(tmp_path, "ledger", "lag", "--json", **prefix)
    assert lag.returncode == 0, lag.stderr
    assert json.loads(lag.stdout)["backlog"] == 0
    published = subsidyctl(tmp_path, "--json", "reference", "publish", **prefix)
    assert published.returncode == 0, published.stderr
    assert json.loads(published.stdout)["reference_version"] >= 1

    nothing = subsidyctl(tmp_path / ".data", "ledger", "verify")  # no record here
    assert nothing.returncode == EXIT_USAGE
    assert "make run" in one_line(nothing)
    down = subsidyctl(tmp_path, "exchange", "reapply", **{PG_ENV: DEAD_PG, REDIS_ENV: env.redis_url, **prefix})
    assert down.returncode == EXIT_UNAVAILABLE
    assert "PostgreSQL at postgresql://postgres@127.0.0.1:1/postgres does not answer" in one_line(down)


def test_a_recorded_embedded_server_that_is_gone_is_one_line(env: Environment, tmp_path: Path) -> None:
    """make run stopped, its embedded servers with it: the command says so in one line."""
    (tmp_path / ".data").mkdir()
    socket = tmp_path / ".data" / "redis" / "redis.sock"
    record_services(tmp_path / ".data", {PG_ENV: env.pg_dsn, REDIS_ENV: f"unix://{socket}?db=0"})
    result = command(tmp_path, "server.ledger", "reconcile")
    assert result.returncode == EXIT_UNAVAILABLE
    line = one_line(result)
    assert "Redis at unix://" in line and "is make run running?" in line


def test_ledger_lag_answers_and_verify_is_one_line_when_postgres_is_down(env: Environment, tmp_path: Path) -> None:
    """lag needs only Redis, so it answers while PostgreSQL is down (it used to die with a
    traceback); verify, reconcile, rebuild, the writer and the reference commands say in one
    line that PostgreSQL does not answer, exit status 3."""
    variables = {PG_ENV: DEAD_PG, REDIS_ENV: env.redis_url, "SUBSIDY_REDIS_PREFIX": env.prefix}
    lag = command(tmp_path, "server.ledger", "lag", **variables)
    assert lag.returncode == 0, lag.stderr
    assert "stream_length" in json.loads(lag.stdout)
    for arguments in (("server.ledger", "verify"), ("server.ledger", "writer"), ("server.reference", "publish")):
        result = command(tmp_path, *arguments, **variables)
        assert result.returncode == EXIT_UNAVAILABLE, (arguments, result.stderr)
        assert "PostgreSQL at postgresql://postgres@127.0.0.1:1/postgres does not answer" in one_line(result)

    no_redis = command(tmp_path, "server.ledger", "lag", **{**variables, REDIS_ENV: DEAD_REDIS})
    assert no_redis.returncode == EXIT_UNAVAILABLE
    assert "Redis at redis://127.0.0.1:1/0 does not answer" in one_line(no_redis)
    exchange = command(tmp_path, "server.exchange", "reapply", **variables)
    assert exchange.returncode == EXIT_UNAVAILABLE
    one_line(exchange)
