"""What every operator service shares: its dependencies (the lazily opened PostgreSQL pool and
the Redis store) and the start of every operator action (the caller must be an operator; the
request id is validated and the payload hashed).

The rest of an operator call is storage's (storage/postgres/actions.py): one PostgreSQL
transaction makes the change and ``record``s it (the append-only audit row with idempotency on
(operator, request_id), the reference version); after the commit ``publish_scope`` publishes the
changed objects to Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.domain import validation
from server.domain.errors import AlreadyExists, NotFound
from server.rpc.auth import OPERATOR, caller
from server.services.common import payload_hash
from storage.postgres.actions import Action
from storage.postgres.pool import LazyPool
from storage.redis.store import RedisStore


@dataclass(frozen=True)
class OperatorDeps:
    """What the operator services share: the lazily opened pool and the Redis store."""

    pool: LazyPool
    store: RedisStore


def not_found(kind: str, identifier: str) -> NotFound:
    return NotFound(kind, identifier)


def already_exists(kind: str, identifier: str) -> AlreadyExists:
    return AlreadyExists(kind, identifier)


def begin_action(method: str, request: Any, target_kind: str, target_id: str) -> Action:
    """Validates the request id and names the action; the caller must hold an operator credential."""
    identity = caller(OPERATOR)
    request.request_id = validation.check_request_id(request.request_id)
    return Action(
        identity.terminal_id, request.request_id, method, target_kind, target_id, payload_hash(method, request)
    )
