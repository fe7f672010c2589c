"""One Lua script in one slot of a Redis Cluster, acknowledged by the replicas (issue 16,
docs/scale-out.md section 3): shared by the escrow budget (escrow.py) and the consumer shards'
budget funding and transfers (shard_budget.py).

The script is sent to the slot's primary on a plain connection pipelined with ``WAIT
<replicas> <timeout>`` (so the WAIT follows the script on the same connection: the cluster
client's own pipeline may re-send commands one by one after a redirect, on other connections,
where a WAIT would vouch for nothing), and its answer counts only when WAIT says the replicas
have it. Otherwise it is re-sent, which the scripts make safe by being idempotent on their ids
(and by writing on a replay: see "A replayed answer must write" in scale-out.md). MOVED
refreshes the slot map, ASK is followed with ASKING, TRYAGAIN / CLUSTERDOWN / READONLY /
LOADING / a dead connection are retried until the deadline; then :class:`EscrowUnavailable`.

Scripts answer JSON; a refusal is an error reply starting ``ESCROW_`` (``ESCROW_CONFLICT`` for
an id reused with other values), raised as :class:`EscrowError` / :class:`EscrowConflict`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from storage.redis.cluster.nodes import NodeConnections

LUA_DIR = Path(__file__).resolve().parent / "lua"
RETRY_PAUSE_S = 0.05


class EscrowError(Exception):
    """A refused call (bad input, a conflicting reuse of an id); nothing was written."""


class EscrowConflict(EscrowError):
    """An id reused with other values (a reservation, a transfer, a shard's slice)."""


class EscrowUnavailable(RedisConnectionError):
    """The step was not acknowledged by the replicas before the deadline (the cluster is down, a
    slot has no primary, or no replica is in sync). Retrying with the same ids is safe. A
    ConnectionError, so that a gateway call meeting it answers UNAVAILABLE ("retry with the same
    request_id") like any Redis outage (storage/redis/store.py UNAVAILABLE)."""


@dataclass(frozen=True)
class LuaScript:
    """A script file of ``lua/`` with the shared library prefixed to it."""

    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str, library: str = "_escrow_lib") -> LuaScript:
        source = (LUA_DIR / f"{library}.lua").read_text() + "\n" + (LUA_DIR / f"{name}.lua").read_text()
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())


async def send_with_wait(
    nodes: NodeConnections,
    key: str,
    command: Sequence[Any],
    wait_replicas: int,
    wait_timeout_ms: int,
    ask: tuple[str, int] | None = None,
) -> tuple[Any, Any]:
    """One attempt: ``command`` on the primary of ``key``'s slot (or the node an ASK named, after
    ASKING) pipelined with ``WAIT`` on the same plain connection. Returns the command's reply and
    WAIT's, each possibly an exception (``raise_on_error=False``); a dead connection raises."""
    client = nodes.at(*ask) if ask else await nodes.for_key(key)
    async with client.pipeline(transaction=False) as pipe:
        if ask:
            pipe.execute_command("ASKING")
        pipe.execute_command(*command)
        pipe.execute_command("WAIT", wait_replicas, wait_timeout_ms)
        replies = await pipe.execute(raise_on_error=False)
    return replies[-2], replies[-1]


def not_run(reply: Any) -> str | None:
    """Why a reply says the command did not run and may be sent again (``noscript``, ``ask``,
    MOVED / CLUSTERDOWN / TRYAGAIN, a node that is READONLY, LOADING or MASTERDOWN), else None."""
    if isinstance(reply, NoScriptError):
        return "noscript"
    if isinstance(reply, AskError) and not isinstance(reply, MovedError):
        return "ask"
    if isinstance(reply, (MovedError, ClusterDownError, TryAgainError)):
        return type(reply).__name__
    if isinstance(reply, ResponseError) and str(reply).startswith(("READONLY", "LOADING", "MASTERDOWN")):
        return str(reply).split()[0]
    return None


async def run_acked(
    nodes: NodeConnections,
    script: LuaScript,
    keys: Sequence[str],
    args: Sequence[str | int],
    *,
    wait_replicas: int,
    wait_timeout_ms: int,
    deadline_s: float,
    retried: dict[str, int],
    label: str,
) -> dict[str, Any]:
    """Run ``script`` on the primary of ``keys[0]``'s slot with WAIT on the same connection,
    following MOVED / ASK and retrying until the replicas acknowledged it or the deadline
    passed. ``retried`` counts why calls were retried (for tests and metrics); ``label`` names
    the call in errors."""
    deadline = time.monotonic() + deadline_s
    ask: tuple[str, int] | None = None
    use_eval = False
    last = "no attempt"

    def count(reason: str) -> None:
        retried[reason] = retried.get(reason, 0) + 1

    while time.monotonic() < deadline:
        try:
            command = (
                ("EVAL", script.source, len(keys), *keys, *args)
                if use_eval
                else ("EVALSHA", script.sha, len(keys), *keys, *args)
            )
            reply, acked = await send_with_wait(nodes, keys[0], command, wait_replicas, wait_timeout_ms, ask)
            ask = None
            reason = not_run(reply)
            if reason == "noscript":
                count(reason)
                use_eval = True  # a promoted replica's script cache may be empty
                continue
            if reason == "ask":
                count(reason)
                ask = (reply.host, int(reply.port))  # the slot is migrating: follow it once
                continue
            if reason is not None:
                last = f"{type(reply).__name__}: {reply}"
                count(reason)
                if reason != "TryAgainError":  # TRYAGAIN: keys split by a migration
                    await nodes.refresh_map()
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            if isinstance(reply, ResponseError):
                text = str(reply)
                if text.startswith("ESCROW_CONFLICT"):
                    raise EscrowConflict(f"{label}: {text}")
                if text.startswith("ESCROW_"):
                    raise EscrowError(f"{label}: {text}")
                raise reply
            if isinstance(acked, Exception) or int(acked) < wait_replicas:
                last = f"WAIT {wait_replicas} answered {acked!r}"
                count("wait")
                await asyncio.sleep(RETRY_PAUSE_S)  # not acknowledged: the same ids again
                continue
            answer: dict[str, Any] = json.loads(reply)
            return answer
        except (RedisConnectionError, RedisTimeoutError, OSError, SlotNotCoveredError) as exc:
            # The node died or is unreachable: forget its connection, learn the new map.
            last = f"{type(exc).__name__}: {exc}"
            count("connection")
            ask = None
            # The map is relearned; dead nodes' clients are not closed here: closing one closes it
            # under every concurrent call using it (see AcknowledgedScripts._relearn).
            await asyncio.sleep(RETRY_PAUSE_S * 4)
            try:
                await nodes.refresh_map()
            except (RedisConnectionError, RedisTimeoutError, OSError, ResponseError) as refresh:
                last = f"{last}; slot map refresh: {refresh}"
    raise EscrowUnavailable(f"{label} not acknowledged within {deadline_s:g} s ({last})")
