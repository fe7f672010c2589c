"""The lean Redis path: the money path's EVALSHA calls over one pipelined connection per process.

Why: through redis-py an EVALSHA of Authorize's 35 arguments cost ~86 us of gateway CPU in a
micro-benchmark (``pack_command``, the connection pool, ``getpid`` checks, one socket write and
read per call); this path cost ~22 us for the same call (issue 15). ``Scripts`` uses it for
every script call when ``SUBSIDY_REDIS_CLIENT=lean`` (the default); everything else (reference
data, the ledger writer, migrations, SCRIPT LOAD at start) stays on redis-py.

How it works, and why each part is safe:

- One connection (an ``asyncio.Protocol``) per process. Redis answers the commands of one
  connection in the order it received them, so replies are matched to the waiting calls
  first-in, first-out; ``hiredis.Reader`` parses them, including a reply split across packets
  and several replies in one packet.
- A command is bytes built once per call: the caller passes the pre-encoded constant part
  (``EVALSHA <sha>``, see ``command_prefix``) and the arguments. The commands of one event-loop
  tick go out in one ``transport.write`` (pipelining: one syscall for many calls).
- At most ``max_in_flight`` calls are in flight per process; more wait for a slot for at most
  the timeout and then fail with ``redis.exceptions.ConnectionError`` (what redis-py's blocking
  pool raises when it has no free connection: UNAVAILABLE / DEPENDENCY_UNAVAILABLE).
- A call not answered within the timeout fails with ``redis.exceptions.TimeoutError`` and the
  connection is dropped, failing the calls behind it the same way. The FIFO itself stays in
  step (a timed-out call keeps its place until its reply arrives), but the calls queued behind
  a reply that is late by the whole timeout would wait for it too, each holding an in-flight
  slot, against a Redis that is stuck or gone; a fresh connection fails fast if Redis is gone
  and starts clean if it comes back.
- A lost connection (Redis restart, CLIENT KILL, a network error) fails its calls in flight
  with ``ConnectionError``; ``call`` then retries the command once on a fresh connection, as the
  redis-py pool does (``Retry(NoBackoff(), 1)`` on ``ConnectionError``). Every script is
  idempotent by request id, so a retry of a call that did run answers as a replay, never acts
  twice. Timeouts are not retried (neither are they by redis-py).
- AUTH (password, optional user name), SELECT (the URL's db) and CLIENT SETNAME are sent first
  on every connection. TLS (``rediss://``) and URL options other than these are not supported:
  ``from_url`` returns None and the caller stays on redis-py.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio.connection import UnixDomainSocketConnection, parse_url

# The URL options the lean path honours; any other (TLS, socket options) keeps redis-py.
SUPPORTED_URL_OPTIONS = frozenset({"host", "port", "db", "username", "password", "path", "connection_class"})


def bulk(value: Any) -> bytes:
    """One RESP bulk string, encoded as redis-py encodes command arguments (str as UTF-8, int
    and float in decimal; bool and None refused rather than guessed)."""
    kind = type(value)
    if kind is str:
        data = value.encode()
    elif kind is int:
        data = b"%d" % value
    elif kind is bytes:
        data = value
    elif kind is float:
        data = repr(value).encode()
    else:
        raise redis_errors.DataError(f"invalid Redis argument of type {kind.__name__}")
    return b"$%d\r\n%b\r\n" % (len(data), data)


def command_prefix(*parts: Any) -> bytes:
    """The pre-encoded constant start of a command (e.g. ``EVALSHA <sha>``), for ``encode``."""
    return b"".join(bulk(part) for part in parts)


def encode(prefix: bytes, prefix_count: int, arguments: Sequence[Any]) -> bytes:
    """A whole command: the pre-encoded prefix of ``prefix_count`` parts, then the arguments.

    The common command (an Authorize's ~40 arguments, all ASCII text or int) is built as one
    str and encoded once: 11-13 us against 14-15 us for a bytes part per argument (timeit here).
    Anything else (non-ASCII text, whose byte length differs from its length; bytes; float; a
    type to refuse) takes the part-per-argument path."""
    texts: list[str] = []
    append = texts.append
    for value in arguments:
        kind = type(value)
        if kind is str and value.isascii():
            append(f"${len(value)}\r\n{value}\r\n")
        elif kind is int:
            digits = str(value)
            append(f"${len(digits)}\r\n{digits}\r\n")
        else:
            return _encode_parts(prefix, prefix_count, arguments)
    return b"*%d\r\n%b%b" % (prefix_count + len(texts), prefix, "".join(texts).encode())


def _encode_parts(prefix: bytes, prefix_count: int, arguments: Sequence[Any]) -> bytes:
    parts = [b"", prefix]
    append = parts.append
    for value in arguments:
        kind = type(value)
        if kind is str:
            data = value.encode()
        elif kind is int:
            data = b"%d" % value
        else:
            append(bulk(value))
            continue
        append(b"$%d\r\n%b\r\n" % (len(data), data))
    parts[0] = b"*%d\r\n" % (prefix_count + len(parts) - 2)
    return b"".join(parts)


def reply_error(reply: hiredis.ReplyError) -> redis_errors.RedisError:
    """An error reply as the redis-py exception its parser raises for it."""
    message = str(reply)
    if message.startswith("NOSCRIPT "):
        return redis_errors.NoScriptError(message[9:])
    if message.startswith("LOADING "):  # Redis restarted and is still loading its data
        return redis_errors.BusyLoadingError(message[8:])
    return redis_errors.ResponseError(message)


class Connection(asyncio.Protocol):
    """One Redis connection: pipelined writes, FIFO replies, one deadline timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self._loop = loop
        self._timeout_s = timeout_s
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader()
        # The calls sent and not yet answered, oldest first, each with its deadline.
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._outgoing: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        # Why the connection is unusable (None while it is usable).
        self.broken: redis_errors.RedisError | None = None
        self.writes = 0  # transport.write calls (the tests check that a tick's commands share one)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    @property
    def local_address(self) -> str:
        """This end's "host:port", as Redis's CLIENT LIST and MONITOR name the client ("" before
        the connection is made or on a Unix socket)."""
        if self._transport is None:
            return ""
        sockname = self._transport.get_extra_info("sockname")
        return f"{sockname[0]}:{sockname[1]}" if isinstance(sockname, tuple) else ""

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """Queue one encoded command; the future gets its reply (an error reply as a
        ``hiredis.ReplyError`` value), or the exception that broke the connection."""
        if self.broken is not None:
            raise type(self.broken)(*self.broken.args)
        loop = self._loop
        future = loop.create_future()
        if not self._outgoing:
            loop.call_soon(self._flush)
        self._outgoing.append(command)
        deadline = loop.time() + self._timeout_s
        self._waiting.append((future, deadline))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._check_deadline)
        return future

    def _flush(self) -> None:
        if not self._outgoing or self._transport is None:
            return
        outgoing, self._outgoing = self._outgoing, []
        self.writes += 1
        self._transport.write(outgoing[0] if len(outgoing) == 1 else b"".join(outgoing))

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                future, _ = self._waiting.popleft()
                if not future.done():  # a caller cancelled its call: its reply is dropped
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as error:  # garbage, or a reply nobody asked for
            self.abort(redis_errors.ConnectionError(f"Redis connection out of step: {error}"))

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        deadline = self._waiting[0][1]
        if deadline <= self._loop.time():
            self.abort(redis_errors.TimeoutError(f"Redis did not answer within {self._timeout_s} s"))
        else:
            self._timer = self._loop.call_at(deadline, self._check_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self.abort(redis_errors.ConnectionError("the Redis connection was closed"))

    def abort(self, error: redis_errors.RedisError) -> None:
        """Makes the connection unusable and fails every call in flight on it with ``error``."""
        if self.broken is None:
            self.broken = error
        waiting, self._waiting = self._waiting, deque()
        self._outgoing = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for future, _ in waiting:
            if not future.done():
                future.set_exception(type(error)(*error.args))
        if self._transport is not None:
            self._transport.abort()


class LeanRedis:
    """The process's lean Redis client: ``call`` sends one encoded command, pipelined."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str = "",
        db: int = 0,
        username: str = "",
        password: str = "",
        client_name: str = "",
        timeout_s: float = 2.0,
        max_in_flight: int = 64,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._address = (host, port, path)
        self._timeout_s = timeout_s
        self._max_in_flight = max_in_flight
        self._setup: list[bytes] = []
        if password:
            auth = ("AUTH", username, password) if username else ("AUTH", password)
            self._setup.append(encode(b"", 0, auth))
        if db:
            self._setup.append(encode(b"", 0, ("SELECT", db)))
        if client_name:
            self._setup.append(encode(b"", 0, ("CLIENT", "SETNAME", client_name)))
        self._connection: Connection | None = None
        self._connect_lock = asyncio.Lock()
        self._in_flight = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self.connections = 0  # connections opened (the tests check reconnects)

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> LeanRedis | None:
        """A client for a redis:// or unix:// URL, or None when the URL needs what the lean path
        does not do (TLS, socket options): the caller then keeps redis-py."""
        options = parse_url(url)
        connection_class = options.get("connection_class")
        if set(options) - SUPPORTED_URL_OPTIONS or connection_class not in (None, UnixDomainSocketConnection):
            return None
        return cls(
            host=options.get("host") or "127.0.0.1",
            port=int(options.get("port") or 6379),
            path=options.get("path") or "",
            db=int(options.get("db") or 0),
            username=options.get("username") or "",
            password=options.get("password") or "",
            **settings,
        )

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def connection(self) -> Connection | None:
        return self._connection

    async def call(self, command: bytes) -> Any:
        """One command's reply (an error reply is returned as a ``hiredis.ReplyError``).
        Raises redis-py's ``ConnectionError`` (no slot within the timeout, Redis unreachable)
        or ``TimeoutError`` (no answer within the timeout)."""
        if self._in_flight < self._max_in_flight and not self._slot_waiters and not self._closed:
            self._in_flight += 1  # _acquire's common case inline: no coroutine per call
        else:
            await self._acquire()
        try:
            connection = self._connection
            if connection is None or connection.broken is not None:
                connection = await self._connect()
            try:
                return await connection.send(command)
            except redis_errors.ConnectionError:
                # Lost with the call in flight (a Redis restart, CLIENT KILL): once more on a
                # fresh connection; the scripts are idempotent by request id.
                connection = await self._connect()
                return await connection.send(command)
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self._closed:
            raise redis_errors.ConnectionError("the lean Redis client is closed")
        if self._in_flight < self._max_in_flight and not self._slot_waiters:
            self._in_flight += 1
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._slot_waiters.append(waiter)
        timer = loop.call_later(self._timeout_s, self._expire_waiter, waiter)
        try:
            await waiter  # a released slot passes straight to this waiter (_release)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release()  # the slot arrived as the caller was cancelled: pass it on
            raise
        finally:
            timer.cancel()

    def _expire_waiter(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(
                redis_errors.ConnectionError(f"{self._max_in_flight} Redis calls in flight; no slot freed in time")
            )

    def _release(self) -> None:
        waiters = self._slot_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to it: the count stays
                return
        self._in_flight -= 1

    async def _connect(self) -> Connection:
        async with self._connect_lock:
            connection = self._connection
            if connection is not None and connection.broken is None:
                return connection  # another call reconnected meanwhile
            if self._closed:
                raise redis_errors.ConnectionError("the lean Redis client is closed")
            self._connection = connection = await self._open()
            return connection

    async def _open(self) -> Connection:
        loop = asyncio.get_running_loop()
        connection = Connection(loop, self._timeout_s)
        host, port, path = self._address
        try:
            async with asyncio.timeout(self._timeout_s):
                if path:
                    await loop.create_unix_connection(lambda: connection, path)
                else:
                    await loop.create_connection(lambda: connection, host, port)
        except TimeoutError:
            connection.abort(redis_errors.TimeoutError("timeout connecting to Redis"))
            raise redis_errors.TimeoutError("timeout connecting to Redis") from None
        except OSError as error:
            raise redis_errors.ConnectionError(f"cannot connect to Redis: {error.strerror or error}") from None
        self.connections += 1
        if self._setup:
            # AUTH, SELECT, SETNAME pipelined; each must answer OK before any script runs here.
            replies = await asyncio.gather(*(connection.send(command) for command in self._setup))
            for reply in replies:
                if isinstance(reply, hiredis.ReplyError):
                    connection.abort(redis_errors.ConnectionError("Redis refused the connection set-up"))
                    # The reply may name the command, never the password.
                    raise redis_errors.ConnectionError(f"Redis refused the connection set-up: {reply}")
        return connection

    async def aclose(self) -> None:
        """Closes the connection; calls still in flight fail with ConnectionError."""
        self._closed = True
        async with self._connect_lock:
            if self._connection is not None:
                self._connection.abort(redis_errors.ConnectionError("the lean Redis client is closed"))
                self._connection = None
