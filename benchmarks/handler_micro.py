"""The gateway's own Python per call, in one process: no gRPC, no sockets, no Redis.

``python -m benchmarks.handler_micro [--calls N] [--rounds R] [--gc-threshold N]`` runs the
Authorize and Echo handlers exactly as the gateway wraps them (``GuardedServer``: the call guard
with its metrics, ``Authenticator`` over the signed request bytes, the servicer, the store's key
and argument building, the lean path's command encoding and its reply decoding), each call with
a fresh signed request built before the clock starts. The lean client is replaced by one that
answers every EVALSHA with the same approval after yielding to the event loop once, so 32 calls
are in flight as in the bench's closed loop. Reported: CPU-µs per call (``time.process_time``,
the fastest of ``--rounds`` rounds of ``--calls`` calls) and the time the cyclic garbage
collector took over all rounds (``gc.callbacks``).

Not part of ``make bench``: it isolates the few-µs changes (issue 15) the bench's A/B rounds
cannot resolve on a shared machine. Compare two checkouts by running it in each, alternately
(``PYTHONPATH=<checkout>:<checkout>/clients/python``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import secrets
import time
import uuid
from typing import Any

import msgspec
from redis.asyncio import Redis
from subsidy_client import signing
from subsidy_client.v1 import authorization_pb2, authorization_pb2_grpc, diagnostics_pb2, diagnostics_pb2_grpc

from server.rpc.auth import Authenticator
from server.rpc.handlers import GuardedServer
from server.services.authorization import AuthorizationService
from server.services.diagnostics import DiagnosticsService
from storage.redis.contract import Approved, AuthorizationView, Line
from storage.redis.credentials import Credential, CredentialCache
from storage.redis.keys import Keys
from storage.redis.scripts import Scripts
from storage.redis.store import RedisStore, StoreLimits

AUTHORIZE = "/subsidy.v1.AuthorizationService/Authorize"
ECHO = "/subsidy.v1.DiagnosticsService/Echo"
TERMINAL, MERCHANT, SECRET = "t-micro", "m-micro", "s" * 64
IN_FLIGHT = 32

_VIEW = AuthorizationView(
    authorization_id="a" * 32,
    state="PENDING",
    campaign_id="c-micro",
    merchant_id=MERCHANT,
    terminal_id=TERMINAL,
    channel=1,
    lines=[Line(line_id="1", gtin="6970000000017", category="fridge", unit_price_fen=300_000, subsidy_fen=60_000)],
    total_price_fen=300_000,
    subsidy_fen=60_000,
    refunded_fen=0,
    created_ms=1,
    hold_expires_ms=2,
    updated_ms=1,
)
APPROVAL = [b"ok", msgspec.json.encode(Approved(authorization=_VIEW))]


class AnsweringLean:
    """Stands in for ``LeanRedis``: every command is answered with the approval, one event-loop
    turn later (as a reply arriving with others in one read would be)."""

    async def call(self, command: bytes) -> Any:
        await asyncio.sleep(0)
        return APPROVAL

    async def aclose(self) -> None:
        return None


class NoServer:
    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        return None


class Context:
    """The part of ``grpc.aio.ServicerContext`` the wrapped handlers use on success."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort_with_status(self, status: Any) -> None:
        raise RuntimeError(f"the call failed: {status}")


def request_bytes(method: str) -> bytes:
    if method == AUTHORIZE:
        request = authorization_pb2.AuthorizeRequest(
            request_id=str(uuid.uuid4()),
            campaign_id="c-micro",
            consumer_key=secrets.token_hex(32),
            channel=authorization_pb2.CHANNEL_POS,
        )
        request.lines.add(line_id="1", gtin="6970000000017", unit_price_fen=300_000)
        return request.SerializeToString()
    return diagnostics_pb2.EchoRequest(payload=b"x" * 150).SerializeToString()


def handlers() -> GuardedServer:
    credentials = CredentialCache(Redis(), Keys("micro"))
    credentials._credentials = {TERMINAL: Credential(merchant_id=MERCHANT, secret=SECRET, role="terminal")}
    guarded = GuardedServer(NoServer(), Authenticator(credentials, clock_skew_s=300))
    scripts = Scripts(Redis(), AnsweringLean())  # type: ignore[arg-type]
    store = RedisStore(Redis(), Keys("micro"), scripts, StoreLimits(604_800, 86_400, 660))
    authorization_pb2_grpc.add_AuthorizationServiceServicer_to_server(AuthorizationService(store, 10), guarded)
    diagnostics_pb2_grpc.add_DiagnosticsServiceServicer_to_server(DiagnosticsService(), guarded)
    return guarded


async def measure(guarded: GuardedServer, method: str, calls: int) -> float:
    """CPU-µs per call of ``calls`` signed calls, IN_FLIGHT at a time."""
    handler = guarded.service(_Details(method))
    assert handler is not None and handler.request_deserializer is not None
    signed = []
    for _ in range(calls):
        body = request_bytes(method)
        signed.append((body, Context(signing.signed_metadata(SECRET, method, TERMINAL, body))))
    behaviour, deserialize = handler.unary_unary, handler.request_deserializer
    started = time.process_time()
    for first in range(0, calls, IN_FLIGHT):
        await asyncio.gather(
            *(behaviour(deserialize(body), context) for body, context in signed[first : first + IN_FLIGHT])
        )
    return (time.process_time() - started) / calls * 1e6


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method


async def run(calls: int, rounds: int) -> dict[str, float]:
    guarded = handlers()
    return {
        method.rsplit("/", 1)[1]: min([await measure(guarded, method, calls) for _ in range(rounds)])
        for method in (AUTHORIZE, ECHO)
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.handler_micro", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="calls per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per method; the fastest counts (default 7)")
    parser.add_argument("--gc-threshold", type=int, default=0, help="gc.set_threshold(N, 10, 10) first (0: as is)")
    arguments = parser.parse_args()
    if arguments.calls < IN_FLIGHT or arguments.rounds < 1:
        parser.error(f"--calls must be at least {IN_FLIGHT} and --rounds at least 1")
    if arguments.gc_threshold:
        gc.set_threshold(arguments.gc_threshold, 10, 10)
    collecting = [0.0, 0.0]  # seconds in the collector, start of the current collection

    def timed(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            collecting[1] = time.perf_counter()
        else:
            collecting[0] += time.perf_counter() - collecting[1]

    gc.callbacks.append(timed)
    results = asyncio.run(run(arguments.calls, arguments.rounds))
    per_call = " ".join(f"{name} {cpu_us:.1f}" for name, cpu_us in results.items())
    total_calls = 2 * arguments.calls * arguments.rounds
    print(
        f"CPU-us per call: {per_call}; gc threshold {gc.get_threshold()[0]}: "
        f"{collecting[0] * 1e3:.0f} ms in the collector over {total_calls} calls"
    )


if __name__ == "__main__":
    main()
