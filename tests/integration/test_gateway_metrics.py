"""The gateway's Prometheus metrics and /health (SUBSIDY_METRICS_LISTEN): calls by method and
status code, latency histograms, Authorize decisions by reason, rejected calls; one endpoint
for every worker of ``python -m server`` (prometheus_client's multiprocess mode)."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import pytest
from subsidy_client import AuthorizationClient, Line, RetryPolicy
from subsidy_client.errors import InvalidArgument

from tests.conftest import Environment, consumer_key, running_gateway, serial
from tests.integration.test_concurrency import free_port, server_processes

AUTHORIZE = "/subsidy.v1.AuthorizationService/Authorize"


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample (0 when absent), labels matched exactly and in any order."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return 0.0


async def calls(client: AuthorizationClient, approved: int, declined: int, invalid: int) -> None:
    for _ in range(approved):
        await client.authorize(
            campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", "6970000000017", 300_000, serial())]
        )
    for _ in range(declined):
        await client.authorize(campaign_id="c-main", consumer_key=consumer_key(), lines=[Line("1", "6970000000109", 1)])
    for _ in range(invalid):
        with pytest.raises(InvalidArgument):
            await client.authorize(campaign_id="c-main", consumer_key="nope", lines=[Line("1", "6970000000017", 1)])


async def test_gateway_metrics_count_calls_decisions_and_latency(environment: Environment) -> None:
    async with running_gateway(environment.config(metrics_listen="127.0.0.1:0")) as gateway:
        assert gateway.metrics is not None
        port = gateway.metrics.port
        _, before = await asyncio.to_thread(scrape, port)
        client = AuthorizationClient(
            f"127.0.0.1:{gateway.port}", "t-main-01", environment.credentials["t-main-01"], retry=RetryPolicy(1)
        )
        try:
            await calls(client, approved=3, declined=2, invalid=4)
        finally:
            await client.close()
        status, after = await asyncio.to_thread(scrape, port)
        assert status == 200

        def delta(name: str, **labels: str) -> float:
            return sample(after, name, **labels) - sample(before, name, **labels)

        assert delta("subsidy_grpc_calls_total", method=AUTHORIZE, code="OK") == 5
        assert delta("subsidy_grpc_calls_total", method=AUTHORIZE, code="INVALID_ARGUMENT") == 4
        assert delta("subsidy_authorize_decisions_total", decision="DECISION_APPROVED", reason="UNSPECIFIED") == 3
        assert (
            delta("subsidy_authorize_decisions_total", decision="DECISION_DECLINED", reason="PRODUCT_NOT_ELIGIBLE") == 2
        )
        assert delta("subsidy_grpc_call_seconds_count", method=AUTHORIZE) == 9
        assert (
            delta("subsidy_rejected_calls_total", method=AUTHORIZE, code="INVALID_ARGUMENT", reason="INVALID_FIELD")
            == 4
        )
        health_status, health = await asyncio.to_thread(scrape, port, "/health")
        assert health_status == 200 and '"serving":true' in health
        assert (await asyncio.to_thread(scrape, port, "/nothing"))[0] == 404
    # Stopped: the endpoint is gone.
    with pytest.raises(OSError):
        scrape(port)


async def test_one_endpoint_counts_every_worker(environment: Environment, tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    async with server_processes(
        environment, port, tmp_path / "server.log", extra_env={"SUBSIDY_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"}
    ):
        # Several connections, so that the kernel spreads them over both workers.
        clients = [
            AuthorizationClient(f"127.0.0.1:{port}", "t-main-01", environment.credentials["t-main-01"])
            for _ in range(6)
        ]
        try:
            await asyncio.gather(*(calls(client, approved=2, declined=1, invalid=0) for client in clients))
        finally:
            await asyncio.gather(*(client.close() for client in clients))
        status, text = await asyncio.to_thread(scrape, metrics_port)
        assert status == 200
        assert sample(text, "subsidy_grpc_calls_total", method=AUTHORIZE, code="OK") == 18
        assert (
            sample(text, "subsidy_authorize_decisions_total", decision="DECISION_APPROVED", reason="UNSPECIFIED") == 12
        )
