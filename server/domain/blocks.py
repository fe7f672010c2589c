"""The operator's block lists: what may be blocked and how each subject is written (pure rules)."""

from __future__ import annotations

import re

from server.domain.errors import InvalidField
from server.domain.reference import IDENTIFIER
from server.domain.validation import canonical_consumer_key, canonical_serial

KINDS = ("CONSUMER", "DEVICE", "MERCHANT", "TERMINAL", "PARTNER_APP")
REASON_CHARACTERS_MAX = 500
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def canonical_subject(kind: str, subject_id: str, field: str = "subject_id") -> str:
    """The subject as the hot path names it: a consumer key in lower-case hex, a device serial
    upper case (Authorize compares serials without regard to case), ids as they are."""
    if kind == "CONSUMER":
        return canonical_consumer_key(subject_id, field)
    if kind == "DEVICE":
        return canonical_serial(subject_id, field)
    if kind in ("MERCHANT", "TERMINAL", "PARTNER_APP"):
        if not IDENTIFIER.fullmatch(subject_id):
            raise InvalidField(field, "must be an id of 1-64 characters of [A-Za-z0-9_.-]")
        return subject_id
    raise InvalidField("kind", f"must be one of {', '.join(KINDS)}")


def check_reason(reason: str, field: str = "reason") -> str:
    text = reason.strip()
    if not 1 <= len(text) <= REASON_CHARACTERS_MAX or CONTROL.search(text):
        raise InvalidField(field, f"must be 1-{REASON_CHARACTERS_MAX} characters without control characters")
    return text
