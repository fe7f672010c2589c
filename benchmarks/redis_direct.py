"""The authorize script driven directly: what one Redis core serves, without the gateway.

Every command is the EVALSHA the gateway would send for an approvable one-line Authorize: the
bench's reference data (one campaign with a huge budget, one product, the bench merchant's
terminals), a fresh request id, nonce, authorization id and 64-hex consumer key per call, and
the KEYS and ARGV built by the project's own code (``storage.redis.store.RedisStore.authorize``
through ``storage.redis.scripts.Scripts`` and the contract in ``storage/redis/contract.py``),
captured instead of sent, then encoded once as RESP. The script is loaded with
``Scripts.preload`` (the gateway's loader, so the SHA is the gateway's).

Several processes (``connections``) each hold one TCP connection and keep ``depth`` EVALSHAs in
flight (pipelined: a reply frees a slot, the next command goes out in the same write as the
others freed by that read). The commands are built before the clock starts, so the client
processes spend their CPU on writes and reads only. A round reports the calls answered inside
its window, the redis-server process's CPU over the same window (/proc), so **Authorize/s per
Redis core** = calls ÷ Redis CPU-seconds, and ``INFO commandstats``' ``usec_per_call`` of
EVALSHA (after ``CONFIG RESETSTAT`` at the window's start), which is the time inside the script
alone (not the AOF write and fsync of ``appendfsync always``, which the CPU figure includes).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import secrets
import socket
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from redis.asyncio import Redis

from server.config import Config
from server.services.common import payload_hash
from storage.redis.keys import Keys
from storage.redis.scripts import Scripts
from storage.redis.store import AuthorizeInput, LineInput, RedisStore, StoreLimits

READY_TIMEOUT_S = 120.0
RESULT_GRACE_S = 30.0
# Commands built per connection: enough for this many calls a second over the whole phase
# (Redis serves far fewer here; a connection that runs out stops and says so).
BUILD_CEILING_PER_S = 40_000
CHANNEL_POS = 1  # authorization_pb2.CHANNEL_POS


class _Captured(Exception):
    def __init__(self, arguments: tuple[Any, ...]) -> None:
        super().__init__("captured")
        self.arguments = arguments


class _CapturingRedis(Redis):
    """A client that never sends an EVALSHA: it hands the arguments back instead."""

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        raise _Captured(("EVALSHA", sha, numkeys, *keys_and_args))


def encode_command(arguments: tuple[Any, ...]) -> bytes:
    """RESP: an array of bulk strings (str as UTF-8, int in decimal)."""
    parts = [b"*%d\r\n" % len(arguments)]
    for argument in arguments:
        data = argument if isinstance(argument, bytes) else str(argument).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _store(prefix: str, hold_ttl_s: int) -> RedisStore:
    config_fields = Config.__dataclass_fields__
    skew = config_fields["auth_clock_skew_s"].default
    idempotency = config_fields["idempotency_ttl_s"].default
    assert isinstance(skew, int) and isinstance(idempotency, int)
    capturing = _CapturingRedis()
    return RedisStore(
        capturing,
        Keys(prefix),
        Scripts(capturing),
        # As server/processes/app.py builds them from the configuration's defaults.
        StoreLimits(hold_ttl_s=hold_ttl_s, idempotency_ttl_s=idempotency, nonce_ttl_s=2 * skew + 60),
    )


@dataclass(frozen=True)
class DirectSpec:
    redis_host: str
    redis_port: int
    prefix: str
    hold_ttl_s: int
    terminal_id: str
    merchant_id: str
    campaign_id: str
    gtin: str
    price_fen: int
    depth: int
    commands: int
    db: int = 0  # the Redis database index (SELECTed first)
    start_at: float = 0.0
    warmup_s: float = 0.0
    duration_s: float = 0.0


def build_commands(spec: DirectSpec) -> list[bytes]:
    """``spec.commands`` encoded EVALSHAs, each an approvable Authorize of a new consumer."""
    from subsidy_client.v1 import authorization_pb2

    store = _store(spec.prefix, spec.hold_ttl_s)

    async def build() -> list[bytes]:
        built: list[bytes] = []
        for _ in range(spec.commands):
            request = authorization_pb2.AuthorizeRequest(
                request_id=str(uuid.uuid4()),
                campaign_id=spec.campaign_id,
                consumer_key=secrets.token_hex(32),
                channel=authorization_pb2.CHANNEL_POS,
                lines=[authorization_pb2.LineItem(line_id="1", gtin=spec.gtin, unit_price_fen=spec.price_fen)],
            )
            try:
                await store.authorize(
                    AuthorizeInput(
                        payload_hash=payload_hash("Authorize", request),
                        request_id=request.request_id,
                        terminal_id=spec.terminal_id,
                        merchant_id=spec.merchant_id,
                        nonce=secrets.token_urlsafe(16),
                        campaign_id=request.campaign_id,
                        consumer_key=request.consumer_key,
                        channel=request.channel,
                        authorization_id=uuid.uuid4().hex,
                        lines=[
                            LineInput(line.line_id, line.gtin, line.unit_price_fen, line.serial_number)
                            for line in request.lines
                        ],
                    )
                )
            except _Captured as captured:
                built.append(encode_command(captured.arguments))
            else:  # pragma: no cover - the capturing client always raises
                raise AssertionError("the EVALSHA was not captured")
        return built

    return asyncio.run(build())


def parse_reply(buffer: bytes, position: int) -> tuple[Any, int] | None:
    """One RESP2 reply from ``buffer[position:]``: (value, next position), or None when it is
    not all there yet. Errors come back as ``("error", message)``."""
    end = buffer.find(b"\r\n", position)
    if end < 0:
        return None
    kind, line = buffer[position : position + 1], buffer[position + 1 : end]
    after = end + 2
    if kind == b"+":
        return line, after
    if kind == b"-":
        return ("error", line.decode()), after
    if kind == b":":
        return int(line), after
    if kind == b"$":
        length = int(line)
        if length < 0:
            return None, after
        if len(buffer) < after + length + 2:
            return None
        return buffer[after : after + length], after + length + 2
    if kind == b"*":
        count = int(line)
        items: list[Any] = []
        for _ in range(max(count, 0)):
            parsed = parse_reply(buffer, after)
            if parsed is None:
                return None
            item, after = parsed
            items.append(item)
        return items, after
    raise ValueError(f"not a RESP reply: {buffer[position : position + 20]!r}")


def outcome(reply: Any) -> str:
    """APPROVED, DECLINED_<reason code>, FAILURE (the script's own error reply), or the Redis error."""
    if isinstance(reply, tuple):
        message: str = reply[1]
        return "REDIS_" + message.split(" ", 1)[0]
    kind, body = reply
    if kind == b"error":
        return "FAILURE"
    if b'"APPROVED"' in body:
        return "APPROVED"
    return f"DECLINED_{json.loads(body).get('reason', '?')}"  # the script's reason code


@dataclass
class DirectResult:
    connection: int
    completed_in_window: int = 0
    sent: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    ran_out: bool = False


def drive(index: int, spec: DirectSpec, commands: list[bytes]) -> DirectResult:
    """One connection, ``spec.depth`` in flight, until the window ends or the commands do."""
    result = DirectResult(index)
    outcomes: Counter[str] = Counter()
    window_start = spec.start_at + spec.warmup_s
    window_end = window_start + spec.duration_s
    with socket.create_connection((spec.redis_host, spec.redis_port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if spec.db:
            sock.sendall(encode_command(("SELECT", spec.db)))
            if sock.recv(64) != b"+OK\r\n":
                raise ConnectionError(f"SELECT {spec.db} failed")
        while time.monotonic() < spec.start_at:
            time.sleep(min(0.01, max(0.0, spec.start_at - time.monotonic())))
        next_command = min(spec.depth, len(commands))
        sock.sendall(b"".join(commands[:next_command]))
        in_flight = next_command
        buffer = b""
        position = 0
        while in_flight:
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionError("redis closed the connection")
            buffer = buffer[position:] + data
            position = 0
            answered = 0
            while True:
                parsed = parse_reply(buffer, position)
                if parsed is None:
                    break
                reply, position = parsed
                answered += 1
                outcomes[outcome(reply)] += 1
            if not answered:
                continue
            in_flight -= answered
            now = time.monotonic()
            if window_start <= now <= window_end:
                result.completed_in_window += answered
            if now >= window_end:
                continue  # drain what is in flight, send no more
            more = min(answered, len(commands) - next_command)
            if more:
                sock.sendall(b"".join(commands[next_command : next_command + more]))
                next_command += more
                in_flight += more
            elif next_command >= len(commands):
                result.ran_out = True
    result.sent = next_command
    result.outcomes = dict(outcomes)
    return result


def _worker(index: int, spec: DirectSpec, connection: Connection) -> None:
    try:
        commands = build_commands(spec)
        connection.send(("ready", None))
        _kind, timed = connection.recv()
        connection.send(("result", drive(index, timed, commands)))
    except Exception:
        connection.send(("error", traceback.format_exc()))


def run_round(
    spec: DirectSpec, connections: int, on_window: Callable[[float, float], None] | None = None
) -> list[DirectResult]:
    """Starts ``connections`` processes (spawn), lets each build its commands, then starts them
    all at one ``time.monotonic()`` instant; ``on_window(start, end)`` runs here meanwhile."""
    context = multiprocessing.get_context("spawn")
    processes: list[Any] = []
    pipes: list[Connection] = []
    try:
        for index in range(connections):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_worker, args=(index, spec, child_end), daemon=True)
            process.start()
            child_end.close()
            processes.append(process)
            pipes.append(parent_end)
        for pipe in pipes:
            if not pipe.poll(READY_TIMEOUT_S):
                raise RuntimeError("a Redis driver process did not build its commands in time")
            kind, payload = pipe.recv()
            if kind == "error":
                raise RuntimeError(f"Redis driver failed:\n{payload}")
        start_at = time.monotonic() + 0.3
        timed = DirectSpec(**{**spec.__dict__, "start_at": start_at})
        for pipe in pipes:
            pipe.send(("go", timed))
        if on_window is not None:
            on_window(start_at + spec.warmup_s, start_at + spec.warmup_s + spec.duration_s)
        results: list[DirectResult] = []
        for pipe in pipes:
            remaining = start_at + spec.warmup_s + spec.duration_s - time.monotonic()
            if not pipe.poll(max(remaining, 0.0) + RESULT_GRACE_S):
                raise RuntimeError("a Redis driver process did not report in time")
            kind, payload = pipe.recv()
            if kind == "error":
                raise RuntimeError(f"Redis driver failed:\n{payload}")
            results.append(payload)
        return results
    finally:
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join(5)


async def preload_scripts(redis_url: str) -> None:
    """SCRIPT LOAD every script, as the gateway does at start-up (storage/redis/scripts.py)."""
    client = Redis.from_url(redis_url)
    try:
        await Scripts(client).preload()
    finally:
        await client.aclose()
