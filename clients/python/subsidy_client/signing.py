"""Terminal request signing, shared by the client and the server.

Every call carries four metadata entries:

- ``x-subsidy-terminal``: the terminal id;
- ``x-subsidy-timestamp``: Unix time in milliseconds when the call was signed;
- ``x-subsidy-nonce``: 16 to 64 characters of ``[A-Za-z0-9_-]``, never reused by a terminal;
- ``x-subsidy-signature``: lowercase hex HMAC-SHA256, keyed with the terminal's secret, of::

      <full method>\\n<terminal id>\\n<timestamp>\\n<nonce>\\n<hex SHA-256 of the request bytes>

The request bytes are exactly the serialized message sent on the wire, so any client that can
serialize a protobuf message and compute an HMAC can sign (see clients/node for JavaScript).
For client-streaming calls (catalog import) the body is empty bytes: metadata travels before
the messages, and TLS protects the stream's content.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

TERMINAL_HEADER = "x-subsidy-terminal"
TIMESTAMP_HEADER = "x-subsidy-timestamp"
NONCE_HEADER = "x-subsidy-nonce"
SIGNATURE_HEADER = "x-subsidy-signature"


def string_to_sign(method: str, terminal_id: str, timestamp_ms: int, nonce: str, body: bytes) -> bytes:
    body_digest = hashlib.sha256(body).hexdigest()
    return f"{method}\n{terminal_id}\n{timestamp_ms}\n{nonce}\n{body_digest}".encode()


def signature(secret: str, method: str, terminal_id: str, timestamp_ms: int, nonce: str, body: bytes) -> str:
    message = string_to_sign(method, terminal_id, timestamp_ms, nonce, body)
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_metadata(secret: str, method: str, terminal_id: str, body: bytes) -> tuple[tuple[str, str], ...]:
    """Fresh timestamp, nonce and signature for one attempt of one call."""
    timestamp_ms = time.time_ns() // 1_000_000
    nonce = secrets.token_urlsafe(18)
    return (
        (TERMINAL_HEADER, terminal_id),
        (TIMESTAMP_HEADER, str(timestamp_ms)),
        (NONCE_HEADER, nonce),
        (SIGNATURE_HEADER, signature(secret, method, terminal_id, timestamp_ms, nonce, body)),
    )
