"""Risk events into PostgreSQL: every decline by a hot-path risk rule and every flag.

authorize.lua and claim_qualification.lua append each one to the risk event stream
(``Keys.risk_events``, ``risk_event`` in _lib.lua) in the same call as the decision.
``RiskEventWriter`` runs in the ledger writer process beside the ledger writer and the
qualification mirror, as a consumer of its own group on that stream (the loop both share is
stream_consumer.py): it inserts a batch in one transaction, keyed by the stream entry id
(``ON CONFLICT DO NOTHING``), and only then acknowledges and deletes the entries. Delivery is
at least once; the entry id makes the write exactly once, so a redelivery after a crash or two
writers racing add no row.
Risk events are not money: they do not go through the ledger stream, whose every entry posts.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from storage.postgres.ledger import from_ms
from storage.postgres.stream_consumer import StreamConsumer
from storage.redis.contract import RISK_EVENT

log = logging.getLogger("subsidy.risk")
GROUP = "risk-events"

INSERT = """
INSERT INTO risk_events (stream_id, action, rule, subject_kind, subject_id, campaign_id, merchant_id,
    terminal_id, request_id, authorization_id, evidence, occurred_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12)
ON CONFLICT (stream_id) DO NOTHING
"""


def event_row(entry_id: str, raw: bytes) -> tuple[Any, ...]:
    """A stream entry as the insert's parameters; msgspec.ValidationError or DecodeError,
    OverflowError (a time out of range) or orjson.JSONEncodeError (evidence JSON cannot hold)
    when malformed."""
    event = RISK_EVENT.decode(raw)
    return (
        entry_id,
        event.action,
        event.rule,
        event.subject_kind,
        event.subject_id,
        event.campaign_id,
        event.merchant_id,
        event.terminal_id,
        event.request_id,
        event.authorization_id,
        orjson.dumps(event.evidence).decode(),
        from_ms(event.at_ms),
    )


class RiskEventWriter(StreamConsumer):
    group = GROUP
    statement = INSERT
    default_consumer = "risk-1"
    what = "the risk events"
    item = "risk event"
    log = log

    @property
    def stream(self) -> str:
        return self.keys.risk_events

    def row(self, entry_id: str, fields: dict[bytes, bytes]) -> tuple[Any, ...]:
        return event_row(entry_id, fields[b"r"])
