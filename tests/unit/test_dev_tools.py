"""The newcomer's tools without any service (issue 10, items 9-11 and 14): where make run keeps
its keys, one make run at a time, stable embedded addresses, the record the commands read,
what subsidyctl and the demo say when the gateway does not answer, quiet `make check-protos`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from subsidy_client.errors import NotFound, SubsidyError, Unauthenticated

from server.commands.common import (
    EXIT_ALREADY_RUNNING,
    EXIT_UNAVAILABLE,
    dependency_failure,
    record_services,
    use_recorded_services,
)
from server.commands.dev import AlreadyRunning, KeysConflict, RunLock, ensure_dev_key, prepare_keys_dir
from server.ctl import main as subsidyctl
from server.ctl.common import Settings, failure
from storage.devenv import PG_ENV, REDIS_ENV, UNIX_SOCKET_PATH_MAX, redis_socket_path, redis_socket_url

ROOT = Path(__file__).resolve().parents[2]
# Something that refuses connections at once: privileged, nobody serves it.
NOTHING_THERE = "127.0.0.1:1"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a new shell of this checkout: no SUBSIDY_* exports."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("SUBSIDY_", "SUBSIDYCTL_"))}
    env["PYTHONPATH"] = str(ROOT)
    return {**env, **extra}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- item 9: keys


def test_dev_keys_live_outside_the_data_directory_and_old_ones_are_moved(tmp_path: Path) -> None:
    """make run keeps the programme key and the credentials in .keys/ (0700, files 0600), not in
    .data/ which a backup copies; a key an older make run left in .data/ moves over unchanged
    (so consumer keys stay the same), and .keys/ is ignored by git."""
    data, keys = tmp_path / ".data", tmp_path / ".keys"
    data.mkdir()
    (data / "programme.key").write_text("a" * 64)
    (data / "credentials.json").write_text('{"operators": {}}')
    (data / "programme.key").chmod(0o644)

    done = prepare_keys_dir(data, keys)

    assert len(done) == 2
    assert not (data / "programme.key").exists() and not (data / "credentials.json").exists()
    assert (keys / "programme.key").read_text() == "a" * 64
    assert mode(keys) == 0o700
    assert mode(keys / "programme.key") == mode(keys / "credentials.json") == 0o600
    assert ensure_dev_key(keys / "programme.key") == "a" * 64  # kept, not regenerated

    fresh = ensure_dev_key(keys / "other.key")
    assert len(fresh) == 64 and mode(keys / "other.key") == 0o600
    assert prepare_keys_dir(data, keys) == []  # nothing left to move

    ignored = subprocess.run(["git", "check-ignore", "-q", ".keys/programme.key"], cwd=ROOT, check=False)
    assert ignored.returncode == 0


def test_a_key_in_both_places_is_deduplicated_or_refused(tmp_path: Path) -> None:
    """The same key in both places: the copy in .data/ goes. Two different keys: nothing is
    guessed, make run refuses naming both files."""
    data, keys = tmp_path / ".data", tmp_path / ".keys"
    data.mkdir()
    keys.mkdir()
    (data / "programme.key").write_text("same")
    (keys / "programme.key").write_text("same")
    prepare_keys_dir(data, keys)
    assert not (data / "programme.key").exists()

    (data / "programme.key").write_text("old")
    with pytest.raises(KeysConflict, match="both exist and differ"):
        prepare_keys_dir(data, keys)
    assert (keys / "programme.key").read_text() == "same" and (data / "programme.key").read_text() == "old"


# --------------------------------------------------------------------------- item 11: one make run


def test_second_make_run_refuses_while_one_runs(tmp_path: Path) -> None:
    """While a make run holds .data/run.lock, a second make run (or make reset) says "already
    running, pid N" and exits 4 at once, before finding or starting any service or loading the
    demo data; once the first is gone the lock is free again."""
    (tmp_path / ".data").mkdir()
    first = RunLock(tmp_path / ".data" / "run.lock")
    first.acquire()
    try:
        with pytest.raises(AlreadyRunning) as refused:
            RunLock(tmp_path / ".data" / "run.lock").acquire()
        assert refused.value.pid == os.getpid()
        for argv in ([], ["--reset"]):
            second = subprocess.run(
                [sys.executable, "-m", "server.dev", *argv],
                cwd=tmp_path,
                env=clean_env(),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert second.returncode == EXIT_ALREADY_RUNNING, second.stderr
            assert f"already running in this checkout, pid {os.getpid()}" in second.stderr
            assert second.stderr.count("\n") == 1 and "stopped" not in second.stderr
            assert not (tmp_path / ".data" / "pg").exists() and not (tmp_path / ".data" / "redis").exists()
    finally:
        first.release()
    again = RunLock(tmp_path / ".data" / "run.lock")
    again.acquire()
    again.release()


# --------------------------------------------------------------------------- item 10: addresses


def test_embedded_redis_listens_on_a_stable_socket_under_the_data_dir(tmp_path: Path) -> None:
    """The embedded Redis address is a function of the data directory alone (no random port),
    so what one run recorded is right for the next; a path too long for a socket falls back."""
    path = redis_socket_path(tmp_path / "redis")
    assert path == (tmp_path / "redis" / "redis.sock").resolve()
    assert redis_socket_url(path) == f"unix://{path}?db=0"
    assert redis_socket_path(tmp_path / "redis") == path
    deep = tmp_path / ("d" * (UNIX_SOCKET_PATH_MAX - len(str(tmp_path))))
    assert redis_socket_path(deep) is None


def test_commands_read_the_services_make_run_recorded(tmp_path: Path) -> None:
    """A command fills each unset variable from .data/services.json; a set one wins."""
    record = {PG_ENV: "postgresql://postgres@/subsidy_dev?host=/x/.data/pg&port=5432", REDIS_ENV: "unix:///x/r.sock"}
    path = record_services(tmp_path, record)
    assert mode(path) == 0o600
    env = {REDIS_ENV: "redis://elsewhere:6379/0"}
    assert use_recorded_services(tmp_path, env) == {PG_ENV: record[PG_ENV]}
    assert env == {PG_ENV: record[PG_ENV], REDIS_ENV: "redis://elsewhere:6379/0"}
    assert use_recorded_services(tmp_path / "nothing", {}) == {}


def test_connection_failures_are_dependency_failures_and_bugs_are_not() -> None:
    assert dependency_failure(ConnectionRefusedError(111, "Connect call failed")) is not None
    assert dependency_failure(TimeoutError()) is not None
    assert dependency_failure(ValueError("a bug")) is None
    assert dependency_failure(FileNotFoundError("examples/none.yaml")) is None
    assert dependency_failure(BrokenPipeError()) is None  # our stdout closed (`| head`), not a service


def test_make_run_with_a_bad_pg_dsn_is_one_line_and_exit_3(tmp_path: Path) -> None:
    """A SUBSIDY_PG_DSN that does not answer: one line naming the variable (password masked),
    exit status 3, no traceback; make reset the same."""
    for argv in ([], ["--reset"]):
        result = subprocess.run(
            [sys.executable, "-m", "server.dev", *argv],
            cwd=tmp_path,
            env=clean_env(SUBSIDY_PG_DSN=f"postgresql://bob:secret@{NOTHING_THERE}/postgres"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == EXIT_UNAVAILABLE, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert "$SUBSIDY_PG_DSN" in result.stderr and "does not answer" in result.stderr
        assert "secret" not in result.stderr


# --------------------------------------------------------------------------- the demo and subsidyctl


def test_make_demo_without_a_gateway_is_one_line_and_exit_3(tmp_path: Path) -> None:
    """make demo with no server: one line saying the gateway does not answer, exit 3; without
    a credentials file: one line saying make run writes it, exit 2."""
    credentials = tmp_path / "credentials.json"
    credentials.write_text(
        json.dumps({"target": NOTHING_THERE, "terminals": {"t-1": "s" * 43}, "partners": {"app-1": "s" * 43}})
    )
    demo = [sys.executable, "-m", "subsidy_client.demo"]
    result = subprocess.run(
        [*demo, "--credentials", str(credentials)], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == EXIT_UNAVAILABLE, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"the gateway at {NOTHING_THERE} does not answer" in result.stderr

    missing = subprocess.run(demo, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "make run" in missing.stderr and ".keys/credentials.json" in missing.stderr


def test_subsidyctl_without_a_gateway_is_one_line_and_exit_3(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials.json"
    credentials.write_text(json.dumps({"target": NOTHING_THERE, "operators": {"op-1": "s" * 43}}))
    result = CliRunner().invoke(subsidyctl, ["--credentials", str(credentials), "campaign", "show", "c-1"])
    assert result.exit_code == EXIT_UNAVAILABLE, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert f"UNAVAILABLE: the gateway at {NOTHING_THERE} does not answer" in result.output


def test_cli_errors_name_the_code_once_and_speak_to_an_operator() -> None:
    """No more "NOT_FOUND NOT_FOUND: no campaign c-1 id=c-1 kind=campaign"; the reason is shown
    when it says more than the code; a refused credential is the operator's, not a terminal's."""
    settings = Settings(target="gw:50051", operator_id="op-1", secret="s", json_output=False)
    not_found = NotFound(grpc.StatusCode.NOT_FOUND, "NOT_FOUND", "no campaign c-1", {"kind": "campaign", "id": "c-1"})
    assert failure(settings, not_found).message == "NOT_FOUND: no campaign c-1"

    outside = SubsidyError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "STORE_OUTSIDE_REGION",
        "store.location: outside the region of every campaign",
        {"field": "store.location", "campaigns_with_region": "3"},
    )
    assert failure(settings, outside).message == (
        "FAILED_PRECONDITION (STORE_OUTSIDE_REGION): store.location: outside the region of every campaign"
        " [campaigns_with_region=3]"
    )

    refused = Unauthenticated(
        grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "unknown terminal or bad signature", {}
    )
    message = failure(settings, refused).message
    assert "terminal" not in message and "operator op-1" in message and message.count("UNAUTHENTICATED") == 1


# --------------------------------------------------------------------------- item 14: check-protos


def test_check_protos_prints_no_mypy_progress_lines() -> None:
    """`make check-protos` used to print 18 "Writing mypy to ..." lines; now only its verdict."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Writing mypy" not in result.stdout + result.stderr
    assert result.stdout.strip() in ("generated code is fresh",) or result.stdout.startswith("generated code is stale")
    assert result.stderr == ""
