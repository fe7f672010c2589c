"""A short session against a running gateway: authorize, capture, read back, refund; then a
consumer claims a voucher in a partner app and redeems it at the till.

    python -m subsidy_client.demo [--credentials .keys/credentials.json] [--certs .certs [--mtls]]

Uses the first terminal and partner app in the credentials file written by ``make run`` and
the demo campaigns of examples/demo.yaml.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import secrets
import sys
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from subsidy_client import AuthorizationClient, Line, QualificationClient, TlsConfig
from subsidy_client.errors import DeadlineExceeded, SubsidyError, Unavailable
from subsidy_client.v1 import authorization_pb2 as pb
from subsidy_client.v1 import common_pb2
from subsidy_client.v1 import qualification_pb2 as qpb

DEMO_PROGRAMME_KEY = b"demo-programme-key-not-for-production"
# Written by make run, beside the data directory rather than in it.
DEFAULT_CREDENTIALS = Path(".keys/credentials.json")


def demo_consumer_key() -> str:
    """A fresh consumer key each run, so the per-person limit never blocks the demo."""
    return hmac.new(DEMO_PROGRAMME_KEY, secrets.token_bytes(16), hashlib.sha256).hexdigest()


def tls_settings(certs: Path | None, mutual: bool) -> Callable[[str], TlsConfig | None]:
    """Caller id -> its TLS settings: none without ``certs``; else the CA of ``subsidyctl
    dev-certs`` in ``certs``, and with ``mutual`` the caller's own certificate beside it."""

    def settings(caller_id: str) -> TlsConfig | None:
        if certs is None:
            return None
        if not mutual:
            return TlsConfig(ca_file=str(certs / "ca.pem"))
        client = certs / "clients" / caller_id
        return TlsConfig(str(certs / "ca.pem"), f"{client}.pem", f"{client}.key")

    return settings


async def run(
    credentials: dict[str, Any], target: str | None, campaign_id: str, tls: Callable[[str], TlsConfig | None]
) -> None:
    terminal_id, secret = next(iter(credentials["terminals"].items()))
    async with AuthorizationClient(
        target or credentials["target"], terminal_id, secret, tls=tls(terminal_id)
    ) as client:
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


def demo_id_number() -> str:
    """A made-up but well-formed resident ID number (a Xiaoshan region code, a birth date, a
    random sequence and the GB 11643 check character), different each run."""
    born = date(1960, 1, 1) + timedelta(days=secrets.randbelow(365 * 40))
    first = f"330109{born:%Y%m%d}{secrets.randbelow(1000):03d}"
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return first + "10X98765432"[sum(int(digit) * weight for digit, weight in zip(first, weights, strict=True)) % 11]


async def voucher(
    credentials: dict[str, Any], target: str | None, campaign_id: str, tls: Callable[[str], TlsConfig | None]
) -> None:
    partners = credentials.get("partners") or {}
    if not partners:
        print("voucher:   skipped (no partner app in the credentials file)")
        return
    partner_id, partner_secret = next(iter(partners.items()))
    terminal_id, terminal_secret = next(iter(credentials["terminals"].items()))
    address = target or credentials["target"]
    async with (
        QualificationClient(address, partner_id, partner_secret, tls=tls(partner_id)) as app,
        AuthorizationClient(address, terminal_id, terminal_secret, tls=tls(terminal_id)) as till,
    ):
        # The phone is at the Xiaoshan District government, as AMap reports it (GCJ-02).
        here = common_pb2.Location(
            latitude=30.177544,
            longitude=120.264720,
            coordinate_system=common_pb2.COORDINATE_SYSTEM_GCJ02,
            accuracy_m=15,
        )
        claimed = await app.claim(
            campaign_id=campaign_id,
            category="general",
            id_number=demo_id_number(),
            location=here,
            fix_time_ms=int(time.time() * 1000),
        )
        if claimed.decision != qpb.CLAIM_DECISION_ISSUED:
            print(f"claim:     DECLINED ({qpb.ClaimDeclineReason.Name(claimed.decline_reason)})")
            return
        qualification = claimed.qualification
        print(
            f"claim:     ISSUED code={qualification.redemption_code} for {qualification.masked_id_number}"
            f" valid until {qualification.expires_at.ToDatetime():%Y-%m-%d %H:%M} UTC"
        )
        paid = await till.authorize(
            campaign_id=campaign_id,
            consumer_key=qualification.consumer_key,
            lines=[Line("1", "6901234000061", 2_580)],
            redemption_code=qualification.redemption_code,
        )
        print(
            f"redeem:    {pb.Decision.Name(paid.decision)}"
            f" subsidy={paid.subsidy_fen} fen payable={paid.payable_fen} fen"
        )
        if paid.decision == pb.DECISION_APPROVED:
            await till.capture(paid.authorization_id)
            used = await app.get(qualification.redemption_code)
            print(f"voucher:   {qpb.QualificationState.Name(used.state)}")


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when the session ran, 1 when the gateway refused a call, 2 without a
    readable credentials file, 3 when the gateway does not answer (one line on stderr)."""
    parser = argparse.ArgumentParser(
        prog="python -m subsidy_client.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--credentials", type=Path, default=DEFAULT_CREDENTIALS)
    parser.add_argument("--target", help="host:port (default: the one in the credentials file)")
    parser.add_argument("--campaign", default="demo-tradein-2026")
    parser.add_argument("--voucher-campaign", default="demo-vouchers-xiaoshan")
    parser.add_argument("--certs", type=Path, help="TLS: the folder of subsidyctl dev-certs (its ca.pem)")
    parser.add_argument("--mtls", action="store_true", help="with --certs: each caller's client certificate too")
    arguments = parser.parse_args(argv)
    if arguments.mtls and arguments.certs is None:
        parser.error("--mtls needs --certs")
    try:
        credentials = json.loads(arguments.credentials.read_text())
    except FileNotFoundError:
        print(
            f"demo: no credentials file {arguments.credentials}: start the gateway with `make run` (it writes"
            f" {DEFAULT_CREDENTIALS}), or pass --credentials",
            file=sys.stderr,
        )
        return 2
    except (OSError, ValueError) as error:
        print(f"demo: cannot read {arguments.credentials}: {error}", file=sys.stderr)
        return 2
    tls = tls_settings(arguments.certs, arguments.mtls)
    target = arguments.target or credentials.get("target", "")
    try:
        asyncio.run(run(credentials, arguments.target, arguments.campaign, tls))
        asyncio.run(voucher(credentials, arguments.target, arguments.voucher_campaign, tls))
    except (Unavailable, DeadlineExceeded) as error:
        if error.reason == "DEPENDENCY_UNAVAILABLE":
            print(f"demo: the gateway at {target} answered {error.code.name}: {error.message}", file=sys.stderr)
        else:
            print(
                f"demo: the gateway at {target} does not answer ({error.code.name}); is `make run` running?",
                file=sys.stderr,
            )
        return 3
    except SubsidyError as error:
        print(f"demo: the gateway refused a call: {error.code.name}: {error.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
