"""Masked personal data sealed at rest under this provider's local data key (issue 10, item 9).

A qualification's masked ID number (``330***********123X``) fixes 7 of the 18 characters of
the ID number; next to its consumer key = HMAC-SHA256(programme key, ID number), it lets anyone
holding the programme key, which every provider of the programme shares, find the number in
seconds (see docs/privacy.md). So masks are never stored in clear: a mask at rest is either ``""``
or a **sealed token**, AES-256-GCM under a key derived from the provider's own local data key
(``SUBSIDY_LOCAL_DATA_KEY``, never shared, not kept in the databases), bound to the field, the
redemption code and the consumer key (a token copied to another row does not open there).

Without a local data key nothing is stored (``seal`` returns ``""``); a token that does not open
(another key, tampered, a clear legacy value) reads as ``""``. Pure functions and an AEAD, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

LOCAL_DATA_KEY_BYTES_MIN = 32
# Version 1: "s1." + base64url(12-byte random nonce + AES-256-GCM ciphertext and tag), unpadded.
SEALED_PREFIX = "s1."
SEALED_PATTERN = re.compile(r"s1\.[A-Za-z0-9_-]{40,200}")
NONCE_BYTES = 12
HKDF_INFO = b"subsidy-gateway local data key v1: masked personal data at rest"
# A qualification's masks; a complaint ticket's contact phone (bound to the ticket id, passed
# where a qualification passes its redemption code).
FIELDS = ("masked_id", "masked_phone", "contact_phone")


def at_rest_form(value: str) -> bool:
    """Whether ``value`` may be stored: empty or a sealed token, never a clear mask."""
    return value == "" or SEALED_PATTERN.fullmatch(value) is not None


def derive_key(local_data_key: bytes) -> bytes:
    """The AES-256 key: HKDF-SHA256 of the configured secret (any length from 32 bytes)."""
    if len(local_data_key) < LOCAL_DATA_KEY_BYTES_MIN:
        raise ValueError(f"the local data key must be at least {LOCAL_DATA_KEY_BYTES_MIN} bytes")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(local_data_key)


class Sealer:
    """Seals and opens masks under one provider-local key; inert (stores nothing) without one."""

    def __init__(self, local_data_key: bytes = b"") -> None:
        self._aead = AESGCM(derive_key(local_data_key)) if local_data_key else None

    @property
    def enabled(self) -> bool:
        return self._aead is not None

    @staticmethod
    def _context(field: str, redemption_code: str, consumer_key: str) -> bytes:
        if field not in FIELDS:
            raise ValueError(f"unknown sealed field {field!r}")
        return f"{field}|{redemption_code}|{consumer_key}".encode()

    def seal(self, value: str, *, field: str, redemption_code: str, consumer_key: str) -> str:
        """The token to store for ``value``; ``""`` for an empty value or without a key."""
        context = self._context(field, redemption_code, consumer_key)
        if self._aead is None or not value:
            return ""
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, value.encode(), context)
        return SEALED_PREFIX + base64.urlsafe_b64encode(sealed).decode().rstrip("=")

    def open(self, stored: str, *, field: str, redemption_code: str, consumer_key: str) -> str:
        """The mask a stored token seals, or ``""`` when there is none this key can open."""
        context = self._context(field, redemption_code, consumer_key)
        if self._aead is None or SEALED_PATTERN.fullmatch(stored) is None:
            return ""
        body = stored.removeprefix(SEALED_PREFIX)
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context).decode()
        except (InvalidTag, ValueError, binascii.Error):
            return ""
