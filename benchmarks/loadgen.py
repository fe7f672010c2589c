"""The load generator: client processes (multiprocessing, spawn) driven over pipes.

Each client process runs one asyncio loop (uvloop) with its own gRPC channels (a local
subchannel pool, so every channel is its own TCP connection and the kernel spreads them over
server processes sharing the port). Per call it builds a fresh request (a new request_id and a
new random consumer key, so the per-person limit never declines), serializes it once, and
signs those bytes with a fresh nonce (``subsidy_client.signing``): the work every real
terminal does, and no more.

Three loop shapes:

- **closed** (fixed concurrency): ``concurrency`` tasks each send, await the answer, send
  again. Measures maximum throughput; latency is send-to-answer.
- **open** (fixed arrival rate): call *i* is due at ``start + offset + i / rate`` whatever
  happened to earlier calls, and its latency is measured from that *intended* time. A client or
  server that falls behind therefore shows up in the latency rather than silently lowering the
  offered rate (no coordinated omission). How late sends actually left is recorded too
  (``send_lag``), so a client that cannot keep up is visible.
- **crowd** (a finite flash crowd): a fixed list of ``ClaimQualification`` calls, each due at
  ``start + its offset``, at most ``max_in_flight`` at a time; latency is counted from the due
  time (what the person who pressed the button waited) and from the send (what the server took).
  The process reports when each qualification was issued, so the orchestrator can tell when
  the tranche ran out.

All processes start a phase at the same ``time.monotonic()`` instant (CLOCK_MONOTONIC is
system-wide on Linux) and count only what falls inside the same measurement window, which is
the window the orchestrator samples server CPU over.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import secrets
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from subsidy_client import signing
from subsidy_client.v1 import authorization_pb2, common_pb2, diagnostics_pb2, qualification_pb2

from benchmarks.histogram import Histogram

AUTHORIZE_METHOD = "/subsidy.v1.AuthorizationService/Authorize"
ECHO_METHOD = "/subsidy.v1.DiagnosticsService/Echo"
METHODS = {"authorize": AUTHORIZE_METHOD, "echo": ECHO_METHOD}
CLAIM_METHOD = "/subsidy.v1.QualificationService/ClaimQualification"

# Limits on what one phase may ask of one client process.
PHASE_S_MAX = 600.0
CONCURRENCY_MAX = 1024
RATE_PER_S_MAX = 50_000.0
IN_FLIGHT_MAX = 4096
CHANNELS_MAX = 64
DEADLINE_S_MAX = 30.0
CLIENT_PROCESSES_MAX = 16
CROWD_CLAIMS_MAX = 100_000
READY_TIMEOUT_S = 60.0
RESULT_GRACE_S = 60.0


@dataclass(frozen=True)
class PhaseSpec:
    """What one client process does in one phase. Times are ``time.monotonic()`` seconds."""

    target: str
    method: str  # "authorize" or "echo"
    mode: str  # "closed" or "open"
    start_at: float
    warmup_s: float
    duration_s: float
    terminal_id: str
    secret: str
    campaign_id: str
    gtin: str
    price_fen: int
    concurrency: int = 0  # closed loop: calls in flight
    rate_per_s: float = 0.0  # open loop: arrivals per second from this process
    offset_s: float = 0.0  # open loop: this process's first arrival after start_at
    echo_payload_bytes: int = 0
    channels: int = 4
    deadline_s: float = 10.0
    max_in_flight: int = 2000
    tls_ca: str = ""  # the CA file of a TLS target's certificate; "" for plaintext

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}")
        if self.mode == "closed" and not 0 < self.concurrency <= CONCURRENCY_MAX:
            raise ValueError(f"closed loop: concurrency must be in 1..{CONCURRENCY_MAX}")
        if self.mode == "open" and not 0 < self.rate_per_s <= RATE_PER_S_MAX:
            raise ValueError(f"open loop: rate_per_s must be in (0, {RATE_PER_S_MAX:g}]")
        if self.mode not in ("closed", "open"):
            raise ValueError("mode must be closed or open")
        if not 0 <= self.warmup_s <= PHASE_S_MAX or not 0 < self.duration_s <= PHASE_S_MAX:
            raise ValueError(f"warmup_s and duration_s must be within {PHASE_S_MAX:g} s")
        if not 0 < self.channels <= CHANNELS_MAX:
            raise ValueError(f"channels must be in 1..{CHANNELS_MAX}")
        if not 0 < self.deadline_s <= DEADLINE_S_MAX:
            raise ValueError(f"deadline_s must be in (0, {DEADLINE_S_MAX:g}]")
        if not 0 < self.max_in_flight <= IN_FLIGHT_MAX:
            raise ValueError(f"max_in_flight must be in 1..{IN_FLIGHT_MAX}")

    @property
    def window_start(self) -> float:
        return self.start_at + self.warmup_s

    @property
    def window_end(self) -> float:
        return self.window_start + self.duration_s


@dataclass(frozen=True)
class PhaseResult:
    """One client process's account of one phase (histograms HDR-encoded, microseconds)."""

    worker: int
    pid: int
    completed_in_window: int  # calls answered inside the window: the throughput numerator
    measured: int  # calls whose latency was recorded
    outcomes: dict[str, int]  # APPROVED, DECLINED_<reason>, OK (echo) or a gRPC status name
    latency: str
    send_lag: str  # open loop: how late each measured call actually left
    not_sent: int  # open loop: arrivals never sent (client hopelessly behind): a failure
    unfinished: int  # calls still unanswered when the drain timeout ended the phase


class Claim(NamedTuple):
    """One press of the claim button: who, from where, and when (after the crowd's start)."""

    person: int  # index into the orchestrator's list of people
    id_number: str
    latitude: float
    longitude: float
    coordinate_system: int  # common_pb2.CoordinateSystem
    fix_age_ms: int  # how old the phone's fix is when the claim is sent
    offset_s: float


@dataclass(frozen=True)
class CrowdSpec:
    """One client process's share of a flash crowd: ``claims`` (ordered by offset) from a
    partner app, each due at ``start_at + offset_s``, at most ``max_in_flight`` unanswered."""

    target: str
    partner_id: str
    secret: str
    campaign_id: str
    category: str
    start_at: float
    claims: tuple[Claim, ...]
    max_in_flight: int
    channels: int = 4
    deadline_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < len(self.claims) <= CROWD_CLAIMS_MAX:
            raise ValueError(f"a crowd process sends 1..{CROWD_CLAIMS_MAX} claims")
        if any(later.offset_s < earlier.offset_s for earlier, later in pairwise(self.claims)):
            raise ValueError("claims must be ordered by offset")
        if not 0 < self.max_in_flight <= IN_FLIGHT_MAX:
            raise ValueError(f"max_in_flight must be in 1..{IN_FLIGHT_MAX}")
        if not 0 < self.channels <= CHANNELS_MAX:
            raise ValueError(f"channels must be in 1..{CHANNELS_MAX}")
        if not 0 < self.deadline_s <= DEADLINE_S_MAX:
            raise ValueError(f"deadline_s must be in (0, {DEADLINE_S_MAX:g}]")

    @property
    def last_due(self) -> float:
        return self.start_at + self.claims[-1].offset_s


@dataclass(frozen=True)
class CrowdResult:
    """One client process's account of a flash crowd (histograms HDR-encoded, microseconds)."""

    worker: int
    pid: int
    answered: int
    outcomes: dict[str, int]  # ISSUED, DECLINED_<reason> or a gRPC status name
    wait: str  # from the due time to the answer: what the person waited
    service: str  # from the send to the answer: what the server (and its queue) took
    send_lag: str  # from the due time to the send: waiting for an in-flight slot
    issued: list[tuple[float, int]]  # (answered at, person) of every ISSUED answer
    first_sent: float
    last_answered: float
    unfinished: int


@dataclass
class _Tally:
    latency: Histogram = field(default_factory=Histogram)
    send_lag: Histogram = field(default_factory=Histogram)
    outcomes: Counter[str] = field(default_factory=Counter)
    completed_in_window: int = 0
    measured: int = 0
    not_sent: int = 0
    unfinished: int = 0


class Caller:
    """Builds, signs and sends one call; answers with an outcome label."""

    def __init__(self, spec: PhaseSpec, channels: list[grpc.aio.Channel]) -> None:
        self._spec = spec
        self._method = METHODS[spec.method]
        self._stubs = [channel.unary_unary(self._method) for channel in channels]
        self._next = 0
        self._payload = secrets.token_bytes(spec.echo_payload_bytes)

    def body(self) -> bytes:
        spec = self._spec
        if spec.method == "echo":
            return diagnostics_pb2.EchoRequest(payload=self._payload).SerializeToString()
        return authorize_request(spec.campaign_id, spec.gtin, spec.price_fen).SerializeToString()

    async def call(self) -> str:
        body = self.body()
        metadata = signing.signed_metadata(self._spec.secret, self._method, self._spec.terminal_id, body)
        stub = self._stubs[self._next]
        self._next = (self._next + 1) % len(self._stubs)
        try:
            reply: bytes = await stub(body, timeout=self._spec.deadline_s, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            return str(error.code().name)
        if self._spec.method == "echo":
            return "OK"
        return outcome_label(authorization_pb2.AuthorizeResponse.FromString(reply))


def authorize_request(campaign_id: str, gtin: str, price_fen: int) -> authorization_pb2.AuthorizeRequest:
    """A one-line request from a consumer never seen before (a fresh 64-hex consumer key)."""
    return authorization_pb2.AuthorizeRequest(
        request_id=str(uuid.uuid4()),
        campaign_id=campaign_id,
        consumer_key=secrets.token_hex(32),
        channel=authorization_pb2.CHANNEL_POS,
        lines=[authorization_pb2.LineItem(line_id="1", gtin=gtin, unit_price_fen=price_fen)],
    )


def outcome_label(response: authorization_pb2.AuthorizeResponse) -> str:
    if response.decision == authorization_pb2.DECISION_APPROVED:
        return "APPROVED"
    return "DECLINED_" + authorization_pb2.DeclineReason.Name(response.decline_reason).removeprefix("DECLINE_REASON_")


async def _sleep_until(instant: float) -> None:
    delay = instant - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def closed_loop(spec: PhaseSpec, caller: Caller) -> _Tally:
    tally = _Tally()
    start, end = spec.window_start, spec.window_end

    async def one_worker() -> None:
        while True:
            sent = time.monotonic()
            if sent >= end:
                return
            outcome = await caller.call()
            answered = time.monotonic()
            if start <= answered < end:
                tally.completed_in_window += 1
                tally.measured += 1
                tally.latency.record_us(int((answered - sent) * 1e6))
                tally.outcomes[outcome] += 1

    await _sleep_until(spec.start_at)
    await asyncio.gather(*(one_worker() for _ in range(spec.concurrency)))
    return tally


async def open_loop(spec: PhaseSpec, caller: Caller) -> _Tally:
    tally = _Tally()
    start, end = spec.window_start, spec.window_end
    interval_s = 1.0 / spec.rate_per_s
    first = spec.start_at + spec.offset_s
    slots = asyncio.Semaphore(spec.max_in_flight)
    in_flight: set[asyncio.Task[None]] = set()

    async def one(intended: float) -> None:
        try:
            sent = time.monotonic()
            outcome = await caller.call()
            answered = time.monotonic()
        finally:
            slots.release()
        if start <= answered < end:
            tally.completed_in_window += 1
        if intended >= start:
            tally.measured += 1
            tally.latency.record_us(int((answered - intended) * 1e6))
            tally.send_lag.record_us(int((sent - intended) * 1e6))
            tally.outcomes[outcome] += 1

    index = 0
    while (intended := first + index * interval_s) < end:
        await _sleep_until(intended)
        # A full in-flight budget delays the send; its latency still counts from `intended`.
        await slots.acquire()
        if time.monotonic() > end + spec.deadline_s:
            slots.release()
            tally.not_sent = int((end - intended) / interval_s) + 1
            break
        task = asyncio.create_task(one(intended))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        index += 1
    if in_flight:
        _done, pending = await asyncio.wait(set(in_flight), timeout=spec.deadline_s + 5.0)
        tally.unfinished = len(pending)
        for task in pending:
            task.cancel()
    return tally


def claim_request(spec: CrowdSpec, claim: Claim) -> qualification_pb2.ClaimQualificationRequest:
    """A fresh attempt (a new request id, not a retry) with a fix taken ``fix_age_ms`` ago."""
    fix_time = Timestamp()
    fix_time.FromMilliseconds(int(time.time() * 1000) - claim.fix_age_ms)
    return qualification_pb2.ClaimQualificationRequest(
        request_id=str(uuid.uuid4()),
        campaign_id=spec.campaign_id,
        category=spec.category,
        consumer=qualification_pb2.ConsumerIdentity(id_number=claim.id_number),
        device_location=qualification_pb2.DeviceLocation(
            location=common_pb2.Location(
                latitude=claim.latitude,
                longitude=claim.longitude,
                coordinate_system=claim.coordinate_system,  # type: ignore[arg-type]
                accuracy_m=CROWD_ACCURACY_M,
            ),
            fix_time=fix_time,
        ),
    )


CROWD_ACCURACY_M = 15.0  # a phone with GPS, outdoors


def claim_label(response: qualification_pb2.ClaimQualificationResponse) -> str:
    if response.decision == qualification_pb2.CLAIM_DECISION_ISSUED:
        return "ISSUED"
    reason = qualification_pb2.ClaimDeclineReason.Name(response.decline_reason)
    return "DECLINED_" + reason.removeprefix("CLAIM_DECLINE_REASON_")


async def crowd(worker: int, spec: CrowdSpec, channels: list[grpc.aio.Channel]) -> CrowdResult:
    stubs = [channel.unary_unary(CLAIM_METHOD) for channel in channels]
    wait, service, send_lag = Histogram(), Histogram(), Histogram()
    outcomes: Counter[str] = Counter()
    issued: list[tuple[float, int]] = []
    sent_times: list[float] = []
    answered_times: list[float] = []
    slots = asyncio.Semaphore(spec.max_in_flight)
    in_flight: set[asyncio.Task[None]] = set()

    async def one(index: int, claim: Claim, due: float) -> None:
        try:
            body = claim_request(spec, claim).SerializeToString()
            metadata = signing.signed_metadata(spec.secret, CLAIM_METHOD, spec.partner_id, body)
            sent = time.monotonic()
            try:
                reply: bytes = await stubs[index % len(stubs)](body, timeout=spec.deadline_s, metadata=metadata)
                outcome = claim_label(qualification_pb2.ClaimQualificationResponse.FromString(reply))
            except grpc.aio.AioRpcError as error:
                outcome = str(error.code().name)
            answered = time.monotonic()
        finally:
            slots.release()
        wait.record_us(int((answered - due) * 1e6))
        service.record_us(int((answered - sent) * 1e6))
        send_lag.record_us(int((sent - due) * 1e6))
        outcomes[outcome] += 1
        sent_times.append(sent)
        answered_times.append(answered)
        if outcome == "ISSUED":
            issued.append((answered, claim.person))

    for index, claim in enumerate(spec.claims):
        due = spec.start_at + claim.offset_s
        await _sleep_until(due)
        # A full in-flight budget delays the send; the wait still counts from `due`.
        await slots.acquire()
        task = asyncio.create_task(one(index, claim, due))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    unfinished = 0
    if in_flight:
        _done, pending = await asyncio.wait(set(in_flight), timeout=spec.deadline_s + 5.0)
        unfinished = len(pending)
        for task in pending:
            task.cancel()
    return CrowdResult(
        worker=worker,
        pid=os.getpid(),
        answered=sum(outcomes.values()),
        outcomes=dict(outcomes),
        wait=wait.encode(),
        service=service.encode(),
        send_lag=send_lag.encode(),
        issued=issued,
        first_sent=min(sent_times, default=spec.start_at),
        last_answered=max(answered_times, default=spec.start_at),
        unfinished=unfinished,
    )


class _ChannelCache:
    """Channels per target, kept across phases so no phase pays for connecting."""

    def __init__(self) -> None:
        self._channels: dict[tuple[str, int, str], list[grpc.aio.Channel]] = {}

    async def get(self, target: str, count: int, tls_ca: str = "") -> list[grpc.aio.Channel]:
        key = (target, count, tls_ca)
        if key not in self._channels:
            options = [("grpc.use_local_subchannel_pool", 1)]
            if tls_ca:
                credentials = grpc.ssl_channel_credentials(await asyncio.to_thread(Path(tls_ca).read_bytes))
                channels = [grpc.aio.secure_channel(target, credentials, options=options) for _ in range(count)]
            else:
                channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(count)]
            for channel in channels:
                await asyncio.wait_for(channel.channel_ready(), timeout=10.0)
            self._channels[key] = channels
        return self._channels[key]

    async def close(self) -> None:
        for channels in self._channels.values():
            for channel in channels:
                await channel.close()
        self._channels.clear()


async def run_phase(worker: int, spec: PhaseSpec, cache: _ChannelCache) -> PhaseResult:
    caller = Caller(spec, await cache.get(spec.target, spec.channels, spec.tls_ca))
    tally = await (closed_loop(spec, caller) if spec.mode == "closed" else open_loop(spec, caller))
    return PhaseResult(
        worker=worker,
        pid=os.getpid(),
        completed_in_window=tally.completed_in_window,
        measured=tally.measured,
        outcomes=dict(tally.outcomes),
        latency=tally.latency.encode(),
        send_lag=tally.send_lag.encode(),
        not_sent=tally.not_sent,
        unfinished=tally.unfinished,
    )


async def _serve(worker: int, connection: Connection) -> None:
    cache = _ChannelCache()
    loop = asyncio.get_running_loop()
    connection.send(("ready", os.getpid()))
    try:
        while True:
            message: tuple[str, Any] = await loop.run_in_executor(None, connection.recv)
            if message[0] == "stop":
                return
            spec = message[1]
            try:
                if isinstance(spec, CrowdSpec):
                    outcome: PhaseResult | CrowdResult = await crowd(
                        worker, spec, await cache.get(spec.target, spec.channels)
                    )
                else:
                    outcome = await run_phase(worker, spec, cache)
            except Exception:
                connection.send(("error", traceback.format_exc()))
                continue
            connection.send(("result", outcome))
    finally:
        await cache.close()


def client_main(worker: int, connection: Connection) -> None:
    """Entry point of a client process (importable by name, as spawn requires)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(worker, connection))


class ClientPool:
    """``count`` client processes kept for the whole run; one phase at a time."""

    def __init__(self, count: int) -> None:
        if not 0 < count <= CLIENT_PROCESSES_MAX:
            raise ValueError(f"client processes must be in 1..{CLIENT_PROCESSES_MAX}")
        self.count = count
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[Any] = []
        self._connections: list[Connection] = []
        self.pids: list[int] = []

    def start(self) -> None:
        for worker in range(self.count):
            parent_end, child_end = self._context.Pipe()
            process = self._context.Process(
                target=client_main, args=(worker, child_end), name=f"bench-client-{worker}", daemon=True
            )
            process.start()
            child_end.close()
            self._processes.append(process)
            self._connections.append(parent_end)
        for connection in self._connections:
            if not connection.poll(READY_TIMEOUT_S):
                raise RuntimeError(f"a client process was not ready within {READY_TIMEOUT_S:g} s")
            kind, pid = connection.recv()
            assert kind == "ready"
            self.pids.append(int(pid))

    def run(self, specs: list[PhaseSpec], on_wait: Callable[[], None] | None = None) -> list[PhaseResult]:
        """Sends one spec to each process; ``on_wait`` runs (in this process) while they work,
        e.g. to sample CPU at the window's edges; then collects every result."""
        longest = max(spec.window_end + spec.deadline_s for spec in specs)
        results: list[PhaseResult] = self._run(specs, longest, on_wait)
        return results

    def run_crowd(self, specs: list[CrowdSpec], on_wait: Callable[[], None] | None = None) -> list[CrowdResult]:
        """One flash crowd, a share per process; results once every claim is answered."""
        # Every claim may wait for a slot behind all the others: allow each its deadline.
        longest = max(spec.last_due + spec.deadline_s * (1 + len(spec.claims) / spec.max_in_flight) for spec in specs)
        results: list[CrowdResult] = self._run(specs, longest, on_wait)
        return results

    def _run(self, specs: Sequence[Any], finished_by: float, on_wait: Callable[[], None] | None) -> list[Any]:
        assert len(specs) == self.count
        for connection, spec in zip(self._connections, specs, strict=True):
            connection.send(("run", spec))
        if on_wait is not None:
            on_wait()
        longest = finished_by - time.monotonic()
        results: list[Any] = []
        for connection in self._connections:
            if not connection.poll(max(longest, 0.0) + RESULT_GRACE_S):
                raise RuntimeError("a client process did not report its phase in time")
            kind, payload = connection.recv()
            if kind == "error":
                raise RuntimeError(f"client process failed:\n{payload}")
            results.append(payload)
        return results

    def close(self) -> None:
        for connection in self._connections:
            try:
                connection.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
        for process in self._processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)
        self._processes.clear()
        self._connections.clear()
        self.pids.clear()
