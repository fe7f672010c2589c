"""The errors the layers below the servicers raise: a value that breaks a rule (naming the
field it came from), an object that is not there or is there already, a request id reused with
another payload. They import nothing from gRPC.

The gRPC edge (server/rpc/errors.py, ``classify``) answers each with one status and one
``google.rpc.ErrorInfo``: ``InvalidField`` as INVALID_ARGUMENT with metadata ``field`` and the
message ``"<field>: <reason>"``, exactly as if the servicer had refused the field itself.
"""

from __future__ import annotations


class InvalidField(ValueError):
    """``field`` is the request's field path (``lines[0].gtin``), ``reason`` what is wrong with it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class TooManyLines(InvalidField):
    """More lines than one request may carry (its own ErrorReason, TOO_MANY_LINES)."""

    def __init__(self, field: str, maximum: int) -> None:
        super().__init__(field, f"at most {maximum} lines per request")
        self.maximum = maximum


class NotFound(LookupError):
    """No ``kind`` named ``identifier`` (the gRPC edge: NOT_FOUND, metadata kind and id)."""

    def __init__(self, kind: str, identifier: str) -> None:
        super().__init__(f"no {kind} {identifier}")
        self.kind = kind
        self.identifier = identifier


class AlreadyExists(Exception):
    """A ``kind`` named ``identifier`` exists already (ALREADY_EXISTS, metadata kind and id)."""

    def __init__(self, kind: str, identifier: str) -> None:
        super().__init__(f"{kind} {identifier} exists already")
        self.kind = kind
        self.identifier = identifier


class IdempotencyConflict(Exception):
    """The request id already acted with a different payload (ALREADY_EXISTS, IDEMPOTENCY_CONFLICT)."""

    def __init__(self) -> None:
        super().__init__("request_id was already used with a different payload")


class NotSupportedHere(Exception):
    """A request this deployment cannot serve yet (``field`` names what: on a Redis Cluster
    deployment, a line with a device serial or a redemption code: docs/scale-out.md 2.0). The gRPC
    edge: UNIMPLEMENTED with metadata ``field``; nothing was written."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
