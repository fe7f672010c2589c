"""A short session against a running gateway: authorize, capture, read back, refund.

    python -m subsidy_client.demo [--credentials .data/credentials.json]

Uses the first terminal in the credentials file written by ``make run`` and the demo
campaign of examples/demo.yaml.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import secrets
from pathlib import Path
from typing import Any

from subsidy_client import AuthorizationClient, Line
from subsidy_client.v1 import authorization_pb2 as pb

DEMO_PROGRAMME_KEY = b"demo-programme-key-not-for-production"


def demo_consumer_key() -> str:
    """A fresh consumer key each run, so the per-person limit never blocks the demo."""
    return hmac.new(DEMO_PROGRAMME_KEY, secrets.token_bytes(16), hashlib.sha256).hexdigest()


async def run(credentials: dict[str, Any], target: str | None, campaign_id: str) -> None:
    terminal_id, secret = next(iter(credentials["terminals"].items()))
    async with AuthorizationClient(target or credentials["target"], terminal_id, secret) as client:
        serial = "SN" + secrets.token_hex(6).upper()
        response = await client.authorize(
            campaign_id=campaign_id,
            consumer_key=demo_consumer_key(),
            lines=[Line("1", "6901234000016", 459_900, serial)],
        )
        print(f"authorize: {pb.Decision.Name(response.decision)}", end="")
        if response.decision != pb.DECISION_APPROVED:
            print(f" ({pb.DeclineReason.Name(response.decline_reason)})")
            return
        print(
            f" id={response.authorization_id} price={response.total_price_fen} fen"
            f" subsidy={response.subsidy_fen} fen payable={response.payable_fen} fen"
        )
        captured = await client.capture(response.authorization_id)
        print(f"capture:   {pb.AuthorizationState.Name(captured.authorization.state)}")
        read = await client.get_authorization(response.authorization_id)
        print(f"get:       {pb.AuthorizationState.Name(read.state)} subsidy={read.subsidy_fen} fen")
        refunded = await client.refund(response.authorization_id)
        print(
            f"refund:    {pb.AuthorizationState.Name(refunded.authorization.state)}"
            f" returned {refunded.refunded_subsidy_fen} fen to the budget"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--credentials", type=Path, default=Path(".data/credentials.json"))
    parser.add_argument("--target", help="host:port (default: the one in the credentials file)")
    parser.add_argument("--campaign", default="demo-tradein-2026")
    arguments = parser.parse_args()
    asyncio.run(run(json.loads(arguments.credentials.read_text()), arguments.target, arguments.campaign))


if __name__ == "__main__":
    main()
