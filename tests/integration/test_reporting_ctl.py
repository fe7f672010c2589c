"""subsidyctl reporting reconcile | lag: the ledger's reconciliation and lag asked of the gateway
(ReportingService) with an operator's credential, for an operator without database access."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from subsidy_client import AuthorizationClient, Line, RetryPolicy

from server.ctl import main as subsidyctl
from storage.devenv import Services
from tests.conftest import consumer_key, isolated_environment, running_gateway, serial


async def invoke(arguments: list[str]) -> Any:
    """subsidyctl runs its own event loop; run it in a thread so this test's loop keeps serving."""
    return await asyncio.to_thread(CliRunner().invoke, subsidyctl, arguments)


async def test_reporting_reconcile_and_lag_over_the_gateway(services: Services, tmp_path: Path) -> None:
    """A fresh deployment reconciles clean (exit 0, no differences, no backlog) as a table and
    as JSON; after one approved Authorize whose event no writer has taken, reconcile reports
    the backlog as a finding (exit 1) and lag shows the event in the stream, no dead letters."""
    async with isolated_environment(services) as env, running_gateway(env.config()) as gateway:
        target = f"127.0.0.1:{gateway.port}"
        credentials = tmp_path / "credentials.json"
        credentials.write_text(
            json.dumps({"target": target, "operators": {"op-auditor": env.credentials["op-auditor"]}})
        )
        base = ["--credentials", str(credentials)]

        clean = await invoke([*base, "reporting", "reconcile"])
        assert clean.exit_code == 0, clean.output
        assert "no differences" in clean.output and "ledger backlog: 0 events" in clean.output
        clean_json = await invoke([*base, "--json", "reporting", "reconcile"])
        assert clean_json.exit_code == 0, clean_json.output
        none = {"backlog": "0", "dead_letters": "0"}
        assert json.loads(clean_json.output) == {
            "differences": [],
            "ledger_backlog": "0",
            "qualification_mirror": none,
            "risk_events": none,
            "sweeper": {
                "overdue_holds": "0",
                "overdue_qualifications": "0",
                "set_aside_holds": "0",
                "set_aside_qualifications": "0",
            },
        }

        terminal = AuthorizationClient(target, "t-main-01", env.credentials["t-main-01"], retry=RetryPolicy(1))
        try:
            answer = await terminal.authorize(
                campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", "6970000000017", 300_000, serial())]
            )
        finally:
            await terminal.close()
        assert answer.decision == 1

        behind = await invoke([*base, "reporting", "reconcile"])
        assert behind.exit_code == 1, behind.output
        assert "ledger backlog: 1 events" in behind.output
        lag = await invoke([*base, "reporting", "lag", "--json"])
        assert lag.exit_code == 0, lag.output
        status = json.loads(lag.output)
        assert (status["stream_length"], status["dead_letters"]) == ("1", "0")


async def test_reporting_refuses_a_terminal_credential(services: Services, tmp_path: Path) -> None:
    """A terminal's credential in the operators' place is refused by the gateway: exit 1 and
    PERMISSION_DENIED, nothing else printed as a result."""
    async with isolated_environment(services) as env, running_gateway(env.config()) as gateway:
        credentials = tmp_path / "credentials.json"
        credentials.write_text(
            json.dumps(
                {"target": f"127.0.0.1:{gateway.port}", "operators": {"t-main-01": env.credentials["t-main-01"]}}
            )
        )
        refused = await invoke(["--credentials", str(credentials), "reporting", "lag"])
        assert refused.exit_code == 1 and "PERMISSION_DENIED" in refused.output, refused.output
