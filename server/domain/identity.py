"""Consumer identity at the edge (issue 6 groundwork): pure functions, no I/O.

Partner apps do the real-name check; the raw ID number crosses the wire once and is turned
here into a **consumer key** = HMAC-SHA256(programme key, normalised ID number), the only
identifier the gateway keeps. The same programme key at every service provider makes
cross-provider duplicate checks possible without exchanging ID numbers. The raw number is
never stored or logged; a masked form may be kept for support.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import date

ID_PATTERN = re.compile(r"^[1-9][0-9]{16}[0-9X]\Z")
# GB 11643-1999: weights of the first 17 digits, and the check character by sum mod 11.
WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
CHECK_CHARACTERS = "10X98765432"
PHONE_PATTERN = re.compile(r"^1[3-9][0-9]{9}\Z")
PROGRAMME_KEY_BYTES_MIN = 32


class IdentityError(ValueError):
    """An ID number that cannot be a resident's; the message never repeats the number."""


def normalise_id_number(raw: str) -> str:
    """Upper-case X, no surrounding or inner spaces (as typed on a phone)."""
    return raw.replace(" ", "").strip().upper()


def check_digit(first_seventeen: str) -> str:
    return CHECK_CHARACTERS[
        sum(int(digit) * weight for digit, weight in zip(first_seventeen, WEIGHTS, strict=True)) % 11
    ]


def validate_id_number(raw: str, today: date | None = None) -> str:
    """The normalised 18-character resident ID number, or IdentityError: shape, a real birth
    date not in the future, and the GB 11643 check character."""
    number = normalise_id_number(raw)
    if not ID_PATTERN.match(number):
        raise IdentityError("must be 18 characters: 17 digits and a digit or X")
    try:
        born = date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError as error:
        raise IdentityError("the birth date in it is not a date") from error
    if born > (today or date.today()) or born.year < 1900:
        raise IdentityError("the birth date in it is impossible")
    if check_digit(number[:17]) != number[17]:
        raise IdentityError("the check character does not match")
    return number


def consumer_key(programme_key: bytes, id_number: str) -> str:
    """HMAC-SHA256 of the normalised ID number under the programme key, lowercase hex (the
    ``consumer_key`` of AuthorizeRequest)."""
    if len(programme_key) < PROGRAMME_KEY_BYTES_MIN:
        raise ValueError(f"the programme key must be at least {PROGRAMME_KEY_BYTES_MIN} bytes")
    return hmac.new(programme_key, validate_id_number(id_number).encode(), hashlib.sha256).hexdigest()


def mask_id_number(id_number: str) -> str:
    """``330***********123X``: region prefix and last four only."""
    number = normalise_id_number(id_number)
    return number[:3] + "*" * (len(number) - 7) + number[-4:]


def mask_phone(phone: str) -> str:
    """``138****5678``."""
    if not PHONE_PATTERN.match(phone):
        raise IdentityError("must be an 11-digit mainland mobile number")
    return phone[:3] + "****" + phone[-4:]


def phone_digest(programme_key: bytes, phone: str) -> str:
    """HMAC-SHA256 of the phone number under the programme key: what stands for the number in
    a claim's idempotency hash, so that a stored hash is no way to brute-force it."""
    return hmac.new(programme_key, phone.encode(), hashlib.sha256).hexdigest()
