"""What the gateway's command lines share: finding the services ``make run`` uses without any
exports, and one clear line with a distinct exit status when a dependency does not answer.

``make run`` records the PostgreSQL DSN (database ``subsidy_dev``) and the Redis URL it found or
started in ``.data/services.json``. Embedded servers have stable addresses (storage/devenv.py),
so the record stays right across restarts; a command run in any shell of the checkout reads it
for each of ``SUBSIDY_PG_DSN`` / ``SUBSIDY_REDIS_URL`` that is not set. A variable that is set
always wins; ``make run`` does not record what came from a variable (it may hold a password).

Exit statuses, the same in every command (README, "Quick start"):

- 0: done;
- 1: the command ran and found a problem (a chain break, a reconcile difference, a refused
  operator call, rejected catalog rows);
- 2: a usage or configuration error (and ``server.ledger rebuild`` refusing);
- 3: a dependency did not answer (PostgreSQL, Redis, or the gateway): one line on stderr, no
  traceback;
- 4: ``make run`` or ``make reset`` while ``make run`` already runs in this checkout.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path

import asyncpg
import orjson
from redis import exceptions as redis_errors

from storage.devenv import PG_ENV, REDIS_ENV, check_pg, check_redis, describe_error, mask_url

DATA_DIR = Path(".data")
SERVICES_FILE = "services.json"

EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_ALREADY_RUNNING = 4


class Unavailable(Exception):
    """A dependency did not answer; the message says which, where, and what to try."""


# --------------------------------------------------------------------------- the record


def record_services(data_dir: Path, values: Mapping[str, str]) -> Path:
    """Writes ``values`` (variable name -> value) as ``data_dir/services.json``, mode 0600,
    replacing the previous record whole."""
    path = data_dir / SERVICES_FILE
    partial = path.with_suffix(".tmp")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(orjson.dumps(dict(values), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    os.replace(partial, path)
    return path


def recorded_services(data_dir: Path = DATA_DIR) -> dict[str, str]:
    """What the last ``make run`` recorded; empty when nothing (readable) was recorded."""
    try:
        document = orjson.loads((data_dir / SERVICES_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    if not isinstance(document, dict):
        return {}
    return {name: value for name, value in document.items() if name in (PG_ENV, REDIS_ENV) and isinstance(value, str)}


def use_recorded_services(data_dir: Path = DATA_DIR, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Sets each unset (or empty) service variable from the record; returns those it set."""
    env = os.environ if environ is None else environ
    taken = {
        name: value for name, value in recorded_services(data_dir).items() if not env.get(name, "").strip() and value
    }
    env.update(taken)
    return taken


def missing_pg_dsn(prog: str, data_dir: Path = DATA_DIR) -> str:
    return (
        f"{prog}: {PG_ENV} is not set and no make run has recorded its services in"
        f" {data_dir / SERVICES_FILE}: run `make run` once, or set {PG_ENV}"
    )


# --------------------------------------------------------------------------- checks


def _where(variable: str, recorded: Mapping[str, str], data_dir: Path) -> str:
    if variable not in recorded:
        return f"${variable}"
    value = recorded[variable]
    embedded = value.startswith("unix://") or "host=/" in value
    hint = "; it is an embedded server of make run: is make run running?" if embedded else ""
    return f"recorded by make run in {data_dir / SERVICES_FILE}{hint}"


def require_services(
    *,
    pg_dsn: str | None,
    redis_url: str | None,
    recorded: Mapping[str, str] | None = None,
    data_dir: Path = DATA_DIR,
) -> None:
    """Raises :class:`Unavailable` unless each named service answers (``None``: not needed)."""
    recorded = recorded or {}
    if pg_dsn is not None and (error := check_pg(pg_dsn)) is not None:
        where = _where(PG_ENV, recorded, data_dir)
        raise Unavailable(f"PostgreSQL at {mask_url(pg_dsn)} does not answer ({error}); from {where}")
    if redis_url is not None and (error := check_redis(redis_url)) is not None:
        where = _where(REDIS_ENV, recorded, data_dir)
        raise Unavailable(f"Redis at {mask_url(redis_url)} does not answer ({error}); from {where}")


_PG_CONNECTION = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InterfaceError,
)


def dependency_failure(exception: BaseException) -> str | None:
    """One line for a failure that means a dependency did not answer (or went away mid-way);
    None for anything else, which is a bug and keeps its traceback."""
    if isinstance(exception, Unavailable):
        return str(exception)
    if isinstance(exception, redis_errors.ConnectionError | redis_errors.TimeoutError):
        return f"Redis did not answer: {describe_error(exception)}"
    if isinstance(exception, _PG_CONNECTION):
        return f"PostgreSQL did not answer: {describe_error(exception)}"
    # Not BrokenPipeError: that is mostly our own stdout closed (`... | head`), not a service.
    if isinstance(exception, ConnectionRefusedError | ConnectionResetError | socket.gaierror | TimeoutError):
        return f"a dependency did not answer: {describe_error(exception)}"
    return None


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Runs ``body``; a dependency failure becomes one line on stderr and exit status 3."""
    try:
        return body()
    except Exception as exception:
        message = dependency_failure(exception)
        if message is None:
            raise
        print(f"{prog}: {message}", file=sys.stderr)
        return EXIT_UNAVAILABLE
