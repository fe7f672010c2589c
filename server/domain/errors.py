"""The domain's one error for a value that breaks a rule, naming the field it came from.

Pure code raises it; the gRPC edge (server/rpc/errors.py) answers it as INVALID_ARGUMENT with
one ``google.rpc.ErrorInfo`` whose metadata ``field`` is ``field`` and whose message is
``"<field>: <reason>"``, exactly as if the servicer had refused the field itself.
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
