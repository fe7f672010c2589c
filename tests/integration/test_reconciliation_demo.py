"""make run's reconciliation demo (server/commands/recon_demo.py): the demo day's settlement
file is imported with exactly the four deliberate exceptions, written where the README says,
and a later make run changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import yaml

from server.commands.recon_demo import (
    DEMO_CHANNEL,
    EXTRA_SUBSIDY_FEN,
    MISMATCH_FEN,
    seed_demo_reconciliation,
)
from server.commands.report_demo import seed_demo_day
from storage.devenv import Services
from storage.postgres import reconciliation
from tests.conftest import ROOT, isolated_environment, load_document


async def test_the_demo_day_has_a_reconciliation_with_four_exceptions(services: Services, tmp_path: Path) -> None:
    async with isolated_environment(services) as env:
        await load_document(env, yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text()))
        config = env.config()
        assert await seed_demo_reconciliation(config, tmp_path) is None  # no demo day yet
        day = await seed_demo_day(config, datetime.now(UTC))
        assert day is not None
        assert await seed_demo_reconciliation(config, tmp_path) == (day, True)
        assert (tmp_path / f"demo-settlement-{day.isoformat()}.csv").exists()
        assert await seed_demo_reconciliation(config, tmp_path) == (day, False)  # later runs: a replay
        connection = await asyncpg.connect(env.pg_dsn, timeout=10)
        try:
            run = await reconciliation.current_run(connection, DEMO_CHANNEL, day)
            assert run is not None
            counts = orjson.loads(run["counts"]) if isinstance(run["counts"], str) else run["counts"]
            async with connection.transaction():
                exceptions = [line async for line in reconciliation.stream_lines(connection, run["run_id"], False)]
            assert await connection.fetchval("SELECT count(*) FROM reconciliation_runs") == 1
        finally:
            await connection.close()
        assert {status: lines for status, (lines, _) in counts.items() if status != "MATCHED"} == {
            "AMOUNT_MISMATCH": 1,
            "MISSING_IN_LEDGER": 1,
            "MISSING_IN_CHANNEL": 1,
            "DUPLICATE_IN_FILE": 1,
        }
        by_status = {line["status"]: line for line in exceptions}
        assert by_status["AMOUNT_MISMATCH"]["difference_fen"] == MISMATCH_FEN
        assert by_status["MISSING_IN_LEDGER"]["difference_fen"] == EXTRA_SUBSIDY_FEN
        assert by_status["MISSING_IN_CHANNEL"]["difference_fen"] < 0
        assert by_status["DUPLICATE_IN_FILE"]["kind"] == "REFUND"
        assert counts["MATCHED"][0] > 100
