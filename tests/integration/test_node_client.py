"""The Node.js example client (clients/node) against a real gateway: a partner in another
language can integrate from protos/ alone, signing requests as subsidy_client.signing does."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from server.processes.app import Application
from tests.conftest import ROOT, Environment

NODE_CLIENT = ROOT / "clients" / "node"
FRIDGE_G1 = "6970000000017"


async def run(*command: str, cwd: Path, timeout_s: float) -> tuple[int, str, str]:
    """Runs a command without blocking the event loop the in-process gateway is serving on."""
    process = await asyncio.create_subprocess_exec(
        *command, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def ensure_node_modules() -> str:
    """The path of node, after installing clients/node's locked dependencies if needed; skips
    the test when node is missing or the dependencies cannot be installed."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH")
    if (NODE_CLIENT / "node_modules").is_dir():
        return node
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("clients/node/node_modules is missing and npm is not on PATH to run `npm ci`")
    try:
        code, _, stderr = await run(npm, "ci", "--no-audit", "--no-fund", cwd=NODE_CLIENT, timeout_s=300)
    except TimeoutError:
        pytest.skip("clients/node/node_modules is missing and `npm ci` did not finish within 300 s")
    if code != 0:
        pytest.skip(f"clients/node/node_modules is missing and `npm ci` failed: {stderr.strip()[-500:]}")
    return node


@pytest.mark.timeout(420)
async def test_node_demo_authorizes_captures_and_reads_back(
    environment: Environment, gateway: Application, tmp_path: Path
) -> None:
    node = await ensure_node_modules()
    credentials = tmp_path / "credentials.json"
    credentials.write_text(
        json.dumps(
            {
                "target": f"127.0.0.1:{gateway.port}",
                "terminals": {"t-main-01": environment.credentials["t-main-01"]},
            }
        )
    )

    code, stdout, stderr = await run(
        node, "demo.js", str(credentials), "c-main", FRIDGE_G1, "300000", cwd=NODE_CLIENT, timeout_s=60
    )

    assert code == 0, f"demo.js failed:\n{stdout}\n{stderr}"
    steps = {line["step"]: line for line in map(json.loads, stdout.splitlines())}
    assert steps["authorize"]["decision"] == "DECISION_APPROVED"
    assert steps["authorize"]["subsidy_fen"] == 60_000
    assert steps["authorize"]["payable_fen"] == 240_000
    assert steps["capture"]["state"] == "AUTHORIZATION_STATE_CAPTURED"
    assert steps["get"]["state"] == "AUTHORIZATION_STATE_CAPTURED"
    assert steps["get"]["subsidy_fen"] == 60_000


@pytest.mark.timeout(420)
async def test_node_partner_app_claims_a_voucher_that_a_till_redeems(
    environment: Environment, gateway: Application, tmp_path: Path
) -> None:
    node = await ensure_node_modules()
    credentials = tmp_path / "credentials.json"
    credentials.write_text(
        json.dumps(
            {
                "target": f"127.0.0.1:{gateway.port}",
                "terminals": {"t-main-01": environment.credentials["t-main-01"]},
                "partners": {"p-wallet-01": environment.credentials["p-wallet-01"]},
            }
        )
    )

    code, stdout, stderr = await run(
        node, "voucher.js", str(credentials), "c-qual", "6970000000086", "3000", cwd=NODE_CLIENT, timeout_s=60
    )

    assert code == 0, f"voucher.js failed:\n{stdout}\n{stderr}"
    steps = {line["step"]: line for line in map(json.loads, stdout.splitlines())}
    assert steps["claim"]["decision"] == "CLAIM_DECISION_ISSUED"
    assert steps["claim"]["state"] == "QUALIFICATION_STATE_ISSUED"
    assert steps["redeem"] == {"step": "redeem", "decision": "DECISION_APPROVED", "subsidy_fen": 500}
    assert steps["get"]["state"] == "QUALIFICATION_STATE_RESERVED"
    assert steps["get"]["authorization_id"]
    assert steps["capture"]["state"] == "QUALIFICATION_STATE_REDEEMED"


INVALID_FIELD_SCRIPT = """
const { createClient } = require('./subsidy-client.js');
const [target, terminalId, secret] = process.argv.slice(1);
const client = createClient({ target, terminalId, secret, tls: null });
client
  .authorize({ campaign_id: 'c-main', consumer_key: 'ab'.repeat(32),
               lines: [{ line_id: '1', gtin: '6970000000018', price_fen: 1000 }] })
  .then(() => { console.log(JSON.stringify({ answered: true })); })
  .catch((error) => {
    const { name, codeName, reason, field, fieldViolations, metadata } = error;
    console.log(JSON.stringify({ name, codeName, reason, field, fieldViolations, metadata }));
  })
  .finally(() => client.close());
"""


async def test_node_client_errors_carry_the_reason_and_the_invalid_field(
    environment: Environment, gateway: Application
) -> None:
    """An invalid Authorize (a GTIN whose check digit is wrong) rejects with a SubsidyError
    whose reason is the ErrorInfo's and whose field and fieldViolations come from the standard
    google.rpc.BadRequest, as the Python client's field_violations do."""
    node = await ensure_node_modules()
    code, stdout, stderr = await run(
        node,
        "-e",
        INVALID_FIELD_SCRIPT,
        f"127.0.0.1:{gateway.port}",
        "t-main-01",
        environment.credentials["t-main-01"],
        cwd=NODE_CLIENT,
        timeout_s=60,
    )
    assert code == 0, f"node failed:\n{stdout}\n{stderr}"
    error = json.loads(stdout)
    assert error["name"] == "SubsidyError"
    assert (error["codeName"], error["reason"]) == ("INVALID_ARGUMENT", "INVALID_FIELD")
    # The first field the gateway finds invalid (the GTIN, unless the request lacks a field
    # checked before it): the BadRequest names the same one as the ErrorInfo's metadata.
    assert error["field"] and error["field"] == error["metadata"]["field"]
    assert [violation["field"] for violation in error["fieldViolations"]] == [error["field"]]
    assert error["fieldViolations"][0]["description"]
