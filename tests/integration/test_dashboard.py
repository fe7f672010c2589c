"""The government dashboard over HTTP (server/processes/dashboard.py), against a real gateway,
PostgreSQL and Redis: who may sign in (the gateway's own role checks decide), what the
session cookie is, that sign-in and sign-out refuse cross-site posts, that every read needs a
session, that a published report downloads byte for byte as the gateway exports it, that a
tab too far behind the live stream is dropped rather than buffered, and that sessions expire.
The browser itself is tests/integration/test_dashboard_browser.py.
"""

from __future__ import annotations

import asyncio
import io
import logging
import ssl
import uuid
import zipfile
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from pathlib import Path

import aiohttp
import orjson
import pytest
from subsidy_client import RetryPolicy, SignedClient
from subsidy_client.v1 import complaints_pb2, daily_report_pb2, supervision_pb2

from server.commands.certs import issue, make_ca
from server.domain.daily_report import yuan
from server.processes.dashboard import (
    COMPLAINTS,
    BureauClient,
    Sessions,
    SnapshotRelay,
    complaints_json,
    start_dashboard,
)
from storage.devenv import Services
from tests.conftest import running_gateway
from tests.integration.dashboard_world import AUDITOR, GOVERNMENT, OPERATOR, TERMINAL, DashboardWorld, dashboard_world


@pytest.fixture(scope="module")
async def world(services: Services) -> AsyncIterator[DashboardWorld]:
    async with dashboard_world(services) as made:
        yield made


def browser(world: DashboardWorld) -> aiohttp.ClientSession:
    """A client that keeps cookies for 127.0.0.1 (aiohttp refuses cookies of IP hosts by default)
    and sends the Origin a page of the dashboard would."""
    return aiohttp.ClientSession(
        base_url=world.url, cookie_jar=aiohttp.CookieJar(unsafe=True), headers={"Origin": world.url}
    )


async def sign_in(session: aiohttp.ClientSession, caller_id: str, secret: str) -> aiohttp.ClientResponse:
    response = await session.post("/login", data={"caller_id": caller_id, "secret": secret}, allow_redirects=False)
    await response.read()
    return response


async def test_a_government_credential_gets_a_session_cookie_that_scripts_and_other_sites_cannot_use(
    world: DashboardWorld, caplog: pytest.LogCaptureFixture
) -> None:
    """Signing in with the government credential answers 303 to the page with a cookie that is
    HttpOnly, SameSite=Strict, path /, random; the page and every read then work; the secret
    appears in no log line."""
    secret = world.credentials[GOVERNMENT]
    caplog.set_level(logging.DEBUG)
    async with browser(world) as session:
        before = await session.get("/", allow_redirects=False)
        assert before.status == 303 and before.headers["Location"] == "/login"
        answer = await sign_in(session, GOVERNMENT, secret)
        assert answer.status == 303 and answer.headers["Location"] == "/"
        cookie = SimpleCookie(answer.headers["Set-Cookie"])["dashboard_session"]
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
        assert len(cookie.value) >= 43 and secret not in cookie.value
        page = await session.get("/")
        assert page.status == 200 and "text/html" in page.headers["Content-Type"]
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        me = await (await session.get("/api/me")).json()
        assert me == {"caller_id": GOVERNMENT}
        reports = await (await session.get("/api/reports")).json()
        assert [report["business_date"] for report in reports["reports"]] == [
            day.isoformat() for day in reversed(world.days)
        ]
    assert all(secret not in record.getMessage() and secret not in str(record.__dict__) for record in caplog.records)


@pytest.mark.parametrize(
    ("caller_id", "secret_of", "reason"),
    [
        (OPERATOR, OPERATOR, "denied"),  # an operator may change things: not on this dashboard
        (TERMINAL, TERMINAL, "denied"),
        (AUDITOR, AUDITOR, "denied"),
        (GOVERNMENT, TERMINAL, "invalid"),  # the right id with another caller's secret
        ("nobody-here", GOVERNMENT, "invalid"),
        ("bad id!", GOVERNMENT, "invalid"),
    ],
)
async def test_every_other_credential_is_refused_a_session(
    world: DashboardWorld, caller_id: str, secret_of: str, reason: str
) -> None:
    """Operator, terminal and auditor credentials, a wrong secret, an unknown or malformed id:
    back to the sign-in page with the reason, no cookie, and no read answers."""
    async with browser(world) as session:
        answer = await sign_in(session, caller_id, world.credentials[secret_of])
        assert answer.status == 303 and answer.headers["Location"] == f"/login?error={reason}"
        assert "Set-Cookie" not in answer.headers
        for path in ("/api/me", "/api/reports", "/api/today", "/events", f"/reports/{world.days[0]}/rows.csv"):
            assert (await session.get(path)).status == 401, path


async def test_sign_in_and_out_refuse_cross_site_posts(world: DashboardWorld) -> None:
    """A form on another site (or a post with no origin at all) cannot sign anyone in or out."""
    secret = world.credentials[GOVERNMENT]
    async with browser(world) as session:
        forged = await session.post(
            "/login", data={"caller_id": GOVERNMENT, "secret": secret}, headers={"Origin": "http://evil.example"}
        )
        assert forged.status == 403 and "Set-Cookie" not in forged.headers
        fetched = await session.post(
            "/login",
            data={"caller_id": GOVERNMENT, "secret": secret},
            headers={"Origin": world.url, "Sec-Fetch-Site": "cross-site"},
        )
        assert fetched.status == 403
        assert (await sign_in(session, GOVERNMENT, secret)).status == 303
        logout = await session.post("/logout", headers={"Origin": "http://evil.example"}, allow_redirects=False)
        assert logout.status == 403
        assert (await session.get("/api/me")).status == 200
        logout = await session.post("/logout", allow_redirects=False)
        assert logout.status == 303 and logout.headers["Location"] == "/login"
        assert (await session.get("/api/me")).status == 401
    async with aiohttp.ClientSession(base_url=world.url) as bare:
        no_origin = await bare.post("/login", data={"caller_id": GOVERNMENT, "secret": secret})
        assert no_origin.status == 403


async def test_a_published_report_downloads_as_the_gateway_exports_it(world: DashboardWorld) -> None:
    """CSV (BOM, Chinese headers) and XLSX through the dashboard are the gateway's bytes; a day
    not published is 404, a malformed one too."""
    day = world.days[0].isoformat()
    async with world.reports(GOVERNMENT) as reports:
        expected_csv = b"".join([part.chunk async for part in reports.export(day, daily_report_pb2.EXPORT_FORMAT_CSV)])
        expected_xlsx = b"".join(
            [part.chunk async for part in reports.export(day, daily_report_pb2.EXPORT_FORMAT_XLSX)]
        )
    async with browser(world) as session:
        await sign_in(session, GOVERNMENT, world.credentials[GOVERNMENT])
        csv_answer = await session.get(f"/reports/{day}/rows.csv")
        body = await csv_answer.read()
        assert csv_answer.status == 200 and body == expected_csv
        assert body.startswith("\ufeff业务日期".encode())
        assert "attachment" in csv_answer.headers["Content-Disposition"]
        xlsx_answer = await session.get(f"/reports/{day}/rows.xlsx")
        # The same workbook: an XLSX is a zip whose entries carry the time it was written (and
        # docProps/core.xml its creation time), so two exports a second apart differ in those bytes.
        assert xlsx_members(await xlsx_answer.read()) == xlsx_members(expected_xlsx)
        assert expected_xlsx.startswith(b"PK")
        assert (await session.get("/reports/2001-01-01/rows.csv")).status == 404
        assert (await session.get(f"/reports/{day}/ledger.csv")).status == 404
        assert (await session.get("/reports/2026-13-45/rows.csv")).status == 404


def xlsx_members(workbook: bytes) -> dict[str, bytes]:
    """The workbook's parts by name, without the document properties (which hold timestamps)."""
    with zipfile.ZipFile(io.BytesIO(workbook)) as archive:
        return {name: archive.read(name) for name in archive.namelist() if not name.startswith("docProps/")}


async def test_a_reconciliation_run_and_its_exceptions(world: DashboardWorld) -> None:
    """The imported run is listed as the gateway lists it; its exceptions are the three made on
    purpose, with the mismatch's 1.23 yuan; the exceptions CSV is the gateway's bytes (BOM)."""
    async with world.reconciliation(GOVERNMENT) as reconciliation:
        [run] = await reconciliation.list()
        expected_csv = b"".join([part.chunk async for part in reconciliation.export(world.run_id)])
    async with browser(world) as session:
        await sign_in(session, GOVERNMENT, world.credentials[GOVERNMENT])
        [shown] = (await (await session.get("/api/reconciliation")).json())["runs"]
        assert shown["run_id"] == run.run_id == world.run_id
        assert shown["exception_lines"] == run.exception_lines == 3
        assert shown["ledger_net_subsidy"]["fen"] == run.ledger_net_subsidy_fen
        exceptions = await (await session.get(f"/api/reconciliation/{world.run_id}/exceptions")).json()
        by_status = {line["status"]: line for line in exceptions["lines"]}
        assert set(by_status) == {
            "RECONCILIATION_STATUS_AMOUNT_MISMATCH",
            "RECONCILIATION_STATUS_MISSING_IN_LEDGER",
            "RECONCILIATION_STATUS_MISSING_IN_CHANNEL",
        }
        assert by_status["RECONCILIATION_STATUS_AMOUNT_MISMATCH"]["difference"] == {"fen": 123, "yuan": "1.23"}
        assert by_status["RECONCILIATION_STATUS_MISSING_IN_LEDGER"]["channel_txn_id"] == "CHEXTRA0001"
        assert not exceptions["truncated"]
        answer = await session.get(f"/reconciliation/{world.run_id}/exceptions.csv")
        body = await answer.read()
        assert answer.status == 200 and body == expected_csv and body.startswith(b"\xef\xbb\xbf")
        assert (await session.get("/reconciliation/no-such-run/exceptions.csv")).status == 404
        assert (await session.get("/api/reconciliation/bad%20id/exceptions")).status == 404


async def next_event(response: aiohttp.ClientResponse) -> tuple[str, bytes]:
    """The next server-sent event (name, data), skipping comments and the retry line."""
    name, data = "", b""
    while True:
        line = await asyncio.wait_for(response.content.readline(), 60)
        assert line, "the event stream ended"
        line = line.rstrip(b"\n")
        if line.startswith(b"event: "):
            name = line.removeprefix(b"event: ").decode()
        elif line.startswith(b"data: "):
            data = line.removeprefix(b"data: ")
        elif not line and name:
            return name, data


async def test_live_snapshots_arrive_as_server_sent_events_and_end_with_the_session(world: DashboardWorld) -> None:
    """/events relays WatchFunds: a snapshot at once with every budget as fen and exact yuan,
    then one per second (sequence increasing); signing out in another request ends the stream
    with an ``ended`` event, and the session's upstream stream is closed."""
    async with browser(world) as session:
        await sign_in(session, GOVERNMENT, world.credentials[GOVERNMENT])
        [cookie] = [cookie for cookie in session.cookie_jar if cookie.key == "dashboard_session"]
        dashboard_session = world.dashboard.dashboard.sessions.find(cookie.value, touch=False)
        assert dashboard_session is not None
        async with session.get("/events") as events:
            assert events.status == 200 and events.headers["Content-Type"].startswith("text/event-stream")
            name, data = await next_event(events)
            assert name == "snapshot"
            first = orjson.loads(data)
            fridge = next(b for b in first["budgets"] if (b["campaign_id"], b["category"]) == ("c-main", "fridge"))
            assert fridge["budget"] == {"fen": 100_000_000_000, "yuan": "1000000000.00"}
            assert fridge["remaining"]["yuan"] == yuan(fridge["remaining"]["fen"])
            name, data = await next_event(events)
            assert name == "snapshot" and orjson.loads(data)["sequence"] > first["sequence"]
            assert dashboard_session.relay.subscribers == 1
            await session.post("/logout", allow_redirects=False)
            while name == "snapshot":
                name, data = await next_event(events)
            assert name == "ended"
        assert dashboard_session.ended and dashboard_session.relay.subscribers == 0


def snapshot(sequence: int) -> supervision_pb2.WatchFundsResponse:
    return supervision_pb2.WatchFundsResponse(
        sequence=sequence,
        budgets=[supervision_pb2.BudgetFigures(campaign_id="c-main", category="fridge", spent_fen=100 * sequence)],
    )


async def test_a_tab_that_falls_behind_is_dropped_not_buffered() -> None:
    """The relay offers every snapshot to every tab; a tab with ``buffer`` snapshots unread is
    told to go (its queue then holds only the end marker), while a tab that reads gets all."""
    total = 20
    read = asyncio.Semaphore(0)
    published = asyncio.Event()

    async def stream() -> AsyncIterator[supervision_pb2.WatchFundsResponse]:
        for sequence in range(1, total + 1):
            yield snapshot(sequence)
            await read.acquire()  # the next snapshot once the reading tab has this one
        published.set()
        await asyncio.Event().wait()  # the stream stays open, as WatchFunds does

    relay = SnapshotRelay(stream, buffer=4)
    slow = relay.subscribe()
    fast = relay.subscribe()
    received = []
    while len(received) < total:
        event = await asyncio.wait_for(fast.queue.get(), 10)
        assert event is not None
        received.append(event)
        read.release()
    await asyncio.wait_for(published.wait(), 10)
    assert [name for name, _ in received] == ["snapshot"] * total
    assert slow.queue.qsize() == 1 and slow.queue.get_nowait() is None
    assert relay.dropped == 1 and relay.subscribers == 1
    late = relay.subscribe()  # a new tab starts from the newest snapshot
    name, data = late.queue.get_nowait() or ("", b"")
    assert name == "snapshot" and b'"sequence":20' in data
    await relay.close()
    assert fast.queue.get_nowait() is None


async def test_sessions_expire_when_idle_and_after_their_maximum_and_are_bounded() -> None:
    """Idle for longer than idle_s, or older than max_s however active: gone. No more than
    capacity sessions at once."""
    now = [1000.0]
    sessions = Sessions(idle_s=60, max_s=300, capacity=2, buffer=4, clock=lambda: now[0])
    client = BureauClient("127.0.0.1:1", "gov-x", "s" * 32)
    first = sessions.create("gov-x", client)
    assert first is not None
    now[0] += 59
    assert sessions.find(first.session_id) is first
    now[0] += 61
    assert sessions.find(first.session_id) is None
    active = sessions.create("gov-x", client)
    assert active is not None and active.session_id != first.session_id
    for _ in range(6):
        now[0] += 50
        assert sessions.find(active.session_id) is active
    now[0] += 50
    assert sessions.find(active.session_id) is None  # 350 s after sign-in
    assert sessions.create("a", client) is not None and sessions.create("b", client) is not None
    assert sessions.create("c", client) is None
    await sessions.close()
    await client.close()


async def test_the_page_and_its_scripts_are_served_and_nothing_else(world: DashboardWorld) -> None:
    """Static files by name only; no directory listing, no path outside the folder."""
    async with aiohttp.ClientSession(base_url=world.url) as session:
        login = await session.get("/login")
        assert login.status == 200 and "login.js" in await login.text()
        script = await session.get("/static/dashboard.js")
        assert script.status == 200 and script.headers["Content-Type"].startswith("text/javascript")
        for path in ("/static/", "/static/..%2Fdashboard.py", "/static/dashboard.html", "/static/nope.js"):
            assert (await session.get(path)).status == 404, path
        assert (await session.get("/health")).status == 200


async def ticket_counts(world: DashboardWorld) -> complaints_pb2.GetTicketCountsResponse:
    """What the gateway answers the government credential directly."""
    async with SignedClient(
        world.target, GOVERNMENT, world.credentials[GOVERNMENT], retry=RetryPolicy(max_attempts=1)
    ) as client:
        return await client._call(
            COMPLAINTS + "GetTicketCounts",
            complaints_pb2.GetTicketCountsRequest(),
            complaints_pb2.GetTicketCountsResponse,
        )


async def test_the_complaints_panel_shows_the_gateways_ticket_counts(world: DashboardWorld) -> None:
    """/api/complaints is GetTicketCounts as the gateway answers the same government user: after
    a merchant's terminal opens a ticket, today's opened count and the open backlog are one
    higher than before it, and every day shown (the last seven, newest first) carries the
    gateway's figures. Without a session it is 401 like every read."""
    async with browser(world) as session:
        assert (await session.get("/api/complaints")).status == 401
        await sign_in(session, GOVERNMENT, world.credentials[GOVERNMENT])
        before = await (await session.get("/api/complaints")).json()
        async with SignedClient(
            world.target, TERMINAL, world.credentials[TERMINAL], retry=RetryPolicy(max_attempts=1)
        ) as terminal:
            await terminal._call(
                COMPLAINTS + "OpenMerchantTicket",
                complaints_pb2.OpenMerchantTicketRequest(
                    request_id=str(uuid.uuid4()),
                    category=complaints_pb2.TICKET_CATEGORY_OTHER,
                    link=complaints_pb2.TicketLink(merchant_id="m-main"),
                    text="收银台无法核销",
                ),
                complaints_pb2.OpenMerchantTicketResponse,
            )
        shown = await (await session.get("/api/complaints")).json()
        counts = await ticket_counts(world)
    assert shown == complaints_json(counts)
    assert shown["today"]["business_date"] == counts.days[-1].business_date
    assert [day["business_date"] for day in shown["days"]] == [day.business_date for day in counts.days[:-8:-1]]
    assert shown["today"]["opened"] == before["today"]["opened"] + 1 == counts.days[-1].opened
    assert shown["open_now"] == before["open_now"] + 1 == counts.open_now
    assert shown["overdue_now"] == counts.overdue_now


async def test_report_client_and_dashboard_agree_on_the_report_list(world: DashboardWorld) -> None:
    """The amounts the page shows are the exact yuan of the gateway's fen."""
    async with world.reports(GOVERNMENT) as reports:
        headers = await reports.list()
    async with browser(world) as session:
        await sign_in(session, GOVERNMENT, world.credentials[GOVERNMENT])
        listed = (await (await session.get("/api/reports")).json())["reports"]
    for header, shown in zip(headers, listed, strict=True):
        fen = header.day_total.redeemed_fen
        assert shown["redeemed"] == {"fen": fen, "yuan": f"{fen // 100}.{fen % 100:02d}"}
        assert shown["content_hash"] == header.content_hash


async def test_over_tls_the_dashboard_serves_https_and_trusts_only_the_gateways_ca(
    world: DashboardWorld, tmp_path: Path
) -> None:
    """With the gateway's certificate configured the dashboard serves HTTPS, its cookie is
    Secure with the __Host- prefix, and it calls a TLS gateway trusting SUBSIDY_DASHBOARD_GATEWAY_CA;
    without that CA (the system's roots) the gateway's certificate is refused and nobody signs in."""
    ca = make_ca("Dashboard test CA")
    (tmp_path / "ca.pem").write_bytes(ca.certificate_pem)
    issue(ca, "localhost", server=True, dns=["localhost"], ips=["127.0.0.1"]).write(
        tmp_path / "server.pem", tmp_path / "server.key"
    )
    tls = {"tls_cert": str(tmp_path / "server.pem"), "tls_key": str(tmp_path / "server.key")}
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    async with running_gateway(world.env.config(**tls)) as gateway:
        for gateway_ca, expected in ((str(tmp_path / "ca.pem"), "/"), ("", "/login?error=unavailable")):
            config = world.env.config(
                **tls,
                dashboard_listen="127.0.0.1:0",
                dashboard_gateway=f"127.0.0.1:{gateway.port}",
                dashboard_gateway_ca=gateway_ca,
            )
            dashboard = await start_dashboard(config)
            origin = f"https://127.0.0.1:{dashboard.port}"
            try:
                async with aiohttp.ClientSession(
                    base_url=origin,
                    cookie_jar=aiohttp.CookieJar(unsafe=True),
                    headers={"Origin": origin},
                    connector=aiohttp.TCPConnector(ssl=context),
                ) as session:
                    answer = await sign_in(session, GOVERNMENT, world.credentials[GOVERNMENT])
                    assert answer.headers["Location"] == expected
                    if expected == "/":
                        cookie = SimpleCookie(answer.headers["Set-Cookie"])["__Host-dashboard_session"]
                        assert cookie["secure"] and cookie["httponly"] and cookie["samesite"] == "Strict"
                        reports = await (await session.get("/api/reports")).json()
                        assert len(reports["reports"]) == len(world.days)
            finally:
                await dashboard.stop()
