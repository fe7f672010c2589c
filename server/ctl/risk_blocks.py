"""subsidyctl risk block|unblock|blocks: the operator's block lists (issue 14, section 1).

    subsidyctl risk block KIND SUBJECT --reason TEXT [--until YYYY-MM-DDTHH:MM:SS (UTC)]
    subsidyctl risk unblock KIND SUBJECT
    subsidyctl risk blocks [--kind KIND]

KIND is consumer, device, merchant, terminal or partner-app. Like the rest of ``risk`` they talk
to PostgreSQL directly, and publish the blocks in force to Redis before returning, so a block
is effective on every gateway at once (storage/postgres/risk_blocks.py). The operator is
--operator or SUBSIDYCTL_OPERATOR; each change is audited under a fresh request id, or
``--request-id`` to retry one exactly. The commands join the ``risk`` group when
server/ctl/risk.py imports this module. Exit status: 0 done, 1 NOT_FOUND (unblocking a subject
that is not blocked) or an idempotency conflict, 2 bad usage, 3 PostgreSQL or Redis unavailable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import click
from redis.asyncio import Redis

from server import logs
from server.ctl.common import (
    ConfigurationError,
    check_services,
    emit_document,
    format_table,
    guarded,
    json_option,
    local_config,
    new_request_id,
    options,
)
from server.ctl.risk import _operator, request_id_option, risk
from server.domain.blocks import KINDS, canonical_subject, check_reason
from server.domain.errors import IdempotencyConflict, InvalidField, NotFound
from storage.postgres import risk_blocks
from storage.postgres.actions import Action
from storage.postgres.risk_blocks import Block
from storage.redis.keys import Keys

T = TypeVar("T")
KIND_CHOICES = [kind.lower().replace("_", "-") for kind in KINDS]


def _kind(value: str) -> str:
    return value.upper().replace("-", "_")


def _with_services(body: Callable[[asyncpg.Connection, Redis, Keys], Awaitable[T]]) -> T:
    config, recorded = local_config()
    logs.configure(config.log_level)
    check_services(config, recorded)

    async def go() -> T:
        connection = await asyncpg.connect(config.pg_dsn, timeout=10)
        redis = Redis.from_url(config.redis_url, socket_timeout=10)
        try:
            return await body(connection, redis, Keys(config.redis_prefix))
        finally:
            await connection.close()
            await redis.aclose()

    try:
        return guarded(lambda: asyncio.run(go()))
    except NotFound as error:
        raise click.ClickException(f"NOT_FOUND: {error}") from None
    except IdempotencyConflict as error:
        raise click.ClickException(f"ALREADY_EXISTS (IDEMPOTENCY_CONFLICT): {error}") from None


def _document(block: Block) -> dict[str, Any]:
    return {
        "kind": block.kind,
        "subject_id": block.subject_id,
        "reason": block.reason,
        "expires_at": block.expires_at.isoformat() if block.expires_at else "",
        "created_by": block.created_by,
        "created_at": block.created_at.isoformat(),
    }


def _action(method: str, kind: str, subject: str, payload: str, request_id: str | None) -> Action:
    return Action(_operator(), request_id or new_request_id(), method, "block", f"{kind}:{subject}", payload)


@risk.command(short_help="Block a consumer, device, merchant, terminal or partner app.")
@click.argument("kind", type=click.Choice(KIND_CHOICES))
@click.argument("subject")
@click.option("--reason", required=True, help="why (1-500 characters; kept with the block and audited)")
@click.option(
    "--until", "until", type=click.DateTime(), help="expiry (ISO time, UTC unless it says; default: until lifted)"
)
@request_id_option
@json_option
def block(kind: str, subject: str, reason: str, until: datetime | None, request_id: str | None) -> None:
    """Block SUBJECT (a consumer key, a device serial, or a merchant, terminal or partner app id):
    Authorize and ClaimQualification decline it from now on, on every gateway."""
    name = _kind(kind)
    try:
        subject_id = canonical_subject(name, subject, "SUBJECT")
        why = check_reason(reason, "--reason")
    except InvalidField as error:
        raise ConfigurationError(str(error)) from None
    expires_at = None
    if until is not None:
        expires_at = until.replace(tzinfo=UTC)
        if expires_at <= datetime.now(UTC):
            raise ConfigurationError("--until must lie in the future")
    payload = f"{name}|{subject_id}|{why}|{expires_at.isoformat() if expires_at else ''}"
    action = _action("AddBlock", name, subject_id, payload, request_id)

    async def go(connection: asyncpg.Connection, redis: Redis, keys: Keys) -> Block:
        added = await risk_blocks.add(connection, action, name, subject_id, why, expires_at)
        await risk_blocks.publish(connection, redis, keys)
        return added

    emit_document(_document(_with_services(go)))


@risk.command(short_help="Lift a block.")
@click.argument("kind", type=click.Choice(KIND_CHOICES))
@click.argument("subject")
@request_id_option
@json_option
def unblock(kind: str, subject: str, request_id: str | None) -> None:
    """Lift SUBJECT's block at once on every gateway (exit 1, NOT_FOUND, when it has none)."""
    name = _kind(kind)
    try:
        subject_id = canonical_subject(name, subject, "SUBJECT")
    except InvalidField as error:
        raise ConfigurationError(str(error)) from None
    action = _action("RemoveBlock", name, subject_id, f"{name}|{subject_id}", request_id)

    async def go(connection: asyncpg.Connection, redis: Redis, keys: Keys) -> Block:
        removed = await risk_blocks.remove(connection, action, name, subject_id)
        await risk_blocks.publish(connection, redis, keys)
        return removed

    emit_document(_document(_with_services(go)))


@risk.command(short_help="The blocks in force.")
@click.option("--kind", type=click.Choice(KIND_CHOICES), help="only this kind")
@json_option
def blocks(kind: str | None) -> None:
    """The blocks in force (not lifted, not expired), newest first."""

    async def go(connection: asyncpg.Connection, _redis: Redis, _keys: Keys) -> list[Block]:
        return await risk_blocks.list_in_force(connection, _kind(kind) if kind else None)

    rows = [_document(item) for item in _with_services(go)]
    if options().json_output:
        emit_document(rows)
    else:
        click.echo(format_table(rows) if rows else "no blocks")
