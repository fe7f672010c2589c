"""SupervisionService: live fund supervision for government and operator credentials.

**One poller per gateway process** (``FundsPoller``), started by the first WatchFunds call and
stopped when the last watcher leaves, so a gateway nobody watches makes no supervision call
at all (the authorization path's costs, counted by tests/integration/test_hot_path_cost.py,
stay exact). While running it reads every campaign x category budget once per poll interval
(one second) in ONE pipelined Redis round trip of plain reads (storage/redis/budget.py
``read_budgets``; on a Redis Cluster deployment one per primary, every consumer shard's counts
summed: ``ShardedBudgetReader``), keeps a minute of readings per budget
(server/domain/supervision.py), builds one WatchFundsResponse and offers it to every watcher's
bounded queue. A watcher whose queue is full is dropped: its stream ends RESOURCE_EXHAUSTED,
reason SLOW_CONSUMER, and ``subsidy_supervision_dropped_watchers`` counts it. Watchers therefore
cost a queue slot each, never a Redis or PostgreSQL call.

From PostgreSQL, every few seconds (not every poll): the budgets to watch (campaigns and
rules), captures per minute, and alerts other processes recorded. Budget threshold alerts are
checked on every poll; the merchant surge detector runs every ``surge_check_interval_s``
under a transaction-scoped advisory lock (one process at a time). Both record an alert with
INSERT ... ON CONFLICT DO NOTHING on its key (storage/postgres/alerts.py), so it is recorded
once whichever process sees it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Gauge
from subsidy_client.v1 import common_pb2, supervision_pb2, supervision_pb2_grpc

from server.domain import supervision as rules
from server.domain.budget import released_by
from server.domain.daily_report import CATEGORY_TOTAL, DAY, DISTRICT_TOTAL, BusinessCalendar, parse_business_date
from server.domain.errors import InvalidField
from server.rpc.auth import GOVERNMENT, OPERATOR, caller_in
from server.rpc.errors import ApiError, invalid_field
from server.services.common import checked_timestamp
from storage.postgres import alerts as alert_store
from storage.postgres import daily_reports
from storage.postgres import supervision as supervision_store
from storage.postgres.pool import DATABASE_FAILURES, LazyPool
from storage.redis.budget import BudgetCounters, BudgetSource

pb = supervision_pb2
log = logging.getLogger("subsidy.supervision")

DROPPED = Counter("subsidy_supervision_dropped_watchers", "WatchFunds streams ended because the watcher fell behind")
WATCHERS = Gauge("subsidy_supervision_watchers", "WatchFunds streams open in this process")
POLLS = Counter("subsidy_supervision_polls", "Budget readings taken by this process's supervision poller")
KINDS = {
    alert_store.BUDGET_THRESHOLD: pb.ALERT_KIND_BUDGET_THRESHOLD,
    alert_store.MERCHANT_SURGE: pb.ALERT_KIND_MERCHANT_SURGE,
}
ALERTS_LIMIT_DEFAULT, ALERTS_LIMIT_MAX = 100, 1000
TOP_MERCHANTS_DEFAULT, TOP_MERCHANTS_MAX = 10, 100


@dataclass(frozen=True)
class SupervisionSettings:
    poll_interval_ms: int = 1000
    queue_size: int = 8
    thresholds: tuple[int, ...] = (80, 90, 100)
    # Campaigns with thresholds of their own (SUBSIDY_ALERT_THRESHOLDS_BY_CAMPAIGN).
    thresholds_by_campaign: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    surge: rules.SurgeRule = field(default_factory=rules.SurgeRule)
    surge_check_interval_s: int = 60
    # How often the budgets, captures per minute and other processes' alerts are re-read.
    ledger_refresh_s: float = 5.0
    # Names this process in the alerts it records.
    raised_by: str = "gateway"

    def __post_init__(self) -> None:
        if not 100 <= self.poll_interval_ms <= 60_000:
            raise ValueError("poll_interval_ms must be 100 to 60000")
        if not 1 <= self.queue_size <= 1000:
            raise ValueError("queue_size must be 1 to 1000")


def _timestamp(moment_ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(moment_ms)
    return stamp


def alert_message(record: alert_store.AlertRecord) -> pb.Alert:
    return pb.Alert(
        alert_id=str(record.alert_id),
        kind=KINDS[record.kind],
        campaign_id=record.campaign_id,
        category=record.category,
        merchant_id=record.merchant_id,
        threshold_percent=record.threshold_percent,
        observed=record.observed,
        baseline=record.baseline,
        message=record.message,
        raised_at=_timestamp(int(record.raised_at.timestamp() * 1000)),
    )


class Watcher:
    """One WatchFunds stream's queue of snapshots; ``dropped`` once it fell behind."""

    def __init__(self, queue_size: int) -> None:
        self.queue: asyncio.Queue[pb.WatchFundsResponse | None] = asyncio.Queue(maxsize=queue_size)
        self.dropped = False

    def offer(self, snapshot: pb.WatchFundsResponse) -> bool:
        """Queues the snapshot; a full queue drops the watcher (its queue is emptied and ends
        with None so the stream wakes up and ends). Returns whether the watcher is still on."""
        try:
            self.queue.put_nowait(snapshot)
            return True
        except asyncio.QueueFull:
            self.dropped = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)
            return False


class FundsPoller:
    """The process's one reader of budgets (see the module docstring)."""

    def __init__(
        self,
        budgets: BudgetSource,
        pool: LazyPool,
        calendar: BusinessCalendar,
        settings: SupervisionSettings,
        *,
        autostart: bool = True,
    ) -> None:
        self._budgets = budgets
        # Off only in tests that call tick() themselves, step by step.
        self._autostart = autostart
        self._pool = pool
        self._calendar = calendar
        self.settings = settings
        self._watchers: set[Watcher] = set()
        self._task: asyncio.Task[None] | None = None
        self._windows: dict[tuple[str, str], rules.Window] = {}
        self._plans: list[supervision_store.BudgetPlan] = []
        self._captures: dict[tuple[str, str], int] = {}
        self._captures_span_ms = rules.WINDOW_MS
        self._ledger_read_at = -1e18
        self._surge_checked_at = -1e18
        self._known_alerts: set[str] = set()
        self._last_alert_id = -1
        self.recent_alerts: list[pb.Alert] = []  # the last 24 hours', for a new watcher's first snapshot
        self.latest: pb.WatchFundsResponse | None = None
        self.sequence = 0
        self.reads = 0  # Redis round trips taken (tests count them against the watchers)
        self.starts = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def subscribe(self) -> Watcher:
        watcher = Watcher(self.settings.queue_size)
        self._watchers.add(watcher)
        WATCHERS.set(len(self._watchers))
        if self._autostart and not self.running:
            # A fresh start reads PostgreSQL at once (budgets, and the alerts recorded while it
            # was stopped), so the first snapshot carries them.
            self._ledger_read_at = -1e18
            self.starts += 1
            self._task = asyncio.create_task(self._run(), name="supervision-poller")
        return watcher

    async def unsubscribe(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)
        WATCHERS.set(len(self._watchers))
        if not self._watchers and self._task is not None:
            task, self._task = self._task, None
            self.latest = None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def stop(self) -> None:
        for watcher in list(self._watchers):
            await self.unsubscribe(watcher)

    async def _run(self) -> None:
        interval_s = self.settings.poll_interval_ms / 1000
        while True:
            started = time.monotonic()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A dependency failing (Redis or PostgreSQL down) must not end the watchers'
                # streams: they keep the last snapshot and see the sequence pause.
                log.exception("supervision poll failed")
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))

    async def tick(self) -> pb.WatchFundsResponse:
        """One poll: read, compute, record new alerts, fan out. Public for tests that drive the
        poller step by step."""
        now_monotonic = time.monotonic()
        new_alerts: list[pb.Alert] = []
        if now_monotonic - self._ledger_read_at >= self.settings.ledger_refresh_s:
            new_alerts += await self._guarded("ledger read", self._read_ledger())
            self._ledger_read_at = now_monotonic
        campaigns = sorted({plan.campaign_id for plan in self._plans})
        counters = await self._budgets.read(campaigns)
        self.reads += 1
        POLLS.inc()
        now_ms = counters.as_of_ms
        budgets = []
        crossings: list[alert_store.NewAlert] = []
        for plan in self._plans:
            budgets.append(self._figures(plan, counters, now_ms, crossings))
        if crossings:
            new_alerts += await self._guarded("alert record", self._record(crossings))
        if now_monotonic - self._surge_checked_at >= self.settings.surge_check_interval_s:
            self._surge_checked_at = now_monotonic
            moment = datetime.fromtimestamp(now_ms / 1000, UTC)
            new_alerts += await self._guarded("surge check", self.check_surges(moment))
        self.sequence += 1
        snapshot = pb.WatchFundsResponse(
            taken_at=_timestamp(now_ms), sequence=self.sequence, budgets=budgets, alerts=new_alerts
        )
        self.latest = snapshot
        self.fan_out(snapshot)
        return snapshot

    async def _guarded(self, what: str, work: Coroutine[Any, Any, list[pb.Alert]]) -> list[pb.Alert]:
        """PostgreSQL work of a poll: when it fails (the database away), the poll still sends
        the budgets it read from Redis; the work is tried again next time (an alert not yet
        recorded stays unknown, so its crossing is recorded then)."""
        try:
            return await work
        except DATABASE_FAILURES:
            log.warning("supervision: %s failed; the budgets are still sent", what, exc_info=True)
            return []

    def fan_out(self, snapshot: pb.WatchFundsResponse) -> int:
        """Offers the snapshot to every watcher without waiting; drops (and counts) each whose
        queue is full. Returns how many were dropped."""
        dropped = 0
        for watcher in list(self._watchers):
            if not watcher.offer(snapshot):
                self._watchers.discard(watcher)
                dropped += 1
                DROPPED.inc()
        WATCHERS.set(len(self._watchers))
        return dropped

    def _figures(
        self,
        plan: supervision_store.BudgetPlan,
        counters: BudgetCounters,
        now_ms: int,
        crossings: list[alert_store.NewAlert],
    ) -> pb.BudgetFigures:
        category = counters.category(f"{plan.campaign_id}:{plan.category}")
        reading = rules.Reading(
            now_ms, category.reserved_fen, category.spent_fen, category.refunded_fen, category.qualifications_claimed
        )
        key = (plan.campaign_id, plan.category)
        window = self._windows.setdefault(key, rules.Window())
        window.add(reading)
        rates = window.rates()
        remaining = rules.remaining_fen(plan.budget_fen, reading)
        exhaustion = rules.projected_exhaustion_ms(now_ms, plan.budget_fen, remaining, rates.burn_fen_per_minute)
        used = rules.used_ratio(plan.budget_fen, reading)
        thresholds = self.settings.thresholds_by_campaign.get(plan.campaign_id, self.settings.thresholds)
        for threshold in rules.crossed_thresholds(plan.budget_fen, reading.committed_fen, thresholds):
            alert_key = alert_store.budget_threshold_key(plan.campaign_id, plan.category, threshold)
            if alert_key not in self._known_alerts:
                moment = datetime.fromtimestamp(now_ms / 1000, UTC)
                crossings.append(
                    alert_store.NewAlert(
                        alert_key=alert_key,
                        kind=alert_store.BUDGET_THRESHOLD,
                        message=(
                            f"{plan.campaign_id}/{plan.category} has used {used:.1%} of its budget"
                            f" (threshold {threshold}%)"
                        ),
                        observed=used,
                        baseline=threshold / 100,
                        raised_at=moment,
                        business_date=self._calendar.day_of(moment),
                        campaign_id=plan.campaign_id,
                        category=plan.category,
                        threshold_percent=threshold,
                    )
                )
        figures = pb.BudgetFigures(
            campaign_id=plan.campaign_id,
            campaign_name=plan.campaign_name,
            category=plan.category,
            budget_fen=plan.budget_fen,
            released_fen=released_by(plan.tranches, plan.budget_fen, now_ms),
            reserved_fen=reading.reserved_fen,
            spent_fen=reading.spent_fen,
            refunded_fen=reading.refunded_fen,
            remaining_fen=remaining,
            used_ratio=used,
            claims_per_minute=rates.claims_per_minute,
            redemptions_per_minute=self._captures.get(key, 0) * rules.MINUTE_MS / self._captures_span_ms,
            burn_fen_per_minute=rates.burn_fen_per_minute,
            qualification_quota=plan.qualification_quota,
            qualifications_claimed=reading.claimed,
        )
        if exhaustion is not None:
            figures.projected_exhaustion_at.CopyFrom(_timestamp(exhaustion))
        return figures

    async def _read_ledger(self) -> list[pb.Alert]:
        """The budgets, captures over the last minute, and alerts recorded since the last read
        (by any process); the first read loads the last 24 hours' alerts."""
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            self._plans = await supervision_store.budget_plans(connection)
            now = await alert_store.database_now(connection)
            self._captures = await supervision_store.captures_since(connection, now - timedelta(minutes=1))
            if self._last_alert_id < 0:
                records = list(reversed(await alert_store.alerts_since(connection, now - timedelta(days=1), 1000)))
                self._last_alert_id = await alert_store.last_alert_id(connection)
                self.recent_alerts = [alert_message(record) for record in records]
                self._known_alerts.update(record.alert_key for record in records)
                return []
            records = await alert_store.alerts_after(connection, self._last_alert_id, 1000)
        return self._remember(records)

    def _remember(self, records: Sequence[alert_store.AlertRecord]) -> list[pb.Alert]:
        fresh = [record for record in records if record.alert_id > self._last_alert_id]
        for record in fresh:
            self._last_alert_id = max(self._last_alert_id, record.alert_id)
            self._known_alerts.add(record.alert_key)
        messages = [alert_message(record) for record in fresh]
        self.recent_alerts = (self.recent_alerts + messages)[-1000:]
        return messages

    async def _record(self, candidates: Sequence[alert_store.NewAlert]) -> list[pb.Alert]:
        """Records each candidate once across processes; the ones this call recorded."""
        recorded = []
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            for candidate in candidates:
                record = await alert_store.record_alert(connection, candidate, self.settings.raised_by)
                self._known_alerts.add(candidate.alert_key)
                if record is not None:
                    log.warning("supervision alert", extra={"alert": candidate.alert_key})
                    recorded.append(record)
        return self._remember(recorded)

    async def check_surges(self, now: datetime) -> list[pb.Alert]:
        """The merchant surge detector over the PostgreSQL ledger (one process at a time)."""
        rule = self.settings.surge
        pool = await self._pool.get()
        async with pool.acquire() as connection, connection.transaction():
            if not await supervision_store.try_surge_lock(connection):
                return []
            sales = await supervision_store.merchant_sales(connection, now, rule)
        day = self._calendar.day_of(now)
        candidates = [
            alert_store.NewAlert(
                alert_key=alert_store.merchant_surge_key(merchant.merchant_id, day),
                kind=alert_store.MERCHANT_SURGE,
                message=(
                    f"merchant {merchant.merchant_id}: {merchant.last_hour_sales} subsidised sales in the last hour,"
                    f" {rule.baseline_per_hour(merchant.baseline_sales):.2f} per hour over the previous"
                    f" {rule.baseline_hours} hours"
                ),
                observed=float(merchant.last_hour_sales),
                baseline=rule.baseline_per_hour(merchant.baseline_sales),
                raised_at=now,
                business_date=day,
                merchant_id=merchant.merchant_id,
            )
            for merchant in sales
            if rule.is_surge(merchant.last_hour_sales, merchant.baseline_sales)
            and alert_store.merchant_surge_key(merchant.merchant_id, day) not in self._known_alerts
        ]
        return await self._record(candidates) if candidates else []


def _response(snapshot: pb.WatchFundsResponse, campaign_id: str, alerts: Sequence[pb.Alert]) -> pb.WatchFundsResponse:
    """What one watcher is sent: the shared snapshot's budgets (one campaign's, when asked),
    with the alerts due to this watcher (each once). A new message: the shared one is never
    changed, since every watcher holds it."""
    budgets = snapshot.budgets
    if campaign_id:
        budgets = [budget for budget in budgets if budget.campaign_id == campaign_id]  # type: ignore[assignment]
    unique: dict[str, pb.Alert] = {}
    for alert in alerts:
        if not campaign_id or alert.campaign_id in ("", campaign_id):
            unique.setdefault(alert.alert_id, alert)
    return pb.WatchFundsResponse(
        taken_at=snapshot.taken_at, sequence=snapshot.sequence, budgets=budgets, alerts=list(unique.values())
    )


class SupervisionService(supervision_pb2_grpc.SupervisionServiceServicer):
    def __init__(self, poller: FundsPoller, pool: LazyPool, calendar: BusinessCalendar) -> None:
        self._poller = poller
        self._pool = pool
        self._calendar = calendar

    async def WatchFunds(
        self, request: supervision_pb2.WatchFundsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[supervision_pb2.WatchFundsResponse]:
        caller_in(GOVERNMENT, OPERATOR)
        try:
            interval_ms = rules.watch_interval_ms(request.interval_ms)
        except InvalidField as error:
            raise invalid_field(error.field, error.reason) from None
        latest = self._poller.latest if self._poller.running else None
        watcher = self._poller.subscribe()
        try:
            first = True
            due_ms = 0
            pending_alerts: list[pb.Alert] = []
            while True:
                # A running poller's latest snapshot at once; then each new one as it comes.
                snapshot, latest = (latest, None) if latest is not None else (await watcher.queue.get(), None)
                if snapshot is None:
                    raise ApiError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        common_pb2.ERROR_REASON_SLOW_CONSUMER,
                        "this watcher fell behind the snapshots and was dropped; open the stream again",
                        {"queue_size": str(self._poller.settings.queue_size)},
                    )
                pending_alerts += list(snapshot.alerts)
                taken_ms = snapshot.taken_at.ToMilliseconds()
                if not first and taken_ms < due_ms:
                    continue
                alerts = (list(self._poller.recent_alerts) if first else []) + pending_alerts
                response = _response(snapshot, request.campaign_id, alerts)
                pending_alerts = []
                first = False
                due_ms = taken_ms + interval_ms - rules.INTERVAL_MS_MIN // 2
                yield response
        finally:
            await self._poller.unsubscribe(watcher)

    async def ListAlerts(
        self, request: supervision_pb2.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> supervision_pb2.ListAlertsResponse:
        caller_in(GOVERNMENT, OPERATOR)
        limit = _bounded(request.limit, ALERTS_LIMIT_DEFAULT, ALERTS_LIMIT_MAX, "limit")
        pool = await self._pool.get()
        if request.business_date:
            if request.HasField("since"):
                raise invalid_field("since", "give since or business_date, not both")
            try:
                day = parse_business_date(request.business_date)
            except InvalidField as error:
                raise invalid_field(error.field, error.reason) from None
            async with pool.acquire() as connection:
                records = (await alert_store.alerts_of_day(connection, day))[:limit]
            return pb.ListAlertsResponse(alerts=[alert_message(record) for record in records])
        if request.HasField("since"):
            since = checked_timestamp(request.since, "since").ToDatetime(tzinfo=UTC)
        else:
            since = datetime.now(UTC) - timedelta(days=7)
        async with pool.acquire() as connection:
            records = await alert_store.alerts_since(connection, since, limit)
        return pb.ListAlertsResponse(alerts=[alert_message(record) for record in records])

    async def GetTodayFigures(
        self, request: supervision_pb2.GetTodayFiguresRequest, context: grpc.aio.ServicerContext
    ) -> supervision_pb2.GetTodayFiguresResponse:
        caller_in(GOVERNMENT, OPERATOR)
        limit = _bounded(request.top_merchants, TOP_MERCHANTS_DEFAULT, TOP_MERCHANTS_MAX, "top_merchants")
        now = datetime.now(UTC)
        day = self._calendar.day_of(now)
        pool = await self._pool.get()
        async with pool.acquire() as connection:
            rows = await daily_reports.day_so_far(connection, self._calendar, day)
        response = pb.GetTodayFiguresResponse(
            business_date=day.isoformat(),
            time_zone=self._calendar.timezone,
            as_of=_timestamp(int(now.timestamp() * 1000)),
        )
        for row in rows:
            if row.kind != DAY:
                continue
            figures = row.figures
            message = pb.CategoryFigures(
                campaign_id=row.campaign_id,
                category=row.category,
                consumers=figures.consumers,
                sales=figures.sales,
                redeemed_fen=figures.redeemed_fen,
                order_fen=figures.order_fen,
                refunds=figures.refunds,
                refunded_fen=figures.refunded_fen,
                merchants=figures.merchants,
            )
            if row.level == CATEGORY_TOTAL:
                response.categories.append(message)
            elif row.level == DISTRICT_TOTAL:
                response.district_total.CopyFrom(message)
        for merchant in rules.top_merchants(rows, limit):
            response.top_merchants.append(
                pb.MerchantFigures(
                    merchant_id=merchant.merchant_id,
                    merchant_name=merchant.merchant_name,
                    sales=merchant.sales,
                    redeemed_fen=merchant.redeemed_fen,
                    order_fen=merchant.order_fen,
                    refunded_fen=merchant.refunded_fen,
                )
            )
        return response


def _bounded(value: int, default: int, maximum: int, name: str) -> int:
    if value == 0:
        return default
    if not 1 <= value <= maximum:
        raise invalid_field(name, f"must be 0 (default {default}) or 1 to {maximum}")
    return value
