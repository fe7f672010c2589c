"""The lean Redis path (storage/redis/lean.py) against the real Redis: FIFO replies under many
concurrent calls, one write per event-loop tick, replies split across packets, NOSCRIPT after
SCRIPT FLUSH, timeouts that reset the connection, reconnects after CLIENT KILL (a call in flight
retried once, not twice), the bound on calls in flight, and the connection set-up (SELECT,
CLIENT SETNAME, a refused AUTH). Blocking commands (BLPOP on a key nobody pushes to) stand in
for a Redis that does not answer: they block only their own connection, never the shared Redis."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import hiredis
import pytest
import uvloop
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.connection import Connection as PackingConnection
from subsidy_client import AuthorizationClient, Line
from subsidy_client.v1 import authorization_pb2 as pb

from storage.devenv import Services
from storage.redis.contract import EXPIRE_HOLD, HoldKeys, NoArgs
from storage.redis.keys import Keys
from storage.redis.lean import Connection, LeanRedis, command_prefix, encode
from storage.redis.scripts import Scripts, script_source
from tests.conftest import Environment, consumer_key, running_gateway

ECHO = command_prefix("ECHO")
BLPOP = command_prefix("BLPOP")


def echo(value: Any) -> bytes:
    return encode(ECHO, 1, (value,))


def blpop(key: str, seconds: float) -> bytes:
    return encode(BLPOP, 1, (key, seconds))


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@pytest.fixture
async def admin(services: Services) -> AsyncIterator[Redis]:
    client = Redis.from_url(services.redis_url)
    yield client
    await client.aclose()


def lean_for(services: Services, **settings: Any) -> LeanRedis:
    client = LeanRedis.from_url(services.redis_url, **settings)
    assert client is not None, "the test Redis URL should be one the lean path supports"
    return client


async def kill_by_name(admin: Redis, name: str) -> int:
    killed = 0
    for entry in await admin.client_list():
        if entry.get("name") == name:
            await admin.client_kill_filter(_id=entry["id"])
            killed += 1
    return killed


async def test_replies_are_matched_first_in_first_out(services: Services) -> None:
    """2,000 concurrent calls of different sizes each get their own answer (EVAL returning its
    argument, and ECHO, interleaved on one connection)."""
    lean = lean_for(services, max_in_flight=10_000)
    evaluate = command_prefix("EVAL", "return ARGV[1]")
    try:
        commands = [
            encode(evaluate, 2, (0, f"eval-{index}")) if index % 2 else echo("x" * (index % 97) + str(index))
            for index in range(2000)
        ]
        replies = await asyncio.gather(*(lean.call(command) for command in commands))
        expected = [f"eval-{i}".encode() if i % 2 else ("x" * (i % 97) + str(i)).encode() for i in range(2000)]
        assert replies == expected
        assert lean.connections == 1
    finally:
        await lean.aclose()


async def test_the_calls_of_one_tick_share_one_write(services: Services) -> None:
    """100 calls started in the same event-loop tick go out in one transport.write."""
    lean = lean_for(services, max_in_flight=100)
    try:
        assert await lean.call(echo("warm")) == b"warm"  # connected
        connection = lean.connection
        assert connection is not None
        before = connection.writes
        replies = await asyncio.gather(*(lean.call(echo(index)) for index in range(100)))
        assert replies == [str(index).encode() for index in range(100)]
        assert connection.writes - before == 1
    finally:
        await lean.aclose()


async def test_a_reply_split_across_packets_is_reassembled(services: Services) -> None:
    """A 4 MB reply arrives in many reads; it and the small replies after it are whole."""
    lean = lean_for(services)
    try:
        big = secrets.token_hex(2 * 1024 * 1024)
        replies = await asyncio.gather(lean.call(echo(big)), lean.call(echo("after")), lean.call(echo("")))
        assert replies == [big.encode(), b"after", b""]
    finally:
        await lean.aclose()


async def test_error_replies_and_bad_arguments(services: Services) -> None:
    """An error reply is a value, in its place in the FIFO; arguments redis-py refuses (bool,
    None) are refused before anything is sent."""
    lean = lean_for(services)
    try:
        wrong = encode(command_prefix("NO-SUCH-COMMAND"), 1, ())
        replies = await asyncio.gather(lean.call(echo("a")), lean.call(wrong), lean.call(echo("b")))
        assert replies[0] == b"a" and replies[2] == b"b"
        assert isinstance(replies[1], hiredis.ReplyError)
        assert encode(ECHO, 1, (1.5,)) == b"*2\r\n$4\r\nECHO\r\n$3\r\n1.5\r\n"
        assert encode(ECHO, 1, (b"\x00\xff",)) == b"*2\r\n$4\r\nECHO\r\n$2\r\n\x00\xff\r\n"
        for bad in (True, None):
            with pytest.raises(redis_errors.DataError):
                encode(ECHO, 1, (bad,))
    finally:
        await lean.aclose()


@pytest.mark.parametrize(
    "arguments",
    [
        (22, "{bench}:nonce:t-1:abc", "", 0, -1, 2**63, "a" * 64, 604_800),  # ASCII text and int: one str
        ("caf\u00e9", "\u4e2d\u6587", 7),  # non-ASCII: UTF-8 byte lengths, not character counts
        ("ascii", b"\x00\xff", 1.5, "\u00e9"),  # bytes and float among text
        (),
    ],
)
def test_commands_are_encoded_as_redis_py_packs_them(arguments: tuple[Any, ...]) -> None:
    """``encode`` (its one-str path for ASCII text and int, its per-part path otherwise) gives
    byte for byte what redis-py's own ``pack_command`` sends for the same command."""
    sha = "0" * 40
    packed = b"".join(PackingConnection().pack_command("EVALSHA", sha, *arguments))
    assert encode(command_prefix("EVALSHA", sha), 2, arguments) == packed


async def test_scripts_reload_after_a_script_flush_and_answer_as_redis_py_does(services: Services) -> None:
    """The same script call through the lean path and through redis-py answers the same; after
    SCRIPT FLUSH the lean call gets NOSCRIPT, loads the script and retries (the caller sees the
    answer, not the miss)."""
    redis = Redis.from_url(services.redis_url)
    lean = lean_for(services)
    try:
        through_redis_py = Scripts(redis)
        through_lean = Scripts(redis, lean)
        await through_redis_py.preload()
        keys = Keys(unique("leantest"))
        hold = HoldKeys(
            authorization=keys.authorization("a-1"),
            holds=keys.holds,
            budget=keys.budget("c-1"),
            usage=keys.usage("c-1", "k-1"),
            ledger=keys.ledger,
            qualification=keys.qualification(""),
            qualification_quota=keys.qualification_quota("c-1"),
            qualification_holder=keys.qualification_holder("c-1", "k-1"),
            qualification_expiry=keys.qualification_expiry,
            qualification_events=keys.qualification_events,
        )
        expected = await through_redis_py.call(EXPIRE_HOLD, hold, NoArgs())
        assert await through_lean.call(EXPIRE_HOLD, hold, NoArgs()) == expected
        await redis.script_flush()
        assert await through_lean.call(EXPIRE_HOLD, hold, NoArgs()) == expected
        sha = hashlib.sha1(script_source(EXPIRE_HOLD).encode()).hexdigest()
        assert await redis.script_exists(sha) == [True]
        assert not [key async for key in redis.scan_iter(match=keys.pattern())]
    finally:
        await lean.aclose()
        await redis.aclose()


async def test_a_timeout_resets_the_connection_and_later_calls_work(services: Services) -> None:
    """A call not answered within the timeout fails with TimeoutError, so do the calls pipelined
    behind it; the connection is dropped, and the next call gets its own answer on a new one
    (not the late reply of the timed-out call)."""
    lean = lean_for(services, timeout_s=0.2)
    try:
        assert await lean.call(echo("first")) == b"first"
        results = await asyncio.gather(
            lean.call(blpop(unique("lean-never"), 5)), lean.call(echo("behind")), return_exceptions=True
        )
        assert [type(result) for result in results] == [redis_errors.TimeoutError] * 2
        assert await lean.call(echo("later")) == b"later"
        assert lean.connections == 2
        assert lean.in_flight == 0
    finally:
        await lean.aclose()


async def test_reconnects_after_client_kill(services: Services, admin: Redis) -> None:
    """Redis closes the idle connection (CLIENT KILL, as a restart does): the next call succeeds
    on a new connection."""
    name = unique("lean-kill")
    lean = lean_for(services, client_name=name)
    try:
        assert await lean.call(echo("before")) == b"before"
        assert await kill_by_name(admin, name) == 1
        await asyncio.sleep(0.05)  # lets the loop see the close (the call below works either way)
        assert await lean.call(echo("after")) == b"after"
        assert lean.connections == 2
    finally:
        await lean.aclose()


async def test_a_call_in_flight_when_the_connection_dies_is_retried_once(services: Services, admin: Redis) -> None:
    """A call in flight when its connection is killed is sent again on a new connection (and
    answers there); killed a second time it fails with ConnectionError: one retry, not a loop."""
    name = unique("lean-retry")
    lean = lean_for(services, client_name=name, timeout_s=10)
    key = unique("lean-list")
    try:
        assert await lean.call(echo("connect")) == b"connect"
        waiting = asyncio.create_task(lean.call(blpop(key, 5)))
        await wait_until_blocked(admin, name)
        assert await kill_by_name(admin, name) == 1
        await wait_until_blocked(admin, name)  # the retry, blocked on its new connection
        assert lean.connections == 2
        await admin.rpush(key, "value")
        assert await waiting == [key.encode(), b"value"]

        again = asyncio.create_task(lean.call(blpop(key, 5)))
        await wait_until_blocked(admin, name)
        assert await kill_by_name(admin, name) == 1
        await wait_until_blocked(admin, name)
        assert await kill_by_name(admin, name) == 1
        with pytest.raises(redis_errors.ConnectionError):
            await again
    finally:
        await lean.aclose()
        await admin.delete(key)


async def wait_until_blocked(admin: Redis, name: str) -> None:
    """Until the named connection is blocked in BLPOP (polls CLIENT LIST; bounded)."""
    for _ in range(500):
        if any(entry.get("name") == name and entry.get("cmd") == "blpop" for entry in await admin.client_list()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} never blocked")


async def test_calls_in_flight_are_bounded(services: Services, admin: Redis) -> None:
    """With a bound of 2: two calls in flight, a third waits for a slot and runs when one frees."""
    name = unique("lean-bound")
    lean = lean_for(services, client_name=name, max_in_flight=2, timeout_s=10)
    keys = [unique("lean-list") for _ in range(2)]
    try:
        blocked = [asyncio.create_task(lean.call(blpop(key, 5))) for key in keys]
        third = asyncio.create_task(lean.call(echo("third")))
        await wait_until_blocked(admin, name)
        await asyncio.sleep(0.05)
        assert lean.in_flight == 2 and not third.done()
        await admin.rpush(keys[0], "x")
        assert await blocked[0] == [keys[0].encode(), b"x"]
        # The third call was queued behind the second BLPOP on the one connection: FIFO.
        await admin.rpush(keys[1], "y")
        assert await blocked[1] == [keys[1].encode(), b"y"]
        assert await third == b"third"
        assert lean.in_flight == 0
    finally:
        await lean.aclose()
        await admin.delete(*keys)


async def test_no_slot_within_the_timeout_fails_with_connection_error(services: Services) -> None:
    """With a bound of 1 and a call that never answers, a second call gives up after the timeout
    with ConnectionError (UNAVAILABLE, as redis-py's exhausted pool), and the slot count is right
    again afterwards."""
    lean = lean_for(services, max_in_flight=1, timeout_s=0.3)
    try:
        results = await asyncio.gather(
            lean.call(blpop(unique("lean-never"), 5)), lean.call(echo("waits")), return_exceptions=True
        )
        assert isinstance(results[0], redis_errors.TimeoutError)
        assert isinstance(results[1], redis_errors.ConnectionError) and "in flight" in str(results[1])
        assert lean.in_flight == 0
        assert await lean.call(echo("free")) == b"free"
    finally:
        await lean.aclose()


async def test_a_cancelled_caller_keeps_the_fifo_and_frees_its_slot(services: Services, admin: Redis) -> None:
    """A caller cancelled while its call is in flight: its reply is dropped, the next caller gets
    its own reply, and the slot comes back."""
    name = unique("lean-cancel")
    lean = lean_for(services, client_name=name, max_in_flight=1, timeout_s=10)
    key = unique("lean-list")
    try:
        first = asyncio.create_task(lean.call(blpop(key, 5)))
        await wait_until_blocked(admin, name)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert lean.in_flight == 0
        second = asyncio.create_task(lean.call(echo("mine")))
        await admin.rpush(key, "for-the-cancelled")
        assert await second == b"mine"
    finally:
        await lean.aclose()
        await admin.delete(key)


@pytest.mark.parametrize("max_in_flight, timeout_s", [(0, 1.0), (1, 0.0), (-1, 1.0)])
def test_settings_out_of_range_are_refused(max_in_flight: int, timeout_s: float) -> None:
    with pytest.raises(ValueError):
        LeanRedis(max_in_flight=max_in_flight, timeout_s=timeout_s)


def test_urls_the_lean_path_does_not_support_keep_redis_py() -> None:
    assert LeanRedis.from_url("rediss://127.0.0.1:6379/0") is None
    assert LeanRedis.from_url("redis://127.0.0.1:6379/0?socket_keepalive=true") is None
    assert LeanRedis.from_url("redis://127.0.0.1:6379/0") is not None
    assert LeanRedis.from_url("redis://:secret@127.0.0.1:6379/3") is not None
    assert LeanRedis.from_url("unix:///tmp/redis.sock?db=2") is not None


async def test_select_and_client_name_are_set_up(services: Services, admin: Redis) -> None:
    """The URL's db is selected and the connection carries the configured client name."""
    name = unique("lean-setup")
    base = services.redis_url.rsplit("/", 1)[0]
    lean = LeanRedis.from_url(f"{base}/9", client_name=name)
    assert lean is not None
    key = unique("lean-db")
    other = Redis.from_url(f"{base}/9")
    try:
        assert await lean.call(encode(command_prefix("SET"), 1, (key, "v"))) == b"OK"
        assert await other.get(key) == b"v"
        assert [entry["db"] for entry in await admin.client_list() if entry.get("name") == name] == ["9"]
    finally:
        await lean.aclose()
        await other.delete(key)
        await other.aclose()


async def test_a_refused_auth_fails_the_call_without_naming_the_password(services: Services) -> None:
    """AUTH that Redis refuses (this Redis has no password) fails the call with ConnectionError;
    the message does not carry the password."""
    host_port = services.redis_url.split("//", 1)[1].split("/", 1)[0]
    lean = LeanRedis.from_url(f"redis://:not-the-password-{secrets.token_hex(4)}@{host_port}/0")
    assert lean is not None
    try:
        with pytest.raises(redis_errors.ConnectionError) as raised:
            await lean.call(echo("x"))
        assert "not-the-password" not in str(raised.value)
    finally:
        await lean.aclose()


async def test_an_unreachable_redis_is_a_connection_error(services: Services) -> None:
    lean = LeanRedis(host="127.0.0.1", port=1, timeout_s=1.0)
    try:
        with pytest.raises(redis_errors.ConnectionError):
            await lean.call(echo("x"))
        assert lean.in_flight == 0
    finally:
        await lean.aclose()


def test_under_uvloop_the_gateways_event_loop(services: Services) -> None:
    """The gateway runs uvloop (SUBSIDY_USE_UVLOOP), whose transports are not asyncio's: the
    same FIFO, coalescing and reconnect there."""

    async def scenario() -> None:
        name = unique("lean-uvloop")
        lean = lean_for(services, client_name=name, max_in_flight=500)
        admin = Redis.from_url(services.redis_url)
        try:
            assert await lean.call(echo("warm")) == b"warm"
            connection = lean.connection
            assert connection is not None
            before = connection.writes
            replies = await asyncio.gather(*(lean.call(echo(index)) for index in range(500)))
            assert replies == [str(index).encode() for index in range(500)]
            assert connection.writes - before == 1
            assert await kill_by_name(admin, name) == 1
            await asyncio.sleep(0.05)
            assert await lean.call(echo("after")) == b"after"
            assert lean.connections == 2
        finally:
            await lean.aclose()
            await admin.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


@pytest.mark.parametrize("redis_client", ["lean", "redis-py"])
async def test_the_gateway_uses_the_configured_client(environment: Environment, redis_client: str) -> None:
    """SUBSIDY_REDIS_CLIENT picks the money path's client; with either, Authorize approves, a
    flushed script cache is reloaded."""
    async with running_gateway(environment.config(redis_client=redis_client)) as gateway:
        assert (gateway.lean is not None) == (redis_client == "lean")
        async with AuthorizationClient(
            f"127.0.0.1:{gateway.port}", "t-main-01", environment.credentials["t-main-01"]
        ) as client:
            line = [Line("1", "6970000000017", 300_000, f"LEAN{secrets.token_hex(4)}")]
            first = await client.authorize(campaign_id="c-main", consumer_key=consumer_key(), lines=line)
            assert first.decision == pb.DECISION_APPROVED
            await gateway.redis.script_flush()
            second = await client.authorize(
                campaign_id="c-main",
                consumer_key=consumer_key(),
                lines=[Line("1", "6970000000017", 300_000, f"LEAN{secrets.token_hex(4)}")],
            )
            assert second.decision == pb.DECISION_APPROVED
        if gateway.lean is not None:
            assert gateway.lean.connections == 1


class RecordingTransport(asyncio.Transport):
    """Takes the protocol's writes (the replies come from the real Redis, below)."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True


async def test_replies_split_at_every_byte_are_matched_in_order(services: Services) -> None:
    """The real Redis's replies to a pipeline (a nested array, an error, a bulk string with CRLF
    inside, an integer, a nil) fed to the protocol one byte at a time: each call gets its own
    reply once its last byte arrives, not before."""
    loop = asyncio.get_running_loop()
    connection = Connection(loop, timeout_s=10)
    transport = RecordingTransport()
    connection.connection_made(transport)
    commands = [
        encode(command_prefix("EVAL", "return {ARGV[1], {1, 2}, 'x'}"), 2, (0, "outer")),
        encode(command_prefix("NO-SUCH-COMMAND"), 1, ()),
        echo("line\r\nbreak"),
        encode(command_prefix("EVAL", "return 42"), 2, (0,)),
        encode(command_prefix("GET"), 1, (unique("lean-missing"),)),
    ]
    futures = [connection.send(command) for command in commands]
    await asyncio.sleep(0)  # the tick's flush
    assert transport.written == [b"".join(commands)]
    host, port = services.redis_url.split("//", 1)[1].split("/", 1)[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(transport.written[0])
        await writer.drain()
        raw = b""
        # Read until the last reply (the nil) has arrived: the raw bytes Redis sent back.
        while not raw.endswith(b"$-1\r\n"):
            raw += await asyncio.wait_for(reader.read(65536), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    completed = []
    for index in range(len(raw)):
        connection.data_received(raw[index : index + 1])
        completed.append(sum(future.done() for future in futures))
    assert completed == sorted(completed) and completed[-1] == len(futures)
    assert completed[-2] == len(futures) - 1  # the last reply completed only with its last byte
    replies = [future.result() for future in futures]
    assert replies[0] == [b"outer", [1, 2], b"x"]
    assert isinstance(replies[1], hiredis.ReplyError)
    assert replies[2:] == [b"line\r\nbreak", 42, None]
    assert not transport.aborted
