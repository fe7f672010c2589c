"""The commerce bureau's web dashboard: ``subsidyctl dashboard`` (README "Government dashboard").

A read-only HTTP server (aiohttp) for bureau staff holding a ``government`` credential. It has
no credential of its own and no access to PostgreSQL or Redis: every figure comes from the
gateway over gRPC, each call signed with the logged-in user's own credential, so the gateway's
role checks decide what a user may read, exactly as for ``subsidyctl --operator gov-...``.

- **Login.** The user presents the credential (id and secret) at ``/login``. The dashboard
  asks the gateway for something only readers may have (``ListDailyReports``: operators and
  government) and for something only operators may have (``ReportingService.GetLedgerStatus``,
  a cheap read): a government credential is the one that gets the first and is refused the
  second. A terminal, partner, provider or auditor credential is refused by the first, an
  operator's (a mutating role) by the second, a wrong secret by both.
- **Sessions.** A random id (32 bytes from ``secrets``) in a cookie that is HttpOnly,
  SameSite=Strict and, over HTTPS, Secure with the ``__Host-`` prefix; the credential stays in
  this process's memory, never in the browser, never in a log. A session ends after
  SUBSIDY_DASHBOARD_SESSION_IDLE_S without a request, SUBSIDY_DASHBOARD_SESSION_MAX_S after
  login, at logout, or when the gateway stops accepting its credential; at most
  SUBSIDY_DASHBOARD_MAX_SESSIONS at once.
- **CSRF.** Every route is GET and reads, except ``POST /login`` and ``POST /logout``, which
  must come from this origin (``Origin``, else ``Referer``, and ``Sec-Fetch-Site`` when sent);
  with SameSite=Strict no other site's page can make the browser send the cookie anyway. Pages
  and scripts are served with a Content-Security-Policy of ``'self'`` only (no inline script).
- **Live figures.** ``/events`` relays ``SupervisionService.WatchFunds`` as server-sent events.
  One upstream stream per *session*, shared by that session's browser tabs (``SnapshotRelay``):
  a stream shared by the whole process would have to be signed by a credential of the
  dashboard's own, and the gateway could no longer refuse one user's stream when that user's
  credential is withdrawn. The gateway's single poller fans its snapshots out to every watcher,
  so each session's stream adds no work to the authorization path. Each tab gets a queue of at
  most SUBSIDY_DASHBOARD_SSE_BUFFER snapshots and a write timeout: a tab that falls further
  behind is disconnected (its EventSource reconnects and starts from the newest snapshot), never
  buffered without bound.
- **Reports.** ``/reports/{date}/{rows|budgets}.{csv|xlsx}`` streams
  ``DailyReportService.ExportDailyReport`` to the browser chunk by chunk; likewise a bill
  reconciliation run's exceptions (``ReconciliationService``): the runs, the first exception
  lines of one, and ``/reconciliation/{run}/exceptions.{csv|xlsx}``.
- **Complaints.** ``/api/complaints`` relays ``ComplaintService.GetTicketCounts`` (the
  gateway lets government users read the counts, nothing of the tickets themselves): tickets
  opened, resolved, rejected and overdue per business day for the last COMPLAINT_DAYS days, and
  the open backlog with how much of it is past a deadline.

Money is integer fen on the wire; every amount the page shows is the exact yuan text of those
integers (``server.domain.daily_report.yuan``), beside the integer for the charts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import secrets
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import grpc
import orjson
from aiohttp import web
from google.protobuf.timestamp_pb2 import Timestamp
from subsidy_client import RetryPolicy, TlsConfig
from subsidy_client.client import open_channel
from subsidy_client.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SubsidyError,
    Unauthenticated,
    Unavailable,
)
from subsidy_client.reconciliation import ReconciliationClient
from subsidy_client.reports import DailyReportClient
from subsidy_client.supervision import SupervisionClient
from subsidy_client.v1 import complaints_pb2, daily_report_pb2, reconciliation_pb2, reporting_pb2, supervision_pb2

from server import logs
from server.config import Config, ConfigError
from server.domain.daily_report import yuan
from server.rpc.auth import TERMINAL_PATTERN
from server.rpc.tls import is_loopback, metrics_tls

log = logging.getLogger("subsidy.dashboard")

STATIC_DIR = Path(__file__).with_name("dashboard_static")
REPORTING = "/subsidy.v1.ReportingService/"
COMPLAINTS = "/subsidy.v1.ComplaintService/"
COOKIE = "dashboard_session"
SECURE_COOKIE = "__Host-dashboard_session"
# Gateway calls: one attempt more on UNAVAILABLE, each within this deadline.
CALL_DEADLINE_S = 10.0
WATCH_BACKOFF_S = (1.0, 30.0)
# A comment line on every SSE stream this often: finds closed tabs, keeps proxies from timing out.
HEARTBEAT_S = 15.0
# How long one write to a browser may take before the tab counts as stuck and is disconnected.
WRITE_TIMEOUT_S = 10.0
# Login probes in flight at once (each is two gateway calls); more wait.
LOGIN_CONCURRENCY = 8
SECRET_MAX_LENGTH = 256
REQUEST_MAX_BYTES = 16 * 1024
TOP_MERCHANTS = 10
REPORTS_LISTED = 60
ALERTS_LISTED = 100
RUNS_LISTED = 30
# Exception lines of one reconciliation run shown in the page (the export has them all).
EXCEPTIONS_SHOWN = 200
# Business days of complaint counts the page shows, today included.
COMPLAINT_DAYS = 7
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
RECONCILIATION_FORMATS = {
    "csv": reconciliation_pb2.RECONCILIATION_EXPORT_FORMAT_CSV,
    "xlsx": reconciliation_pb2.RECONCILIATION_EXPORT_FORMAT_XLSX,
}
DATE_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
FILE_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
FORMATS = {"csv": daily_report_pb2.EXPORT_FORMAT_CSV, "xlsx": daily_report_pb2.EXPORT_FORMAT_XLSX}
TABLES = {"rows": daily_report_pb2.EXPORT_TABLE_ROWS, "budgets": daily_report_pb2.EXPORT_TABLE_BUDGETS}
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
        " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


# --------------------------------------------------------------------------- the gateway


class BureauClient(DailyReportClient):
    """What the dashboard reads, signed with one user's credential: the daily reports
    (inherited) and the live supervision service."""

    @functools.cached_property
    def supervision(self) -> SupervisionClient:
        """Live fund supervision, with the same credential over the same channel."""
        return SupervisionClient(
            self.target,
            self._terminal_id,
            self._secret,
            deadline_s=self._deadline_s,
            retry=self._retry,
            channel=self._channel,
        )

    def watch(self) -> AsyncIterator[supervision_pb2.WatchFundsResponse]:
        """Snapshots once a second; the relay reopens the stream when it ends."""
        return self.supervision.watch()

    @functools.cached_property
    def reconciliation(self) -> ReconciliationClient:
        """Bill reconciliation, read with the same credential over the same channel."""
        return ReconciliationClient(
            self.target,
            self._terminal_id,
            self._secret,
            deadline_s=self._deadline_s,
            retry=self._retry,
            channel=self._channel,
        )

    async def ledger_status(self) -> reporting_pb2.GetLedgerStatusResponse:
        request = reporting_pb2.GetLedgerStatusRequest()
        return await self._call(REPORTING + "GetLedgerStatus", request, reporting_pb2.GetLedgerStatusResponse)

    async def ticket_counts(self) -> complaints_pb2.GetTicketCountsResponse:
        """The complaints desk's counts for the gateway's default window (the last 30 business
        days, today last) and its open backlog now."""
        request = complaints_pb2.GetTicketCountsRequest()
        return await self._call(COMPLAINTS + "GetTicketCounts", request, complaints_pb2.GetTicketCountsResponse)


class LoginRefused(Exception):
    """The gateway did not accept the credential for the dashboard; ``reason`` is what the login
    page says: ``invalid`` (unknown id or wrong secret), ``denied`` (not a government
    credential) or ``unavailable`` (the gateway did not answer)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def check_government(client: BureauClient) -> None:
    """Raises LoginRefused unless the gateway treats ``client``'s credential as a government
    reader: allowed to list the daily reports, refused the operators' ledger status."""
    try:
        await client.list(limit=1)
    except Unauthenticated:
        raise LoginRefused("invalid") from None
    except PermissionDenied:
        raise LoginRefused("denied") from None
    except (Unavailable, DeadlineExceeded):
        raise LoginRefused("unavailable") from None
    try:
        await client.ledger_status()
    except PermissionDenied:
        return
    except (Unavailable, DeadlineExceeded):
        raise LoginRefused("unavailable") from None
    raise LoginRefused("denied")  # an operator credential: it may change things, so not here


def gateway_target(config: Config) -> str:
    """SUBSIDY_DASHBOARD_GATEWAY, else the gateway's own SUBSIDY_LISTEN with a wildcard host
    (0.0.0.0, [::]) read as the loopback address of its family."""
    if config.dashboard_gateway:
        return config.dashboard_gateway
    host, _, port = config.listen.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
    return f"{host}:{port}"


def gateway_tls(config: Config) -> TlsConfig | None:
    """TLS to the gateway when the gateway is TLS (its certificate is configured here too) or a
    CA for it is named; None (plaintext) otherwise, as make run's loopback gateway."""
    if config.tls_cert or config.dashboard_gateway_ca:
        return TlsConfig(ca_file=config.dashboard_gateway_ca or None)
    return None


# --------------------------------------------------------------------------- JSON for the page


def money(fen: int) -> dict[str, Any]:
    """An amount for the page: the integer (charts) and its exact yuan text (what is shown)."""
    return {"fen": fen, "yuan": yuan(fen)}


def instant(stamp: Timestamp) -> str | None:
    if stamp.seconds == 0 and stamp.nanos == 0:
        return None
    return stamp.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")


def budget_json(budget: supervision_pb2.BudgetFigures) -> dict[str, Any]:
    exhaustion = budget.projected_exhaustion_at if budget.HasField("projected_exhaustion_at") else Timestamp()
    return {
        "campaign_id": budget.campaign_id,
        "campaign_name": budget.campaign_name,
        "category": budget.category,
        "budget": money(budget.budget_fen),
        "released": money(budget.released_fen),
        "reserved": money(budget.reserved_fen),
        "spent": money(budget.spent_fen),
        "refunded": money(budget.refunded_fen),
        "remaining": money(budget.remaining_fen),
        "used_ratio": budget.used_ratio,
        "claims_per_minute": budget.claims_per_minute,
        "redemptions_per_minute": budget.redemptions_per_minute,
        "burn_per_minute": money(budget.burn_fen_per_minute),
        "projected_exhaustion_at": instant(exhaustion),
        "qualification_quota": budget.qualification_quota,
        "qualifications_claimed": budget.qualifications_claimed,
    }


def alert_json(alert: supervision_pb2.Alert) -> dict[str, Any]:
    return {
        "alert_id": alert.alert_id,
        "kind": supervision_pb2.AlertKind.Name(alert.kind),
        "campaign_id": alert.campaign_id,
        "category": alert.category,
        "merchant_id": alert.merchant_id,
        "threshold_percent": alert.threshold_percent,
        "observed": alert.observed,
        "baseline": alert.baseline,
        "message": alert.message,
        "raised_at": instant(alert.raised_at),
    }


def snapshot_json(snapshot: supervision_pb2.WatchFundsResponse) -> dict[str, Any]:
    return {
        "taken_at": instant(snapshot.taken_at),
        "sequence": snapshot.sequence,
        "budgets": [budget_json(budget) for budget in snapshot.budgets],
        "alerts": [alert_json(alert) for alert in snapshot.alerts],
    }


def figures_json(figures: supervision_pb2.CategoryFigures) -> dict[str, Any]:
    return {
        "campaign_id": figures.campaign_id,
        "category": figures.category,
        "consumers": figures.consumers,
        "sales": figures.sales,
        "redeemed": money(figures.redeemed_fen),
        "order": money(figures.order_fen),
        "refunds": figures.refunds,
        "refunded": money(figures.refunded_fen),
        "merchants": figures.merchants,
    }


def today_json(today: supervision_pb2.GetTodayFiguresResponse) -> dict[str, Any]:
    return {
        "business_date": today.business_date,
        "time_zone": today.time_zone,
        "as_of": instant(today.as_of),
        "categories": [figures_json(item) for item in today.categories],
        "district_total": figures_json(today.district_total),
        "top_merchants": [
            {
                "merchant_id": merchant.merchant_id,
                "merchant_name": merchant.merchant_name,
                "sales": merchant.sales,
                "redeemed": money(merchant.redeemed_fen),
                "order": money(merchant.order_fen),
                "refunded": money(merchant.refunded_fen),
            }
            for merchant in today.top_merchants
        ],
    }


def report_json(header: daily_report_pb2.DailyReportHeader) -> dict[str, Any]:
    total = header.day_total
    return {
        "business_date": header.business_date,
        "cut_at": instant(header.cut_at),
        "row_count": header.row_count,
        "adjustment_rows": header.adjustment_rows,
        "content_hash": header.content_hash,
        "consumers": total.consumers,
        "sales": total.sales,
        "redeemed": money(total.redeemed_fen),
        "order": money(total.order_fen),
        "refunded": money(total.refunded_fen),
        "merchants": total.merchants,
        # Format 2 (0 in reports published before): the day's claw-backs and the complaints
        # desk's day as the report froze them (the complaints panel shows the live counts).
        "clawed_back": money(total.clawed_back_fen),
        "tickets_opened": header.tickets_opened,
        "tickets_resolved": header.tickets_resolved,
        "tickets_overdue": header.tickets_overdue,
    }


def run_json(run: reconciliation_pb2.ReconciliationRun) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "channel": run.channel,
        "business_date": run.business_date,
        "file_name": run.file_name,
        "imported_at": instant(run.imported_at),
        "file_lines": run.file_lines,
        "ledger_items": run.ledger_items,
        "exception_lines": run.exception_lines,
        "channel_net_subsidy": money(run.channel_net_subsidy_fen),
        "ledger_net_subsidy": money(run.ledger_net_subsidy_fen),
        "counts": [
            {
                "status": reconciliation_pb2.ReconciliationStatus.Name(count.status),
                "lines": count.lines,
                "difference": money(count.difference_fen),
            }
            for count in run.counts
        ],
    }


def complaints_json(counts: complaints_pb2.GetTicketCountsResponse) -> dict[str, Any]:
    """Today (the gateway's last business day), the COMPLAINT_DAYS days up to it, newest first,
    and the backlog."""
    days = [
        {
            "business_date": day.business_date,
            "opened": day.opened,
            "resolved": day.resolved,
            "rejected": day.rejected,
            "overdue": day.overdue,
        }
        for day in reversed(counts.days[-COMPLAINT_DAYS:])
    ]
    return {
        "today": days[0] if days else None,
        "days": days,
        "open_now": counts.open_now,
        "overdue_now": counts.overdue_now,
    }


def exception_json(line: reconciliation_pb2.ReconciliationLine) -> dict[str, Any]:
    return {
        "status": reconciliation_pb2.ReconciliationStatus.Name(line.status),
        "kind": reconciliation_pb2.ReconciliationKind.Name(line.kind),
        "line_number": line.line_number,
        "channel_txn_id": line.channel_txn_id,
        "authorization_id": line.authorization_id,
        "merchant_id": line.merchant_id,
        "channel_subsidy": money(line.channel_subsidy_fen),
        "ledger_subsidy": money(line.ledger_subsidy_fen),
        "difference": money(line.difference_fen),
        "error": line.error,
    }


# --------------------------------------------------------------------------- live relay


Event = tuple[str, bytes]  # (SSE event name, JSON data)


class Subscriber:
    """One browser tab's place in a relay: a bounded queue of events. ``None`` in the queue
    means the tab was dropped (it fell behind, or the session ended)."""

    def __init__(self, buffer: int) -> None:
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=buffer + 1)
        self.buffer = buffer

    def offer(self, event: Event) -> bool:
        """Queues ``event``; False (and the tab is told to go) when ``buffer`` are waiting."""
        if self.queue.qsize() >= self.buffer:
            self.end()
            return False
        self.queue.put_nowait(event)
        return True

    def end(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class SnapshotRelay:
    """One upstream WatchFunds stream fanned out to the tabs of one session.

    The stream is opened when the first tab subscribes and cancelled when the last one leaves;
    a new tab gets the newest snapshot at once. When the stream fails it is reopened with
    backoff (the tabs are told ``upstream``); when the gateway refuses the credential
    (UNAUTHENTICATED, PERMISSION_DENIED) the relay ends its tabs and calls ``on_refused``.
    """

    def __init__(
        self,
        open_stream: Callable[[], AsyncIterator[supervision_pb2.WatchFundsResponse]],
        buffer: int,
        on_refused: Callable[[], None] = lambda: None,
    ) -> None:
        if buffer < 1:
            raise ValueError("buffer must be at least 1")
        self._open_stream = open_stream
        self._buffer = buffer
        self._on_refused = on_refused
        self._subscribers: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        self.latest: Event | None = None
        self.dropped = 0

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> Subscriber:
        subscriber = Subscriber(self._buffer)
        if self.latest is not None:
            subscriber.offer(self.latest)
        self._subscribers.add(subscriber)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)
        if not self._subscribers and self._task is not None:
            self._task.cancel()
            self._task = None

    def publish(self, event: Event) -> None:
        for subscriber in list(self._subscribers):
            if not subscriber.offer(event):
                self._subscribers.discard(subscriber)
                self.dropped += 1
                log.info("dashboard tab dropped: too far behind", extra={"buffer": self._buffer})

    async def close(self) -> None:
        for subscriber in self._subscribers:
            subscriber.end()
        self._subscribers.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        backoff_s = WATCH_BACKOFF_S[0]
        while True:
            try:
                async for snapshot in self._open_stream():
                    backoff_s = WATCH_BACKOFF_S[0]
                    self.latest = ("snapshot", orjson.dumps(snapshot_json(snapshot)))
                    self.publish(self.latest)
                state = {"state": "reconnecting", "code": "ENDED"}
            except (Unauthenticated, PermissionDenied) as refused:
                self.publish(("ended", orjson.dumps({"code": refused.code.name})))
                for subscriber in self._subscribers:
                    subscriber.end()
                self._subscribers.clear()
                self._on_refused()
                return
            except SubsidyError as error:
                state = {"state": "reconnecting", "code": error.code.name}
                log.warning("dashboard: supervision stream failed", extra={"code": error.code.name})
            self.publish(("upstream", orjson.dumps(state)))
            await asyncio.sleep(backoff_s)
            backoff_s = min(WATCH_BACKOFF_S[1], backoff_s * 2)


# --------------------------------------------------------------------------- sessions


@dataclass
class Session:
    session_id: str
    caller_id: str
    client: BureauClient
    relay: SnapshotRelay
    created_s: float
    seen_s: float
    ended: bool = False


@dataclass
class Sessions:
    """Server-side sessions by random id, bounded in number and lifetime."""

    idle_s: float
    max_s: float
    capacity: int
    buffer: int
    clock: Callable[[], float] = time.monotonic
    _by_id: dict[str, Session] = field(default_factory=dict)
    _closing: set[asyncio.Task[None]] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self._by_id)

    def _expired(self, session: Session, now: float) -> bool:
        return session.ended or now - session.seen_s > self.idle_s or now - session.created_s > self.max_s

    def find(self, session_id: str, *, touch: bool = True) -> Session | None:
        session = self._by_id.get(session_id)
        if session is None:
            return None
        now = self.clock()
        if self._expired(session, now):
            self._end(session)
            return None
        if touch:
            session.seen_s = now
        return session

    def create(self, caller_id: str, client: BureauClient) -> Session | None:
        self.sweep()
        if len(self._by_id) >= self.capacity:
            return None
        session_id = secrets.token_urlsafe(32)
        now = self.clock()
        relay = SnapshotRelay(client.watch, self.buffer, on_refused=lambda: self.end(session_id))
        session = Session(session_id, caller_id, client, relay, now, now)
        self._by_id[session_id] = session
        return session

    def end(self, session_id: str) -> None:
        session = self._by_id.get(session_id)
        if session is not None:
            self._end(session)

    def _end(self, session: Session) -> None:
        session.ended = True
        self._by_id.pop(session.session_id, None)
        closing = asyncio.get_running_loop().create_task(session.relay.close())
        self._closing.add(closing)  # held until done: the loop keeps only weak references to tasks
        closing.add_done_callback(self._closing.discard)

    def sweep(self) -> None:
        now = self.clock()
        for session in [item for item in self._by_id.values() if self._expired(item, now)]:
            self._end(session)

    async def close(self) -> None:
        for session in list(self._by_id.values()):
            session.ended = True
            await session.relay.close()
        self._by_id.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)


# --------------------------------------------------------------------------- the HTTP side


@dataclass
class Dashboard:
    config: Config
    channel: grpc.aio.Channel
    sessions: Sessions
    secure: bool
    login_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(LOGIN_CONCURRENCY))

    @property
    def cookie_name(self) -> str:
        return SECURE_COOKIE if self.secure else COOKIE

    def client(self, caller_id: str, secret: str) -> BureauClient:
        return BureauClient(
            gateway_target(self.config),
            caller_id,
            secret,
            deadline_s=CALL_DEADLINE_S,
            retry=RetryPolicy(max_attempts=2, total_budget_s=2 * CALL_DEADLINE_S),
            channel=self.channel,
        )

    def session(self, request: web.Request) -> Session | None:
        session_id = request.cookies.get(self.cookie_name, "")
        return self.sessions.find(session_id) if session_id else None


DASHBOARD_KEY = web.AppKey("dashboard", Dashboard)


def _dashboard(request: web.Request) -> Dashboard:
    return request.app[DASHBOARD_KEY]


@web.middleware
async def security_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as error:
        response = error
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if isinstance(response, web.HTTPException):
        raise response
    return response


def same_origin(request: web.Request, public_origin: str = "") -> bool:
    """Whether a POST comes from a page of this dashboard (the CSRF check of login and logout):
    of ``public_origin`` (SUBSIDY_DASHBOARD_PUBLIC_ORIGIN) when the dashboard is served through
    a reverse proxy, which browsers see at another scheme, host or port than the listener's own;
    else of the listener the request reached."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin") or request.headers.get("Referer") or ""
    if not origin or origin == "null":
        return False
    parts = urlsplit(origin)
    if public_origin:
        expected = urlsplit(public_origin)
        return (parts.scheme, parts.netloc) == (expected.scheme, expected.netloc)
    return parts.scheme == request.scheme and parts.netloc == request.host


def static_file(name: str) -> web.Response:
    path = STATIC_DIR / name
    return web.Response(body=path.read_bytes(), content_type=STATIC_TYPES[path.suffix], charset="utf-8")


async def page(request: web.Request) -> web.StreamResponse:
    if _dashboard(request).session(request) is None:
        raise web.HTTPSeeOther("/login")
    return static_file("dashboard.html")


async def login_page(request: web.Request) -> web.StreamResponse:
    return static_file("login.html")


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in request.app[STATIC_NAMES]:
        raise web.HTTPNotFound()
    return static_file(name)


STATIC_NAMES = web.AppKey("static_names", frozenset)


async def login(request: web.Request) -> web.StreamResponse:
    dashboard = _dashboard(request)
    if not same_origin(request, dashboard.config.dashboard_public_origin):
        raise web.HTTPForbidden(text="cross-site request refused")
    form = await request.post()
    caller_id, secret = str(form.get("caller_id", "")).strip(), str(form.get("secret", "")).strip()
    if not TERMINAL_PATTERN.fullmatch(caller_id) or not 0 < len(secret) <= SECRET_MAX_LENGTH:
        raise web.HTTPSeeOther("/login?error=invalid")
    client = dashboard.client(caller_id, secret)
    async with dashboard.login_slots:
        try:
            await check_government(client)
        except LoginRefused as refused:
            log.info("dashboard login refused", extra={"caller": caller_id, "reason": refused.reason})
            raise web.HTTPSeeOther(f"/login?error={refused.reason}") from None
    session = dashboard.sessions.create(caller_id, client)
    if session is None:
        log.warning("dashboard login refused: too many sessions", extra={"capacity": dashboard.sessions.capacity})
        raise web.HTTPSeeOther("/login?error=busy")
    log.info("dashboard login", extra={"caller": caller_id})
    response = web.HTTPSeeOther("/")
    response.set_cookie(
        dashboard.cookie_name,
        session.session_id,
        max_age=int(dashboard.sessions.max_s),
        path="/",
        secure=dashboard.secure,
        httponly=True,
        samesite="Strict",
    )
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    dashboard = _dashboard(request)
    if not same_origin(request, dashboard.config.dashboard_public_origin):
        raise web.HTTPForbidden(text="cross-site request refused")
    session = dashboard.session(request)
    if session is not None:
        dashboard.sessions.end(session.session_id)
        log.info("dashboard logout", extra={"caller": session.caller_id})
    response = web.HTTPSeeOther("/login")
    response.del_cookie(dashboard.cookie_name, path="/", secure=dashboard.secure, samesite="Strict")
    raise response


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json")


def _failure(dashboard: Dashboard, session: Session, error: SubsidyError) -> web.Response:
    """A gateway refusal as the page's answer; a refused credential ends the session."""
    if isinstance(error, Unauthenticated | PermissionDenied):
        dashboard.sessions.end(session.session_id)
        return _json({"error": "session_ended"}, 401)
    if isinstance(error, NotFound | InvalidArgument):  # what the path named does not exist (or cannot)
        return _json({"error": "not_found"}, 404)
    log.warning("dashboard: gateway call failed", extra={"code": error.code.name, "reason": error.reason})
    return _json({"error": "unavailable", "code": error.code.name}, 503)


def _session_or_401(request: web.Request) -> Session:
    session = _dashboard(request).session(request)
    if session is None:
        raise web.HTTPUnauthorized(text='{"error":"login"}', content_type="application/json")
    return session


async def api_me(request: web.Request) -> web.StreamResponse:
    session = _session_or_401(request)
    return _json({"caller_id": session.caller_id})


async def api_today(request: web.Request) -> web.StreamResponse:
    session = _session_or_401(request)
    try:
        return _json(today_json(await session.client.supervision.today(TOP_MERCHANTS)))
    except SubsidyError as error:
        return _failure(_dashboard(request), session, error)


async def api_alerts(request: web.Request) -> web.StreamResponse:
    session = _session_or_401(request)
    try:
        return _json(
            {"alerts": [alert_json(alert) for alert in await session.client.supervision.alerts(limit=ALERTS_LISTED)]}
        )
    except SubsidyError as error:
        return _failure(_dashboard(request), session, error)


async def api_complaints(request: web.Request) -> web.StreamResponse:
    session = _session_or_401(request)
    try:
        return _json(complaints_json(await session.client.ticket_counts()))
    except SubsidyError as error:
        return _failure(_dashboard(request), session, error)


async def api_reports(request: web.Request) -> web.StreamResponse:
    session = _session_or_401(request)
    try:
        return _json({"reports": [report_json(header) for header in await session.client.list(limit=REPORTS_LISTED)]})
    except SubsidyError as error:
        return _failure(_dashboard(request), session, error)


def _content_disposition(file_name: str, fallback: str) -> str:
    ascii_name = file_name if FILE_NAME_PATTERN.fullmatch(file_name) else fallback
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(file_name, safe='')}"


async def download(request: web.Request) -> web.StreamResponse:
    """A published report as a file, streamed from the gateway's chunks to the browser."""
    session = _session_or_401(request)
    business_date, table, extension = (request.match_info[key] for key in ("date", "table", "extension"))
    if not DATE_PATTERN.fullmatch(business_date) or table not in TABLES or extension not in FORMATS:
        raise web.HTTPNotFound()
    try:
        date.fromisoformat(business_date)
    except ValueError:
        raise web.HTTPNotFound() from None
    chunks = session.client.export(business_date, FORMATS[extension], TABLES[table])
    return await relay_file(request, session, chunks, f"daily-report-{business_date}-{table}.{extension}")


async def download_exceptions(request: web.Request) -> web.StreamResponse:
    """A reconciliation run's exceptions (CSV or XLSX), streamed as a report is."""
    session = _session_or_401(request)
    run_id, extension = request.match_info["run_id"], request.match_info["extension"]
    if not RUN_ID_PATTERN.fullmatch(run_id) or extension not in RECONCILIATION_FORMATS:
        raise web.HTTPNotFound()
    chunks = session.client.reconciliation.export(run_id, file_format=RECONCILIATION_FORMATS[extension])
    return await relay_file(request, session, chunks, f"reconciliation-{run_id}-exceptions.{extension}")


async def relay_file(
    request: web.Request, session: Session, chunks: AsyncIterator[Any], fallback: str
) -> web.StreamResponse:
    """The gateway's file chunks to the browser as they come. The first chunk (which names the
    file) is read before answering, so a file that does not exist is a 404, not a broken one."""
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        return _json({"error": "unavailable"}, 503)
    except SubsidyError as error:
        return _failure(_dashboard(request), session, error)
    response = web.StreamResponse(
        headers={
            "Content-Type": first.content_type or "application/octet-stream",
            "Content-Disposition": _content_disposition(first.file_name or fallback, fallback),
        }
    )
    await response.prepare(request)
    try:
        await response.write(first.chunk)
        async for chunk in chunks:
            await response.write(chunk.chunk)
    except SubsidyError as error:
        # Headers are gone: the browser sees a truncated download, which it reports as failed.
        log.warning("dashboard: download broken off", extra={"code": error.code.name})
        if request.transport is not None:
            request.transport.close()
        return response
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    await response.write_eof()
    return response


async def api_reconciliation(request: web.Request) -> web.StreamResponse:
    session = _session_or_401(request)
    try:
        return _json({"runs": [run_json(run) for run in await session.client.reconciliation.list(limit=RUNS_LISTED)]})
    except SubsidyError as error:
        return _failure(_dashboard(request), session, error)


async def api_exceptions(request: web.Request) -> web.StreamResponse:
    """The first EXCEPTIONS_SHOWN exception lines of a run (``truncated`` when there are more)."""
    session = _session_or_401(request)
    run_id = request.match_info["run_id"]
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise web.HTTPNotFound()
    lines: list[dict[str, Any]] = []
    truncated = False
    parts = session.client.reconciliation.results(run_id)
    try:
        async for part in parts:
            for line in part.lines:
                if len(lines) == EXCEPTIONS_SHOWN:
                    truncated = True
                    break
                lines.append(exception_json(line))
            if truncated:
                break
    except SubsidyError as error:
        return _failure(_dashboard(request), session, error)
    finally:
        await parts.aclose()  # type: ignore[attr-defined]
    return _json({"run_id": run_id, "lines": lines, "truncated": truncated})


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``snapshot`` (every WatchFunds snapshot), ``upstream`` (the stream
    is being reopened), ``ended`` (the session is over: log in again)."""
    dashboard = _dashboard(request)
    session = _session_or_401(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    subscriber = session.relay.subscribe()
    try:
        await asyncio.wait_for(response.write(b"retry: 3000\n\n"), WRITE_TIMEOUT_S)
        while True:
            try:
                event = await asyncio.wait_for(subscriber.queue.get(), HEARTBEAT_S)
            except TimeoutError:
                if dashboard.sessions.find(session.session_id, touch=False) is None:
                    event = ("ended", b'{"code":"SESSION_EXPIRED"}')
                else:
                    await asyncio.wait_for(response.write(b": keepalive\n\n"), WRITE_TIMEOUT_S)
                    continue
            if event is None and not session.ended:
                break  # dropped, too far behind: the page's EventSource reconnects
            if event is None:
                event = ("ended", b'{"code":"SESSION_ENDED"}')  # signed out (maybe in another tab)
            name, data = event
            await asyncio.wait_for(
                response.write(b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"), WRITE_TIMEOUT_S
            )
            if name == "ended":
                break
    except (TimeoutError, ConnectionResetError):
        pass  # a tab that stopped reading: drop it
    finally:
        session.relay.unsubscribe(subscriber)
    return response


async def health(request: web.Request) -> web.StreamResponse:
    return _json({"status": "ok", "sessions": len(_dashboard(request).sessions)})


def create_app(config: Config, channel: grpc.aio.Channel, secure: bool) -> web.Application:
    app = web.Application(middlewares=[security_headers], client_max_size=REQUEST_MAX_BYTES)
    sessions = Sessions(
        idle_s=config.dashboard_session_idle_s,
        max_s=config.dashboard_session_max_s,
        capacity=config.dashboard_max_sessions,
        buffer=config.dashboard_sse_buffer,
    )
    app[DASHBOARD_KEY] = Dashboard(config, channel, sessions, secure)
    app[STATIC_NAMES] = frozenset(
        path.name for path in STATIC_DIR.iterdir() if path.suffix in STATIC_TYPES and path.suffix != ".html"
    )
    app.router.add_get("/", page)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/me", api_me)
    app.router.add_get("/api/today", api_today)
    app.router.add_get("/api/alerts", api_alerts)
    app.router.add_get("/api/reports", api_reports)
    app.router.add_get("/api/complaints", api_complaints)
    app.router.add_get("/events", events)
    app.router.add_get(r"/reports/{date}/{table}.{extension}", download)
    app.router.add_get("/api/reconciliation", api_reconciliation)
    app.router.add_get("/api/reconciliation/{run_id}/exceptions", api_exceptions)
    app.router.add_get(r"/reconciliation/{run_id}/exceptions.{extension}", download_exceptions)
    app.router.add_get("/health", health)
    return app


# --------------------------------------------------------------------------- the process


@dataclass
class DashboardServer:
    runner: web.AppRunner
    site: web.TCPSite
    channel: grpc.aio.Channel
    dashboard: Dashboard
    sweeper: asyncio.Task[None]
    tls: bool

    @property
    def port(self) -> int:
        return int(self.runner.addresses[0][1])

    @property
    def url(self) -> str:
        """Where a browser opens the dashboard: its public origin behind a proxy, else the listener."""
        if self.dashboard.config.dashboard_public_origin:
            return self.dashboard.config.dashboard_public_origin + "/"
        host = self.dashboard.config.dashboard_listen.rpartition(":")[0]
        host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    async def stop(self) -> None:
        self.sweeper.cancel()
        await self.dashboard.sessions.close()
        await self.runner.cleanup()
        await self.channel.close()


def check_listener(config: Config) -> ssl.SSLContext | None:
    """HTTPS with the gateway's certificate when one is configured; plaintext off loopback
    refused unless SUBSIDY_ALLOW_PLAINTEXT (raises ConfigError naming the variable)."""
    if not config.dashboard_listen:
        raise ConfigError("SUBSIDY_DASHBOARD_LISTEN is not set: host:port to serve the dashboard on")
    return metrics_tls(config, config.dashboard_listen, "SUBSIDY_DASHBOARD_LISTEN")


async def _sweep(sessions: Sessions) -> None:
    while True:
        await asyncio.sleep(60)
        sessions.sweep()


async def start_dashboard(config: Config) -> DashboardServer:
    """Binds SUBSIDY_DASHBOARD_LISTEN (port 0: any free port) and serves until ``stop``."""
    context = check_listener(config)
    channel = open_channel(gateway_target(config), gateway_tls(config))
    # Secure cookies when browsers reach the dashboard over HTTPS: its own TLS, or a proxy's.
    secure = context is not None or config.dashboard_public_origin.startswith("https://")
    app = create_app(config, channel, secure=secure)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    host, _, port = config.dashboard_listen.rpartition(":")
    site = web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=context)
    await site.start()
    sweeper = asyncio.create_task(_sweep(app[DASHBOARD_KEY].sessions))
    return DashboardServer(runner, site, channel, app[DASHBOARD_KEY], sweeper, tls=context is not None)


async def serve(config: Config) -> None:
    server = await start_dashboard(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info(
        "dashboard serving",
        extra={"url": server.url, "gateway": gateway_target(config), "loopback": is_loopback(config.dashboard_listen)},
    )
    try:
        await stop.wait()
    finally:
        await server.stop()
        log.info("dashboard stopped")


def main() -> int:
    try:
        config = Config.from_env()
        check_listener(config)
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    logs.configure(config.log_level)
    asyncio.run(serve(config))
    return 0
