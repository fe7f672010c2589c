"""Merchants, stores and terminals: the pure checks of their fields (server/services/merchants.py
applies them to the messages; each raises ``InvalidField`` naming the field).

The unified social credit code (统一社会信用代码, GB 32100-2015) is 18 characters from a
31-character alphabet without I, O, S, V and Z; the last is a check character, the mod-31
weighted sum of the first 17 with weights 3^i mod 31.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from server.domain.errors import InvalidField
from server.domain.reference import CATEGORY, IDENTIFIER

NAME_LENGTH_MAX = 200
ADDRESS_LENGTH_MAX = 500
REASON_LENGTH_MAX = 500
SHOP_URL_LENGTH_MAX = 2048
CATEGORIES_MAX = 64
PLATFORM = re.compile(r"^[a-z0-9_.-]{1,32}\Z")

LICENCE_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
LICENCE_WEIGHTS = tuple(pow(3, index, 31) for index in range(17))


def licence_check_character(first_seventeen: str) -> str:
    total = sum(
        LICENCE_ALPHABET.index(character) * weight
        for character, weight in zip(first_seventeen, LICENCE_WEIGHTS, strict=True)
    )
    return LICENCE_ALPHABET[(31 - total % 31) % 31]


def is_valid_licence_number(value: str) -> bool:
    if len(value) != 18 or any(character not in LICENCE_ALPHABET for character in value):
        return False
    return licence_check_character(value[:17]) == value[17]


def check_licence_number(value: str, field: str) -> None:
    if not is_valid_licence_number(value):
        raise InvalidField(
            field,
            "must be an 18-character unified social credit code (GB 32100-2015) with a valid check character",
        )


def check_identifier(value: str, field: str) -> None:
    if not value:
        raise InvalidField(field, "is required")
    if not IDENTIFIER.match(value):
        raise InvalidField(field, "must be 1-64 characters of [A-Za-z0-9_.-]")


def check_text(value: str, field: str, length_max: int, *, required: bool = True) -> None:
    if required and not value.strip():
        raise InvalidField(field, "is required")
    if len(value) > length_max:
        raise InvalidField(field, f"must be at most {length_max} characters")
    if not value.isprintable():
        raise InvalidField(field, "must be printable text on one line")


def check_categories(categories: Sequence[str], field: str) -> None:
    if len(categories) > CATEGORIES_MAX:
        raise InvalidField(field, f"at most {CATEGORIES_MAX} categories")
    for index, category in enumerate(categories):
        if not CATEGORY.match(category):
            raise InvalidField(f"{field}[{index}]", f"must match {CATEGORY.pattern}")
        if category in categories[:index]:
            raise InvalidField(f"{field}[{index}]", "is repeated")


def check_accuracy(accuracy_m: float, field: str) -> None:
    """A physical store's stated accuracy: a radius in metres, 0 when surveyed exactly."""
    if not math.isfinite(accuracy_m) or accuracy_m < 0:
        raise InvalidField(field, "must be a finite number of metres, 0 or more")


def check_platform(value: str, field: str) -> None:
    if not PLATFORM.match(value):
        raise InvalidField(field, "must name the platform: 1-32 characters of [a-z0-9_.-], e.g. jd")


def check_shop_url(value: str, field: str) -> None:
    check_text(value, field, SHOP_URL_LENGTH_MAX)
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidField(field, "must be an https:// URL of the shop")
