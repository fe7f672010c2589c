"""The government dashboard in a real headless browser: Debian's Chromium driven by Selenium
through chromium-driver, against a real gateway (PostgreSQL, Redis) and the dashboard process's
server. Turns an operator's credential away at the form, signs in with the government one,
sees the live budget of c-main/fridge move by exactly the subsidy of an Authorize + Capture the
test makes, downloads a published report (checks its bytes: BOM and the Chinese header), opens
a reconciliation run's exceptions, shows the complaints desk's counts as the gateway gives
them, switches to English, and saves screenshots.

Chromium and chromium-driver come from Debian's packages (``apt-get install chromium
chromium-driver``; .ci/run installs them on a fresh machine). Without them this test is skipped
with that reason, except under CI (CI=true), where it fails. Every wait is a bounded
WebDriverWait with a generous timeout, never a sleep. ``SUBSIDY_UPDATE_SCREENSHOTS=1`` also
writes the screenshots the README shows (docs/screenshots/dashboard.png and dashboard-en.png).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait
from subsidy_client import Line
from subsidy_client.v1 import authorization_pb2 as pb

from storage.devenv import Services
from tests.conftest import ROOT, consumer_key
from tests.integration.dashboard_world import GOVERNMENT, OPERATOR, DashboardWorld, dashboard_world
from tests.integration.test_dashboard import ticket_counts

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = ROOT / "docs" / "screenshots"
WAIT_S = 90
# A grade-2 fridge at 3,000 yuan in c-main: 15 % subsidy, 450.00 yuan.
FRIDGE_GTIN, FRIDGE_PRICE_FEN, FRIDGE_SUBSIDY_FEN = "6970000000024", 300_000, 45_000
SPENT = '[data-budget="c-main/fridge"] [data-field="spent"]'
TODAY_REDEEMED = '[data-today="district"] [data-field="redeemed"]'
COMPLAINTS_OPEN = '#complaints-now [data-field="open_now"]'
COMPLAINTS_OPENED_TODAY = '#complaints-now [data-field="opened_today"]'


def require_chromium() -> None:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if not missing:
        return
    message = (
        f"the browser test needs Debian's chromium and chromium-driver; missing: {', '.join(missing)}"
        " (apt-get install chromium chromium-driver, as .ci/run does)"
    )
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def yuan_text(fen: int) -> str:
    """What the page shows for an amount (dashboard_static/i18n.js formatYuan)."""
    sign = "-" if fen < 0 else ""
    whole, cents = divmod(abs(fen), 100)
    return f"{sign}¥{whole:,}.{cents:02d}"


def fen_of(text: str) -> int:
    negative = text.startswith("-")
    whole, cents = text.lstrip("-").removeprefix("¥").replace(",", "").split(".")
    return (-1 if negative else 1) * (int(whole) * 100 + int(cents))


@pytest.fixture(scope="module")
async def world(services: Services) -> AsyncIterator[DashboardWorld]:
    require_chromium()
    async with dashboard_world(services) as made:
        yield made


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    folder = tmp_path / "downloads"
    folder.mkdir()
    return folder


@pytest.fixture
def driver(downloads: Path) -> Iterator[WebDriver]:
    require_chromium()

    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1440,2900",
        "--lang=zh-CN",
    ):
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield browser
    finally:
        browser.quit()


def submit_credential(driver: WebDriver, caller_id: str, secret: str) -> None:
    wait = WebDriverWait(driver, WAIT_S)
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "h1"), "政府监管登录"))
    for field, value in (("caller-id", caller_id), ("secret", secret)):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    driver.find_element(By.ID, "login-submit").click()


def sign_in(driver: WebDriver, world: DashboardWorld) -> str:
    """The operator's credential is turned away at the form; the government's signs in. Returns
    the spent amount of c-main/fridge the page then shows."""
    driver.get(world.url + "/")
    wait = WebDriverWait(driver, WAIT_S)
    submit_credential(driver, OPERATOR, world.credentials[OPERATOR])
    wait.until(ec.text_to_be_present_in_element_attribute((By.ID, "login-error"), "data-reason", "denied"))
    assert "不是政府" in driver.find_element(By.ID, "login-error").text
    assert not driver.get_cookies()
    submit_credential(driver, GOVERNMENT, world.credentials[GOVERNMENT])
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "h1"), "以旧换新补贴资金监管"))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, SPENT)))
    wait.until(ec.text_to_be_present_in_element((By.ID, "caller"), GOVERNMENT))
    wait.until(ec.text_to_be_present_in_element_attribute((By.ID, "live-status"), "data-state", "live"))
    for day in world.days:
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f'[data-report="{day}"]')))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f'[data-reconciliation="{world.run_id}"]')))
    return str(driver.find_element(By.CSS_SELECTOR, SPENT).text)


def today_redeemed(browser: WebDriver) -> str:
    WebDriverWait(browser, WAIT_S).until(ec.presence_of_element_located((By.CSS_SELECTOR, TODAY_REDEEMED)))
    return str(browser.find_element(By.CSS_SELECTOR, TODAY_REDEEMED).text)


def wait_for_text(browser: WebDriver, selector: str, expected: str) -> None:
    """Until the element's whole text is ``expected`` (not merely contains it)."""
    WebDriverWait(browser, WAIT_S).until(lambda driver: driver.find_element(By.CSS_SELECTOR, selector).text == expected)


def download_report(browser: WebDriver, downloads: Path, day: str) -> bytes:
    """Clicks the report's rows CSV link; waits for the finished file; returns its bytes."""

    link = browser.find_element(By.CSS_SELECTOR, f'[data-report="{day}"] a[data-download="rows.csv"]')
    link.click()

    def finished(_: WebDriver) -> Path | None:
        files = [path for path in downloads.iterdir() if path.suffix == ".csv"]
        partial = [path for path in downloads.iterdir() if path.suffix == ".crdownload"]
        return files[0] if files and not partial else None

    path: Path = WebDriverWait(browser, WAIT_S).until(finished)
    return path.read_bytes()


def screenshots(browser: WebDriver, folder: Path) -> tuple[Path, Path]:
    """The page in Chinese, then (after the toggle) in English."""

    chinese, english = folder / "dashboard.png", folder / "dashboard-en.png"
    browser.find_element(By.CSS_SELECTOR, "button[data-run]").click()
    WebDriverWait(browser, WAIT_S).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, '#exceptions tr[data-status$="AMOUNT_MISMATCH"]'))
    )
    assert browser.save_screenshot(str(chinese))
    browser.find_element(By.ID, "lang-toggle").click()
    wait = WebDriverWait(browser, WAIT_S)
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "h1"), "Trade-in subsidy fund supervision"))
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#today thead"), "Redeemed (核销金额)"))
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#complaints-section h2"), "Complaints desk"))
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#complaints-now"), "Open backlog"))
    assert browser.save_screenshot(str(english))
    return chinese, english


async def test_the_bureau_sees_a_sale_live_downloads_a_report_and_reads_english(
    world: DashboardWorld, driver: WebDriver, downloads: Path, tmp_path: Path
) -> None:
    """Sign in; the c-main/fridge budget card shows spent S; after an Authorize + Capture of a
    fridge with 450.00 yuan of subsidy it shows exactly S + 450.00 (pushed by WatchFunds through
    the dashboard's server-sent events, no reload), and once the ledger has the sale today's
    district 核销金额 has grown by the same 450.00 (GetTodayFigures); the published day's CSV downloads with a
    BOM and Chinese headers, byte for byte what the gateway exports; the English toggle works;
    screenshots are saved."""
    before = await asyncio.to_thread(sign_in, driver, world)
    # The complaints panel: the counts the gateway gives the same government user.
    counts = await ticket_counts(world)
    assert "投诉受理" in driver.find_element(By.CSS_SELECTOR, "#complaints-section h2").text
    await asyncio.to_thread(wait_for_text, driver, COMPLAINTS_OPEN, str(counts.open_now))
    await asyncio.to_thread(wait_for_text, driver, COMPLAINTS_OPENED_TODAY, str(counts.days[-1].opened))
    await asyncio.to_thread(
        wait_for_text,
        driver,
        f'#complaints tr[data-complaints="{counts.days[-1].business_date}"] td',
        counts.days[-1].business_date,
    )
    redeemed_before = await asyncio.to_thread(today_redeemed, driver)
    async with world.terminal() as terminal:
        approved = await terminal.authorize(
            campaign_id="c-main",
            consumer_key=consumer_key(),
            lines=[Line("1", FRIDGE_GTIN, FRIDGE_PRICE_FEN)],
        )
        assert approved.decision == pb.DECISION_APPROVED and approved.subsidy_fen == FRIDGE_SUBSIDY_FEN
        await terminal.capture(approved.authorization_id)
    await world.drain_ledger()
    await asyncio.to_thread(wait_for_text, driver, SPENT, yuan_text(fen_of(before) + FRIDGE_SUBSIDY_FEN))
    # Today's figures come from the ledger: the page fetches them again after the budgets move.
    expected_redeemed = yuan_text(fen_of(redeemed_before) + FRIDGE_SUBSIDY_FEN)
    await asyncio.to_thread(wait_for_text, driver, TODAY_REDEEMED, expected_redeemed)

    day = world.days[0].isoformat()
    body = await asyncio.to_thread(download_report, driver, downloads, day)
    assert body.startswith("\ufeff业务日期,".encode())
    async with world.reports(GOVERNMENT) as reports:
        exported = b"".join([part.chunk async for part in reports.export(day, 1)])
    assert body == exported

    chinese, english = await asyncio.to_thread(screenshots, driver, tmp_path)
    for path in (chinese, english):
        assert path.read_bytes().startswith(b"\x89PNG")
    if os.environ.get("SUBSIDY_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chinese, SCREENSHOTS / chinese.name)
        shutil.copyfile(english, SCREENSHOTS / english.name)


def test_yuan_text_matches_the_page_formatting() -> None:
    """The helper the test compares with formats as the page does (exact from fen)."""
    assert yuan_text(123_456_789) == "¥1,234,567.89" and fen_of("¥1,234,567.89") == 123_456_789
    assert yuan_text(5) == "¥0.05" and yuan_text(-45_000) == "-¥450.00" and fen_of("-¥450.00") == -45_000


def test_a_missing_chromium_skips_here_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without /usr/bin/chromium the browser test is skipped with the reason, except under
    CI=true, where it fails (so CI never passes without having run it)."""
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="chromium-driver"):
        require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no-chromium"):
        require_chromium()
